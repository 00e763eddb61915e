"""DAFormer (MiT encoder + context-aware fusion head): key layout, shapes, attention, stochastic depth, weights."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segadapt.errors import CheckpointError, ConfigError
from segadapt.models import (
    MODELS,
    DAFormer,
    DAFormerMiTB0,
    DAFormerMiTB5,
    EncoderDecoder,
    SegmentationModel,
    create_model,
    load_backbone_weights,
    load_checkpoint_weights,
    model_options,
    param_groups,
)
from segadapt.models.mit import DropPath, EfficientSelfAttention, MixTransformer, stochastic_depth_rates

PARITY_KEYS = Path(__file__).parent / "fixtures" / "parity" / "daformer_mitb5_state_dict_keys.txt"
NUM_CLASSES = 19
SMALL_EMBED = 16  # decoder width for the CPU tests


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


def small_model(seed: int = 0, num_classes: int = NUM_CLASSES, **options) -> DAFormer:
    torch.manual_seed(seed)
    return DAFormerMiTB0(num_classes, embed_dim=SMALL_EMBED, **options).eval()


def on_meta(model_class: type[DAFormer], *args, **kwargs) -> DAFormer:
    """Shapes without storage: layout checks at no cost."""
    with torch.device("meta"):
        return model_class(*args, **kwargs)


def read_parity_layout(path: Path) -> dict[str, tuple[int, ...]]:
    """``key (d0, d1, ...)`` per line after the comment line -> {key: shape}."""
    layout = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        match = re.fullmatch(r"(\S+) \(([\d, ]*)\)", line.strip())
        assert match, f"unparsable line {line!r}"
        layout[match[1]] = tuple(int(size) for size in match[2].replace(" ", "").split(",") if size)
    return layout


def ceil_div(value: int, divisor: int) -> int:
    return -(-value // divisor)


# ------------------------------------------------------------------------------------ layout


def test_state_dict_matches_daformer_mitb5_keys_and_shapes():
    expected = read_parity_layout(PARITY_KEYS)
    assert len(expected) == 1110
    model = on_meta(DAFormerMiTB5, NUM_CLASSES)
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == expected


def test_named_variant_equals_the_generic_class_with_that_encoder():
    named = on_meta(DAFormerMiTB5, NUM_CLASSES)
    generic = on_meta(DAFormer, NUM_CLASSES, encoder="mit_b5")
    assert {k: v.shape for k, v in named.state_dict().items()} == {k: v.shape for k, v in generic.state_dict().items()}
    assert named.encoder_name == "mit_b5" and isinstance(named, DAFormer)


def test_parameter_counts():
    # DAFormer (Hoyer et al. 2022, Table 8): 85.2 M parameters for MiT-B5 + the DAFormer decoder.
    assert sum(p.numel() for p in on_meta(DAFormerMiTB5, NUM_CLASSES).parameters()) == 85_155_283
    assert sum(p.numel() for p in on_meta(DAFormerMiTB0, NUM_CLASSES).parameters()) == 6_900_595
    assert sum(p.numel() for p in on_meta(DAFormerMiTB0, NUM_CLASSES, embed_dim=64).parameters()) == 3_575_731


def test_stage_layout_of_every_preset():
    depths = {"mit_b0": (2, 2, 2, 2), "mit_b1": (2, 2, 2, 2), "mit_b2": (3, 4, 6, 3), "mit_b3": (3, 4, 18, 3),
              "mit_b4": (3, 8, 27, 3), "mit_b5": (3, 6, 40, 3)}
    for name, stage_depths in depths.items():
        with torch.device("meta"):
            encoder = MixTransformer(name)
        assert tuple(len(encoder.stage(index)[1]) for index in range(1, 5)) == stage_depths, name
        assert encoder.embed_dims == ((32, 64, 160, 256) if name == "mit_b0" else (64, 128, 320, 512))
        heads = [encoder.stage(index)[1][0].attn.num_heads for index in range(1, 5)]
        assert heads == [1, 2, 5, 8]
        assert [hasattr(encoder.stage(index)[1][0].attn, "sr") for index in range(1, 5)] == [True, True, True, False]


def test_layer_norm_epsilons_and_drop_path_rates():
    encoder = on_meta(DAFormerMiTB0, NUM_CLASSES).backbone
    assert encoder.patch_embed1.norm.eps == 1e-5 and encoder.block1[0].attn.norm.eps == 1e-5
    assert encoder.block1[0].norm1.eps == encoder.block4[1].norm2.eps == encoder.norm4.eps == 1e-6
    rates = [block.drop_path.rate for index in range(1, 5) for block in encoder.stage(index)[1]]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 8).tolist())
    assert stochastic_depth_rates((3, 6, 40, 3), 0.1)[3] == pytest.approx(torch.linspace(0, 0.1, 52)[-3:].tolist())


def test_initialisation_follows_segformer_and_mmseg():
    model = small_model()
    block = model.backbone.block1[0]
    assert block.attn.q.weight.std().item() == pytest.approx(0.02, rel=0.15) and not block.attn.q.bias.any()
    # conv N(0, sqrt(2 / fan_out)), fan_out = k*k*out/groups: 3*3*128/128 = 9 for the depth-wise conv
    assert block.mlp.dwconv.dwconv.weight.std().item() == pytest.approx((2 / 9) ** 0.5, rel=0.15)
    assert bool((model.backbone.norm1.weight == 1).all()) and not model.backbone.norm1.bias.any()
    assert model.decode_head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.3)
    assert not model.decode_head.conv_seg.bias.any()


# --------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("height,width", [(64, 64), (65, 97), (128, 256), (29, 30)])
def test_output_is_ceil_quarter_of_any_input_size(height, width):
    model = small_model()
    with torch.no_grad():
        out = model(torch.rand(2, 3, height, width))
        maps = model.encode(torch.rand(2, 3, height, width))
    size = (ceil_div(height, 4), ceil_div(width, 4))
    assert out.logits.shape == (2, NUM_CLASSES, *size)
    assert out.features.shape == (2, model.feature_dim, *size) and model.feature_dim == SMALL_EMBED
    assert out.aux_logits is None
    expected = [(2, channels, ceil_div(height, stride), ceil_div(width, stride))
                for channels, stride in zip((32, 64, 160, 256), (4, 8, 16, 32))]
    assert [tuple(feature.shape) for feature in maps] == expected


def test_contract_attributes():
    model = small_model()
    assert isinstance(model, SegmentationModel) and isinstance(model, EncoderDecoder)
    assert model.output_stride == 4 and model.aux_weight == 0.0 and model.num_classes == NUM_CLASSES
    # DAFormer's img_norm_cfg: mean 123.675, 116.28, 103.53 / std 58.395, 57.12, 57.375 on 0-255 RGB
    assert [m * 255 for m in model.normalization.mean] == pytest.approx([123.675, 116.28, 103.53])
    assert [s * 255 for s in model.normalization.std] == pytest.approx([58.395, 57.12, 57.375])
    assert model.normalization.channel_order == "rgb"
    assert not any(key.startswith("normalize") for key in model.state_dict())  # the normaliser has no entries


def test_too_small_input_is_refused_with_the_minimum():
    with pytest.raises(ValueError, match="at least 29 pixels"):
        small_model()(torch.rand(1, 3, 28, 64))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        small_model()(torch.rand(1, 4, 64, 64))


def test_forward_is_decode_of_encode_and_features_feed_the_classifier():
    model = small_model()
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out = model(images)
        halves = model.decode(model.encode(images))
        reclassified = model.decode_head.conv_seg(out.features)
    torch.testing.assert_close(out.logits, halves.logits)
    torch.testing.assert_close(out.features, halves.features)
    torch.testing.assert_close(out.logits, reclassified)  # eval: no dropout between features and classifier
    assert bool((out.features >= 0).all())  # the bottleneck's ReLU output


def test_encode_normalises_inside():
    model = small_model()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        direct = model.backbone(model.normalize(images))
        encoded = model.encode(images)
        unnormalised = model.backbone(images)
    for a, b in zip(direct, encoded):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(encoded[0], unnormalised[0])


def test_backbone_and_head_parameters_partition_the_model():
    model = small_model()
    backbone = [id(p) for p in model.backbone_parameters()]
    head = [id(p) for p in model.head_parameters()]
    assert backbone == [id(p) for p in model.backbone.parameters()]
    assert head == [id(p) for p in model.decode_head.parameters()]
    assert not set(backbone) & set(head) and set(backbone) | set(head) == {id(p) for p in model.parameters()}
    groups = param_groups(model)
    assert [id(p) for p in groups["backbone"]] == backbone and [id(p) for p in groups["head"]] == head


def test_eval_is_deterministic_and_train_mode_drops_paths():
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        model = small_model(drop_path_rate=0.9, dropout=0.0)
        torch.testing.assert_close(model(images).logits, model(images).logits)
        model.train()
        first, second = model(images).logits, model(images).logits
        assert not torch.allclose(first, second)
        # without stochastic depth (and dropout) train mode is deterministic too: the randomness was DropPath's
        model = small_model(drop_path_rate=0.0, dropout=0.0).train()
        torch.testing.assert_close(model(images).logits, model(images).logits)


def test_dropout_sits_between_features_and_classifier():
    model = small_model(drop_path_rate=0.0, dropout=0.5).train()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        assert not torch.allclose(out.logits, model.decode_head.conv_seg(out.features))
        assert isinstance(model.decode_head.dropout, torch.nn.Dropout2d)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(0)
    drop = DropPath(0.25).train()
    out = drop(torch.ones(4000, 5, 3))
    per_sample = out.flatten(1)
    assert bool((per_sample == per_sample[:, :1]).all())  # one decision per sample
    assert sorted(set(per_sample[:, 0].tolist())) == pytest.approx([0.0, 1 / 0.75])
    assert per_sample.mean().item() == pytest.approx(1.0, abs=0.05)
    assert bool((drop.eval()(torch.ones(3, 2)) == 1).all())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropPath(1.0)


@pytest.mark.parametrize("sr_ratio", [2, 1])
def test_attention_equals_explicit_softmax(sr_ratio):
    torch.manual_seed(0)
    dim, heads, height, width = 8, 2, 4, 6
    attention = EfficientSelfAttention(dim, heads, sr_ratio)
    tokens = torch.randn(2, height * width, dim)
    source = tokens
    if sr_ratio > 1:
        grid = tokens.transpose(1, 2).reshape(2, dim, height, width)
        source = attention.norm(attention.sr(grid).flatten(2).transpose(1, 2))
        assert source.shape == (2, (height // sr_ratio) * (width // sr_ratio), dim)
    head_dim = dim // heads
    q = attention.q(tokens).reshape(2, -1, heads, head_dim).permute(0, 2, 1, 3)
    kv = attention.kv(source).reshape(2, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ kv[0].transpose(-2, -1) / head_dim**0.5, dim=-1)
    expected = attention.proj((weights @ kv[1]).transpose(1, 2).reshape(2, -1, dim))
    with torch.no_grad():
        torch.testing.assert_close(attention(tokens, height, width), expected.detach())


def test_decoder_upsamples_each_level_bilinearly_to_stride_four():
    model = small_model()
    head = model.decode_head
    with torch.no_grad():
        maps = model.encode(torch.rand(1, 3, 64, 96))
        embedded = [head.embed_layers[0](maps[0])] + [
            F.interpolate(head.embed_layers[i](maps[i]), size=maps[0].shape[-2:], mode="bilinear", align_corners=False)
            for i in range(1, 4)
        ]
        expected = head.fuse_layer.bottleneck(
            torch.cat([branch(torch.cat(embedded, 1)) for branch in head.fuse_layer.aspp_modules], 1)
        )
        torch.testing.assert_close(model.decode(maps).features, expected)
    dilations = [branch.conv.dilation if i == 0 else branch.depthwise_conv.conv.dilation
                 for i, branch in enumerate(head.fuse_layer.aspp_modules)]
    assert dilations == [(1, 1), (6, 6), (12, 12), (18, 18)]


# ----------------------------------------------------------------------------------- registry


def test_registry_names_and_options():
    assert [name for name in MODELS if name.startswith("daformer_")] == [f"daformer_mitb{i}" for i in range(6)]
    assert model_options("daformer_mitb0") == ["embed_dim", "dropout", "drop_path_rate", "normalization"]
    model = create_model("daformer_mitb0", 5, embed_dim=32)
    assert isinstance(model, DAFormerMiTB0) and model.feature_dim == 32 and model.num_classes == 5
    assert model.decode_head.conv_seg.out_channels == 5


def test_unknown_or_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="encoder is not an option.*embed_dim, dropout, drop_path_rate, normalization"):
        create_model("daformer_mitb0", 5, encoder="mit_b5")
    with pytest.raises(ConfigError, match="embed_dim must be a positive integer"):
        create_model("daformer_mitb0", 5, embed_dim=0)
    with pytest.raises(ConfigError, match="drop path rate"):
        create_model("daformer_mitb0", 5, drop_path_rate=1.5)
    with pytest.raises(ValueError, match="unknown Mix Transformer 'mit_b9'; choose one of mit_b0, mit_b1"):
        DAFormer(5, encoder="mit_b9")


def test_deepcopy_keeps_the_preset():
    model = small_model()
    twin = copy.deepcopy(model)
    assert type(twin) is DAFormerMiTB0 and twin.encoder_name == "mit_b0"


# ------------------------------------------------------------------------------------ weights


def segformer_imagenet_file(path: Path, encoder: MixTransformer) -> Path:
    """A file laid out as SegFormer's ``mit_b*.pth``: unprefixed encoder keys plus the ImageNet classifier."""
    state = dict(encoder.state_dict())
    state["head.weight"] = torch.randn(1000, encoder.embed_dims[-1])
    state["head.bias"] = torch.randn(1000)
    torch.save(state, path)
    return path


def test_segformer_imagenet_file_loads_into_the_backbone_only(tmp_path):
    source = small_model(seed=1)
    path = segformer_imagenet_file(tmp_path / "mit_b0.pth", source.backbone)
    model = small_model(seed=2)
    head_before = copy.deepcopy(model.decode_head.state_dict())
    report = load_backbone_weights(model, path)
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)
    for key, value in head_before.items():
        torch.testing.assert_close(model.decode_head.state_dict()[key], value)
    assert report.unexpected == ("head.weight", "head.bias")
    assert set(report.loaded) == {f"backbone.{key}" for key in source.backbone.state_dict()}
    assert set(report.missing) == {f"decode_head.{key}" for key in head_before if not key.endswith("num_batches_tracked")}


def test_wrong_encoder_size_is_refused_with_key_and_shapes(tmp_path):
    path = segformer_imagenet_file(tmp_path / "mit_b0.pth", small_model().backbone)
    model = on_meta(DAFormerMiTB5, NUM_CLASSES)
    with pytest.raises(CheckpointError, match=r"patch_embed1\.proj\.weight has shape \(32, 3, 7, 7\).*needs \(64, 3, 7, 7\)"
                       r".*SegFormer's ImageNet mit_b5\.pth"):
        load_backbone_weights(model, path)


def test_imagenet_file_missing_encoder_tensors_names_the_expected_file(tmp_path):
    state = {key: value for key, value in small_model().backbone.state_dict().items() if not key.startswith("block4")}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"lacks \d+ of the \d+ .*mit_b0.*SegFormer's ImageNet mit_b0\.pth"):
        load_backbone_weights(small_model(), tmp_path / "partial.pth")


def daformer_uda_checkpoint(path: Path, student: DAFormer, teacher: DAFormer, imagenet: DAFormer) -> Path:
    """DAFormer's UDA checkpoint layout: mmcv meta plus one state dict holding three networks."""
    state = {}
    for prefix, network in (("model.", student), ("ema_model.", teacher), ("imnet_model.", imagenet)):
        state.update({prefix + key: value for key, value in network.state_dict().items()})
    torch.save({"meta": {"CLASSES": ("road", "sidewalk"), "iter": 40000}, "state_dict": state}, path)
    return path


def test_daformer_uda_checkpoint_loads_the_student_and_reports_the_rest(tmp_path, caplog):
    student, teacher, imagenet = small_model(seed=1), small_model(seed=2), small_model(seed=3)
    path = daformer_uda_checkpoint(tmp_path / "latest.pth", student, teacher, imagenet)
    model = small_model(seed=4)
    with caplog.at_level(logging.INFO, logger="segadapt.models.weights"):
        report = load_checkpoint_weights(model, path)
    weight = model.decode_head.conv_seg.weight
    torch.testing.assert_close(weight, student.decode_head.conv_seg.weight)
    assert not torch.allclose(weight, teacher.decode_head.conv_seg.weight)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    count = len(student.state_dict())
    assert set(report.loaded) == set(student.state_dict()) and not report.missing and not report.unexpected
    assert len(report.skipped) == 2 * count
    assert all(key.startswith(("ema_model.", "imnet_model.")) for key in report.skipped)
    assert f"skipped {2 * count} tensors of the other networks in the file (ema_model.: {count}, imnet_model.: {count})" in caplog.text


def test_daformer_uda_checkpoint_with_other_class_count_names_it(tmp_path):
    networks = [small_model(seed=seed, num_classes=16) for seed in (1, 2, 3)]
    path = daformer_uda_checkpoint(tmp_path / "latest.pth", *networks)
    with pytest.raises(CheckpointError, match="checkpoint has 16 classes"):
        load_checkpoint_weights(small_model(), path)


@pytest.mark.parametrize("wrapped", [False, True])
def test_plain_encoder_decoder_state_dict_loads(tmp_path, wrapped):
    source = small_model(seed=1)
    state = source.state_dict()
    torch.save({"meta": {}, "state_dict": state} if wrapped else state, tmp_path / "model.pth")
    model = small_model(seed=2)
    report = load_checkpoint_weights(model, tmp_path / "model.pth")
    assert report.skipped == () and "skipped" not in report.summary()
    for key, value in state.items():
        torch.testing.assert_close(model.state_dict()[key], value)
