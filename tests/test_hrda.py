"""HRDA (Hoyer et al., ECCV 2022): the multi-resolution network, its loss, checkpoints and the ``hrda`` recipe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segadapt.models.hrda as hrda
from segadapt.cli import main
from segadapt.config import load_config
from segadapt.engine.logging import read_metrics
from segadapt.methods.hrda import hrda_loss, labels_in_box
from segadapt.models import create_model, load_checkpoint_weights, param_groups
from segadapt.models.base import DetailOutput, SegOutput
from segadapt.models.hrda import HRDADAFormerMiTB5, HRDASegmentor, fuse_scales, random_detail_box, scale_box, sliding_detail_boxes

from data_fixtures import toy_overrides

FIXTURES = Path(__file__).parent / "fixtures" / "parity"


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.relu(self.conv(x))]


class _Decoder(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(4, channels, 1)

    def forward(self, maps: list[torch.Tensor]) -> SegOutput:
        return SegOutput(self.conv_seg(maps[-1]), maps[-1])


class TinyHRDA(HRDASegmentor):
    """A stand-in network: one strided convolution as encoder, 1x1 decoders, stride 2."""

    output_stride = 2

    def __init__(self, num_classes: int = 3, **options) -> None:
        super().__init__(_Encoder(), _Decoder(num_classes), _Decoder(num_classes), num_classes, 4, "imagenet", **options)


def tiny(**options) -> TinyHRDA:
    torch.manual_seed(0)
    return TinyHRDA(3, **{"detail_crop_size": (8, 8), "crop_coord_divisible": 4, **options})


# --------------------------------------------------------------------------- pieces on hand values


def test_fusion_is_attention_times_detail_plus_upsampled_one_minus_attention_times_context() -> None:
    context = torch.tensor([[[[1.0, 3.0]]]])  # [1, 1, 1, 2]
    attention = torch.tensor([[[[0.5, 0.0]]]])
    detail = torch.tensor([[[[8.0, 8.0, 2.0, 2.0], [8.0, 8.0, 2.0, 2.0]]]])
    fused = fuse_scales(context, detail, attention, scale=2)
    # up() of a 1x2 map by 2 (bilinear, half-pixel centres): columns 0.75a+0.25b ... ; check against explicit maths
    up = lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    expected = up(attention) * detail + up((1 - attention) * context)
    assert torch.equal(fused, expected)
    # at the leftmost column the upsampled maps equal the left cell: 0.5 * 8 + (1 - 0.5) * 1
    assert fused[0, 0, 0, 0].item() == pytest.approx(4.5)
    # where the attention is 0 the fused output is the context prediction alone, whatever the detail says
    assert fuse_scales(context, detail * 100, torch.zeros_like(attention), 2).equal(up(context))


def test_detail_boxes_are_divisible_inside_and_of_the_crop_size() -> None:
    generator = torch.Generator().manual_seed(1)
    corners: set[int] = set()
    for _ in range(200):
        y1, y2, x1, x2 = random_detail_box((1024, 1024), (512, 512), 8, generator)
        assert y1 % 8 == 0 and x1 % 8 == 0 and (y2 - y1, x2 - x1) == (512, 512)
        assert 0 <= y1 and y2 <= 1024 and 0 <= x1 and x2 <= 1024
    for _ in range(50):
        corners.add(random_detail_box((32, 32), (16, 16), 8, generator)[0])
    assert corners == {0, 8}  # the authors' (margin + 1) // divisible choices: 17 // 8 = 2, the corner 16 is never drawn
    assert random_detail_box((64, 64), (64, 64), 8) == (0, 64, 0, 64)
    assert scale_box((16, 528, 8, 520), 8) == (2, 66, 1, 65)


def test_sliding_detail_windows_overlap_by_half_and_end_at_the_border() -> None:
    boxes = sliding_detail_boxes((1024, 2048), (512, 512))
    assert len(boxes) == 3 * 7 and boxes[-1] == (512, 1024, 1536, 2048)
    assert {b[0] for b in boxes} == {0, 256, 512}
    assert sliding_detail_boxes((1024, 1024), (512, 512), overlapping=False) == [
        (0, 512, 0, 512), (0, 512, 512, 1024), (512, 1024, 0, 512), (512, 1024, 512, 1024)
    ]  # fmt: skip


# --------------------------------------------------------------------------- the network


def test_attention_is_zero_outside_the_detail_crop_in_training() -> None:
    model = tiny().train()
    images = torch.rand(2, 3, 16, 24)
    box = (8, 16, 4, 12)
    seen: list[torch.Tensor] = []
    original = hrda.fuse_scales

    def spy(context, detail, attention, scale):
        seen.append(attention.detach().clone())
        return original(context, detail, attention, scale)

    hrda.fuse_scales = spy
    try:
        out = model(images, detail_box=box)
    finally:
        hrda.fuse_scales = original
    attention = seen[0]  # on the context grid: stride 2 of the half-size view, 1/4 of the input
    inside = torch.zeros_like(attention, dtype=torch.bool)
    inside[..., 2:4, 1:3] = True  # the box divided by output_stride / context_scale = 4
    assert (attention[~inside] == 0).all() and (attention[inside] > 0).all()
    assert out.detail is not None and out.detail.box == box and tuple(out.detail.logits.shape) == (2, 3, 4, 4)
    # outside the crop (its upsampled border aside) the fused output is the upsampled context prediction alone
    context = model._head(model.encode(model.context_view(images)))[0]
    up = F.interpolate(context, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(out.logits[..., :, :1], up[..., :, :1]) and torch.allclose(out.logits[..., :2, :], up[..., :2, :])


def test_sliding_detail_inference_equals_one_forward_when_a_window_covers_the_image() -> None:
    model = tiny(detail_crop_size=(16, 24)).eval()
    images = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        slid = model.slide_detail_logits(images)
        whole = model._head(model.encode(images))[0]
        assert torch.allclose(slid, whole)
        # overlapping windows average: a constant-logit decoder gives the constant everywhere
        small = tiny(detail_crop_size=(8, 8)).eval()
        nn.init.zeros_(small.decode_head.head.conv_seg.weight)
        nn.init.constant_(small.decode_head.head.conv_seg.bias, 2.5)
        assert torch.allclose(small.slide_detail_logits(images), torch.full((2, 3, 8, 12), 2.5))
        # the eval forward: attention unmasked, the slid detail in place of the crop
        assert model(images).detail is None and tuple(model(images).logits.shape) == (2, 3, 8, 12)


def test_random_detail_box_is_injectable_as_the_transforms_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[tuple] = []
    monkeypatch.setattr(hrda, "random_detail_box", lambda size, crop, divisible: drawn.append((tuple(size), crop, divisible)) or (0, 8, 8, 16))
    out = tiny().train()(torch.rand(1, 3, 16, 24))
    assert drawn == [((16, 24), (8, 8), 4)] and out.detail is not None and out.detail.box == (0, 8, 8, 16)


@pytest.mark.parametrize("name", ["hrda_daformer_mitb0", "hrda_deeplabv2_r101"])
def test_registered_hrda_networks_keep_the_model_contract(name: str) -> None:
    options = {"embed_dim": 16, "attention_embed_dim": 16} if "daformer" in name else {}
    model = create_model(name, 5, detail_crop_size=[64, 64], **options).eval()
    groups = param_groups(model)
    assert len(groups["backbone"]) + len(groups["head"]) == len(list(model.parameters()))
    with torch.no_grad():
        out = model(torch.rand(2, 3, 128, 128))
    grid = 128 // model.output_stride
    assert out.logits.shape[:2] == (2, 5) and out.features.shape[:2] == (2, model.feature_dim)
    assert out.logits.shape[-2:] == out.features.shape[-2:] and abs(out.logits.shape[-1] - grid) <= 2
    assert out.aux_logits is None and out.detail is None  # eval mode


# --------------------------------------------------------------------------- the loss


def test_loss_is_one_minus_lambda_fused_plus_lambda_detail_on_the_cropped_labels() -> None:
    torch.manual_seed(0)
    fused, detail_logits = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 2, 2)
    labels = torch.randint(0, 3, (2, 8, 12))
    weight = torch.rand(2, 8, 12)
    detail = DetailOutput(detail_logits, (4, 8, 4, 8), (8, 12), 0.1)
    calls: list[tuple] = []

    def loss(logits, lab, w):
        calls.append((tuple(logits.shape), lab.clone(), None if w is None else w.clone()))
        up = F.interpolate(logits, size=lab.shape[-2:], mode="bilinear", align_corners=False)
        return (w * F.cross_entropy(up, lab, reduction="none")).mean()

    total = hrda_loss(loss, fused, detail, labels, weight)
    assert torch.equal(calls[1][1], labels[:, 4:8, 4:8]) and torch.equal(calls[1][2], weight[:, 4:8, 4:8])
    expected = 0.9 * loss(fused, labels, weight) + 0.1 * loss(detail_logits, labels[:, 4:8, 4:8], weight[:, 4:8, 4:8])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    # labels at half the input size get the box halved
    assert torch.equal(labels_in_box(labels[:, ::2, ::2], detail), labels[:, ::2, ::2][:, 2:4, 2:4])
    # lambda_d = 0: the fused term alone
    assert hrda_loss(loss, fused, detail._replace(loss_weight=0.0), labels, weight).item() == pytest.approx(loss(fused, labels, weight).item())


# --------------------------------------------------------------------------- keys and checkpoints


def on_meta(**options) -> HRDADAFormerMiTB5:
    with torch.device("meta"):
        return HRDADAFormerMiTB5(19, **options)


def test_state_dict_keys_and_shapes_equal_the_authors_hrda_segmentor() -> None:
    lines = (FIXTURES / "hrda_mitb5_state_dict_keys.txt").read_text().splitlines()
    assert lines[0].startswith("# state_dict of HRDA's segmentor")
    theirs = {}
    for line in lines[1:]:
        key, shape = line.split(" ", 1)
        theirs[key] = tuple(int(n) for n in shape.strip("(),").split(",") if n.strip())
    ours = {key: tuple(value.shape) for key, value in on_meta().state_dict().items()}
    assert ours == theirs
    assert len(ours) == 1126 and sum(key.startswith("decode_head.scale_attention.") for key in ours) == 16


def test_an_hrda_release_checkpoint_loads_its_student(tmp_path: Path) -> None:
    model = create_model("hrda_daformer_mitb0", 5, embed_dim=8, attention_embed_dim=8)
    networks = [create_model("hrda_daformer_mitb0", 5, embed_dim=8, attention_embed_dim=8) for _ in range(3)]
    prefixes = ("model.", "ema_model.", "imnet_model.")
    state = {f"{prefix}{key}": value for prefix, net in zip(prefixes, networks) for key, value in net.state_dict().items()}
    torch.save({"meta": {"iter": 40000}, "state_dict": state}, tmp_path / "release.pth")
    report = load_checkpoint_weights(model, tmp_path / "release.pth")
    count = len(model.state_dict())
    assert len(report.loaded) == count and len(report.skipped) == 2 * count and not report.missing
    for key, value in model.state_dict().items():
        assert torch.equal(value, networks[0].state_dict()[key]), key


def test_a_daformer_checkpoint_loads_as_backbone_and_shared_decoder(tmp_path: Path) -> None:
    daformer = create_model("daformer_mitb0", 5, embed_dim=8)
    torch.save({"model": daformer.state_dict()}, tmp_path / "warm.pt")
    model = create_model("hrda_daformer_mitb0", 5, embed_dim=8, attention_embed_dim=8)
    attention_before = {k: v.clone() for k, v in model.decode_head.scale_attention.state_dict().items()}
    report = load_checkpoint_weights(model, tmp_path / "warm.pt")
    assert report.missing and all(key.startswith("decode_head.scale_attention.") for key in report.missing)
    assert torch.equal(model.decode_head.head.conv_seg.weight, daformer.decode_head.conv_seg.weight)
    assert torch.equal(model.backbone.patch_embed1.proj.weight, daformer.backbone.patch_embed1.proj.weight)
    assert all(torch.equal(v, attention_before[k]) for k, v in model.decode_head.scale_attention.state_dict().items())


def test_packaged_mic_hrda_config_builds_the_mitb5_hrda_network() -> None:
    cfg = load_config("gta5_to_cityscapes/mic_hrda")
    assert cfg.recipe == "hrda" and cfg.mic.enabled and cfg.mic.mask_block_size == 64
    assert cfg.eval.sliding_window == (1024, 1024) and cfg.eval.window_stride == (512, 512) and cfg.eval.size is None
    with torch.device("meta"):
        model = create_model(cfg.model.name, 19, **cfg.model.options)
    assert isinstance(model, HRDADAFormerMiTB5)
    assert model.detail_crop_size == (512, 512) and model.context_scale == 0.5 and model.crop_coord_divisible == 8
    assert model.hr_loss_weight == 0.1
    assert cfg.method["rare_class_min_crop_ratio"] == 2.0 and cfg.method["pseudo_margins"] == [30, 240, 30, 30]


# --------------------------------------------------------------------------- the recipe, end to end

TOY_HRDA = [  # toy_overrides' 32x48 crops are too small for MiT's context view (sides >= 29 at half scale)
    "data.crop_size=[64,96]", "eval.size=[64,96]", "model.options.detail_crop_size=[32,48]",
    "method.feature_distance_classes=null", "method.rare_class_min_pixels=10", "method.pseudo_threshold=0",
]  # fmt: skip


@pytest.mark.parametrize("config", ["benchmark/hrda", "benchmark/mic_hrda"])
def test_benchmark_hrda_configs_train_two_iterations_on_five_classes_with_ignore_seven(
    config: str, toy: Path, warmups: dict[str, Path], tmp_path: Path
) -> None:
    start = [f"model.checkpoint={warmups['warm_mitb0']}"] if config == "benchmark/hrda" else ["method.feature_distance_weight=0"]
    assert main(["train", config, *toy_overrides(toy), *TOY_HRDA, *start, f"output_dir={tmp_path}", "name=run"]) == 0
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["iter"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss_source"] > 0 and r["loss_mix"] > 0 for r in records)
    assert ("loss_mic" in records[0]) == (config == "benchmark/mic_hrda")
    assert ("loss_feature_distance" in records[0]) == (config == "benchmark/hrda")


def test_pseudo_margins_zero_the_weight_at_the_whole_images_border_only() -> None:
    from segadapt.data.transforms import valid_mask

    mask = valid_mask([], (10, 12), margins=(1, 3, 2, 0))
    assert mask[:1].any().item() is False and mask[-3:].any().item() is False and mask[:, :2].any().item() is False
    assert mask[1:7, 2:].all().item() and int(mask.sum()) == 6 * 10


def test_recipe_hrda_refuses_a_single_scale_network(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["train", "benchmark/daformer", *toy_overrides(toy), "recipe=hrda", "method.feature_distance_weight=0"]
    assert main([*args, f"output_dir={tmp_path}"]) == 2
    assert "model.name=hrda_daformer_mitb5" in capsys.readouterr().err

