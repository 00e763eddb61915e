"""The networks: state-dict parity with the authors' DeepLab-V2 layouts, output contract, weights, registry."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segadapt.errors import CheckpointError, ConfigError
from segadapt.models import (
    MODELS,
    BackboneHeadSplit,
    DeepLabV2,
    DeepLabV2ProDA,
    InputNormalizer,
    Normalization,
    PSPNet50,
    SegmentationModel,
    SegOutput,
    SmallSegNet,
    available_models,
    create_model,
    deeplabv2_output_size,
    load_backbone_weights,
    load_checkpoint_weights,
    param_groups,
    pspnet_output_size,
    read_state_dict,
)
from segadapt.models.deeplabv2 import ASPPClassifier

PARITY_DIR = Path(__file__).parent / "fixtures" / "parity"  # recorded from the authors' model classes
NUM_CLASSES = 19


def parse_key_list(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """``key (d0, d1, ...)`` per line, ``()`` for scalars; ``#`` lines are comments."""
    entries = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"(\S+) \(([\d, ]*)\)", line.strip())
        assert match, f"unparsable line in {path.name}: {line!r}"
        entries.append((match[1], tuple(int(d) for d in match[2].split(",") if d.strip())))
    return entries


def reference_keys(filename: str) -> list[tuple[str, tuple[int, ...]]]:
    return parse_key_list(PARITY_DIR / filename)  # part of the repository: a missing file is a failure, not a skip


def build_on_meta(model_class: type[nn.Module], *args, **kwargs) -> nn.Module:
    """A model whose tensors have shapes but no storage: for layout checks without compute."""
    with torch.device("meta"):
        return model_class(*args, **kwargs)


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


@pytest.fixture(scope="module")
def classic() -> DeepLabV2:
    torch.manual_seed(0)
    return DeepLabV2(NUM_CLASSES).eval()


@pytest.fixture(scope="module")
def proda() -> DeepLabV2ProDA:
    torch.manual_seed(0)
    return DeepLabV2ProDA(NUM_CLASSES).eval()


def state_layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


# ----------------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    ("fixture", "filename", "count"),
    [("classic", "deeplabv2_classic_state_dict_keys.txt", 632), ("proda", "deeplabv2_proda_state_dict_keys.txt", 653)],
)
def test_state_dict_equals_reference_key_list_in_order(request, fixture, filename, count):
    expected = reference_keys(filename)
    assert len(expected) == count
    assert state_layout(request.getfixturevalue(fixture)) == expected


def test_bn_clr_appends_bn_pretrain_keys_after_the_head():
    expected = reference_keys("deeplabv2_proda_state_dict_keys.txt")
    bn_keys = [(f"bn_pretrain.{name}", shape) for name, shape in
               [("weight", (2048,)), ("bias", (2048,)), ("running_mean", (2048,)), ("running_var", (2048,)),
                ("num_batches_tracked", ())]]
    assert state_layout(build_on_meta(DeepLabV2ProDA, NUM_CLASSES, bn_clr=True)) == expected + bn_keys  # 658 keys


def test_proda_parameter_count_matches_reference():
    # docs/reference_code.md, "Networks: ProDA/CPSL DeepLab-V2 head": 65.06 M parameters for 19 classes.
    model = build_on_meta(DeepLabV2ProDA, NUM_CLASSES)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 65.06


# ----------------------------------------------------------------------------- output contract


def test_output_size_formula():
    assert deeplabv2_output_size(512, 1024) == (65, 129)
    assert deeplabv2_output_size(1024, 2048) == (129, 257)
    assert deeplabv2_output_size(65, 65) == (9, 9)
    assert deeplabv2_output_size(361, 361) == (46, 46)


@pytest.mark.parametrize("model_class", [DeepLabV2, DeepLabV2ProDA])
def test_network_arithmetic_matches_formula_at_full_resolution(model_class):
    # On the meta device PyTorch propagates shapes without computing: the real layer stack,
    # a 512x1024 input, no cost.
    model = build_on_meta(model_class, NUM_CLASSES)
    with torch.device("meta"):
        for height, width in [(512, 1024), (100, 37)]:
            out = model(torch.empty(2, 3, height, width))
            assert tuple(out.logits.shape) == (2, NUM_CLASSES, *deeplabv2_output_size(height, width))
            assert out.features.shape[-2:] == out.logits.shape[-2:]


@pytest.mark.parametrize(("fixture", "feature_dim"), [("classic", 2048), ("proda", 256)])
def test_forward_returns_segoutput_at_stride_8(request, fixture, feature_dim):
    model = request.getfixturevalue(fixture)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 65, 65))
    assert out.logits.shape == (1, NUM_CLASSES, 9, 9)
    assert out.features.shape == (1, feature_dim, 9, 9)
    assert model.feature_dim == feature_dim and model.output_stride == 8 and model.num_classes == NUM_CLASSES
    assert torch.isfinite(out.logits).all()


def test_classic_features_are_layer4_output_and_logits_their_aspp(classic):
    with torch.no_grad():
        out = classic(torch.rand(1, 3, 33, 33))
        assert out.features.shape == (1, 2048, 5, 5)
        assert (out.features >= 0).all()  # post-ReLU residual output
        branches = [F.conv2d(out.features, conv.weight, conv.bias, padding=rate, dilation=rate)
                    for conv, rate in zip(classic.layer5.conv2d_list, (6, 12, 18, 24))]
    torch.testing.assert_close(out.logits, sum(branches), rtol=1e-5, atol=1e-5)


def test_aspp_branch_modes_paper_sum_and_reference_bug():
    torch.manual_seed(1)
    head = ASPPClassifier(in_channels=8, num_classes=3)
    x = torch.randn(2, 8, 30, 30)
    branch_outputs = [F.conv2d(x, c.weight, c.bias, padding=r, dilation=r)
                      for c, r in zip(head.conv2d_list, (6, 12, 18, 24))]
    with torch.no_grad():
        torch.testing.assert_close(head(x), sum(branch_outputs))
        head.branches = "first_two_reference"
        torch.testing.assert_close(head(x), branch_outputs[0] + branch_outputs[1])
    with pytest.raises(ConfigError, match="aspp_branches.*first_two_reference"):
        ASPPClassifier(8, 3, branches="two")


def test_aspp_reference_option_keeps_all_branch_weights():
    model = build_on_meta(DeepLabV2, NUM_CLASSES, aspp_branches="first_two_reference")
    assert model.layer5.branches == "first_two_reference"
    assert len(model.layer5.conv2d_list) == 4  # checkpoints still carry branches 2 and 3


def test_proda_features_are_classifier_input_after_dropout(proda):
    head = proda.layer5
    x = torch.randn(1, 2048, 5, 5)
    with torch.no_grad():
        features, logits = head(x)  # eval: dropout is the identity
        torch.testing.assert_close(logits, F.conv2d(features, head.head[1].weight))
        torch.testing.assert_close(features, head.bottleneck(torch.cat([b(x) for b in head.conv2d_list], 1)))
        head.train()
        try:
            torch.manual_seed(0)
            train_features, train_logits = head(x)
        finally:
            head.eval()
    # Dropout2d(0.1) zeroes whole channels of the returned feature (256 channels: some drop
    # with probability 1 - 0.9**256) and rescales the others by 1/0.9, as the reference's 'feat'.
    dropped = (train_features == 0).flatten(2).all(-1).squeeze(0)
    assert 0 < int(dropped.sum()) < 256
    torch.testing.assert_close(train_features[:, ~dropped], features[:, ~dropped] / 0.9)
    torch.testing.assert_close(train_logits, F.conv2d(train_features, head.head[1].weight))


def test_input_is_normalised_inside_the_model(classic, proda):
    assert classic.normalization == Normalization.preset("imagenet")
    assert proda.normalization == Normalization.preset("proda")
    images = torch.rand(1, 3, 33, 33)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    normalizer = classic.normalize
    try:
        with torch.no_grad():
            expected = classic(images).logits
            classic.normalize = InputNormalizer(Normalization(mean=(0, 0, 0), std=(1, 1, 1)))
            prenormalised = classic((images - mean) / std).logits
    finally:
        classic.normalize = normalizer
    torch.testing.assert_close(prenormalised, expected)


def test_normalization_option_accepts_presets_and_objects():
    caffe = build_on_meta(DeepLabV2, NUM_CLASSES, normalization="caffe")
    assert caffe.normalization.channel_order == "bgr" and caffe.normalization.pixel_scale == 255.0
    custom = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert build_on_meta(DeepLabV2ProDA, NUM_CLASSES, normalization=custom).normalization == custom
    with pytest.raises(ConfigError, match="normalization.*caffe.*imagenet.*proda"):
        build_on_meta(DeepLabV2ProDA, NUM_CLASSES, normalization="coco")


# --------------------------------------------------------------------------------- batch norm


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_freeze_bn_affine_freezes_parameters_but_statistics_update():
    model = build_on_meta(DeepLabV2ProDA, NUM_CLASSES, freeze_bn="affine", bn_clr=True).train()
    assert len(batchnorms(model)) == 105  # 104 in the backbone + bn_pretrain
    assert all(not p.requires_grad for m in batchnorms(model) for p in m.parameters())
    assert all(m.training for m in batchnorms(model))  # as the references: running stats keep moving
    assert all(p.requires_grad for p in model.layer5.parameters())


def test_freeze_bn_all_keeps_batchnorm_in_eval_mode():
    model = build_on_meta(DeepLabV2, NUM_CLASSES, freeze_bn="all").train()
    assert all(not m.training for m in batchnorms(model))
    assert model.training and model.layer1[0].conv1.training
    groups = param_groups(model)
    frozen = {id(p) for m in batchnorms(model) for p in m.parameters()}
    assert not frozen & {id(p) for group in groups.values() for p in group}
    assert sum(p.numel() for p in groups["backbone"]) + sum(p.numel() for p in groups["head"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_freeze_bn_all_leaves_running_statistics_untouched(classic):
    before = {k: v.clone() for k, v in classic.state_dict().items() if "running" in k}
    try:
        classic.freeze_bn = "all"
        classic.train()
        with torch.no_grad():
            classic(torch.rand(2, 3, 33, 33))
    finally:
        classic.freeze_bn = "none"
        classic.eval()
    after = classic.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_freeze_bn_rejects_ambiguous_boolean():
    with pytest.raises(ConfigError, match="freeze_bn.*boolean is ambiguous.*'affine'"):
        build_on_meta(DeepLabV2, NUM_CLASSES, freeze_bn=True)


# ------------------------------------------------------------------------------- param groups


@pytest.mark.parametrize("fixture", ["classic", "proda"])
def test_param_groups_split_backbone_and_head(request, fixture):
    model = request.getfixturevalue(fixture)
    groups = param_groups(model)
    names = {id(p): name for name, p in model.named_parameters()}
    backbone = {names[id(p)].split(".")[0] for p in groups["backbone"]}
    head = {names[id(p)].split(".")[0] for p in groups["head"]}
    assert backbone == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"} and head == {"layer5"}
    assert len(groups["backbone"]) + len(groups["head"]) == len(list(model.parameters()))


def test_param_groups_put_bn_pretrain_in_the_head_and_see_through_dataparallel():
    model = build_on_meta(DeepLabV2ProDA, NUM_CLASSES, bn_clr=True)
    groups = param_groups(model)
    assert {id(model.bn_pretrain.weight), id(model.bn_pretrain.bias)} <= {id(p) for p in groups["head"]}
    small = SmallSegNet(num_classes=3)
    wrapped = nn.DataParallel(small)  # no GPU: a plain wrapper exposing .module
    assert [id(p) for p in param_groups(wrapped)["head"]] == [id(p) for p in param_groups(small)["head"]]


def test_param_groups_reject_models_with_incomplete_or_missing_groups():
    class Incomplete(nn.Module, BackboneHeadSplit):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def backbone_parameters(self):
            return self.a.parameters()

        def head_parameters(self):
            return iter(())

    with pytest.raises(ValueError, match=r"neither group: \['b.weight', 'b.bias'\]"):
        param_groups(Incomplete())
    with pytest.raises(TypeError, match="got Linear: derive the network from segadapt.models.SegmentationModel"):
        param_groups(nn.Linear(2, 2))


def test_param_groups_do_not_probe_for_the_methods():
    class DuckTyped(nn.Linear):  # has the methods but does not declare the contract
        def backbone_parameters(self):
            return self.parameters()

        def head_parameters(self):
            return iter(())

    with pytest.raises(TypeError, match="BackboneHeadSplit.*backbone_parameters\\(\\) and head_parameters\\(\\)"):
        param_groups(DuckTyped(2, 2))


def test_param_groups_accept_a_training_wrapper_declaring_the_split():
    class WithExtraHead(nn.Module, BackboneHeadSplit):  # e.g. CPSL: network + self-labeling head
        def __init__(self, model: SegmentationModel) -> None:
            super().__init__()
            self.model, self.extra = model, nn.Linear(2, 2)

        def backbone_parameters(self) -> Iterator[nn.Parameter]:
            yield from self.model.backbone_parameters()

        def head_parameters(self) -> Iterator[nn.Parameter]:
            yield from self.model.head_parameters()
            yield from self.extra.parameters()

    small = SmallSegNet(num_classes=3, feature_dim=8, width=4)
    wrapper = WithExtraHead(small)
    groups = param_groups(wrapper)
    assert [id(p) for p in groups["backbone"]] == [id(p) for p in small.backbone_parameters()]
    assert [id(p) for p in groups["head"]] == [id(p) for p in [*small.head_parameters(), *wrapper.extra.parameters()]]


# ------------------------------------------------------------------------------ model contract


@pytest.fixture(scope="module")
def pspnet() -> PSPNet50:
    torch.manual_seed(0)
    return PSPNet50(NUM_CLASSES).eval()


@pytest.fixture(scope="module")
def small_net() -> SmallSegNet:
    torch.manual_seed(0)
    return SmallSegNet(NUM_CLASSES, feature_dim=16, width=8).eval()


def _quarter(height: int, width: int) -> tuple[int, int]:
    return -(-height // 4), -(-width // 4)


@pytest.fixture(scope="module")
def daformer_nets() -> dict[str, SegmentationModel]:
    """Every DAFormer encoder size with a 16-channel decoder, built once for the module."""
    torch.manual_seed(0)
    return {f"daformer_mitb{k}": MODELS[f"daformer_mitb{k}"](NUM_CLASSES, embed_dim=16).eval() for k in range(6)}


REGISTERED = {  # registry name -> (module fixture, the model's exact output-size rule)
    "deeplabv2_r101": ("classic", deeplabv2_output_size),
    "deeplabv2_r101_proda": ("proda", deeplabv2_output_size),
    "pspnet50": ("pspnet", pspnet_output_size),
    "small": ("small_net", _quarter),
    **{f"daformer_mitb{k}": ("daformer_nets", _quarter) for k in range(6)},
}
"""Every registered model; a new one must be added here (and so gets the contract tests). The HRDA networks
(``hrda_*``: the fused output is the context view's grid times 2, MiT needs sides of 58 there) have their
contract tests in tests/test_hrda.py (``MULTI_RESOLUTION``)."""

MULTI_RESOLUTION = ("hrda_daformer_mitb0", "hrda_daformer_mitb5", "hrda_deeplabv2_r101")

CONTRACT_INPUT = (2, 3, 65, 49)  # odd sides: the rounding of each stride-2 layer shows


def registered_model(request: pytest.FixtureRequest, name: str) -> SegmentationModel:
    model = request.getfixturevalue(REGISTERED[name][0])
    return model[name] if isinstance(model, dict) else model


@contextmanager
def briefly_in_train_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Train mode for one forward; the BN running statistics it moves are put back afterwards."""
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    try:
        yield model.train()
    finally:
        model.load_state_dict(saved)
        model.eval()


def test_contract_table_covers_the_registry():
    assert sorted([*REGISTERED, *MULTI_RESOLUTION]) == available_models()


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered_model_is_a_segmentation_model_with_the_declared_attributes(request, name):
    model = registered_model(request, name)
    assert isinstance(model, SegmentationModel) and issubclass(MODELS[name], SegmentationModel)
    assert isinstance(model.feature_dim, int) and model.feature_dim > 0
    assert isinstance(model.output_stride, int) and model.output_stride in (4, 8)
    assert isinstance(model.aux_weight, float) and model.aux_weight == (0.4 if name == "pspnet50" else 0.0)
    assert isinstance(model.normalization, Normalization) and model.normalize.norm == model.normalization
    assert model.num_classes == NUM_CLASSES


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered_model_returns_segoutput_at_its_output_stride(request, name):
    model = registered_model(request, name)
    _, output_size = REGISTERED[name]
    batch, _, height, width = CONTRACT_INPUT
    with torch.no_grad():
        out = model(torch.rand(CONTRACT_INPUT))
    assert isinstance(out, SegOutput) and out.aux_logits is None  # eval mode
    expected = output_size(height, width)
    # For these sizes every rule comes down to ceil(side / output_stride).
    assert expected == (-(-height // model.output_stride), -(-width // model.output_stride))
    assert out.logits.shape == (batch, NUM_CLASSES, *expected)
    assert out.features.shape == (batch, model.feature_dim, *expected)
    logits, features = out[:2]
    assert logits is out.logits and features is out.features


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_aux_logits_come_in_train_mode_and_only_from_pspnet(request, name):
    model = registered_model(request, name)
    with briefly_in_train_mode(model), torch.no_grad():
        out = model(torch.rand(CONTRACT_INPUT))
    if name == "pspnet50":
        assert out.aux_logits is not None and out.aux_logits.shape == out.logits.shape
    else:
        assert out.aux_logits is None
    assert not model.training
    assert "aux_logits" not in vars(model)  # no side channel on the model


@pytest.mark.parametrize("name", sorted(REGISTERED))
@pytest.mark.parametrize("freeze_bn", [None, "all"])
def test_backbone_and_head_parameters_partition_the_parameters(name, freeze_bn):
    has_freeze_bn = name.startswith(("deeplabv2", "pspnet"))  # small and DAFormer have no freeze_bn option
    options = {"freeze_bn": freeze_bn} if freeze_bn is not None and has_freeze_bn else {}
    model = build_on_meta(MODELS[name], NUM_CLASSES, **options)
    backbone = [id(p) for p in model.backbone_parameters()]
    head = [id(p) for p in model.head_parameters()]
    assert backbone and head
    assert len(set(backbone)) == len(backbone) and len(set(head)) == len(head)  # nobody twice in a group
    assert not set(backbone) & set(head)  # nobody in both
    assert set(backbone) | set(head) == {id(p) for p in model.parameters()}  # nobody missing


def test_contract_is_abstract_until_implemented():
    class NoForward(SegmentationModel):
        output_stride = 1

        def backbone_parameters(self) -> Iterator[nn.Parameter]:
            return iter(())

        def head_parameters(self) -> Iterator[nn.Parameter]:
            return iter(())

    with pytest.raises(TypeError, match="abstract.*forward"):
        NoForward(3, 4, "imagenet")


# ----------------------------------------------------------------------------------- registry


def test_registry_names_and_small_model():
    daformers = [f"daformer_mitb{k}" for k in range(6)]
    hrda = ["hrda_daformer_mitb0", "hrda_daformer_mitb5", "hrda_deeplabv2_r101"]
    assert available_models() == [*daformers, "deeplabv2_r101", "deeplabv2_r101_proda", *hrda, "pspnet50", "small"]
    model = create_model("small", 5, feature_dim=16)
    assert isinstance(model, SmallSegNet)
    out = model.eval()(torch.rand(1, 3, 32, 32))
    assert out.logits.shape[1] == 5 and out.features.shape[1] == 16


def test_registry_errors_name_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=(
        r"unknown model.name 'deeplabv2_r10'.*deeplabv2_r101, deeplabv2_r101_proda, hrda_daformer_mitb0, .*pspnet50, small"
        r".*did you mean 'deeplabv2_r101'"
    )):
        create_model("deeplabv2_r10", 19)
    with pytest.raises(ConfigError, match=(
        r"model.options.aspp_branch is not an option of model 'deeplabv2_r101'.*did you mean 'aspp_branches'"
    )):
        create_model("deeplabv2_r101", 19, aspp_branch="all")
    with pytest.raises(ConfigError, match="model.num_classes must be a positive integer, got 0"):
        create_model("deeplabv2_r101_proda", 0)
    with pytest.raises(ConfigError, match="model 'small'.*check model.options"):
        create_model("small", 3, width=0)


# ---------------------------------------------------------------------------- checkpoint files


@pytest.fixture()
def small_model() -> SmallSegNet:
    torch.manual_seed(3)
    return SmallSegNet(num_classes=4, feature_dim=8, width=4)


def perturbed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v + torch.rand_like(v.float()).to(v.dtype) + 1) if v.is_floating_point() else v + 7
            for k, v in model.state_dict().items()}


WRAPPERS = {
    "plain": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3},
    "model (segadapt)": lambda sd: {"model": sd, "iteration": 10, "rng": {"numpy": np.random.get_state()}},
    "ProDA/CPSL": lambda sd: {"ResNet101": {"model_state": sd, "optimizer_state": {"state": {}, "param_groups": []}},
                              "iter": 40000, "best_iou": np.float64(0.5566)},
    "DataParallel prefix": lambda sd: {"ResNet101": {"model_state": {f"module.{k}": v for k, v in sd.items()}}},
    "DDP + compile prefixes": lambda sd: {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_checkpoint_round_trip_through_the_authors_formats(tmp_path, small_model, wrapper, legacy_format):
    saved = perturbed_state(small_model)
    path = tmp_path / "ckpt.pth"
    torch.save(WRAPPERS[wrapper](saved), path, _use_new_zipfile_serialization=not legacy_format)
    report = load_checkpoint_weights(small_model, path)
    assert set(report.loaded) == set(saved) and report.missing == () and report.unexpected == ()
    for key, value in small_model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_proda_checkpoint_built_from_the_reference_key_list_loads_every_tensor(tmp_path, proda):
    # The file is built from the authors' key list, not from our model: names, shapes and
    # the {'ResNet101': {'model_state': ...}} wrapper of ProDA/CPSL checkpoints.
    entries = reference_keys("deeplabv2_proda_state_dict_keys.txt")
    generator = torch.Generator().manual_seed(0)
    state = {}
    for index, (key, shape) in enumerate(entries):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(index)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.01
    path = tmp_path / "from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl"
    torch.save({"ResNet101": {"model_state": state}, "iter": 1, "best_iou": np.float64(0.41)}, path)
    load_checkpoint_weights(proda, path)
    loaded = proda.state_dict()
    mismatched = [key for key, _ in entries if not torch.equal(loaded[key], state[key])]
    assert mismatched == []


def test_class_count_mismatch_names_file_and_counts(tmp_path):
    path = tmp_path / "synthia16.pth"
    torch.save({"state_dict": SmallSegNet(num_classes=16, feature_dim=8, width=4).state_dict()}, path)
    with pytest.raises(CheckpointError, match=(
        r"synthia16.pth: checkpoint has 16 classes .* but the SmallSegNet built for this run has 19 .*: use a checkpoint trained on "
        r"19 classes, or train on data labelled with its 16 classes$"
    )) as err:
        load_checkpoint_weights(SmallSegNet(num_classes=19, feature_dim=8, width=4), path)
    assert "model.pretrained" not in str(err.value)  # SmallSegNet has no ImageNet backbone to start from


def test_other_shape_mismatch_names_the_key(tmp_path, small_model):
    path = tmp_path / "wide.pth"
    torch.save(SmallSegNet(num_classes=4, feature_dim=8, width=8).state_dict(), path)
    with pytest.raises(CheckpointError, match=(
        r"wide.pth: stem.0.0.weight has shape \(8, 3, 3, 3\) in the file but \(4, 3, 3, 3\)"
    )):
        load_checkpoint_weights(small_model, path)


def test_missing_and_unexpected_keys_are_listed_with_hints(tmp_path, small_model):
    state = small_model.state_dict()
    removed = state.pop("classifier.bias")
    state["bn_pretrain.weight"] = removed
    path = tmp_path / "student.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=(
        r"student.pth does not fit model SmallSegNet: 1 model keys missing .*classifier.bias"
        r".*1 file keys unknown.*bn_pretrain.weight.*bn_clr=true"
    )):
        load_checkpoint_weights(small_model, path)


def test_layout_hint_points_to_the_other_deeplab(tmp_path, small_model):
    state = {"layer5.conv2d_list.0.weight": torch.zeros(1)}
    state.update(small_model.state_dict())
    path = tmp_path / "classic.pth"
    torch.save(state, path)
    model = build_on_meta(DeepLabV2ProDA, NUM_CLASSES)
    with pytest.raises(CheckpointError, match="classic DeepLab-V2 checkpoint: use model.name=deeplabv2_r101"):
        load_checkpoint_weights(model, path)


def test_old_files_without_batchnorm_counters_load(tmp_path, small_model):
    saved = {k: v for k, v in perturbed_state(small_model).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(saved, path)
    load_checkpoint_weights(small_model, path)
    assert torch.equal(small_model.classifier.weight, saved["classifier.weight"])


def test_unreadable_missing_and_unsafe_files(tmp_path, small_model):
    with pytest.raises(CheckpointError, match="nowhere.pth does not exist"):
        read_state_dict(tmp_path / "nowhere.pth")
    good = tmp_path / "good.pth"
    torch.save(small_model.state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated.pth cannot be read"):
        read_state_dict(truncated)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": small_model.state_dict(), "args": Normalization()}, unsafe)
    with pytest.raises(CheckpointError, match=(
        r"unsafe.pth holds Python objects .*segadapt.models.base.Normalization.*trusted=True"
    )):
        read_state_dict(unsafe)
    assert set(read_state_dict(unsafe, trusted=True)) == set(small_model.state_dict())
    empty = tmp_path / "no_weights.pth"
    torch.save({"iter": 3, "optimizer": {"lr": 0.1}}, empty)
    with pytest.raises(CheckpointError, match=(
        r"no_weights.pth holds no model state dict \(top level: \['iter', 'optimizer'\]\)"
    )):
        read_state_dict(empty)


def test_adaptsegnet_scale_prefix_is_stripped(tmp_path):
    path = tmp_path / "DeepLab_init.pth"
    torch.save({"Scale.conv1.weight": torch.zeros(1), "Scale.layer5.conv2d_list.0.weight": torch.ones(1)}, path)
    assert list(read_state_dict(path)) == ["conv1.weight", "layer5.conv2d_list.0.weight"]


# ------------------------------------------------------------------------- torchvision weights


def torchvision_resnet101_layout() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of torchvision's ``resnet101()`` state dict, written out independently."""

    def bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.{n}": (channels,) for n in ("weight", "bias", "running_mean", "running_var")}

    layout = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    in_channels = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 23, 3)), start=1):
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            layout.update({f"{p}.conv1.weight": (planes, in_channels, 1, 1), **bn(f"{p}.bn1", planes),
                           f"{p}.conv2.weight": (planes, planes, 3, 3), **bn(f"{p}.bn2", planes),
                           f"{p}.conv3.weight": (planes * 4, planes, 1, 1), **bn(f"{p}.bn3", planes * 4)})
            if block == 0:
                layout.update({f"{p}.downsample.0.weight": (planes * 4, in_channels, 1, 1),
                               **bn(f"{p}.downsample.1", planes * 4)})
            in_channels = planes * 4
    layout.update({"fc.weight": (1000, 2048), "fc.bias": (1000,)})
    return layout


def test_torchvision_resnet101_weights_land_in_the_backbone(tmp_path, classic):
    generator = torch.Generator().manual_seed(0)
    state = {key: (torch.rand(shape, generator=generator) + 0.5 if key.endswith("running_var")
                   else torch.randn(shape, generator=generator) * 0.01)
             for key, shape in torchvision_resnet101_layout().items()}
    # Like resnet101-5d3b4d8f.pth: legacy serialisation, no num_batches_tracked counters.
    path = tmp_path / "resnet101-5d3b4d8f.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    head_before = {k: v.clone() for k, v in classic.layer5.state_dict().items()}

    report = load_backbone_weights(classic, path)

    assert report.unexpected == ("fc.weight", "fc.bias")
    assert set(report.missing) == {f"layer5.{k}" for k in head_before}
    loaded = classic.state_dict()
    assert len(report.loaded) == len(state) - 2
    assert [key for key in state if not key.startswith("fc.") and not torch.equal(loaded[key], state[key])] == []
    assert all(torch.equal(classic.layer5.state_dict()[k], v) for k, v in head_before.items())


def test_incomplete_or_wrong_backbone_files_are_refused(tmp_path, proda):
    layout = torchvision_resnet101_layout()
    partial = tmp_path / "resnet50_like.pth"
    torch.save({k: torch.zeros(s) for k, s in layout.items() if k.startswith(("conv1", "bn1", "layer1"))}, partial)
    with pytest.raises(CheckpointError, match=(
        r"resnet50_like.pth lacks \d+ of the \d+ ResNet-101 backbone tensors.*layer2.0.conv1.weight"
    )):
        load_backbone_weights(proda, partial)
    wrong = tmp_path / "resnet18_stem.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, wrong)
    with pytest.raises(CheckpointError, match=(
        r"resnet18_stem.pth: conv1.weight has shape \(64, 3, 3, 3\)"
        r" but the ResNet-101 backbone needs \(64, 3, 7, 7\)"
    )):
        load_backbone_weights(proda, wrong)
    with pytest.raises(ConfigError, match="SmallSegNet has no ResNet-101 backbone"):
        load_backbone_weights(SmallSegNet(num_classes=3), wrong)
