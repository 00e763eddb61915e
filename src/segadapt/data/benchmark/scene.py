"""The benchmark's scene layout: a street seen through a pinhole camera, painted back to front.

:func:`sample_scene` draws one street from a domain's :class:`ScenePrior` (road, sidewalks,
verges, blocks of façades, trees and parks, walls and fences, then vehicles, poles, trees,
pedestrians and riders, far to near) into a :class:`_Canvas`: the label map (Cityscapes train
ids, 255 for the ego-vehicle hood) and a region map whose materials
:func:`segadapt.data.benchmark.style.render` colours. All lengths are in metres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable

import numpy as np

from ..classes import CITYSCAPES_CLASSES, IGNORE_INDEX

CLASSES = CITYSCAPES_CLASSES
_ID = {name: index for index, name in enumerate(CLASSES.names)}


@dataclass(frozen=True)
class ScenePrior:
    """The layout statistics of one domain."""

    horizon: tuple[float, float]  # horizon row, as a fraction of the image height
    focal: tuple[float, float]  # focal length, in image widths
    road_half_width: tuple[float, float]
    sidewalk_width: tuple[float, float]
    verge_width: tuple[float, float]  # between sidewalk and façades: grass or paving per block
    building_height: tuple[float, float]
    tree_row_height: tuple[float, float]
    block_kinds: dict[str, float]  # building / vegetation / park: probabilities
    barrier_kinds: dict[str, float]  # none / wall / fence in front of a block: probabilities
    grass_verge: float  # probability that a block's verge is grass (terrain)
    mean_count: dict[str, float]  # Poisson mean of each kind of object per image
    object_scale: float
    ego_hood: bool  # the bottom of the image shows the camera car's hood (ignore label)


CAMERA_HEIGHT = 1.5
MAX_DEPTH = 80.0


# --------------------------------------------------------------------------------------------
# Geometry: a painter's-algorithm canvas seen through a pinhole camera.
# --------------------------------------------------------------------------------------------


class _Canvas:
    """Label and region maps, painted back to front.

    A point ``x`` metres right of the camera axis, ``z`` metres above the ground and ``depth``
    metres ahead projects to column ``vanish_x + focal * x / depth`` and row
    ``horizon + focal * (CAMERA_HEIGHT - z) / depth``.
    """

    def __init__(self, height: int, width: int, horizon: float, vanish_x: float, focal: float) -> None:
        self.height, self.width = height, width
        self.horizon, self.vanish_x, self.focal = horizon, vanish_x, focal
        self.label = np.full((height, width), _ID["sky"], dtype=np.uint8)
        self.region = np.zeros((height, width), dtype=np.int32)
        self.materials: list[tuple[str, float]] = [("sky", 1.0)]  # (material, shade) of each region
        self.rows = np.arange(height, dtype=np.float32)[:, None] + 0.5
        self.cols = np.arange(width, dtype=np.float32)[None, :] + 0.5
        # Façade surface coordinates (height, depth) in metres for the window texture; NaN elsewhere.
        self.facade_z = np.full((height, width), np.nan, dtype=np.float32)
        self.facade_depth = np.full((height, width), np.nan, dtype=np.float32)

    def row(self, z: float, depth: float) -> float:
        return self.horizon + self.focal * (CAMERA_HEIGHT - z) / depth

    def col(self, x: float, depth: float) -> float:
        return self.vanish_x + self.focal * x / depth

    def pixels(self, metres: float, depth: float) -> float:
        return self.focal * metres / depth

    def paint(self, class_id: int, material: str, mask: np.ndarray, top: int = 0, left: int = 0, shade: float = 1.0) -> None:
        """Paint ``mask`` (a window whose corner is at ``top, left``) as a new region."""
        region_id = len(self.materials)
        self.materials.append((material, shade))
        window = (slice(top, top + mask.shape[0]), slice(left, left + mask.shape[1]))
        self.label[window][mask] = class_id
        self.region[window][mask] = region_id

    def rect(self, class_id: int, material: str, x0: float, x1: float, y0: float, y1: float, min_size: int = 1) -> None:
        """An axis-aligned rectangle in pixel coordinates, at least ``min_size`` pixels across."""
        left, top = int(math.floor(x0)), int(math.floor(y0))
        right = max(int(round(x1)), left + min_size)
        bottom = max(int(round(y1)), top + min_size)
        left, top = max(left, 0), max(top, 0)
        right, bottom = min(right, self.width), min(bottom, self.height)
        if right > left and bottom > top:
            self.paint(class_id, material, np.ones((bottom - top, right - left), dtype=bool), top, left)

    def front(self, class_id: int, material: str, x0: float, x1: float, z0: float, z1: float, depth: float, min_size: int = 1) -> None:
        """A rectangle facing the camera (the back of a car, a sign, a torso)."""
        self.rect(class_id, material, self.col(x0, depth), self.col(x1, depth), self.row(z1, depth), self.row(z0, depth), min_size)

    def disc(self, class_id: int, material: str, x: float, z: float, radius_x: float, radius_z: float, depth: float) -> None:
        """An ellipse facing the camera, centred at ``(x, z)``."""
        cx, cy = self.col(x, depth), self.row(z, depth)
        rx, ry = max(self.pixels(radius_x, depth), 0.7), max(self.pixels(radius_z, depth), 0.7)
        top, bottom = max(int(cy - ry), 0), min(int(cy + ry) + 1, self.height)
        left, right = max(int(cx - rx), 0), min(int(cx + rx) + 1, self.width)
        if right > left and bottom > top:
            mask = ((self.cols[:, left:right] - cx) / rx) ** 2 + ((self.rows[top:bottom] - cy) / ry) ** 2 <= 1.0
            self.paint(class_id, material, mask, top, left)

    def side(
        self,
        class_id: int,
        material: str,
        x: float,
        near: float,
        far: float,
        z0: float,
        z1: float | Callable[[np.ndarray], np.ndarray],
        shade: float = 1.0,
        facade: bool = False,
    ) -> None:
        """A vertical plane along the street, ``x`` metres from the axis, between two depths.

        ``z1`` may be a function of depth (the bumpy top of a tree row). Façades also record
        their surface coordinates for the window texture.
        """
        if abs(x) < 0.05:
            return
        x_near, x_far = self.col(x, near), self.col(x, far)
        left = max(int(math.floor(min(x_near, x_far))), 0)
        right = min(int(math.ceil(max(x_near, x_far))), self.width)
        if right <= left:
            return
        depth = np.clip(self.focal * x / (self.cols[0, left:right] - self.vanish_x), near, far)
        top_z = z1(depth) if callable(z1) else z1
        y_top = self.horizon + self.focal * (CAMERA_HEIGHT - top_z) / depth
        y_bottom = self.horizon + self.focal * (CAMERA_HEIGHT - z0) / depth
        mask = (self.rows >= y_top) & (self.rows < y_bottom)
        self.paint(class_id, material, mask, 0, left, shade)
        if facade:
            window = (slice(None), slice(left, right))
            z = CAMERA_HEIGHT - (self.rows - self.horizon) * depth / self.focal
            self.facade_z[window] = np.where(mask, z, self.facade_z[window])
            self.facade_depth[window] = np.where(mask, depth, self.facade_depth[window])

    def overlay(self, layer: _Canvas) -> None:
        """Paint ``layer``'s non-sky regions over this canvas, keeping their materials."""
        offset = len(self.materials) - 1
        painted = layer.region > 0
        self.materials.extend(layer.materials[1:])
        self.label[painted] = layer.label[painted]
        self.region[painted] = layer.region[painted] + offset
        self.facade_z = np.where(painted, layer.facade_z, self.facade_z)
        self.facade_depth = np.where(painted, layer.facade_depth, self.facade_depth)


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    probabilities = np.asarray([weights[name] for name in names])
    return names[rng.choice(len(names), p=probabilities / probabilities.sum())]


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """Depths: uniform in log depth, so near and far objects are equally common per octave."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


@dataclass(frozen=True)
class _Street:
    """The street's cross-section in metres, one value per side (left, right)."""

    road: tuple[float, float]
    sidewalk: tuple[float, float]
    facade: tuple[float, float]

    def kerb(self, side: int) -> float:
        """Signed lateral position of the kerb (road edge) on ``side`` (0 left, 1 right)."""
        return self.road[side] if side else -self.road[side]

    def on_sidewalk(self, side: int, fraction: float) -> float:
        """Signed lateral position ``fraction`` of the way across the sidewalk from the kerb."""
        offset = self.road[side] + fraction * self.sidewalk[side]
        return offset if side else -offset


def _paint_ground(canvas: _Canvas, street: _Street, grass_verge: Callable[[int, np.ndarray], np.ndarray], rng: np.random.Generator) -> None:
    """Road with lane markings, sidewalks and verges, below the horizon."""
    top = min(max(int(math.ceil(canvas.horizon - 0.5)) + 1, 0), canvas.height)
    depth = np.broadcast_to(canvas.focal * CAMERA_HEIGHT / (canvas.rows[top:] - canvas.horizon), (canvas.height - top, canvas.width))
    lateral = (canvas.cols - canvas.vanish_x) * depth / canvas.focal
    right = lateral > 0
    road_edge = np.where(right, street.road[1], street.road[0])
    sidewalk_edge = road_edge + np.where(right, street.sidewalk[1], street.sidewalk[0])
    distance = np.abs(lateral)
    road = distance < road_edge
    canvas.paint(_ID["road"], "road", road, top)
    if rng.random() < 0.8:  # a dashed centre line: 3 m dashes every 9 m
        centre = (street.road[1] - street.road[0]) / 2
        dashes = road & (np.abs(lateral - centre) < 0.12) & (np.mod(depth, 9.0) < 3.0)
        canvas.paint(_ID["road"], "road.marking", dashes, top)
    canvas.paint(_ID["sidewalk"], "sidewalk", ~road & (distance < sidewalk_edge), top)
    verge = distance >= sidewalk_edge
    grass = verge & np.where(right, grass_verge(1, depth), grass_verge(0, depth))
    canvas.paint(_ID["sidewalk"], "sidewalk", verge & ~grass, top)
    canvas.paint(_ID["terrain"], "terrain", grass, top)


def _paint_blocks(layer: _Canvas, street: _Street, prior: ScenePrior, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Façades, tree rows, parks and their walls and fences along both sides of the street.

    Returns, per side, the depth bounds of the blocks and whether each block's verge is grass.
    """
    layer.front(_ID["building"], "building", -street.facade[0], street.facade[1], 0.0, rng.uniform(*prior.building_height), MAX_DEPTH)
    verges, blocks = [], []
    for side in (0, 1):
        facade_x = street.facade[side] if side else -street.facade[side]
        image_edge = layer.width - layer.vanish_x if side else layer.vanish_x
        depth = 0.9 * layer.focal * street.facade[side] / max(image_edge, 1.0)  # where the façade leaves the image
        bounds, grass = [depth], []
        while depth < MAX_DEPTH:
            near, depth = depth, min(depth + rng.uniform(6.0, 20.0) * (0.5 + depth / 30.0), MAX_DEPTH)
            kind = _choice(rng, prior.block_kinds)
            grass.append(kind == "park" or rng.random() < prior.grass_verge)
            blocks.append((near, depth, kind, facade_x))
            bounds.append(depth)
        verges.append((np.asarray(bounds), np.asarray(grass, dtype=bool)))
    for near, far, kind, facade_x in sorted(blocks, key=lambda block: -block[0]):
        _paint_block(layer, kind, facade_x, near, far, prior, rng)
    return verges


def _paint_block(layer: _Canvas, kind: str, facade_x: float, near: float, far: float, prior: ScenePrior, rng: np.random.Generator) -> None:
    shade = rng.uniform(0.8, 1.0)
    if kind == "building":
        height = rng.uniform(*prior.building_height)
        layer.side(_ID["building"], "building", facade_x, near, far, 0.0, height, shade, facade=True)
    elif kind == "vegetation":
        base, amplitude = rng.uniform(*prior.tree_row_height), rng.uniform(0.5, 2.0)
        period, phase = rng.uniform(3.0, 8.0), rng.uniform(0.0, 2 * np.pi)
        layer.side(_ID["vegetation"], "vegetation", facade_x, near, far, 0.0, lambda d: base + amplitude * np.sin(d / period + phase), shade)
    else:  # a park: grass up to the façade line, bushes further back
        layer.side(_ID["vegetation"], "vegetation", facade_x * 1.8, near, far, 0.0, rng.uniform(1.5, 3.5), shade)
    barrier = _choice(rng, prior.barrier_kinds)
    if barrier != "none":
        height = rng.uniform(1.0, 2.2) if barrier == "wall" else rng.uniform(0.9, 1.6)
        layer.side(_ID[barrier], barrier, facade_x - np.sign(facade_x) * 0.3, near, far, 0.0, height, shade)


# --------------------------------------------------------------------------------------------
# Objects. Each draws itself at its depth; the caller draws them far to near.
# --------------------------------------------------------------------------------------------

# Vehicles' width, height and length in metres.
_VEHICLE_SIZE = {"car": (1.8, 1.45, 4.5), "truck": (2.4, 3.4, 8.0), "bus": (2.5, 3.1, 12.0), "train": (2.6, 3.4, 25.0)}


def _vehicle(canvas: _Canvas, kind: str, x: float, depth: float, scale: float) -> None:
    """A vehicle seen from behind: its side facing the camera axis, then its rear.

    Cars and buses have a rear window, trucks a closed cargo box; buses and trams have a band
    of side windows.
    """
    width, height, length = (size * scale for size in _VEHICLE_SIZE[kind])
    class_id = _ID[kind]
    if abs(x) > width / 2:
        inner = x - np.sign(x) * width / 2
        canvas.side(class_id, f"{kind}.body", inner, depth, depth + length, 0.15, height, shade=0.75)
        if kind in ("bus", "train"):
            canvas.side(class_id, f"{kind}.glass", inner, depth + 0.5, depth + length - 0.5, height * 0.5, height * 0.85, shade=0.75)
    left, right = x - width / 2, x + width / 2
    canvas.front(class_id, f"{kind}.body", left, right, 0.15, height, depth)
    if kind != "truck":
        glass_bottom, inset = (height * 0.55, width * 0.12) if kind == "car" else (height * 0.5, width * 0.08)
        canvas.front(class_id, f"{kind}.glass", left + inset, right - inset, glass_bottom, height * 0.9, depth)
    for wheel_left in (left, right - 0.35 * scale):
        canvas.front(class_id, "wheel", wheel_left, wheel_left + 0.35 * scale, 0.0, 0.35 * scale, depth)


def _person(canvas: _Canvas, class_id: int, x: float, depth: float, scale: float, rng: np.random.Generator, seat: float = 0.0) -> None:
    """A person facing the camera: legs, torso, head. A rider (``seat`` > 0) sits on a bike."""
    height = 1.75 * scale * rng.uniform(0.9, 1.1)
    shoulders = 0.5 * scale
    hip = seat if seat > 0 else 0.48 * height
    if seat == 0:
        canvas.front(class_id, "person.legs", x - shoulders * 0.3, x + shoulders * 0.3, 0.0, hip, depth, min_size=2)
    neck = hip + 0.36 * height
    part = "rider" if seat > 0 else "person"
    canvas.front(class_id, f"{part}.top", x - shoulders / 2, x + shoulders / 2, hip - 0.05 * height, neck, depth, min_size=2)
    head = "rider.helmet" if seat > 0 else "person.skin"
    canvas.disc(class_id, head, x, neck + 0.06 * height, 0.11 * scale, 0.12 * height, depth)


def _two_wheeler(canvas: _Canvas, kind: str, x: float, depth: float, scale: float, rng: np.random.Generator, rider: bool) -> None:
    """A bicycle or motorcycle, from behind or from the side, with or without a rider."""
    class_id = _ID[kind]
    seat = (0.85 if kind == "motorcycle" else 0.9) * scale
    if rng.random() < 0.5:  # from behind: a narrow upright shape
        width = (0.8 if kind == "motorcycle" else 0.5) * scale
        canvas.front(class_id, f"{kind}.body", x - width / 2, x + width / 2, 0.0, seat, depth, min_size=2)
    else:  # from the side: two wheels and a frame between them
        length, radius = (2.0 if kind == "motorcycle" else 1.7) * scale, (0.33 * scale)
        for wheel_x in (x - length / 2 + radius, x + length / 2 - radius):
            canvas.disc(class_id, "wheel", wheel_x, radius, radius, radius, depth)
        frame_bottom = radius if kind == "bicycle" else radius * 0.5
        canvas.front(class_id, f"{kind}.body", x - length * 0.3, x + length * 0.3, frame_bottom, seat, depth, min_size=2)
    if rider:
        _person(canvas, _ID["rider"], x, depth, scale, rng, seat=seat)


def _pole(canvas: _Canvas, x: float, depth: float, rng: np.random.Generator) -> None:
    """A pole, often carrying a traffic light (on top or on an arm over the road) and/or a sign."""
    height = rng.uniform(4.0, 6.5)
    canvas.front(_ID["pole"], "pole", x - 0.12, x + 0.12, 0.0, height, depth, min_size=2)
    fixture = rng.random()
    if fixture < 0.35:
        light_x = x - np.sign(x) * rng.choice([0.0, rng.uniform(1.5, 4.0)])
        if light_x != x:
            canvas.front(_ID["pole"], "pole", min(x, light_x), max(x, light_x), height - 0.15, height, depth)
        # Larger than real lights (0.4 x 1.0 m): at 128 x 256 pixels real-sized ones are a pixel or two wide.
        canvas.front(_ID["traffic light"], "light.housing", light_x - 0.4, light_x + 0.4, height - 1.4, height, depth, min_size=2)
        canvas.front(_ID["traffic light"], "light.lamp", light_x - 0.2, light_x + 0.2, height - 0.55, height - 0.2, depth)
    if fixture > 0.35:
        size = rng.uniform(0.7, 1.0)
        centre = rng.uniform(2.2, height - 0.3 - size)
        if rng.random() < 0.5:
            canvas.front(_ID["traffic sign"], "sign", x - size / 2, x + size / 2, centre - size / 2, centre + size / 2, depth, min_size=2)
        else:
            canvas.disc(_ID["traffic sign"], "sign", x, centre, size / 2, size / 2, depth)


def _tree(canvas: _Canvas, x: float, depth: float, rng: np.random.Generator) -> None:
    trunk = rng.uniform(2.0, 3.5)
    canvas.front(_ID["vegetation"], "vegetation.trunk", x - 0.15, x + 0.15, 0.0, trunk, depth, min_size=2)
    radius_x, radius_z = rng.uniform(1.5, 3.0), rng.uniform(1.5, 3.0)
    canvas.disc(_ID["vegetation"], "vegetation", x, trunk + radius_z * 0.7, radius_x, radius_z, depth)


def _place_objects(canvas: _Canvas, street: _Street, prior: ScenePrior, rng: np.random.Generator) -> None:
    """A Poisson number of each kind of object at random places, drawn far to near."""
    drawers: list[tuple[float, Callable[[], None]]] = []
    scale = prior.object_scale
    near = canvas.focal * CAMERA_HEIGHT / (canvas.height - canvas.horizon)  # ground depth at the bottom row

    def count(kind: str) -> range:
        return range(rng.poisson(prior.mean_count[kind]))

    def in_lane(width: float) -> float:
        return rng.uniform(-street.road[0] + width / 2, street.road[1] - width / 2)

    def add(depth: float, draw: Callable[[], None]) -> None:
        drawers.append((depth, draw))

    for kind in ("car", "truck", "bus", "train"):
        for _ in count(kind):
            x = 0.0 if kind == "train" else in_lane(_VEHICLE_SIZE[kind][0])  # trams run in the middle
            depth = _log_uniform(rng, near * (1.3 if kind == "car" else 2.5), 40.0)  # no wall-filling trucks
            add(depth, partial(_vehicle, canvas, kind, x, depth, scale))
    for _ in count("parked_car"):
        side = int(rng.integers(2))
        x, depth = street.kerb(side) * (1.0 - 1.1 / street.road[side]), _log_uniform(rng, near, 35.0)
        add(depth, partial(_vehicle, canvas, "car", x, depth, scale))
    for _ in count("pole"):
        x, depth = street.on_sidewalk(int(rng.integers(2)), rng.uniform(0.08, 0.3)), _log_uniform(rng, near, 30.0)
        add(depth, partial(_pole, canvas, x, depth, rng))
    for _ in count("tree"):
        x, depth = street.on_sidewalk(int(rng.integers(2)), rng.uniform(0.3, 0.7)), _log_uniform(rng, near, 40.0)
        add(depth, partial(_tree, canvas, x, depth, rng))
    for _ in count("person"):
        crossing = rng.random() < 0.15
        x = in_lane(0.6) if crossing else street.on_sidewalk(int(rng.integers(2)), rng.uniform(0.1, 0.95))
        depth = _log_uniform(rng, near, 16.0)
        add(depth, partial(_person, canvas, _ID["person"], x, depth, scale, rng))
    for kind, key in (("bicycle", "cyclist"), ("motorcycle", "motorcyclist")):
        for _ in count(key):
            side = int(rng.integers(2))
            x = in_lane(1.0) if kind == "motorcycle" else street.kerb(side) * (1.0 - 0.9 / street.road[side])
            depth = _log_uniform(rng, near * 1.2, 20.0)
            add(depth, partial(_two_wheeler, canvas, kind, x, depth, scale, rng, rider=True))
    for _ in count("bicycle"):
        x, depth = street.on_sidewalk(int(rng.integers(2)), rng.uniform(0.1, 0.3)), _log_uniform(rng, near, 20.0)
        add(depth, partial(_two_wheeler, canvas, "bicycle", x, depth, scale, rng, rider=False))
    for _, draw in sorted(drawers, key=lambda item: -item[0]):
        draw()


def _sides(values: Iterable[float]) -> tuple[float, float]:
    """``(left, right)`` of two values."""
    left, right = values
    return left, right


def sample_scene(height: int, width: int, prior: ScenePrior, rng: np.random.Generator) -> _Canvas:
    """Lay out one street scene: its label map and the region map the renderer colours."""
    horizon, vanish_x = height * rng.uniform(*prior.horizon), width * rng.uniform(0.38, 0.62)
    focal = width * rng.uniform(*prior.focal)
    road = _sides(float(rng.uniform(*prior.road_half_width)) for _ in range(2))
    sidewalk = _sides(float(rng.uniform(*prior.sidewalk_width)) for _ in range(2))
    facade = _sides(r + s + rng.uniform(*prior.verge_width) for r, s in zip(road, sidewalk))
    street = _Street(road, sidewalk, facade)
    # The blocks decide which verges are grass, and are painted over the ground.
    blocks = _Canvas(height, width, horizon, vanish_x, focal)
    verges = _paint_blocks(blocks, street, prior, rng)

    def grass_verge(side: int, depth: np.ndarray) -> np.ndarray:
        bounds, grass = verges[side]
        return grass[np.clip(np.searchsorted(bounds, depth) - 1, 0, len(grass) - 1)]

    canvas = _Canvas(height, width, horizon, vanish_x, focal)
    _paint_ground(canvas, street, grass_verge, rng)
    canvas.overlay(blocks)
    _place_objects(canvas, street, prior, rng)
    if prior.ego_hood:
        hood = height * rng.uniform(0.06, 0.1)
        cx, cy, rx, ry = width * rng.uniform(0.45, 0.55), height + hood * 2.0, width * 0.75, hood * 3.0
        mask = ((canvas.cols - cx) / rx) ** 2 + ((canvas.rows - cy) / ry) ** 2 <= 1.0
        canvas.paint(IGNORE_INDEX, "hood", mask)
    return canvas
