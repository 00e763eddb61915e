"""The benchmark's two domains: what differs between the synthetic-looking source and the real-looking target.

Each domain is a :class:`~segadapt.data.benchmark.scene.ScenePrior` (how often and how large
things are: the label shift) and a :class:`~segadapt.data.benchmark.style.DomainStyle` (how they
look: the appearance shift). The source has flat, saturated per-class colours, hard edges, no
noise and a GTA5-like class prior (docs/datasets/gta5.md, "Class distribution"); the target a
camera look (desaturated, textured, lit, noisy, blurred), some repainted classes, an ego-vehicle
hood and a Cityscapes-like class prior (docs/datasets/cityscapes.md, "Class distribution"). The
measured shares and how the generator is tuned: docs/datasets/benchmark.md, "The two domains"
and "Calibration".
"""

from __future__ import annotations

import numpy as np

from .scene import ScenePrior
from .style import DomainStyle, Material

# --------------------------------------------------------------------------------------------
# Scene priors: how often and how large things are in each domain (the label shift).
# All lengths are in metres.
# --------------------------------------------------------------------------------------------


SOURCE_PRIOR = ScenePrior(
    horizon=(0.40, 0.50),
    focal=(0.55, 0.65),
    road_half_width=(3.0, 6.5),
    sidewalk_width=(3.0, 6.0),
    verge_width=(0.5, 3.0),
    building_height=(6.0, 16.0),
    tree_row_height=(4.0, 9.0),
    block_kinds={"building": 0.6, "vegetation": 0.2, "park": 0.2},
    barrier_kinds={"none": 0.6, "wall": 0.28, "fence": 0.12},
    grass_verge=0.5,
    mean_count={
        "car": 1.5, "parked_car": 0.5, "truck": 0.2, "bus": 0.1, "train": 0.03, "pole": 3.5,
        "tree": 1.2, "person": 1.5, "cyclist": 0.08, "motorcyclist": 0.1, "bicycle": 0.05,
    },
    object_scale=1.0,
    ego_hood=False,
)

TARGET_PRIOR = ScenePrior(
    horizon=(0.36, 0.46),
    focal=(0.5, 0.6),
    road_half_width=(3.0, 6.5),
    sidewalk_width=(2.0, 5.0),
    verge_width=(0.5, 3.5),
    building_height=(12.0, 28.0),
    tree_row_height=(7.0, 14.0),
    block_kinds={"building": 0.5, "vegetation": 0.45, "park": 0.05},
    barrier_kinds={"none": 0.70, "wall": 0.12, "fence": 0.18},
    grass_verge=0.6,
    mean_count={
        "car": 2.0, "parked_car": 1.4, "truck": 0.14, "bus": 0.12, "train": 0.07, "pole": 4.5,
        "tree": 2.0, "person": 5.0, "cyclist": 0.7, "motorcyclist": 0.35, "bicycle": 1.5,
    },
    object_scale=0.92,
    ego_hood=True,
)


# --------------------------------------------------------------------------------------------
# Appearance: what each material looks like in each domain.
# --------------------------------------------------------------------------------------------


def _m(*colors: tuple[float, float, float], jitter: float = 0.04, texture: float = 0.0) -> Material:
    return Material(tuple(colors), jitter, texture)


# The synthetic look: flat, saturated colours, every class in its own colour family.
SOURCE_MATERIALS = {
    "sky": _m((0.35, 0.65, 1.0)),
    "road": _m((0.45, 0.42, 0.55), jitter=0.03),
    "road.marking": _m((0.95, 0.95, 0.95)),
    "sidewalk": _m((0.85, 0.62, 0.62)),
    "terrain": _m((0.65, 0.9, 0.35)),
    "building": _m((0.9, 0.6, 0.3), (0.95, 0.85, 0.4), (0.8, 0.45, 0.45), (0.75, 0.7, 0.6), jitter=0.05),
    "vegetation": _m((0.15, 0.75, 0.2), jitter=0.05),
    "vegetation.trunk": _m((0.55, 0.35, 0.15)),
    "wall": _m((0.6, 0.6, 0.9)),
    "fence": _m((0.9, 0.7, 0.3)),
    "pole": _m((0.8, 0.8, 0.85)),
    "light.housing": _m((0.2, 0.2, 0.25)),
    "light.lamp": _m((1.0, 0.2, 0.1), (0.1, 1.0, 0.2), (1.0, 0.8, 0.1)),
    "sign": _m((1.0, 0.9, 0.1), (1.0, 0.3, 0.3)),
    "person.legs": _m((0.2, 0.25, 0.6), (0.3, 0.3, 0.3), jitter=0.06),
    "person.top": _m((1.0, 0.2, 0.4), (0.2, 0.8, 0.9), (1.0, 0.6, 0.1), (0.6, 0.3, 0.9), jitter=0.06),
    "person.skin": _m((1.0, 0.8, 0.65), (0.6, 0.4, 0.3)),
    "rider.helmet": _m((1.0, 1.0, 0.2), (0.2, 1.0, 1.0)),
    "rider.top": _m((0.1, 0.9, 0.5), (1.0, 0.5, 0.0), jitter=0.06),
    "car.body": _m((0.9, 0.1, 0.1), (0.1, 0.3, 0.9), (0.95, 0.95, 0.95), (0.1, 0.1, 0.1), (0.2, 0.7, 0.3), jitter=0.05),
    "car.glass": _m((0.3, 0.45, 0.6)),
    "wheel": _m((0.08, 0.08, 0.08)),
    "truck.body": _m((0.95, 0.5, 0.1), (0.5, 0.35, 0.2)),
    "bus.body": _m((0.95, 0.85, 0.1), (0.9, 0.2, 0.2)),
    "bus.glass": _m((0.3, 0.45, 0.6)),
    "train.body": _m((0.2, 0.8, 0.4)),
    "train.glass": _m((0.3, 0.45, 0.6)),
    "bicycle.body": _m((0.2, 0.4, 1.0), (1.0, 0.3, 0.6)),
    "motorcycle.body": _m((0.7, 0.1, 0.9), (0.3, 0.3, 0.3)),
    "hood": _m((0.1, 0.1, 0.12)),
}

# Materials the target repaints beyond the camera change: the classes whose look differs
# between a game and a city (cf. the classes near zero for GTA5 -> Cityscapes source-only).
TARGET_REPAINTS = {
    "vegetation": _m((0.22, 0.45, 0.2), (0.3, 0.5, 0.22), texture=0.4),
    "terrain": _m((0.55, 0.55, 0.3), texture=0.3),
    "fence": _m((0.55, 0.47, 0.35), texture=0.3),
    "sign": _m((0.15, 0.3, 0.8), (0.9, 0.9, 0.95)),
    "rider.top": _m((0.1, 0.1, 0.12), (0.85, 0.95, 0.2)),
    "train.body": _m((0.85, 0.15, 0.15)),
}


def _camera_look(materials: dict[str, Material], saturation: float, brightness: float, texture: float) -> dict[str, Material]:
    """What a real camera does to a palette: desaturate toward luminance, darken, add texture."""

    def convert(color: tuple[float, float, float]) -> tuple[float, float, float]:
        rgb = np.asarray(color)
        luminance = float(rgb @ np.asarray([0.299, 0.587, 0.114]))
        red, green, blue = (float(v) for v in np.clip((luminance + saturation * (rgb - luminance)) * brightness, 0, 1))
        return red, green, blue

    return {
        name: Material(tuple(convert(c) for c in m.colors), m.jitter, max(m.texture, texture))
        for name, m in materials.items()
    }


SOURCE_STYLE = DomainStyle(
    materials=SOURCE_MATERIALS,
    texture_cell=6.0,
    sky_gradient=0.1,
    lighting=(0.75, 1.2),
    saturation=(0.6, 1.1),
    color_cast=0.08,
    vignette=0.0,
    noise=0.01,
    blur=0.0,
    windows=0.35,
)

TARGET_STYLE = DomainStyle(
    materials={**_camera_look(SOURCE_MATERIALS, saturation=0.6, brightness=0.85, texture=0.12), **TARGET_REPAINTS},
    texture_cell=3.0,
    sky_gradient=0.25,
    lighting=(0.7, 1.15),
    saturation=(0.8, 1.0),
    color_cast=0.08,
    vignette=0.3,
    noise=0.02,
    blur=0.5,
    windows=0.5,
)

_DOMAINS = {"source": (SOURCE_PRIOR, SOURCE_STYLE), "target": (TARGET_PRIOR, TARGET_STYLE)}
"""Domain name -> (layout prior, appearance style), as the generator draws each image."""
