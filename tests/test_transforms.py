"""Joint transforms: exact replay of the recorded geometry, photometric ops, mixing masks, config factory."""

from __future__ import annotations

import math

import pytest
import torch

from segadapt.data.transforms import (
    BlurRecord,
    ColorJitter,
    Compose,
    CropRecord,
    Cutout,
    CutoutRecord,
    FlipRecord,
    GaussianBlur,
    JitterRecord,
    RandomCrop,
    RandomHorizontalFlip,
    RandomRotate,
    RandomScale,
    Resize,
    RotateRecord,
    ScaleRecord,
    apply_color_jitter,
    build_transforms,
    classmix_masks,
    gaussian_blur,
    gaussian_kernel,
    hsv_to_rgb,
    mix,
    replay_geometric,
    rgb_to_hsv,
    strong_augment,
    to_augmented_view,
    valid_mask,
)
from segadapt.errors import ConfigError, DataError

GEOMETRY = [
    {"name": "resize", "long_side": 60},
    {"name": "random_scale", "min": 0.5, "max": 1.5},
    {"name": "random_rotate", "min": -10, "max": 10, "p": 0.5},
    {"name": "random_crop", "size": [32, 40], "pad_value": 0.25},
    {"name": "random_horizontal_flip", "p": 0.5},
]
PHOTOMETRY = [
    {"name": "color_jitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 1.0},
    {"name": "gaussian_blur", "sigma": [0.5, 1.5], "p": 1.0},
    {"name": "cutout", "num_boxes": 2, "size": [0.1, 0.3], "p": 1.0, "erase_label": True},
]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_sample(height: int = 30, width: int = 50, seed: int = 0, num_classes: int = 6) -> dict:
    g = seeded(seed)
    label = torch.randint(0, num_classes, (height, width), generator=g)
    label[:3] = 255
    return {
        "image": torch.rand(3, height, width, generator=g),
        "label": label,
        "soft_label": torch.rand(num_classes, height, width, generator=g).softmax(0),
        "confidence": torch.rand(height, width, generator=g),
        "name": "frame_0001",
    }


# ---------------------------------------------------------------- exact replay


@pytest.mark.parametrize("seed", range(6))
def test_replaying_records_on_the_original_reproduces_every_transformed_map_bit_for_bit(seed: int) -> None:
    sample = make_sample()
    view = build_transforms(GEOMETRY + PHOTOMETRY)(sample, seeded(seed))
    records = view["replay"]
    assert [r.name for r in records] == [e["name"] for e in GEOMETRY + PHOTOMETRY]

    label = replay_geometric(records, sample["label"], "label")
    label[~valid_mask(records, sample["label"].shape)] = 255  # the cutout erased the label inside its boxes
    assert label.dtype == torch.int64 and torch.equal(label, view["label"])
    assert torch.equal(replay_geometric(records, sample["soft_label"], "soft"), view["soft_label"])
    assert torch.equal(replay_geometric(records, sample["confidence"], "soft"), view["confidence"])

    geometric_view = build_transforms(GEOMETRY)(sample, seeded(seed))
    assert torch.equal(replay_geometric(records, sample["image"], "image"), geometric_view["image"])
    assert view["image"].shape == (3, 32, 40) and view["name"] == "frame_0001"
    assert "replay" not in sample  # the input sample is not mutated


def test_small_views_are_padded_bottom_right_with_ignore_for_labels_and_zero_for_soft_maps() -> None:
    sample = make_sample(10, 12)
    view = RandomCrop((16, 20), pad_value=0.5)(sample, seeded(0))
    (record,) = view["replay"]
    assert (record.top, record.left, record.padding) == (0, 0, (6, 8))
    assert torch.equal(view["label"][:10, :12], sample["label"])
    assert (view["label"][10:] == 255).all() and (view["label"][:, 12:] == 255).all()
    assert (view["image"][:, 10:] == 0.5).all() and torch.equal(view["image"][:, :10, :12], sample["image"])
    assert (view["soft_label"][:, :, 12:] == 0).all() and (view["confidence"][10:] == 0).all()
    assert valid_mask(view["replay"], (10, 12)).sum() == 10 * 12


def test_flip_mirrors_every_map_and_twice_is_identity() -> None:
    sample = make_sample()
    flip = RandomHorizontalFlip(p=1.0)
    once = flip(sample)
    assert torch.equal(once["label"], sample["label"].flip(-1))
    assert torch.equal(once["soft_label"], sample["soft_label"].flip(-1))
    twice = flip(once)
    for key in ("image", "label", "soft_label", "confidence"):
        assert torch.equal(twice[key], sample[key])
    assert [r.flipped for r in twice["replay"]] == [True, True]
    assert RandomHorizontalFlip(p=0.0)(sample)["replay"] == [FlipRecord((30, 50), False)]


def test_scale_and_resize_output_sizes_and_nearest_labels() -> None:
    sample = make_sample(30, 50)
    for seed in range(5):
        view = RandomScale(0.5, 2.0)(sample, seeded(seed))
        (record,) = view["replay"]
        assert 0.5 <= record.factor <= 2.0
        expected = (math.floor(30 * record.factor + 0.5), math.floor(50 * record.factor + 0.5))
        assert record.output_size == expected == view["label"].shape == view["image"].shape[1:]
        assert set(view["label"].unique().tolist()) <= set(sample["label"].unique().tolist())
    assert Resize(long_side=25)(sample)["image"].shape == (3, 15, 25)
    assert Resize(size=(7, 9))(sample)["soft_label"].shape == (6, 7, 9)
    doubled = Resize(size=(60, 100))(sample)["label"]
    assert torch.equal(doubled, sample["label"].repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_same_seed_same_view_and_records_including_global_rng() -> None:
    pipeline = build_transforms(GEOMETRY + PHOTOMETRY)
    sample = make_sample()
    a, b = pipeline(sample, seeded(7)), pipeline(sample, seeded(7))
    assert a["replay"] == b["replay"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert pipeline(sample, seeded(8))["replay"] != a["replay"]
    torch.manual_seed(3)
    c = pipeline(sample)
    torch.manual_seed(3)
    assert pipeline(sample)["replay"] == c["replay"]


def test_batched_replay_with_shared_and_per_sample_records() -> None:
    pipeline = build_transforms(GEOMETRY)
    samples = [make_sample(seed=i) for i in range(3)]
    views = [pipeline(s, seeded(10 + i)) for i, s in enumerate(samples)]
    per_sample = [v["replay"] for v in views]
    labels = torch.stack([s["label"] for s in samples])
    soft = torch.stack([s["soft_label"] for s in samples])
    assert torch.equal(replay_geometric(per_sample, labels, "label"), torch.stack([v["label"] for v in views]))
    assert torch.equal(replay_geometric(per_sample, soft, "soft"), torch.stack([v["soft_label"] for v in views]))
    shared = replay_geometric(per_sample[0], soft, "soft")
    assert all(torch.equal(shared[i], replay_geometric(per_sample[0], soft[i], "soft")) for i in range(3))
    with pytest.raises(ValueError, match="per-sample record lists"):
        replay_geometric(per_sample[:2], labels, "label")


def test_replay_refuses_a_tensor_off_the_records_grid() -> None:
    records = [CropRecord((30, 50), 0, 0, 10, 10)]
    with pytest.raises(ValueError, match="to_augmented_view"):
        replay_geometric(records, torch.zeros(15, 25, dtype=torch.long), "label")


def test_rotation_is_counter_clockwise_about_the_centre_and_a_quarter_turn_is_rot90() -> None:
    label = torch.randint(0, 19, (9, 9), generator=seeded(0))
    view = RandomRotate(90, 90, p=1.0)({"image": torch.rand(3, 9, 9), "label": label}, seeded(0))
    (record,) = view["replay"]
    assert record == RotateRecord((9, 9), 90.0)
    assert torch.equal(view["label"], torch.rot90(label, 1))  # numpy/torch rot90 k=1 is counter-clockwise on screen
    image = torch.zeros(1, 9, 15)
    image[0, 4, 10] = 1.0  # 3 pixels right of the centre (4, 7)
    turned = replay_geometric([RotateRecord((9, 15), 90.0)], image, "image")
    assert turned[0].argmax().item() == 1 * 15 + 7  # 3 pixels above it
    assert torch.equal(replay_geometric([RotateRecord((9, 15), 0.0)], image, "image"), image)


def test_rotated_in_corners_are_ignore_in_labels_and_pad_value_in_the_image() -> None:
    sample = {"image": torch.full((3, 40, 60), 0.8), "label": torch.full((40, 60), 3), "soft_label": torch.ones(2, 40, 60)}
    view = RandomRotate(30, 30, p=1.0, pad_value=0.25)(sample, seeded(0))
    assert view["label"][0, 0] == 255 and view["label"][-1, -1] == 255 and view["label"][20, 30] == 3
    assert set(view["label"].unique().tolist()) == {3, 255}
    assert view["image"][0, 0, 0] == pytest.approx(0.25) and view["image"][0, 20, 30] == pytest.approx(0.8)
    assert view["soft_label"][0, 0, 0] == 0 and view["soft_label"][0, 20, 30] == pytest.approx(1.0)
    # the valid mask agrees with the ignored corners
    assert torch.equal(valid_mask(view["replay"], (40, 60)), view["label"] != 255)


def test_rotation_without_its_coin_is_an_identity_record() -> None:
    sample = make_sample()
    view = RandomRotate(-10, 10, p=0.0)(sample, seeded(0))
    assert view["replay"][0].angle == 0.0 and torch.equal(view["label"], sample["label"])


def test_rotation_replayed_on_a_coarse_grid_matches_the_full_resolution_view() -> None:
    blocks = torch.randint(0, 19, (4, 6), generator=seeded(1)).repeat_interleave(4, 0).repeat_interleave(4, 1)  # 16x24
    full = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)  # 64x96, a class per 16x16 square
    records = [RotateRecord((64, 96), 8.0)]
    coarse = to_augmented_view(records, blocks, "label")
    cells = replay_geometric(records, full, "label").reshape(16, 4, 24, 4).permute(0, 2, 1, 3).reshape(16, 24, 16)
    uniform = (cells == cells[..., :1]).all(dim=-1)  # 4x4 cells of the full view that lie inside one rotated block
    assert coarse.shape == (16, 24) and uniform.float().mean() > 0.5
    assert torch.equal(coarse[uniform], cells[..., 0][uniform])


# ---------------------------------------------------------------- mapping the un-augmented view into the view


def test_to_augmented_view_at_output_stride_matches_the_full_resolution_replay() -> None:
    # A label constant on 4x4 blocks, a scale by 2 and a crop on multiples of 4: the stride-4 replay is exact.
    blocks = torch.randint(0, 19, (8, 12), generator=seeded(0))
    full = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)  # 32x48
    records = [
        ScaleRecord((32, 48), (64, 96), 2.0),
        CropRecord((64, 96), top=40, left=56, height=36, width=48, padding=(12, 8)),
        FlipRecord((36, 48), True),
    ]
    full_view = replay_geometric(records, full, "label")
    coarse_view = to_augmented_view(records, blocks, "label")
    assert coarse_view.shape == (9, 12)
    assert torch.equal(coarse_view, full_view[::4, ::4])
    assert (coarse_view[-3:] == 255).all()  # the padded rows
    assert torch.equal(to_augmented_view(records, full, "label"), full_view)
    logits = torch.rand(2, 19, 8, 12)
    assert to_augmented_view(records, logits, output_size=(5, 6)).shape == (2, 19, 5, 6)


def test_valid_mask_marks_padding_and_cutout_boxes() -> None:
    records = [
        CropRecord((10, 10), top=2, left=0, height=12, width=8, padding=(4, 0)),
        CutoutRecord(((0, 0, 2, 3),)),
    ]
    mask = valid_mask(records, (10, 10))
    assert mask.shape == (12, 8)
    assert not mask[8:].any() and not mask[:2, :3].any()
    assert mask.sum() == 8 * 8 - 6
    assert valid_mask([records, records[:1]], (10, 10)).shape == (2, 12, 8)


# ---------------------------------------------------------------- photometric transforms


@pytest.mark.parametrize(
    "transform",
    [ColorJitter(0.5, 0.5, 0.5, 0.2, p=1.0), GaussianBlur((1.0, 2.0), p=1.0), Cutout(3, (0.2, 0.4), p=1.0)],
)
def test_image_transforms_leave_labels_and_dense_maps_alone(transform) -> None:
    sample = make_sample()
    view = transform(sample, seeded(0))
    assert not torch.equal(view["image"], sample["image"])
    for key in ("label", "soft_label", "confidence"):
        assert view[key] is sample[key]
    assert len(view["replay"]) == 1


def test_color_jitter_maths() -> None:
    image = torch.rand(3, 8, 8, generator=seeded(1))
    assert torch.allclose(apply_color_jitter(image, JitterRecord(brightness=0.5)), image * 0.5)
    gray = apply_color_jitter(image, JitterRecord(saturation=0.0))
    assert torch.allclose(gray, (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).expand(3, 8, 8))
    flat = apply_color_jitter(image, JitterRecord(contrast=0.0))
    assert torch.allclose(flat, gray.mean().expand(3, 8, 8))
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    green = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(apply_color_jitter(red, JitterRecord(hue=1 / 3)), green, atol=1e-6)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(image)), image, atol=1e-6)
    assert ColorJitter(0.4, p=0.0)(make_sample(), seeded(0))["replay"] == [JitterRecord()]


def test_blur_keeps_constants_and_its_impulse_response_is_the_normalised_gaussian() -> None:
    constant = torch.full((3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(constant, 1.3), constant, atol=1e-6)
    impulse = torch.zeros(1, 21, 21)
    impulse[0, 10, 10] = 1.0
    sigma = 1.5
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    reference = torch.exp(-offsets**2 / (2 * sigma**2))
    reference = torch.outer(reference, reference) / reference.sum() ** 2
    response = gaussian_blur(impulse, sigma)[0]
    assert torch.allclose(response[10 - radius : 11 + radius, 10 - radius : 11 + radius], reference, atol=1e-7)
    assert math.isclose(response.sum().item(), 1.0, rel_tol=1e-6)
    assert math.isclose(gaussian_kernel(0.7).sum().item(), 1.0, rel_tol=1e-6)
    image = torch.rand(3, 64, 64, generator=seeded(2))
    assert abs(gaussian_blur(image, 1.0).mean() - image.mean()) < 2e-3
    assert torch.equal(gaussian_blur(image, 0.0), image)



def test_blur_with_the_dacs_kernel_of_a_tenth_of_the_side_per_axis() -> None:
    from segadapt.data.transforms.photometric import tenth_of_side_kernel

    # DACS's code: the largest odd number of taps up to ceil(0.1 * side) (np.ceil of the same float product)
    assert [tenth_of_side_kernel(side, side)[0] for side in (10, 11, 30, 32, 48, 512, 1024)] == [1, 1, 3, 3, 5, 51, 103]
    impulse = torch.zeros(1, 32, 48)
    impulse[0, 16, 24] = 1.0
    sigma = 0.8
    response = gaussian_blur(impulse, sigma, tenth_of_side_kernel(32, 48))[0]  # 3 taps down, 5 across
    taps = [torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2)) for r in (1, 2)]
    reference = torch.outer(taps[0] / taps[0].sum(), taps[1] / taps[1].sum())
    assert torch.allclose(response[15:18, 22:27], reference, atol=1e-7)
    assert math.isclose(response.sum().item(), 1.0, rel_tol=1e-6) and int((response > 0).sum()) == 15
    assert torch.equal(gaussian_blur(impulse, sigma, (1, 1)), impulse)  # sides up to 20 pixels: no blur
    with pytest.raises(ConfigError, match="blur kernel must be one of"):
        GaussianBlur(kernel="ten_percent")

def test_cutout_fills_boxes_and_erases_labels_only_when_asked() -> None:
    sample = make_sample()
    view = Cutout(2, (0.2, 0.3), fill=(0.1, 0.2, 0.3), p=1.0, erase_label=True)(sample, seeded(4))
    (record,) = view["replay"]
    inside = ~valid_mask([record], (30, 50))
    assert len(record.boxes) == 2 and inside.any()
    assert torch.allclose(view["image"][:, inside], torch.tensor([[0.1], [0.2], [0.3]]).expand(3, int(inside.sum())))
    assert (view["label"][inside] == 255).all() and torch.equal(view["label"][~inside], sample["label"][~inside])
    kept = Cutout(2, (0.2, 0.3), p=1.0)(sample, seeded(4))
    assert kept["label"] is sample["label"] and kept["replay"][0].boxes == record.boxes


# ---------------------------------------------------------------- batch mixing


def test_classmix_masks_cover_exactly_half_the_present_classes() -> None:
    labels = torch.randint(0, 7, (4, 24, 24), generator=seeded(0))
    labels[0, :5] = 255
    labels[1] = torch.where(labels[1] < 3, labels[1], 2)  # three classes -> two chosen
    masks = classmix_masks(labels, seeded(1))
    assert masks.shape == labels.shape and masks.dtype == torch.bool
    for label, mask in zip(labels, masks):
        present = set(label.unique().tolist()) - {255}
        chosen = set(label[mask].unique().tolist())
        assert len(chosen) == math.ceil(len(present) / 2) and chosen <= present
        assert torch.equal(mask, torch.isin(label, torch.tensor(sorted(chosen))))
    assert not masks[0, :5].any()
    assert torch.equal(classmix_masks(labels, seeded(1)), masks)


def test_mix_takes_a_inside_the_mask_and_b_outside() -> None:
    mask = torch.tensor([[[True, False], [False, True]]])
    a, b = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert torch.equal(mix(mask, a, b), mask.unsqueeze(1).expand(1, 3, 2, 2).float())
    labels = mix(mask, torch.full((1, 2, 2), 7), torch.full((1, 2, 2), 255))
    assert labels.tolist() == [[[7, 255], [255, 7]]]
    with pytest.raises(ValueError, match="cannot mix"):
        mix(mask, a, torch.zeros(1, 3, 3, 3))


def test_strong_augment_returns_the_parameters_it_applied() -> None:
    images = torch.rand(3, 3, 20, 24, generator=seeded(0))
    out, params = strong_augment(images, seeded(5), jitter_p=1.0, blur_p=1.0)
    for image, result, (jitter, blur) in zip(images, out, params):
        assert isinstance(jitter, JitterRecord) and isinstance(blur, BlurRecord)
        assert 0.8 <= jitter.brightness <= 1.2 and 0.15 <= blur.sigma <= 1.15
        assert torch.allclose(result, gaussian_blur(apply_color_jitter(image, jitter), blur.sigma))
    assert out.min() >= 0 and out.max() <= 1
    again, _ = strong_augment(images, seeded(5), jitter_p=1.0, blur_p=1.0)
    assert torch.equal(again, out)
    unchanged, params = strong_augment(images, seeded(5), jitter_p=0.0, blur_p=0.0)
    assert torch.equal(unchanged, images) and params[0] == [JitterRecord(), BlurRecord(0.0)]


# ---------------------------------------------------------------- factory and user errors


def test_factory_builds_the_configured_transforms() -> None:
    pipeline = build_transforms(GEOMETRY + PHOTOMETRY)
    assert isinstance(pipeline, Compose)
    assert [type(t).__name__ for t in pipeline.transforms] == [
        "Resize", "RandomScale", "RandomRotate", "RandomCrop", "RandomHorizontalFlip", "ColorJitter", "GaussianBlur",
        "Cutout",
    ]
    assert pipeline.transforms[3].size == (32, 40) and pipeline.transforms[5].brightness == (0.6, 1.4)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([{"name": "random_scal", "min": 0.5, "max": 1.5}],
         r"transforms\[0\]: unknown transform 'random_scal'; did you mean 'random_scale'\? "
         r"\(valid names: resize, random_scale"),
        ([{"name": "sharpen"}], r"transforms\[0\]: unknown transform 'sharpen' \(valid names: resize, "),
        ([{"name": "random_crop", "size": 8}, {"name": "random_crop", "szie": 8}],
         r"transforms\[1\] \(random_crop\): unknown key 'szie'; did you mean 'size'\? "
         r"\(valid keys: size, ignore_index, pad_value, cat_max_ratio\)"),
        ([{"name": "random_crop"}], r"transforms\[0\] \(random_crop\): missing required key\(s\) size"),
        ([{"name": "random_scale", "min": 2.0, "max": 1.0}],
         r"transforms\[0\] \(random_scale\): need 0 < min <= max, got min=2.0, max=1.0"),
        ([{"name": "random_horizontal_flip", "p": 1.5}], r"\(random_horizontal_flip\): p must be a probability"),
        ([{"name": "resize"}], r"\(resize\): give exactly one of size or long_side"),
        ([{"name": "color_jitter", "hue": 0.7}], r"\(color_jitter\): hue must be"),
        ([{"name": "random_rotate", "min": 10, "max": -10}], r"\(random_rotate\): \[min, max\] must be \[min, max\] with -180"),
        ([{"size": 8}], r"transforms\[0\]: expected a mapping with a 'name' key"),
        ({"name": "resize"}, r"transforms must be a list"),
    ],
)
def test_factory_errors_name_the_entry_and_the_fix(spec, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_transforms(spec)


def test_dense_map_of_another_size_is_a_data_error_naming_sample_and_key() -> None:
    sample = make_sample()
    sample["label"] = sample["label"][:, :40]
    with pytest.raises(DataError, match=r"sample 'frame_0001': 'label' is \(30, 40\) but the image is \(30, 50\)"):
        RandomHorizontalFlip(1.0)(sample)
