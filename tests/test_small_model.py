"""SmallSegNet keeps the model contract: shapes at output stride 4, parameter groups, normalisation."""

from __future__ import annotations

import pytest
import torch

from segadapt.models.base import Normalization, SegmentationModel, SegOutput
from segadapt.models.small import SmallSegNet


@pytest.fixture(scope="module")
def model() -> SmallSegNet:
    torch.manual_seed(0)
    return SmallSegNet(num_classes=7, feature_dim=24, width=8).eval()


@pytest.mark.parametrize(("height", "width"), [(32, 64), (40, 48), (37, 53)])
def test_output_is_segoutput_at_stride_4(model: SmallSegNet, height: int, width: int) -> None:
    out = model(torch.rand(2, 3, height, width))
    assert isinstance(out, SegOutput)
    expected = (-(-height // 4), -(-width // 4))  # ceil: each stride-2 conv rounds up
    assert out.logits.shape == (2, 7, *expected)
    assert out.features.shape == (2, 24, *expected)
    assert model.output_stride == 4


def test_implements_the_model_contract_without_an_auxiliary_head(model: SmallSegNet) -> None:
    assert isinstance(model, SegmentationModel)
    assert (model.num_classes, model.feature_dim, model.output_stride, model.aux_weight) == (7, 24, 4, 0.0)
    assert model.normalization == Normalization.preset("imagenet")
    model.train()
    try:
        assert model(torch.rand(2, 3, 16, 16)).aux_logits is None
    finally:
        model.eval()


def test_defaults_give_64_dim_features_and_exact_quarter_resolution() -> None:
    out = SmallSegNet(num_classes=19).eval()(torch.rand(1, 3, 96, 192))
    assert out.logits.shape == (1, 19, 24, 48)
    assert out.features.shape == (1, 64, 24, 48)


def test_logits_are_the_classifier_applied_to_the_features(model: SmallSegNet) -> None:
    out = model(torch.rand(1, 3, 32, 32))
    torch.testing.assert_close(model.classifier(out.features), out.logits)


def test_parameter_groups_partition_all_parameters(model: SmallSegNet) -> None:
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    everything = {id(p) for p in model.parameters()}
    assert backbone and head
    assert backbone.isdisjoint(head)
    assert backbone | head == everything
    assert id(model.classifier.weight) in head
    assert id(model.stem[0][0].weight) in backbone


def test_normalisation_has_no_state_dict_entries_and_is_applied(model: SmallSegNet) -> None:
    assert not any(key.startswith("normalize") for key in model.state_dict())
    caffe = SmallSegNet(num_classes=7, feature_dim=24, width=8, normalization="caffe")
    assert caffe.state_dict().keys() == model.state_dict().keys()
    image = torch.full((1, 3, 1, 1), 0.5)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(model.normalize(image).flatten(), expected)


def test_normalization_object_and_preset_are_equivalent() -> None:
    torch.manual_seed(1)
    by_name = SmallSegNet(num_classes=3, width=4, feature_dim=8, normalization="proda").eval()
    by_object = SmallSegNet(num_classes=3, width=4, feature_dim=8, normalization=Normalization.preset("proda")).eval()
    by_object.load_state_dict(by_name.state_dict())
    images = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(by_name(images).logits, by_object(images).logits)


def test_batch_of_one_trains_despite_the_global_pooling_branch() -> None:
    model = SmallSegNet(num_classes=3, width=4, feature_dim=8).train()
    out = model(torch.rand(1, 3, 16, 16))
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_few_steps_fit_a_layout_that_needs_context() -> None:
    """Top half class 0, bottom half class 1, identical pixels: only position/context separates them."""
    torch.manual_seed(0)
    model = SmallSegNet(num_classes=2, width=8, feature_dim=16)
    images = torch.full((4, 3, 32, 32), 0.5)
    labels = torch.zeros(4, 32, 32, dtype=torch.long)
    labels[:, 16:] = 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        logits = torch.nn.functional.interpolate(model(images).logits, size=(32, 32), mode="bilinear")
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # 30 large Adam steps leave the running statistics behind the weights: estimate them once for the
    # final weights (as any evaluation after so short a run would), so the test checks the layout only
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None
        model(images)
    model.eval()
    logits = torch.nn.functional.interpolate(model(images[:1]).logits, size=(32, 32), mode="bilinear")
    accuracy = (logits.argmax(1) == labels[:1]).float().mean().item()
    assert accuracy > 0.9


def test_rejects_bad_input_and_bad_arguments(model: SmallSegNet) -> None:
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        model(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="positive"):
        SmallSegNet(num_classes=0)
    with pytest.raises(ValueError, match="unknown normalization preset"):
        SmallSegNet(num_classes=3, normalization="bogus")


def test_the_embedding_is_signed_by_default_like_the_proda_head_and_relu_on_request() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 64)
    signed = SmallSegNet(num_classes=5, feature_dim=16, width=8).train()
    relu = SmallSegNet(num_classes=5, feature_dim=16, width=8, embedding="relu").train()
    relu.load_state_dict(signed.state_dict())  # the same keys either way: checkpoints load across the option
    features = signed(images).features
    assert (features < 0).float().mean() > 0.3 and not (features == 0).any()  # batch-norm output, no ReLU
    assert torch.equal(relu(images).features, features.clamp(min=0))  # the former embedding is its ReLU
    pixels = torch.nn.functional.normalize(features.permute(0, 2, 3, 1).reshape(-1, 16), dim=1)
    assert (pixels @ pixels.T).min() < -0.2  # cosines span negative values, which Sinkhorn scores and prototypes use
    # the logits are the classifier on the embedding the recipes see
    out = signed(images)
    assert torch.allclose(out.logits, signed.classifier(out.features), atol=1e-6)
    with pytest.raises(ValueError, match="embedding"):
        SmallSegNet(num_classes=5, embedding="tanh")  # type: ignore[arg-type]
