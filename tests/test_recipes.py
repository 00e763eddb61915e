"""What every recipe shares: the supervised-loss rule (PSPNet's auxiliary head), the shared helpers, the run caches."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segadapt.engine.recipes as recipes_package
from segadapt.config import load_config
from segadapt.data.classes import ClassInfo
from segadapt.data.transforms import RandomCrop, strong_augment
from segadapt.engine.losses import build_seg_loss
from segadapt.engine.recipes.adversarial import AdversarialWarmup
from segadapt.engine.recipes.common import DACS_STRONG, FrozenNetwork, content_mask, forward_streams, strong_view
from segadapt.engine.recipes.dacs import DACS
from segadapt.engine.recipes.self_training import SelfTraining
from segadapt.engine.recipes.source_only import SourceOnly
from segadapt.engine.run_cache import key_path, reuse_or_make
from segadapt.models import create_model
from segadapt.models.base import SegOutput

CLASSES = ClassInfo("toy", ("a", "b", "c"), ((0, 0, 0), (1, 1, 1), (2, 2, 2)))


def test_supervised_loss_adds_pspnet_auxiliary_head_with_weight_0_4() -> None:
    model = create_model("pspnet50", 3).train()
    seg_loss = build_seg_loss(load_config(None).loss, ignore_index=255)
    recipe = SourceOnly(load_config(None, ["model.name=pspnet50"]), model, seg_loss, CLASSES)
    images, labels = torch.rand(2, 3, 33, 33), torch.randint(0, 3, (2, 33, 33))
    labels[0, :5] = 255

    torch.manual_seed(1)  # the same dropout masks in both forwards
    out = model(images)
    main, aux = seg_loss(out.logits, labels), seg_loss(out.aux_logits, labels)
    torch.manual_seed(1)
    losses = recipe.training_step({"source": {"image": images, "label": labels}}, 0)
    assert torch.allclose(losses["loss"], main + 0.4 * aux)
    assert float(aux.detach()) > 0


class AuxNet(nn.Module):
    """A network with an auxiliary head, as PSPNet-50, small enough for every recipe's step on CPU."""

    feature_dim, output_stride = 4, 1

    def __init__(self, aux_weight: float = 0.4) -> None:
        super().__init__()
        self.aux_weight = aux_weight
        self.body = nn.Conv2d(3, 4, 1)
        self.classifier = nn.Conv2d(4, 3, 1)
        self.aux = nn.Conv2d(3, 3, 1)

    def forward(self, images: torch.Tensor) -> SegOutput:
        features = self.body(images)
        return SegOutput(self.classifier(features), features, self.aux(images) if self.training else None)


def step(recipe_class: type, model: nn.Module, batches: dict, *overrides: str) -> dict[str, torch.Tensor]:
    seg_loss = build_seg_loss(load_config(None).loss, ignore_index=255)
    recipe = recipe_class(load_config(None, list(overrides)), model, seg_loss, CLASSES).train()
    torch.manual_seed(0)
    return recipe.training_step(batches, 1)


def toy_batches(size: int = 32) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    def stream() -> dict[str, torch.Tensor]:
        return {"image": torch.rand(2, 3, size, size, generator=generator), "label": torch.randint(0, 3, (2, size, size), generator=generator)}
    return {"source": stream(), "target": stream()}


def test_forward_streams_splits_logits_features_and_aux_logits_per_stream() -> None:
    model = AuxNet().train()
    a, b = torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8)
    first, second = forward_streams(model, a, b)
    whole = model(torch.cat([a, b]))
    for field in ("logits", "features", "aux_logits"):
        assert torch.equal(torch.cat([getattr(first, field), getattr(second, field)]), getattr(whole, field))
    assert second.logits.shape[0] == 3
    assert forward_streams(model.eval(), a, b)[1].aux_logits is None  # eval: no auxiliary head


def test_self_training_adds_each_streams_auxiliary_term_with_its_weight() -> None:
    batches, model = toy_batches(), AuxNet()
    losses = step(SelfTraining, model, batches, "method.source_weight=0.5", "method.target_weight=2")

    def ce(logits, labels):
        return F.cross_entropy(logits, labels, ignore_index=255)

    with torch.no_grad():
        source, target = (model(batches[k]["image"]) for k in ("source", "target"))
        expected = 0.5 * (ce(source.logits, batches["source"]["label"]) + 0.4 * ce(source.aux_logits, batches["source"]["label"])) + 2 * (
            ce(target.logits, batches["target"]["label"]) + 0.4 * ce(target.aux_logits, batches["target"]["label"])
        )
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("recipe_class", [SourceOnly, SelfTraining, DACS, AdversarialWarmup])
def test_the_auxiliary_rule_trains_the_auxiliary_head_in_every_recipe(recipe_class: type) -> None:
    batches = toy_batches()
    if recipe_class is DACS:  # the target stream is unlabelled
        del batches["target"]["label"]
    with_aux = step(recipe_class, AuxNet(0.4), batches)["loss"]
    without = step(recipe_class, AuxNet(0.0), batches)["loss"]
    assert with_aux.item() > without.item()
    model = AuxNet(0.4)
    step(recipe_class, model, batches)["loss"].backward()
    assert model.aux.weight.grad is not None and model.aux.weight.grad.abs().sum() > 0


def test_recipes_import_only_the_base_and_the_shared_helpers() -> None:
    folder = Path(recipes_package.__file__).parent
    shared = {"base", "common"}
    for path in folder.glob("*.py"):
        if path.stem in shared | {"__init__"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module in shared, f"{path.name} imports recipe module .{node.module}"


def test_content_mask_is_false_in_crop_padding_on_any_grid() -> None:
    sample = {"image": torch.rand(3, 10, 12), "label": torch.zeros(10, 12, dtype=torch.long)}
    view = RandomCrop((16, 20))(sample, torch.Generator().manual_seed(0))
    batch = {"image": torch.stack([view["image"], view["image"]]), "replay": [view["replay"], []]}
    mask = content_mask(batch, (16, 20))
    assert mask.shape == (2, 16, 20) and mask[0, :10, :12].all() and not mask[0, 10:].any() and not mask[0, :, 12:].any()
    assert mask[1].all()  # no records: all content
    assert content_mask(batch, (4, 5))[0].sum() == 2 * 3  # on a stride-4 grid: pixel centres 2, 6 (rows), 2, 6, 10 (columns)
    assert content_mask({"image": batch["image"]}, (4, 5)).all()


def test_frozen_network_stays_out_of_the_state_dict_and_in_eval_mode() -> None:
    model = AuxNet()
    recipe = SourceOnly(load_config(None), model, build_seg_loss(load_config(None).loss, ignore_index=255), CLASSES)
    recipe.frozen = FrozenNetwork(AuxNet())
    recipe.train()
    assert not any(k.startswith("frozen") for k in recipe.state_dict())
    assert recipe.frozen.network.training is False and not any(p.requires_grad for p in recipe.frozen.network.parameters())
    output = recipe.frozen(torch.rand(1, 3, 4, 4))
    assert output.aux_logits is None and not output.logits.requires_grad
    assert recipe.frozen.logits(torch.rand(1, 3, 4, 4), (8, 8)).shape == (1, 3, 8, 8)


def test_dacs_strong_view_is_the_strong_augment_defaults() -> None:
    images = torch.rand(3, 3, 16, 16)
    torch.manual_seed(3)
    ours = strong_view(images, DACS_STRONG)
    torch.manual_seed(3)
    assert torch.equal(ours, strong_augment(images)[0])


def test_a_run_cache_is_reused_for_the_same_key_and_remade_otherwise(tmp_path: Path) -> None:
    result, made, lines = tmp_path / "table.json", [], []

    def make(value: int):
        def write() -> None:
            made.append(value)
            result.write_text(json.dumps(value))
        return write

    key = {"model.checkpoint": {"sha256": "ab", "bytes": 3}, "data.target": {"dataset": "x", "size": (1, 2)}}
    assert reuse_or_make(result, key, make(1), lines.append, "t") is False and "(not made yet)" in lines[-1]
    assert json.loads(key_path(result).read_text())["data.target"]["size"] == [1, 2]
    assert reuse_or_make(result, dict(key), make(2), lines.append, "t") is True and made == [1] and "reusing" in lines[-1]
    changed = {**key, "model.checkpoint": {"sha256": "cd", "bytes": 3}}
    assert reuse_or_make(result, changed, make(3), lines.append, "t") is False and made == [1, 3]
    assert "(changed: model.checkpoint)" in lines[-1]

    def killed() -> None:
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        reuse_or_make(result, key, killed, lines.append, "t")
    assert not key_path(result).exists()  # a result made half-way is never taken as current
    assert reuse_or_make(result, key, make(4), lines.append, "t") is False and "no record of what made it" in lines[-1]
    result.unlink()
    assert reuse_or_make(result, key, make(5), lines.append, "t") is False and made[-1] == 5
