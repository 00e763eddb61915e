"""PSPNet-50 (semseg/DARS layout): key names, output stride, auxiliary head, parameter groups, ImageNet weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segadapt.errors import CheckpointError, ConfigError
from segadapt.methods.ema import ModelEMA
from segadapt.models import (
    PSPNet50,
    SegOutput,
    create_model,
    load_backbone_weights,
    model_options,
    param_groups,
    pspnet_output_size,
)
from segadapt.models.pspnet import semseg_resnet_to_pspnet_key

NUM_CLASSES = 19


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


@pytest.fixture(scope="module")
def model() -> PSPNet50:
    torch.manual_seed(0)
    return PSPNet50(NUM_CLASSES).eval()


@pytest.fixture
def eval_model(model):
    yield model.eval()
    model.eval()


@pytest.fixture
def train_model(model):
    yield model.train()
    model.eval()


def on_meta(**options) -> PSPNet50:
    """Shapes without storage: layout checks at no cost."""
    with torch.device("meta"):
        return PSPNet50(NUM_CLASSES, **options)


def bn_keys(prefix: str, channels: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.{name}", (channels,)) for name in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{prefix}.num_batches_tracked", ())
    ]


def semseg_resnet50_layout(stem: dict[str, str]) -> list[tuple[str, tuple[int, ...]]]:
    """semseg's ``resnet50(deep_base=True)`` tensors, the stem named through ``stem``, fc excluded."""
    layout = [(f"{stem['conv1']}.weight", (64, 3, 3, 3)), *bn_keys(stem["bn1"], 64),
              (f"{stem['conv2']}.weight", (64, 64, 3, 3)), *bn_keys(stem["bn2"], 64),
              (f"{stem['conv3']}.weight", (128, 64, 3, 3)), *bn_keys(stem["bn3"], 128)]
    in_channels = 128
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            layout += [(f"{p}.conv1.weight", (planes, in_channels, 1, 1)), *bn_keys(f"{p}.bn1", planes),
                       (f"{p}.conv2.weight", (planes, planes, 3, 3)), *bn_keys(f"{p}.bn2", planes),
                       (f"{p}.conv3.weight", (planes * 4, planes, 1, 1)), *bn_keys(f"{p}.bn3", planes * 4)]
            if block == 0:
                layout += [(f"{p}.downsample.0.weight", (planes * 4, in_channels, 1, 1)),
                           *bn_keys(f"{p}.downsample.1", planes * 4)]
            in_channels = planes * 4
    return layout


def semseg_pspnet_layout(num_classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """The state dict of semseg/DARS ``PSPNet(layers=50, bins=(1,2,3,6), classes=C)``, written from its source."""
    stem = {"conv1": "layer0.0", "bn1": "layer0.1", "conv2": "layer0.3", "bn2": "layer0.4",
            "conv3": "layer0.6", "bn3": "layer0.7"}
    layout = semseg_resnet50_layout(stem)
    for i in range(4):
        layout += [(f"ppm.features.{i}.1.weight", (512, 2048, 1, 1)), *bn_keys(f"ppm.features.{i}.2", 512)]
    layout += [("cls.0.weight", (512, 4096, 3, 3)), *bn_keys("cls.1", 512),
               ("cls.4.weight", (num_classes, 512, 1, 1)), ("cls.4.bias", (num_classes,))]
    layout += [("aux.0.weight", (256, 1024, 3, 3)), *bn_keys("aux.1", 256),
               ("aux.4.weight", (num_classes, 256, 1, 1)), ("aux.4.bias", (num_classes,))]
    return layout


# ------------------------------------------------------------------------------------ layout


def test_state_dict_follows_semseg_pspnet_key_names_in_order():
    layout = [(key, tuple(value.shape)) for key, value in on_meta().state_dict().items()]
    assert layout == semseg_pspnet_layout(NUM_CLASSES)
    assert len(layout) == 370


def test_parameter_count():
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in on_meta().named_children()}
    # 49.08 M with the auxiliary head, 46.72 M without (ResNet-50 deep stem 25.56 M incl. no fc).
    assert sum(counts.values()) == 49_080_038
    assert sum(counts.values()) - counts["aux"] == 46_715_347


# ---------------------------------------------------------------------------------- output


def test_output_size_is_ceil_of_one_eighth():
    assert pspnet_output_size(713, 713) == (90, 90)
    assert pspnet_output_size(361, 361) == (46, 46)
    assert pspnet_output_size(512, 1024) == (64, 128)
    model = on_meta()
    with torch.device("meta"):
        for height, width in [(713, 713), (512, 1024), (100, 37)]:
            out = model.eval()(torch.empty(2, 3, height, width))
            assert tuple(out.logits.shape) == (2, NUM_CLASSES, *pspnet_output_size(height, width))
            assert tuple(out.features.shape) == (2, 512, *pspnet_output_size(height, width))


def test_eval_forward_is_segoutput_at_stride_8_without_aux(eval_model):
    with torch.no_grad():
        out = eval_model(torch.rand(1, 3, 33, 41))
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (1, NUM_CLASSES, 5, 6)
    assert out.features.shape == (1, 512, 5, 6)
    assert out.aux_logits is None
    assert (eval_model.num_classes, eval_model.feature_dim, eval_model.output_stride) == (NUM_CLASSES, 512, 8)
    # features are exactly what the 1x1 classifier consumes
    classifier = eval_model.cls[4]
    torch.testing.assert_close(out.logits, F.conv2d(out.features, classifier.weight, classifier.bias))
    assert (out.features >= 0).all()  # post-ReLU (dropout is the identity in eval)


def test_training_forward_returns_aux_logits_of_layer3(train_model):
    images = torch.rand(2, 3, 33, 33)
    out = train_model(images)
    aux = out.aux_logits
    assert aux is not None and aux.shape == out.logits.shape == (2, NUM_CLASSES, 5, 5)
    torch.testing.assert_close(out[:2][0], out.logits)  # positional access to the first two fields still works
    assert train_model.aux_weight == 0.4
    train_model.zero_grad(set_to_none=True)
    aux.sum().backward()
    # the auxiliary loss trains the aux head and the backbone up to layer3, not layer4 or the main head
    assert train_model.aux[4].weight.grad is not None and train_model.layer3[0].conv1.weight.grad is not None
    assert train_model.layer4[0].conv1.weight.grad is None and train_model.cls[4].weight.grad is None
    train_model.zero_grad(set_to_none=True)
    train_model.eval()
    with torch.no_grad():
        assert train_model(images).aux_logits is None


def test_model_keeps_no_tensor_of_a_training_forward(train_model):
    out = train_model(torch.rand(2, 3, 17, 17))
    assert out.aux_logits is not None and out.aux_logits.grad_fn is not None
    assert "aux_logits" not in vars(train_model)  # the old side channel is gone
    teacher = ModelEMA(train_model)  # deepcopy: a non-leaf tensor attribute would make it fail
    assert isinstance(teacher.module, PSPNet50)
    assert isinstance(copy.deepcopy(train_model), PSPNet50)


def test_single_image_training_batch_is_refused_with_the_fix(train_model):
    with pytest.raises(ValueError, match="at least 2 images per batch.*freeze_bn=all"):
        train_model(torch.rand(1, 3, 17, 17))


# ------------------------------------------------------------------------- parameter groups


def test_param_groups_split_backbone_layers_from_ppm_cls_aux():
    model = on_meta()
    groups = param_groups(model)
    names = {id(p): name for name, p in model.named_parameters()}
    backbone = {names[id(p)].split(".")[0] for p in groups["backbone"]}
    head = {names[id(p)].split(".")[0] for p in groups["head"]}
    assert backbone == {"layer0", "layer1", "layer2", "layer3", "layer4"}
    assert head == {"ppm", "cls", "aux"}
    assert len(groups["backbone"]) + len(groups["head"]) == len(list(model.parameters()))


@pytest.mark.parametrize("freeze_bn", ["affine", "all"])
def test_freeze_bn_leaves_bn_out_of_the_groups(freeze_bn):
    model = on_meta(freeze_bn=freeze_bn)
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    grouped = {id(p) for group in param_groups(model).values() for p in group}
    assert bn_params and not bn_params & grouped
    assert grouped == {id(p) for p in model.parameters()} - bn_params
    model.train()
    bn_modes = {m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert bn_modes == ({False} if freeze_bn == "all" else {True})
    assert model.cls[3].training  # dropout still trains


# ------------------------------------------------------------------------------- registry


def test_registry_builds_pspnet50_with_its_options():
    assert model_options("pspnet50") == ["normalization", "freeze_bn"]
    with torch.device("meta"):
        model = create_model("pspnet50", 7, normalization="caffe", freeze_bn="affine")
    assert isinstance(model, PSPNet50) and model.num_classes == 7
    assert model.normalization.channel_order == "bgr"
    assert model.cls[4].out_channels == 7 and model.aux[4].out_channels == 7
    with pytest.raises(ConfigError, match="model.options.freeze_bn must be one of"):
        create_model("pspnet50", 19, freeze_bn=True)
    with pytest.raises(ConfigError, match="not an option of model 'pspnet50'.*did you mean 'freeze_bn'"):
        create_model("pspnet50", 19, freeze_bnn="all")


def test_default_normalization_is_imagenet():
    norm = on_meta().normalization
    assert norm.mean == (0.485, 0.456, 0.406) and norm.std == (0.229, 0.224, 0.225)
    assert norm.channel_order == "rgb" and norm.pixel_scale == 1.0


# ------------------------------------------------------------------------ ImageNet weights


def test_semseg_key_map():
    assert semseg_resnet_to_pspnet_key("conv1.weight") == "layer0.0.weight"
    assert semseg_resnet_to_pspnet_key("bn3.running_var") == "layer0.7.running_var"
    assert semseg_resnet_to_pspnet_key("conv3.weight") == "layer0.6.weight"
    assert semseg_resnet_to_pspnet_key("layer1.0.downsample.1.bias") == "layer1.0.downsample.1.bias"
    assert semseg_resnet_to_pspnet_key("fc.bias") is None


def test_semseg_resnet50_v2_weights_land_in_the_backbone(tmp_path, model):
    top_level = {name: name for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")}
    layout = semseg_resnet50_layout(top_level) + [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    # Distinct constant per tensor: every tensor must land in its own place.
    state = {key: torch.full(shape, float(index + 1)) for index, (key, shape) in enumerate(layout)}
    path = tmp_path / "resnet50_v2.pth"
    torch.save(state, path)
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    try:
        report = load_backbone_weights(model, path)
        loaded = {key: value.clone() for key, value in model.state_dict().items()}
    finally:
        model.load_state_dict(initial)  # the module's other tests keep a sane network
    head_before = {key: value for key, value in initial.items() if key.startswith(("ppm", "cls", "aux"))}
    for key, value in state.items():
        target = semseg_resnet_to_pspnet_key(key)
        if target is not None:
            assert torch.equal(loaded[target], value), key
    assert report.unexpected == ("fc.weight", "fc.bias")
    assert set(report.missing) == {key for key in head_before if not key.endswith("num_batches_tracked")}
    assert all(torch.equal(loaded[key], value) for key, value in head_before.items())


def test_torchvision_resnet_file_is_refused_with_the_expected_file(tmp_path):
    path = tmp_path / "resnet50-19c8e357.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(CheckpointError, match=(
        r"conv1.weight has shape \(64, 3, 7, 7\) but the deep-stem ResNet-50 backbone needs \(64, 3, 3, 3\);"
        r" expected the semseg/DARS deep-stem ImageNet ResNet-50 file resnet50_v2.pth"
    )):
        load_backbone_weights(on_meta(), path)
