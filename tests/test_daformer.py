"""DAFormer's training strategies (Hoyer et al., CVPR 2022, Sec. 3.3) and the daformer recipe.

The network itself (MiT encoder, fusion decoder, checkpoint keys) is tested in test_daformer_model.py.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from segadapt.config import PACKAGED_CONFIGS, load_config
from segadapt.data.classes import ClassInfo
from segadapt.data.transforms import RandomCrop
from segadapt.engine.builders import build_optimizer
from segadapt.engine.checkpoint import load_checkpoint
from segadapt.engine.logging import read_metrics
from segadapt.engine.losses import build_seg_loss
from segadapt.engine.recipes.dacs import DACS, DAFormer
from segadapt.engine.sampling import ClassBalancedSampler, CropRequirement, SeededTransformDataset
from segadapt.engine.schedule import lr_factor
from segadapt.engine.trainer import Trainer
from segadapt.errors import ConfigError, DataError
from segadapt.methods.daformer import (
    downscale_labels_by_ratio,
    feature_distance,
    ignore_border_rows,
    rare_class_distribution,
    rare_class_probabilities,
    thing_class_mask,
)
from segadapt.methods.ema import warmup_momentum
from segadapt.models import create_model

from data_fixtures import TOY_IGNORE, toy_overrides

# ----------------------------------------------------------------------------- rare-class sampling (Eq. 6)


def test_rare_class_probabilities_follow_eq_6_by_hand() -> None:
    pixels = torch.tensor([700.0, 200.0, 100.0, 0.0])
    frequency = [0.7, 0.2, 0.1]
    expected = [math.exp((1 - f) / 0.5) for f in frequency]
    expected = [e / sum(expected) for e in expected] + [0.0]
    assert rare_class_probabilities(pixels, temperature=0.5).tolist() == pytest.approx(expected)
    # DAFormer's T = 0.01 puts nearly every draw on the rarest class
    assert rare_class_probabilities(pixels, temperature=0.01)[2] > 0.99
    with pytest.raises(DataError, match="no pixel of any class"):
        rare_class_probabilities(torch.zeros(3), 0.01)


def test_rare_class_sampler_draw_frequencies_match_the_formula_on_a_hand_made_table() -> None:
    # 4 images x 3 classes; class 2 is rare and only image 3 holds more than 3000 of its pixels
    table = torch.tensor([[9000, 4000, 0], [8000, 3500, 200], [7000, 0, 2000], [6000, 100, 3100]])
    probabilities, candidates = rare_class_distribution(table, temperature=0.1, min_pixels=3000)
    totals = table.sum(dim=0).double()
    scores = torch.exp((1 - totals / totals.sum()) / 0.1)
    assert probabilities.tolist() == pytest.approx((scores / scores.sum()).tolist())
    assert candidates.tolist() == [[True, True, False], [True, True, False], [True, False, False], [True, False, True]]

    sampler = ClassBalancedSampler(candidates, probabilities, seed=3, crop_min_pixels=1500)
    stream = iter(sampler)
    draws = [next(stream) for _ in range(6000)]
    classes = torch.bincount(torch.tensor([requirement.class_id for _, _, requirement in draws]), minlength=3).double() / 6000
    assert classes.tolist() == pytest.approx(probabilities.tolist(), abs=0.02)
    for index, _, requirement in draws:
        assert candidates[index, requirement.class_id] and requirement.min_pixels == 1500
    images = torch.bincount(torch.tensor([index for index, _, _ in draws]), minlength=4).double() / 6000
    # image 3 gets every class-2 draw, images 0 and 1 share the class-1 draws, class 0 spreads over all four
    expected = [
        probabilities[0] / 4 + probabilities[1] / 2, probabilities[0] / 4 + probabilities[1] / 2,
        probabilities[0] / 4, probabilities[0] / 4 + probabilities[2],
    ]  # fmt: skip
    assert images.tolist() == pytest.approx([float(e) for e in expected], abs=0.02)
    resumed = next(iter(ClassBalancedSampler(candidates, probabilities, seed=3, start=17, crop_min_pixels=1500)))
    assert resumed == draws[17]  # a resumed stream continues exactly


def test_a_class_without_candidate_image_is_not_drawn() -> None:
    table = torch.tensor([[5000, 10], [6000, 20]])
    probabilities, _ = rare_class_distribution(table, temperature=0.01, min_pixels=3000)
    assert probabilities.tolist() == [1.0, 0.0]
    with pytest.raises(DataError, match="no source image holds more than 9000 pixels"):
        rare_class_distribution(table, temperature=0.01, min_pixels=9000)


class StripeDataset:
    """One 8x64 image whose class 1 fills only columns 60-63: most 8x8 crops miss it."""

    names = ["stripe"]

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        label = torch.zeros(8, 64, dtype=torch.long)
        label[:, 60:] = 1
        return {"image": torch.rand(3, 8, 64, generator=torch.Generator().manual_seed(0)), "label": label}


def test_the_crop_is_redrawn_until_it_shows_the_sampled_class() -> None:
    dataset = SeededTransformDataset(StripeDataset(), RandomCrop(size=8, ignore_index=255))
    plain = [int((dataset[(0, seed)]["label"] == 1).sum()) for seed in range(200)]
    required = [int((dataset[(0, seed, CropRequirement(1, 10))]["label"] == 1).sum()) for seed in range(200)]
    assert sum(p > 10 for p in plain) < 40  # about 1 crop in 19 (or fewer) shows more than 10 pixels of it by chance
    assert sum(r > 10 for r in required) > 80  # up to 10 re-draws: most crops now hold it
    assert torch.equal(dataset[(0, 5, CropRequirement(1, 10))]["label"], dataset[(0, 5, CropRequirement(1, 10))]["label"])


def test_random_crop_cat_max_ratio_redraws_single_class_crops() -> None:
    label = torch.zeros(8, 64, dtype=torch.long)
    label[:, 56:] = 1
    sample = {"image": torch.rand(3, 8, 64), "label": label}
    plain, balanced = RandomCrop(size=8), RandomCrop(size=8, cat_max_ratio=0.75)
    def accepted(crop: RandomCrop) -> int:  # views with two classes, the larger under 75 % of the pixels
        views = [crop(sample, torch.Generator().manual_seed(seed))["label"] for seed in range(300)]
        return sum(0.25 < float(view.float().mean()) < 0.75 for view in views)
    # 3 of the 57 crop positions pass (3-5 stripe columns): p = 0.053 by chance, 1 - (1 - p)^11 = 0.45 with 10 re-draws
    assert accepted(plain) < 0.1 * 300 and accepted(balanced) > 0.35 * 300
    with pytest.raises(ConfigError, match="cat_max_ratio must be in"):
        RandomCrop(size=8, cat_max_ratio=0.0)


# ----------------------------------------------------------------------------- feature distance (Eq. 7-9)


def test_feature_distance_by_hand_on_a_tiny_tensor() -> None:
    student = torch.tensor([[[[1.0, 2.0]], [[2.0, 2.0]]]], requires_grad=True)  # cells (1, 2) and (2, 2)
    frozen = torch.tensor([[[[1.0, -1.0]], [[0.0, 6.0]]]])  # differences (0, 2) and (3, -4): norms 2 and 5
    assert feature_distance(student, frozen).item() == pytest.approx(3.5)
    only_second = feature_distance(student, frozen, torch.tensor([[[False, True]]]))
    assert only_second.item() == pytest.approx(5.0)
    only_second.backward()
    assert student.grad is not None
    assert student.grad[0, :, 0, 0].tolist() == [0.0, 0.0] and student.grad[0, :, 0, 1].tolist() == pytest.approx([0.6, -0.8])
    empty = feature_distance(student, frozen, torch.zeros(1, 1, 2, dtype=torch.bool))
    assert empty.item() == 0.0  # the authors' mean of nothing is NaN; both give no gradient


def test_downscaled_labels_keep_cells_that_one_class_fills_to_the_ratio() -> None:
    labels = torch.tensor([[
        [3, 3, 0, 0, 5, 5],
        [3, 3, 0, 1, 5, 5],
    ]])  # fmt: skip
    cells = downscale_labels_by_ratio(labels, 2, 0.75, num_classes=4, ignore_index=5)
    assert cells.tolist() == [[[3, 0, 5]]]  # all 3; three of four 0; all ignore
    assert downscale_labels_by_ratio(labels, 2, 0.8, num_classes=4, ignore_index=5).tolist() == [[[3, 5, 5]]]
    assert thing_class_mask(cells, [3]).tolist() == [[[True, False, False]]]


def test_pseudo_label_crop_zeroes_the_top_and_bottom_rows() -> None:
    weight = ignore_border_rows(torch.full((2, 10, 3), 0.5), top=2, bottom=3)
    assert weight[:, :2].sum() == 0 and weight[:, 7:].sum() == 0 and torch.all(weight[:, 2:7] == 0.5)


class ConstantTeacher(torch.nn.Module):
    """Predicts class 1 with confidence ~0.9999 everywhere."""

    def forward(self, images: torch.Tensor):
        from segadapt.models.base import SegOutput

        logits = torch.zeros(images.shape[0], 3, *images.shape[-2:])
        logits[:, 1] = 10.0
        return SegOutput(logits, logits)


def test_daformer_pseudo_labels_carry_the_crop_in_their_weight() -> None:
    classes = ClassInfo("toy", ("a", "b", "c"), ((0, 0, 0), (1, 1, 1), (2, 2, 2)))
    cfg = load_config(None, [
        "recipe=daformer", "method.feature_distance_weight=0", "method.rare_class_sampling=false",
        "method.teacher_batch_norm=running",  # the stub teacher below has no BatchNorm to put in the student's mode
    ])
    recipe = DAFormer(cfg, create_model("small", 3), build_seg_loss(cfg.loss, ignore_index=255), classes)
    assert recipe.options.pseudo_ignore_top == 15 and recipe.options.pseudo_ignore_bottom == 120
    recipe.teacher.module = ConstantTeacher()
    labels, weight = recipe.pseudo_labels(torch.rand(1, 3, 512, 8), torch.ones(1, 512, 8, dtype=torch.bool))
    assert torch.all(labels == 1)
    assert weight[:, :15].sum() == 0 and weight[:, -120:].sum() == 0 and torch.all(weight[:, 15:-120] == 1.0)


# ----------------------------------------------------------------------------- the authors' step (DACS/DAFormer code)

TOY3 = ClassInfo("toy", ("a", "b", "c"), ((0, 0, 0), (1, 1, 1), (2, 2, 2)))
AUTHORS_STEP = {  # method.* -> the DACS/DAFormer code's behaviour (docs/daformer.md, "The authors' step")
    "source_loss_mean": "all",
    "teacher_batch_norm": "as_student",
    "ema_warmup": "from_start",
    "classmix_classes": "batch",
    "augmentation_coins": "batch",
    "blur_kernel": "tenth_of_side",
    "jitter_maths": "kornia",
}


def dacs_recipe(*overrides: str, model: str = "small", **model_options: int) -> DACS:
    cfg = load_config(None, ["recipe=dacs", *overrides])
    return DACS(cfg, create_model(model, 3, **model_options), build_seg_loss(cfg.loss, ignore_index=255), TOY3)


class UniformLogits(torch.nn.Module):
    """Logits 0 for every class: the cross-entropy of every labelled pixel is log 3."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor):
        from segadapt.models.base import SegOutput

        logits = torch.zeros(images.shape[0], 3, *images.shape[-2:]) * self.bias
        return SegOutput(logits, logits)


@pytest.mark.parametrize(("mean", "expected"), [("all", math.log(3) * 2 / 4), ("valid", math.log(3))])
def test_source_loss_mean_over_all_pixels_counts_ignored_ones_as_zero(mean: str, expected: float) -> None:
    recipe = dacs_recipe(f"method.source_loss_mean={mean}")
    recipe.model = UniformLogits()
    labels = torch.tensor([[[0, 255], [2, 255]]])  # 2 labelled pixels of 4
    loss = recipe.source_step(torch.rand(1, 3, 2, 2), labels)["loss_source"]
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_teacher_predicts_with_batch_statistics_as_the_student_and_without_dropout() -> None:
    from segadapt.models.mit import DropPath

    recipe = dacs_recipe(model="daformer_mitb0", embed_dim=16).train()
    teacher = recipe.teacher.module
    norms = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    dropping = [m for m in teacher.modules() if isinstance(m, (torch.nn.Dropout2d, torch.nn.Dropout, DropPath))]
    assert norms and dropping
    for norm in norms:  # running statistics far from the batch's: any use of them shows in the logits
        norm.running_mean.fill_(3.0)
        norm.running_var.fill_(9.0)
    images = torch.rand(2, 3, 32, 32)

    torch.manual_seed(0)
    first = recipe.teacher_logits(images)
    second = recipe.teacher_logits(images)
    assert torch.equal(first, second)  # no dropout, no drop-path
    assert all(bool(norm.running_mean.eq(3.0).all()) and not norm.training for norm in norms)  # left as they were
    # the DACS code's teacher: the module in train mode with its dropout and drop-path layers switched off
    reference = copy.deepcopy(teacher).train()
    for module in reference.modules():
        if isinstance(module, (torch.nn.Dropout2d, torch.nn.Dropout, DropPath)):
            module.eval()
    with torch.no_grad():
        expected = torch.nn.functional.interpolate(reference(images).logits, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(first, expected, atol=1e-5)

    recipe.options.teacher_batch_norm = "running"
    running = recipe.teacher_logits(images)
    with torch.no_grad():
        eval_mode = torch.nn.functional.interpolate(teacher.eval()(images).logits, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(running, eval_mode, atol=1e-6) and not torch.allclose(running, first, atol=1e-2)


def test_ema_warmup_coefficients_and_the_teacher_they_give() -> None:
    assert [warmup_momentum(k, 0.99) for k in (1, 2, 3)] == pytest.approx([1 / 2, 2 / 3, 3 / 4])
    assert [warmup_momentum(k, 0.99, count_start=False) for k in (1, 2, 3)] == pytest.approx([0, 1 / 2, 2 / 3])
    assert warmup_momentum(99, 0.99) == pytest.approx(0.99) and warmup_momentum(500, 0.99) == 0.99
    for warmup, after_two in [("from_start", 1.0), ("from_first_step", 1.5)]:
        recipe = dacs_recipe(f"method.ema_warmup={warmup}", "method.ema_momentum=0.99")
        start = [p.detach().clone() for p in recipe.model.parameters()]
        for step in (1, 2):  # the student moves by +1 per step: theta_k = theta_0 + k
            with torch.no_grad():
                for p in recipe.model.parameters():
                    p.add_(1.0)
            recipe.after_optimizer_step(step)
        # from_start: mean(theta_0, theta_1, theta_2) = theta_0 + 1; from_first_step: mean(theta_1, theta_2) = theta_0 + 1.5
        for ema, p0 in zip(recipe.teacher.module.parameters(), start):
            assert torch.allclose(ema, p0 + after_two, atol=1e-5)


def test_classmix_draws_from_the_batch_labels_with_the_ignore_value() -> None:
    from segadapt.data.transforms import classmix_masks

    labels = torch.tensor([[[0, 0], [1, 9]], [[2, 2], [2, 2]]])  # the batch holds 0, 1, 2 and the ignore value 9
    generator = torch.Generator().manual_seed(0)
    image_pool = [classmix_masks(labels, generator, ignore_index=9) for _ in range(400)]
    batch_pool = [classmix_masks(labels, generator, ignore_index=9, pool="batch") for _ in range(400)]
    # per image: image 1 holds only class 2, always pasted; the ignore pixel is never pasted
    assert all(bool(m[1].all()) and not m[0, 1, 1] for m in image_pool)
    # per batch: 2 of the 4 values {0, 1, 2, 9} for each image, so class 2 is pasted onto image 1 half the time
    # and the ignored pixel of image 0 half the time
    assert all(bool(m[1].all()) or not m[1].any() for m in batch_pool)
    assert sum(bool(m[1].all()) for m in batch_pool) / 400 == pytest.approx(0.5, abs=0.08)
    assert sum(bool(m[0, 1, 1]) for m in batch_pool) / 400 == pytest.approx(0.5, abs=0.08)
    # image 0 gets 2 of its own 3 values only when class 2 is not among the chosen: 1, 2 or 3 of its pixels otherwise
    assert {int(m[0].sum()) for m in batch_pool} <= {1, 2, 3}
    single = torch.tensor([[[4, 4, 9]]])  # values {4, 9}: exactly one is chosen
    assert {tuple(classmix_masks(single, generator, ignore_index=9, pool="batch")[0, 0].tolist()) for _ in range(50)} == {
        (True, True, False), (False, False, True)}


def test_strong_augmentation_coins_per_batch_apply_to_every_image_or_none() -> None:
    from segadapt.data.transforms import strong_augment
    from segadapt.data.transforms.records import JitterRecord

    images = torch.rand(4, 3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    counts = {"batch": [0, 0], "image": [0, 0]}  # batches fully jittered, fully blurred
    for coins in counts:
        for _ in range(300):
            _, records = strong_augment(images, generator, coins=coins)
            jittered = [jitter != JitterRecord() for jitter, _ in records]
            blurred = [blur.sigma > 0 for _, blur in records]
            if coins == "batch":
                assert len(set(jittered)) == 1 and len(set(blurred)) == 1
                if all(blurred):  # the sigma and the jitter factors are still drawn per image
                    assert len({blur.sigma for _, blur in records}) == 4
            counts[coins][0] += all(jittered)
            counts[coins][1] += all(blurred)
    # p 0.8 and 0.5: per batch every image together; per image all four only 0.8^4 = 0.41 and 0.5^4 = 0.06 of the time
    assert counts["batch"][0] / 300 == pytest.approx(0.8, abs=0.07) and counts["batch"][1] / 300 == pytest.approx(0.5, abs=0.08)
    assert counts["image"][0] / 300 == pytest.approx(0.41, abs=0.08) and counts["image"][1] / 300 == pytest.approx(0.0625, abs=0.04)


def test_the_dacs_step_passes_its_classmix_and_coin_options_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import segadapt.engine.recipes.dacs as dacs_module

    seen: dict[str, str] = {}
    real_masks, real_view = dacs_module.classmix_masks, dacs_module.strong_view

    def masks(labels: torch.Tensor, *args, pool: str = "image", **kwargs) -> torch.Tensor:
        seen["pool"] = pool
        return real_masks(labels, *args, pool=pool, **kwargs)

    def view(images: torch.Tensor, augmentation, coins: str = "image", **kwargs) -> torch.Tensor:
        seen["coins"] = coins
        return real_view(images, augmentation, coins=coins, **kwargs)

    monkeypatch.setattr(dacs_module, "classmix_masks", masks)
    monkeypatch.setattr(dacs_module, "strong_view", view)
    for pool, coins in [("batch", "batch"), ("image", "image")]:
        recipe = dacs_recipe(f"method.classmix_classes={pool}", f"method.augmentation_coins={coins}").train()
        batches = {"source": {"image": torch.rand(2, 3, 16, 16), "label": torch.randint(0, 3, (2, 16, 16))},
                   "target": {"image": torch.rand(2, 3, 16, 16)}}
        losses = recipe.training_step(batches, 1)
        assert seen == {"pool": pool, "coins": coins} and math.isfinite(losses["loss"].item())


DACS_CONFIGS = sorted(
    str(path.relative_to(PACKAGED_CONFIGS))
    for path in PACKAGED_CONFIGS.rglob("*.yaml")
    if path.stem.startswith(("dacs", "daformer"))
)


@pytest.mark.parametrize("name", DACS_CONFIGS)
def test_packaged_dacs_and_daformer_configs_take_the_authors_step(name: str) -> None:
    from segadapt.engine.recipes import recipe_class
    from segadapt.engine.recipes.base import parse_options

    cfg = load_config(PACKAGED_CONFIGS / name)
    assert cfg.recipe in ("dacs", "daformer")
    options = parse_options(recipe_class(cfg.recipe).Options, cfg.method, cfg.recipe)
    assert {key: getattr(options, key) for key in AUTHORS_STEP} == AUTHORS_STEP


# ----------------------------------------------------------------------------- optimiser and schedule


def test_daformer_learning_rate_at_the_warm_up_boundary() -> None:
    cfg = load_config(PACKAGED_CONFIGS / "gta5_to_cityscapes" / "daformer.yaml")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.head_lr_mult, cfg.optim.weight_decay) == ("adamw", 6e-5, 10, 0.01)
    total = cfg.train.iters
    # mmcv's linear warm-up multiplies the poly value by 1 - (1 - t / 1500) (1 - 1e-6)
    assert lr_factor(0, total, cfg.schedule) == pytest.approx(1e-6)
    assert lr_factor(1499, total, cfg.schedule) == pytest.approx((1 - 1499 / 40000) * (1e-6 + (1 - 1e-6) * 1499 / 1500))
    assert lr_factor(1500, total, cfg.schedule) == pytest.approx(1 - 1500 / 40000)
    assert lr_factor(20000, total, cfg.schedule) == pytest.approx(0.5)  # poly power 1.0


def test_daformer_optimiser_has_no_weight_decay_on_norms_and_ten_times_the_rate_on_the_decoder() -> None:
    cfg = load_config(PACKAGED_CONFIGS / "gta5_to_cityscapes" / "daformer.yaml")
    model = create_model("daformer_mitb0", 19, embed_dim=32)
    optimizer = build_optimizer(model, cfg.optim)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["backbone"]["lr"] == 6e-5 and groups["head"]["lr"] == pytest.approx(6e-4)
    assert groups["backbone"]["weight_decay"] == 0.01 and groups["backbone_no_decay"]["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in groups["backbone_no_decay"]["params"])
    assert not any("norm" in names[id(p)] for p in groups["backbone"]["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- the recipe, end to end


def test_feature_distance_needs_an_encoder_decoder_and_a_start_network() -> None:
    classes = ClassInfo("toy", ("a", "car"), ((0, 0, 0), (1, 1, 1)))
    cfg = load_config(None, ["recipe=daformer", "model.checkpoint=x.pt", "method.feature_distance_classes=[car]"])
    with pytest.raises(ConfigError, match="needs the encoder's features, which model 'small' does not expose"):
        DAFormer(cfg, create_model("small", 2), build_seg_loss(cfg.loss, ignore_index=255), classes)
    with pytest.raises(ConfigError, match="it starts from random weights: set model.pretrained"):
        DAFormer.prepare(load_config(None, ["recipe=daformer"]), Path("unused"), print)
    with pytest.raises(ConfigError, match=r"method.feature_distance_classes: \['rider'\] are not classes of the data"):
        DAFormer.check_classes(DAFormer.Options(feature_distance_classes=["car", "rider"]), classes)
    DACS.check_classes(DACS.Options(feature_distance_classes=["rider"]), classes)  # dacs: the distance is off


def test_daformer_recipe_trains_with_mitb0_and_resumes_exactly(toy: Path, tmp_path: Path) -> None:
    warm = load_config("benchmark/source_only_mitb0", [*toy_overrides(toy), f"output_dir={tmp_path}", "name=warm"])
    Trainer(warm, log=lambda _: None).fit()
    checkpoint = tmp_path / "warm" / "checkpoints" / "last.pt"
    common = [
        *toy_overrides(toy), f"output_dir={tmp_path}", f"model.checkpoint={checkpoint}", "schedule.name=constant",
        "method.ema_momentum=0.99",  # a number: the time-constant rule would rescale it with the resume's train.iters
        "method.feature_distance_classes=[car,sign]", "method.rare_class_min_pixels=10",
    ]  # fmt: skip
    things = Trainer(load_config("benchmark/daformer", [*common, "name=things"]), log=lambda _: None)
    assert things.recipe.start_network is not None and things.recipe.thing_classes == [3, 4]
    # the toy's cars and signs never fill 3/4 of a 16x24 bottleneck cell: every pixel gets the distance here
    common.append("method.feature_distance_classes=null")
    straight = load_config("benchmark/daformer", [*common, "name=straight", "train.iters=3"])
    lines: list[str] = []
    trainer = Trainer(straight, log=lines.append)
    assert trainer.recipe.thing_classes is None
    trainer.fit()
    assert any("rare-class sampling: source class pixels: making" in line for line in lines)
    assert (tmp_path / "straight" / "source_class_pixels.pt").is_file()

    first = load_config("benchmark/daformer", [*common, "name=resumed", "train.iters=2"])
    Trainer(first, log=lambda _: None).fit()
    lines.clear()
    resumed = Trainer(first.model_copy(update={"train": first.train.model_copy(update={"iters": 3})}), resume=True, log=lines.append)
    resumed.fit()
    assert any("source class pixels: reusing" in line for line in lines)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key, value in a["recipe"].items():  # the student and the EMA teacher; the frozen start network is not saved
        assert torch.equal(b["recipe"][key], value), key
    assert not any(key.startswith("start_network") for key in a["recipe"])
    records = [r for r in read_metrics(tmp_path / "straight") if "loss" in r]
    assert [r["iter"] for r in records] == [1, 2, 3]
    assert all(r["loss_feature_distance"] >= 0 and math.isfinite(r["loss_mix"]) for r in records)
    # the student starts as the frozen copy, but trains with stochastic depth (the copy predicts in eval mode)
    assert all(r["loss_feature_distance"] > 0 for r in records)
    assert trainer.recipe.ignore_index == TOY_IGNORE


@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpsl", "bicl_hybrid", "dars_sd", "cpsl_blv"])
def test_the_class_balanced_recipes_run_on_the_daformer_network(config: str, toy: Path, tmp_path: Path) -> None:
    """CPSL (with BLV too), BiCL and the DARS thresholds on MiT-B0: they need only ``features``, which the fusion decoder gives."""
    from segadapt.cli import main

    network = ["model.name=daformer_mitb0", "model.options={embed_dim: 16}"]
    assert main(["train", "benchmark/source_only", *toy_overrides(toy), *network, f"output_dir={tmp_path}", "name=warm"]) == 0
    warm = tmp_path / "warm" / "checkpoints" / "last.pt"
    extra = ["method.pixels_per_image=8", "method.queue_size=64"] if config.startswith("cpsl") else []
    args = ["train", f"benchmark/{config}", *toy_overrides(toy), *network, f"model.checkpoint={warm}", *extra, f"output_dir={tmp_path}", "name=run"]
    assert main(args) == 0
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["iteration"] == 2 and state["model_name"] == "daformer_mitb0"
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
