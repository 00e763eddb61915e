"""FixMatch's RandAugment on tensors (CPSL's strong view): each operation's values, the recorded geometry replayed
on label and probability maps, the cut-out box, the authors' translate quirk and the kept full frame."""

from __future__ import annotations

import math

import pytest
import torch

from segadapt.data.transforms import (
    RANDAUGMENT_OPS,
    AffineRecord,
    CutoutRecord,
    EnhanceRecord,
    FlipRecord,
    RandAugmentMC,
    RotateRecord,
    apply_op,
    build_transforms,
    cutout_box,
    op_value,
    records_after_full_frame,
    replay_geometric,
    to_augmented_view,
    valid_mask,
)
from segadapt.data.transforms.randaugment import GREY, auto_contrast, equalize, posterize, sharpness, solarize
from segadapt.methods.cpsl import translate_x_by_height

IGNORE = 7  # not the Cityscapes ignore value: the padding value comes from the caller


def coordinates(height: int, width: int) -> torch.Tensor:
    """int64 ``[H, W]`` whose value encodes its own pixel, ``y * W + x``."""
    return torch.arange(height * width).view(height, width)


def test_op_values_are_fixmatch_ranges_at_magnitudes_1_to_9() -> None:
    size = (32, 64)
    low, high = ({op: op_value(op, magnitude, False, size) for op in RANDAUGMENT_OPS} for magnitude in (1, 9))
    for op in ("brightness", "color", "contrast", "sharpness"):  # v * 0.9 / 10 + 0.05: always below 1
        assert (low[op], high[op]) == pytest.approx((0.14, 0.86))
    assert (low["posterize"], high["posterize"]) == (4, 7)  # int(v * 4 / 10) + 4 bits
    assert (low["rotate"], high["rotate"]) == (3, 27)  # int(v * 3) degrees
    assert (low["solarize"], high["solarize"]) == (231, 26)  # 256 - int(v * 25.6)
    assert (low["shear_x"], high["shear_y"]) == pytest.approx((0.03, 0.27))
    assert (low["translate_x"], high["translate_x"], high["translate_y"]) == (1, 17, 8)  # int(0.03 * 64), int(0.27 * 64), int(0.27 * 32)
    assert all(low[op] is None for op in ("auto_contrast", "equalize", "identity"))
    assert op_value("rotate", 9, True, size) == -27 and op_value("translate_x", 9, True, size) == -17
    assert op_value("solarize", 9, True, size) == 26 and op_value("posterize", 9, True, size) == 7  # photometric values take no sign


def test_photometric_ops_follow_pil_on_hand_made_images() -> None:
    image = torch.tensor([0.2, 0.4, 0.6]).view(1, 1, 3).expand(3, 2, 3).clone()
    image[1] = 0.5  # a flat channel is left alone
    stretched = auto_contrast(image)
    assert torch.allclose(stretched[0, 0], torch.tensor([0.0, 0.5, 1.0])) and torch.equal(stretched[1], image[1])

    levels = torch.tensor([128, 200, 15, 255]).view(1, 1, 4).expand(3, 1, 4) / 255.0
    assert torch.equal(posterize(levels, 4)[0, 0] * 255, torch.tensor([128.0, 192.0, 0.0, 240.0]))
    assert torch.allclose(solarize(levels, 128)[0, 0] * 255, torch.tensor([127.0, 55.0, 15.0, 0.0]))

    # equalize: PIL's table, step = (4 - 1) // 255 = 0 on 4 pixels leaves the image; on 512 pixels of two levels it spreads them
    assert torch.equal(equalize(levels), levels)
    two = torch.cat([torch.full((3, 16, 16), 10 / 255), torch.full((3, 16, 16), 20 / 255)], dim=1)
    step = (512 - 256) // 255  # 1: level 10 -> (0 + 0) // 1 = 0, level 20 -> (0 + 256) // 1 = 256, capped at 255
    assert step == 1 and torch.equal(equalize(two).unique() * 255, torch.tensor([0.0, 255.0]))

    noise = torch.rand(3, 6, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sharpness(noise, 1.0), noise)
    smooth = sharpness(noise, 0.0)  # the SMOOTH filter inside, the image on the one-pixel border
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    assert torch.allclose(smooth[0, 2, 3], (noise[0, 1:4, 2:5] * kernel).sum(), atol=1e-6)
    assert torch.equal(smooth[:, 0], noise[:, 0]) and torch.equal(smooth[:, :, -1], noise[:, :, -1])
    for op, value, expected in (("brightness", 0.5, noise * 0.5), ("identity", None, noise)):
        view = apply_op({"image": noise, "replay": []}, op, value)
        assert torch.allclose(view["image"], expected) and view["replay"] == [EnhanceRecord(op, value)]
    gray = apply_op({"image": noise, "replay": []}, "color", 0.0)["image"]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    flat = apply_op({"image": noise, "replay": []}, "contrast", 0.0)["image"]
    assert torch.allclose(flat, flat.flatten()[0].expand_as(flat))


@pytest.mark.parametrize(
    "op, value", [("translate_x", 6), ("translate_x", -5), ("translate_y", 3), ("shear_x", 0.2), ("shear_y", -0.1), ("rotate", 27)]
)
def test_recorded_geometry_moves_maps_as_pil_moves_the_image(op: str, value: float) -> None:
    """PIL's affine convention: output pixel centre (x + .5, y + .5) takes the input at the matrix's image of it."""
    height, width = 16, 24
    label = coordinates(height, width)
    view = apply_op({"image": torch.rand(3, height, width), "label": label, "replay": []}, op, value, ignore_index=IGNORE)
    (record,) = view["replay"]
    assert isinstance(record, RotateRecord if op == "rotate" else AffineRecord)
    assert record.pad_value == pytest.approx(127 / 255)
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    if op == "rotate":  # counter-clockwise about the centre, as Image.rotate
        angle = math.radians(value)
        cx, cy = width / 2, height / 2
        x_in = math.cos(angle) * (xs - cx) - math.sin(angle) * (ys - cy) + cx
        y_in = math.sin(angle) * (xs - cx) + math.cos(angle) * (ys - cy) + cy
    else:
        a, b, c, d, e, f = record.matrix
        x_in, y_in = a * xs + b * ys + c, d * xs + e * ys + f
    inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
    expected = torch.where(inside, y_in.floor().clamp(0, height - 1).long() * width + x_in.floor().clamp(0, width - 1).long(), IGNORE)
    moved = view["label"]
    away_from_edges = ((x_in - x_in.floor() - 0.5).abs() < 0.45) & ((y_in - y_in.floor() - 0.5).abs() < 0.45)  # no rounding ties
    assert torch.equal(moved[away_from_edges], expected[away_from_edges])
    assert (moved == expected).float().mean() > 0.9
    # the record replays exactly on a label map and on a probability map (the teacher's output)
    assert torch.equal(replay_geometric([record], label, "label"), moved)
    soft = torch.nn.functional.one_hot(label % 5, 5).permute(2, 0, 1).float()
    replayed = replay_geometric([record], soft, "soft")
    interior = (x_in >= 0.5) & (x_in <= width - 0.5) & (y_in >= 0.5) & (y_in <= height - 0.5)  # no blend with the padding
    assert torch.allclose(replayed.sum(0)[interior], torch.ones(()), atol=1e-5) and (replayed.sum(0)[~inside] < 1).all()


def test_translation_replays_exactly_on_a_coarser_grid() -> None:
    """A shift of 8 image pixels is 2 pixels of a stride-4 grid: the teacher's map moves as the image did."""
    view = apply_op({"image": torch.rand(3, 32, 64), "replay": []}, "translate_x", 8)
    coarse = coordinates(8, 16)
    moved = to_augmented_view(view["replay"], coarse, "label")
    assert torch.equal(moved[:, :14], coarse[:, 2:]) and (moved[:, 14:] == 255).all()
    down = apply_op({"image": torch.rand(3, 32, 64), "replay": []}, "translate_y", -4)
    assert torch.equal(to_augmented_view(down["replay"], coarse, "label")[1:], coarse[:-1])


def test_translate_quirk_moves_the_teacher_w_over_h_times_as_far() -> None:
    height, width = 16, 64
    view = apply_op({"image": torch.rand(3, height, width), "replay": []}, "translate_x", 4)
    quirk = translate_x_by_height(view["replay"])
    assert quirk[0].matrix == (1.0, 0.0, 16.0, 0.0, 1.0, 0.0)  # 4 * 64 / 16
    label = coordinates(height, width)
    assert torch.equal(replay_geometric(view["replay"], label)[:, : width - 4], label[:, 4:])
    assert torch.equal(replay_geometric(quirk, label)[:, : width - 16], label[:, 16:])
    others = [FlipRecord((height, width), True), AffineRecord((height, width), (1, 0, 0, 0, 1, 3.0), name="translate_y")]
    assert translate_x_by_height(others) == others  # vertical shifts and other steps are replayed as drawn


def test_cutout_box_is_the_authors_square_and_masked() -> None:
    generator = torch.Generator().manual_seed(3)
    boxes = [cutout_box(30, 60, 10, generator) for _ in range(200)]
    for top, left, height, width in boxes:
        assert 0 <= top and 0 <= left and top + height <= 30 and left + width <= 60
        assert height <= 11 and width <= 11  # PIL draws the far corner too: side + 1 inside the image
    assert (11, 11) in {(h, w) for _, _, h, w in boxes} and any(h < 11 for _, _, h, _ in boxes)  # the border cuts some
    view = RandAugmentMC(n=1, jitter=0.0, blur_sigma=0.0)({"image": torch.rand(3, 30, 60), "replay": []}, generator)
    cutout = view["replay"][-1]
    assert isinstance(cutout, CutoutRecord) and cutout.fill == (GREY,)
    (top, left, height, width) = cutout.boxes[0]
    assert (view["image"][:, top : top + height, left : left + width] == GREY).all()
    mask = valid_mask(view["replay"], (30, 60))
    assert not mask[top : top + height, left : left + width].any()


def test_randaugment_draws_the_authors_steps_in_order() -> None:
    generator = torch.Generator().manual_seed(0)
    seen: dict[str, set[float | None]] = {}
    flips = blurs = jitters = 0
    for _ in range(300):
        view = RandAugmentMC()({"image": torch.rand(3, 12, 18), "replay": []}, generator)
        records = view["replay"]
        names = [r.name for r in records]
        assert names[:3] == ["random_horizontal_flip", "gaussian_blur", "color_jitter"] and names[-1] == "cutout"
        assert len(records) <= 6  # at most n = 2 operations between
        flips += records[0].flipped
        blurs += records[1].sigma > 0
        jitters += records[2].brightness != 1.0
        for record in records[3:-1]:
            if isinstance(record, EnhanceRecord):
                seen.setdefault(record.op, set()).add(record.value)
            elif isinstance(record, RotateRecord):
                seen.setdefault("rotate", set()).add(abs(record.angle))
            else:
                seen.setdefault(record.name, set()).add(abs(sum(record.matrix[i] for i in (1, 2, 3, 5))))
        assert records[-1].boxes[0][2] <= 12 // 3 + 1
    assert all(90 < count < 210 for count in (flips, blurs, jitters))  # p = 0.5 each
    assert set(seen) == set(RANDAUGMENT_OPS)  # all 14, drawn with replacement, each applied with p = 0.5
    for op in ("brightness", "color", "contrast", "sharpness", "shear_x", "shear_y"):
        max_v, bias = RANDAUGMENT_OPS[op]
        assert all(min(abs(value - (v * max_v / 10 + bias)) for v in range(1, 10)) < 1e-9 for value in seen[op]), op
    assert seen["rotate"] <= {3.0 * v for v in range(1, 10)} and seen["posterize"] <= {4.0, 5.0, 6.0, 7.0}
    assert seen["translate_x"] <= {float(int(v * 0.03 * 18)) for v in range(1, 10)} and seen["solarize"] <= {
        256.0 - int(v * 25.6) for v in range(1, 10)
    }


def test_kept_full_frame_and_the_records_after_it_rebuild_the_view() -> None:
    pipeline = build_transforms(
        [
            {"name": "resize", "size": [24, 40]},
            {"name": "keep_full_frame"},
            {"name": "random_scale", "min": 0.8, "max": 1.6},
            {"name": "random_crop", "size": [16, 24]},
            {"name": "random_horizontal_flip"},
        ],
        ignore_index=IGNORE,
    )
    image = torch.rand(3, 30, 50)
    view = pipeline({"image": image, "label": coordinates(30, 50), "replay": []}, torch.Generator().manual_seed(1))
    full = view["full_image"]
    assert full.shape == (3, 24, 40)  # after the leading resize, untouched by the later steps
    after = records_after_full_frame(view["replay"])
    assert [r.name for r in after] == ["random_scale", "random_crop", "random_horizontal_flip"]
    assert torch.allclose(replay_geometric(after, full, "image"), view["image"], atol=1e-6)
    with pytest.raises(ValueError, match="keep_full_frame"):
        records_after_full_frame(after)
