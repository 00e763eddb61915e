"""Function-level parity of segadapt's RandAugment with the CPSL authors' ``data/randaugment.py`` (lslrh/CPSL 5ab8e14).

The fixture ``tests/fixtures/parity/cpsl_randaugment.npz`` (script ``tests/fixtures/parity/scripts/cpsl_randaugment.py``)
holds the authors' operations applied to one 8-bit image at magnitudes 2 and 9 (both signs for the geometric ones), their
``CutoutAbs`` from a recorded centre, and their replay ``affine_sample`` of each geometric draw on a map of pixel indices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segadapt.data.transforms import apply_cutout, apply_op, op_value, replay_geometric
from segadapt.data.transforms.randaugment import cutout_square
from segadapt.methods.cpsl import translate_x_by_height

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "parity" / "cpsl_randaugment.npz")
AUTHORS = {
    "AutoContrast": "auto_contrast", "Brightness": "brightness", "Color": "color", "Contrast": "contrast", "Equalize": "equalize",
    "Identity": "identity", "Posterize": "posterize", "Rotate": "rotate", "Sharpness": "sharpness", "ShearX": "shear_x",
    "ShearY": "shear_y", "Solarize": "solarize", "TranslateX": "translate_x", "TranslateY": "translate_y",
}  # fmt: skip
IMAGE = torch.from_numpy(FIXTURE["image"]).permute(2, 0, 1).float() / 255.0
SIZE = tuple(IMAGE.shape[-2:])
EXACT = ("equalize", "identity", "posterize", "solarize", "translate_x", "translate_y")


@pytest.mark.parametrize("key", [str(k) for k in FIXTURE["names"]])
def test_each_operation_matches_the_authors(key: str) -> None:
    name, magnitude, negative = key.split("/")
    op = AUTHORS[name]
    value = op_value(op, int(magnitude), bool(int(negative)), SIZE)  # type: ignore[arg-type]
    theirs = float(FIXTURE[f"{key}/value"])
    assert (value is None and np.isnan(theirs)) or value == pytest.approx(theirs)
    indices = torch.arange(SIZE[0] * SIZE[1]).view(SIZE)
    view = apply_op({"image": IMAGE, "label": indices, "replay": []}, op, value, ignore_index=-1)
    ours = (view["image"] * 255).round().permute(1, 2, 0).numpy()
    difference = np.abs(ours - FIXTURE[f"{key}/image"].astype(np.float64))
    if op in EXACT:  # on 8-bit levels, or whole-pixel shifts
        assert difference.max() == 0
    elif op in ("rotate", "shear_x", "shear_y"):
        # PIL's bilinear against grid_sample: the same inside; where a pixel samples within half a pixel of the image's
        # edge PIL takes the edge pixel and segadapt blends in the grey fill, so those pixels (and the rim) are left out
        blended = replay_geometric(view["replay"], torch.ones(1, *SIZE), "soft")[0] < 1 - 1e-6
        near_fill = torch.nn.functional.max_pool2d(blended.float()[None, None], 3, stride=1, padding=1)[0, 0].bool().numpy()
        assert difference[~near_fill].max() <= 1 and (~near_fill).mean() > 0.5
    else:  # float against 8-bit arithmetic: one level
        assert difference.max() <= 1
    if f"{key}/replay" in FIXTURE.files:  # the authors' label_strong_T replay of this draw
        replay = torch.from_numpy(FIXTURE[f"{key}/replay"].astype(np.int64))
        ours_replayed = replay_geometric(view["replay"], indices)
        assert torch.equal(ours_replayed, view["label"])  # the replay moves maps as the image moved
        theirs_replayed = replay.where(replay >= 0, torch.tensor(-1))  # -1: their padding
        if op == "translate_x":  # their shift is normalised by the height: only the quirk option replays it
            assert not torch.equal(ours_replayed, theirs_replayed)
            assert torch.equal(replay_geometric(translate_x_by_height(view["replay"]), indices), theirs_replayed)
        else:
            assert torch.equal(ours_replayed, theirs_replayed)


def test_cutout_matches_the_authors_box_and_fill() -> None:
    x, y = FIXTURE["cutout/centre"]
    box = cutout_square(float(x), float(y), *SIZE, min(SIZE) // 3)
    x0, y0, x1, y1 = FIXTURE["cutout/box"]
    top, left, height, width = box
    assert (left, top) == (x0, y0) and (left + width - 1, top + height - 1) == (min(x1, SIZE[1] - 1), min(y1, SIZE[0] - 1))
    ours = (apply_cutout({"image": IMAGE, "replay": []}, box)["image"] * 255).round().permute(1, 2, 0).numpy()
    assert np.array_equal(ours, FIXTURE["cutout/image"].astype(np.float64))
