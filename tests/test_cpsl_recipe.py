"""The CPSL recipes end to end on the tiny benchmark: stage 1 (cpsl), its ablation switches, the
adversarial warm-up and the distillation stage; exact resume of everything they keep."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from segadapt.cli import main
from segadapt.config import load_config
from segadapt.data.transforms import records_after_full_frame, to_augmented_view, valid_mask
from segadapt.data.transforms.randaugment import GREY
from segadapt.engine.checkpoint import load_checkpoint
from segadapt.engine.logging import read_metrics
from segadapt.engine.recipes import cpsl as cpsl_recipe
from segadapt.engine.recipes.adversarial import FCDiscriminator
from segadapt.engine.trainer import Trainer
from segadapt.errors import ConfigError
from segadapt.methods import cpsl as cpsl_methods
from segadapt.methods.cpsl import class_pixel_counts, cutmix, gather_pixel_features, reverse_cross_entropy
from segadapt.methods.ema import batch_norm_as

from data_fixtures import FAST, TINY, tiny_args, tiny_config, toy_overrides

# crops inside the 32x64 tiny images: the small network's 8x16 output grid has 128 pixels
CROP = ["data.train_transforms=[{name: random_crop, size: [32, 64]}, {name: random_horizontal_flip}]"]

# The paper's reading of the step (Alg. 1, Eq. 1-14; config benchmark/cpsl_paper but for the consistency's
# reduction), which the tests of the paper's equations set: since 2026-12-07 the defaults are the authors' step.
# One Sinkhorn problem over the batch's pooled pixels, so the self-labeling loss is one call.
PAPER_STEP = (
    "method.consistency=segmentation",
    "method.cutmix_p=0",
    "method.target_loss=ce",
    "method.contrastive_weight=0",
    "method.output_self_labeling=false",
    "method.pixel_sampling=class_balanced",
    "method.sinkhorn_per_image=false",
    "method.bank_partial=true",
    "method.bank_scores=cosine",
    "method.prototype_init=pixel_mean",
    "method.strong_view=photometric",
    "method.teacher_view=weak",
    "method.distribution=momentum",
)


@pytest.fixture(scope="module")
def warmup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source-only warm-up checkpoint (a few iterations: only its role matters here)."""
    out = tmp_path_factory.mktemp("warmup")
    assert main(["train", "benchmark/source_only", *tiny_args(out, *CROP, "name=w", "train.iters=3")]) == 0
    return out / "w" / "checkpoints" / "last.pt"


def cpsl_config(tmp_path: Path, warmup: Path, *extra: str, config: str = "benchmark/cpsl"):
    return tiny_config(tmp_path, *CROP, f"model.checkpoint={warmup}", "method.pixels_per_image=16", "method.queue_size=64", *extra, config=config)


# ---------------------------------------------------------------------------------------------- cpsl


def stop_after(cfg, iterations: int) -> None:
    """Train ``iterations`` steps of a run and write its checkpoint, as a run killed right after saving."""
    trainer = Trainer(cfg)
    loaders = trainer._loaders()
    for _ in range(iterations):
        trainer._step(loaders)
    trainer.save("last.pt")


def test_cpsl_resumes_bitwise_and_reuses_its_warmup_statistics(tmp_path: Path, warmup: Path) -> None:
    common = TINY + FAST + CROP + [f"output_dir={tmp_path}", f"model.checkpoint={warmup}", "method.pixels_per_image=16",
                                   "method.queue_size=40", "train.iters=3", "method.distribution=momentum"]
    stop_after(load_config("benchmark/cpsl", common + ["name=a"]), 2)
    stamp = (tmp_path / "a" / "cpsl_init.pt").stat().st_mtime_ns
    assert main(["train", str(tmp_path / "a")]) == 0  # a run directory resumes
    assert (tmp_path / "a" / "cpsl_init.pt").stat().st_mtime_ns == stamp  # prepare reused its work
    assert main(["train", "benchmark/cpsl", *common, "name=b"]) == 0

    resumed, straight = (load_checkpoint(tmp_path / n / "checkpoints" / "last.pt") for n in "ab")
    assert resumed["iteration"] == straight["iteration"] == 3
    keys = set(straight["recipe"])
    assert {"head.prototypes", "ema_head.module.prototypes", "bank.features", "bank.pointer", "class_distribution.distribution"} <= keys
    assert any(k.startswith("ema_model.module.") for k in keys) and not any(k.startswith("_warmup") for k in keys)
    for key, value in straight["recipe"].items():
        assert torch.equal(resumed["recipe"][key], value), key
    # the benchmark config: AdamW for the network, the paper's SGD for the self-labeling head
    adamw, sgd = straight["optimizer"]["optimizers"]
    assert [g["name"] for g in sgd["param_groups"]] == ["method_head"] and "momentum_buffer" in sgd["state"][0]
    for saved, again in zip(straight["optimizer"]["optimizers"], resumed["optimizer"]["optimizers"]):
        for index, state in saved["state"].items():
            for name, value in state.items():
                assert torch.equal(again["state"][index][name], value), (index, name)
    # 3 iterations x 2 images x 16 pixels = 96 features went through a 40-slot FIFO
    assert int(straight["recipe"]["bank.num_filled"]) == 40 and int(straight["recipe"]["bank.pointer"]) == 96 % 40
    r = straight["recipe"]["class_distribution.distribution"]
    initial = torch.load(tmp_path / "b" / "cpsl_init.pt")["class_counts"].float()
    assert r.sum().item() == pytest.approx(1.0) and not torch.allclose(r, initial / initial.sum())  # Eq. 11 moved r
    rows = [row for row in read_metrics(tmp_path / "a") if "loss" in row]
    assert [row["iter"] for row in rows] == [3]  # the stopped run logged nothing before its checkpoint
    assert all(math.isfinite(row[k]) for row in rows for k in ("loss_source", "loss_target", "loss_sl", "loss_reg"))


def test_cpsl_warmup_statistics_are_remade_only_when_what_made_them_changes(tmp_path: Path, warmup: Path) -> None:
    import shutil

    lines: list[str] = []
    run_dir = tmp_path / "r"

    def prepare(*extra):
        return cpsl_recipe.CPSL.prepare(cpsl_config(tmp_path, warmup, *extra), run_dir, lines.append)

    prepare()
    stamp = (run_dir / "cpsl_init.pt").stat().st_mtime_ns
    copied = tmp_path / "copy.pt"
    shutil.copy(warmup, copied)
    prepare(f"model.checkpoint={copied}")  # the same warm-up under another path
    assert "reusing" in lines[-1] and (run_dir / "cpsl_init.pt").stat().st_mtime_ns == stamp
    with torch.no_grad():  # another warm-up: other weights in the same file name
        state = torch.load(copied, weights_only=False)
        state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
        torch.save(state, copied)
    prepare(f"model.checkpoint={copied}")
    assert any("changed: model.checkpoint)" in line for line in lines[-3:])
    prepare(f"model.checkpoint={copied}", "pseudo_label.size=[16,32]")
    assert any("changed: pseudo_label.size)" in line for line in lines[-3:])


def test_cpsl_warmup_statistics_are_eq7_and_eq10_of_the_warmup(tmp_path: Path, warmup: Path) -> None:
    cfg = cpsl_config(tmp_path, warmup, "name=s", "method.prototype_init=pixel_mean")  # Eq. 7 as written
    trainer = Trainer(cfg)
    init = torch.load(tmp_path / "s" / "cpsl_init.pt")
    from segadapt.engine.builders import build_dataset_from_spec, build_model

    dataset = build_dataset_from_spec(cfg.data.target, with_labels=False)
    net = build_model(cfg.model, 19).eval()
    counts, sums = torch.zeros(19, dtype=torch.float64), torch.zeros(19, init["prototypes"].shape[1], dtype=torch.float64)
    with torch.no_grad():
        for index in range(len(dataset)):
            out = net(dataset[index]["image"][None])
            hard = out.logits.argmax(1).flatten()
            feats = F.normalize(out.features.double(), dim=1).flatten(2)[0].T
            counts += torch.bincount(hard, minlength=19).double()
            sums.index_add_(0, hard, feats)
    assert torch.equal(init["class_counts"], counts) and init["num_images"] == len(dataset) == 4
    seen = counts > 0
    expected = (sums[seen] / counts[seen].unsqueeze(1)).float()
    assert torch.allclose(init["prototypes"][seen], expected, atol=1e-6)
    recipe = trainer.recipe
    assert torch.allclose(recipe.head.prototypes[seen], F.normalize(expected, dim=1), atol=1e-6)  # Alg. 1 line 2
    assert torch.equal(recipe.ema_head.module.prototypes, recipe.head.prototypes)
    assert torch.allclose(recipe.class_distribution.distribution, (counts / counts.sum()).float())  # Eq. 10


def test_cpsl_image_means_prototypes_are_the_authors_four_passes(tmp_path: Path, warmup: Path) -> None:
    """``method.prototype_init=image_means``: calc_prototype.py's running mean of per-image means, four passes; Eq. 10 once."""
    lines: list[str] = []
    run_dir = tmp_path / "r"
    cpsl_recipe.CPSL.prepare(cpsl_config(tmp_path, warmup, "method.prototype_init=pixel_mean"), run_dir, lines.append)
    pixel_mean = torch.load(run_dir / "cpsl_init.pt")
    cfg = cpsl_config(tmp_path, warmup, "method.prototype_init=image_means")
    cpsl_recipe.CPSL.prepare(cfg, run_dir, lines.append)
    assert any("changed: method.prototype_init)" in line for line in lines[-3:])
    init = torch.load(run_dir / "cpsl_init.pt")
    from segadapt.engine.builders import build_dataset_from_spec, build_model

    dataset = build_dataset_from_spec(cfg.data.target, with_labels=False)
    net = build_model(cfg.model, 19).eval()
    expected = cpsl_methods.ImageMeanPrototypes(19, init["prototypes"].shape[1])
    with torch.no_grad():
        for _ in range(4):
            for index in range(len(dataset)):
                out = net(dataset[index]["image"][None])
                expected.update(out.features, out.logits.argmax(1))
    assert torch.allclose(init["prototypes"], expected.compute(), atol=1e-6)
    assert torch.equal(init["class_counts"], pixel_mean["class_counts"])  # counted in the first pass only
    assert not torch.allclose(F.normalize(init["prototypes"], dim=1), F.normalize(pixel_mean["prototypes"], dim=1), atol=1e-4)


class Spy:
    """Records the calls of the method functions the recipe composes, and passes them through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: dict[str, list[dict[str, Any]]] = {}
        for name, params in (
            ("rectify_pseudo_labels", ("soft", "scores", "tau")),
            ("sample_pixels", ("labels", "m", "k")),
            ("online_self_labeling_loss", ("head", "features", "bank", "marginal")),
            ("symmetric_kl_consistency", ("weak", "strong", "mask", "reduction")),
            ("prototype_kl_consistency", ("weak", "strong", "tau", "mask", "reduction")),
        ):
            self._wrap(monkeypatch, name, params)

    def _wrap(self, monkeypatch: pytest.MonkeyPatch, name: str, params: tuple[str, ...]) -> None:
        original = getattr(cpsl_recipe, name)

        def spy(*args: Any, **kwargs: Any) -> Any:
            record = dict(zip(params, args), **kwargs)
            record = {k: v.detach().clone() if isinstance(v, torch.Tensor) and k != "features" else v for k, v in record.items()}
            result = original(*args, **kwargs)
            record["result"] = result.detach().clone() if isinstance(result, torch.Tensor) else result
            self.calls.setdefault(name, []).append(record)
            return result

        monkeypatch.setattr(cpsl_recipe, name, spy)

    def one(self, name: str) -> dict[str, Any]:
        assert len(self.calls.get(name, [])) == 1, f"{name} called {len(self.calls.get(name, []))} times"
        return self.calls[name][0]


def one_step(tmp_path: Path, warmup: Path, monkeypatch: pytest.MonkeyPatch, name: str, *extra: str):
    """One CPSL training step on the run's first batches, with the method calls and network calls recorded."""
    trainer = Trainer(cpsl_config(tmp_path, warmup, f"name={name}", *extra))
    recipe = trainer.recipe
    batches = {k: next(loader) for k, loader in trainer._loaders().items()}
    spy = Spy(monkeypatch)
    forwards: list[tuple[bool, torch.Tensor, torch.Tensor]] = []
    recipe.model.register_forward_hook(lambda m, args, out: forwards.append((m.training, args[0].clone(), out.logits.detach().clone())))
    r_before = recipe.class_distribution.distribution.clone() if hasattr(recipe, "class_distribution") else None
    supervised = recipe.supervised_loss
    spy.calls["supervised_loss"] = []
    monkeypatch.setattr(
        recipe, "supervised_loss", lambda output, labels, **kw: spy.calls["supervised_loss"].append(labels) or supervised(output, labels, **kw)
    )
    recipe.train()
    torch.manual_seed(0)
    losses = recipe.training_step(batches, 0)
    return trainer, recipe, batches, spy, forwards, losses, r_before


def warmup_probs(warmup: Path, images: torch.Tensor) -> torch.Tensor:
    from segadapt.engine.builders import build_model

    cfg = load_config("benchmark/cpsl", [f"model.checkpoint={warmup}"])
    with torch.no_grad():
        return build_model(cfg.model, 19).eval()(images).logits.softmax(1)


def test_cpsl_step_follows_eq1_eq8_eq11_and_eq14(tmp_path: Path, warmup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer, recipe, batches, spy, forwards, losses, r0 = one_step(tmp_path, warmup, monkeypatch, "full", *PAPER_STEP)
    weak = batches["target"]["image"]
    rectify = spy.one("rectify_pseudo_labels")
    assert torch.allclose(rectify["soft"], warmup_probs(warmup, weak), atol=1e-6)  # P_ST: the fixed warm-up
    assert rectify["tau"] == 0.08
    labels = rectify["result"]
    sampling = spy.one("sample_pixels")
    assert sampling["m"] == 16 and sampling["class_balanced"] is True and torch.equal(sampling["labels"], labels)
    sl = spy.one("online_self_labeling_loss")
    assert not sl["features"].requires_grad and sl["features"].shape == (2 * 16, 64)  # momentum features (paper, Alg. 1 l. 15)
    assert torch.equal(sl["marginal"], r0)  # Eq. 12: r before this iteration's update
    counts = class_pixel_counts(labels, 19).float()
    alpha = 0.999 ** (90000 / recipe.cfg.train.iters)  # benchmark/cpsl: the paper-scale 0.999 under the time-constant rule
    assert recipe.class_distribution.momentum == pytest.approx(alpha)
    assert torch.allclose(recipe.class_distribution.distribution, alpha * r0 + (1 - alpha) * counts / counts.sum(), atol=1e-7)  # Eq. 11
    assert int(recipe.bank.num_filled) == 32
    # the consistency's student view is the strong one (same geometry, other colours); L^t_SEG is on the weak view, a
    # third forward, as the authors' code (method.target_view=weak, default)
    strong_input = forwards[1][1]
    assert [f[0] for f in forwards] == [True, True, True] and strong_input.shape == weak.shape and not torch.equal(strong_input, weak)
    assert torch.equal(forwards[2][1], weak) and "cutmix" not in losses
    kl = spy.one("symmetric_kl_consistency")
    assert torch.equal(kl["strong"], forwards[1][2])
    assert kl["reduction"] == "class_mean" and torch.equal(losses["loss_reg"], kl["result"])  # the authors' KL / K
    # both cross-entropies follow the supervised-loss rule (an auxiliary head would be trained by both)
    assert len(spy.calls["supervised_loss"]) == 2 and torch.equal(spy.calls["supervised_loss"][1], labels)
    total = losses["loss_source"] + losses["loss_target"] + 0.1 * losses["loss_sl"] + 5.0 * losses["loss_reg"]
    assert losses["loss"].item() == pytest.approx(total.item(), rel=1e-5)  # Eq. 14
    # the self-labeling head is trained at the head learning rate (5x), by the paper's SGD (Sec. 4.1)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert [p is recipe.head.prototypes for p in groups["method_head"]["params"]] == [True]
    assert not any(p is recipe.head.prototypes for p in groups["head"]["params"])
    assert groups["method_head"]["lr"] == groups["head"]["lr"] == pytest.approx(5 * groups["backbone"]["lr"])
    sgd, adamw = (o for o in trainer.optimizer.optimizers[::-1])
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0] is groups["method_head"] and groups["method_head"]["momentum"] == 0.9
    assert isinstance(adamw, torch.optim.AdamW) and {g["name"] for g in adamw.param_groups} == {"backbone", "head"}


@pytest.mark.parametrize(
    "switch",
    ["self_labeling", "self_training", "class_balanced", "init_from_prototypes", "strong_augmentation", "momentum_network",
     "sl_through_ema_features_only", "distribution"],
)
def test_every_cpsl_switch_changes_what_the_step_does(tmp_path: Path, warmup: Path, monkeypatch: pytest.MonkeyPatch, switch: str) -> None:
    override = {"distribution": "fixed"}.get(switch, "false")
    trainer, recipe, batches, spy, forwards, losses, r0 = one_step(tmp_path, warmup, monkeypatch, switch, *PAPER_STEP, f"method.{switch}={override}")
    weak = batches["target"]["image"]
    inside = torch.ones(weak.shape[0], 8, 16, dtype=torch.bool)
    if switch == "self_labeling":  # w/o SL: no head, labels are argmax P_ST, no L_SL
        assert recipe.head is None and "rectify_pseudo_labels" not in spy.calls and losses["loss_sl"] == 0
        assert not any(k.startswith(("head.", "bank.")) for k in recipe.state_dict())
        assert torch.equal(spy.one("symmetric_kl_consistency")["mask"], inside)
        expected = warmup_probs(warmup, weak).argmax(1)
        captured: list[torch.Tensor] = []

        class Recording(torch.nn.Module):
            def __init__(self, loss: Any) -> None:
                super().__init__()
                self.loss = loss

            def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
                captured.append(labels)
                return self.loss(logits, labels)

        recipe.seg_loss = Recording(recipe.seg_loss)
        torch.manual_seed(0)
        recipe.training_step(batches, 0)
        assert torch.equal(captured[-1], expected)  # the target labels (the source ones come first)
    elif switch == "self_training":  # w/o ST: a flat P_ST, the labels are argmax P_SL
        rectify = spy.one("rectify_pseudo_labels")
        assert recipe._warmup is None and torch.equal(rectify["soft"], torch.ones_like(rectify["soft"]))
        assert torch.equal(rectify["result"], rectify["scores"].argmax(1)) and "rectified_fraction" not in losses
    elif switch == "class_balanced":  # w/o CB: uniform sampling and equipartition
        assert spy.one("sample_pixels")["class_balanced"] is False and spy.one("online_self_labeling_loss")["marginal"] is None
    elif switch == "init_from_prototypes":  # w/o Init: the head does not start at the class prototypes
        prototypes = F.normalize(torch.load(tmp_path / switch / "cpsl_init.pt")["prototypes"], dim=1)
        assert not torch.allclose(recipe.head.prototypes, prototypes, atol=1e-2)
        assert torch.allclose(recipe.head.prototypes.norm(dim=1), torch.ones(19))
    elif switch == "strong_augmentation":  # w/o Aug: the student sees the weak view itself, in the consistency too
        assert len(forwards) == 3 and torch.equal(forwards[1][1], weak) and torch.equal(forwards[2][1], weak)
    elif switch == "momentum_network":  # w/o Mom: the targets come from the student itself, normalising like it
        assert recipe.ema_model is None and recipe.ema_head is None
        assert not any(k.startswith("ema_") for k in recipe.state_dict())
        training, seen, logits = forwards[1]
        assert training and torch.equal(seen, weak) and torch.equal(spy.one("symmetric_kl_consistency")["weak"], logits)
        assert spy.one("online_self_labeling_loss")["head"] is recipe.head
    elif switch == "sl_through_ema_features_only":  # false: L_SL on the student's features reaches the network
        assert spy.one("online_self_labeling_loss")["features"].requires_grad
    elif switch == "distribution":  # authors' code: r stays the warm-up histogram
        assert torch.equal(recipe.class_distribution.distribution, r0)


@pytest.mark.parametrize(
    "overrides, jitter, blur",
    [((), (0.4, 0.5), ((1.0, 1.0), 0.5)),  # the authors' RandAugmentMC photometric part
     (("method.strong_blur_sigma=0.12",), (0.4, 0.5), ((0.12, 0.12), 0.5)),
     (("method.strong_blur_sigma=0",), (0.4, 0.5), ((0.0, 0.0), 0.0)),
     (("method.strong_jitter=0",), (0.0, 0.0), ((1.0, 1.0), 0.5))],
)
def test_strong_view_follows_its_options(
    tmp_path: Path, warmup: Path, monkeypatch: pytest.MonkeyPatch, overrides: tuple[str, ...], jitter: tuple, blur: tuple
) -> None:
    """``method.strong_blur_sigma`` and ``method.strong_jitter`` set one part of the student's view each (the
    authors' radius 1 on ~2,200-pixel images is ~0.12 on the benchmark's 256); 0 switches that part off."""
    views: list[Any] = []
    original = cpsl_recipe.strong_view
    monkeypatch.setattr(cpsl_recipe, "strong_view", lambda images, aug: views.append(aug) or original(images, aug))
    one_step(tmp_path, warmup, monkeypatch, f"view{len(overrides) and overrides[0][7:]}", "method.strong_view=photometric", *overrides)
    (augmentation,) = views
    assert (augmentation.jitter, augmentation.jitter_p) == jitter
    assert (augmentation.blur_sigma, augmentation.blur_p) == blur
    for key in ("strong_blur_sigma", "strong_jitter"):
        with pytest.raises(ConfigError, match=f"method.{key}"):
            Trainer(cpsl_config(tmp_path, warmup, f"name=neg_{key}", f"method.{key}=-1"))


def test_self_labeling_loss_trains_only_the_head_by_default(tmp_path: Path, warmup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPSL Fig. 1: "The f'_SEG is followed by a self-labeling head f_SL"; Sec. 3.2: "the self-labeling head f_SL
    is updated by minimizing L_SL"; Algorithm 1, line 15: "Train the self-labeling head f_SL using loss L_SL",
    line 19: "Update f_SEG using loss L^t_SEG". So L_SL sees the momentum network's features and reaches no
    parameter of the segmentation network: its weight lambda1 changes the head's gradient, not the network's."""
    gradients = {}
    for lambda1 in ("0.1", "0.0"):
        _, recipe, _, spy, _, losses, _ = one_step(tmp_path, warmup, monkeypatch, f"paper_{lambda1}", f"method.lambda1={lambda1}")
        assert recipe.options.sl_through_ema_features_only is True
        calls = spy.calls["online_self_labeling_loss"]  # one Sinkhorn problem per image (the authors' default)
        assert len(calls) == 2 and not any(call["features"].requires_grad for call in calls)  # momentum features
        losses["loss"].backward()
        network = [p.grad.clone() for p in recipe.model.parameters() if p.grad is not None]
        head = [p.grad.clone() for p in recipe.head.parameters() if p.grad is not None]
        gradients[lambda1] = network, head
    (network, head), (network_without, head_without) = gradients["0.1"], gradients["0.0"]
    assert network and len(network) == len(network_without)
    assert all(torch.equal(a, b) for a, b in zip(network, network_without))
    assert any(not torch.equal(a, b) for a, b in zip(head, head_without))


def test_prototype_consistency_is_the_authors_kl_on_the_momentum_prototypes(
    tmp_path: Path, warmup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """method.consistency=prototype: KL(teacher || student) of softmax(cos(z, c'_SL) / tau), the teacher the momentum
    network's weak view, the student the student's strong view, both against the momentum head's prototypes; the
    gradient reaches the student network, not the head (its only gradient stays L_SL's)."""
    gradients = {}
    for lambda2 in ("5.0", "0.0"):
        _, recipe, batches, spy, _, losses, _ = one_step(
            tmp_path, warmup, monkeypatch, f"proto_{lambda2}", *PAPER_STEP, "method.consistency=prototype", f"method.lambda2={lambda2}"
        )
        assert "symmetric_kl_consistency" not in spy.calls
        call = spy.one("prototype_kl_consistency")
        assert call["tau"] == 0.08 and torch.equal(call["mask"], torch.ones(2, 8, 16, dtype=torch.bool))
        momentum_prototypes = F.normalize(recipe.ema_head.module.prototypes, dim=1)
        with batch_norm_as(recipe.ema_model.module, recipe.model):
            teacher = recipe.ema_model(batches["target"]["image"]).features
        expected_weak = torch.einsum("ndhw,kd->nkhw", F.normalize(teacher, dim=1), momentum_prototypes)
        assert torch.allclose(call["weak"], expected_weak, atol=1e-5)
        assert call["weak"].shape == call["strong"].shape == (2, 19, 8, 16) and not torch.equal(call["weak"], call["strong"])
        # one-directional KL at tau
        p_weak = torch.softmax(call["weak"] / 0.08, dim=1)
        kl = (p_weak * (p_weak.log() - torch.log_softmax(call["strong"] / 0.08, dim=1))).sum(1).mean()
        assert call["reduction"] == "class_mean"
        assert losses["loss_reg"].item() == pytest.approx(kl.item() / 19, rel=1e-4)  # the authors' (kl * mask).sum() / mask.sum()
        losses["loss"].backward()
        gradients[lambda2] = (
            [p.grad.clone() for p in recipe.model.parameters() if p.grad is not None],
            recipe.head.prototypes.grad.clone(),
        )
    (network, head), (network_without, head_without) = gradients["5.0"], gradients["0.0"]
    assert torch.equal(head, head_without)  # the consistency term sends nothing to the head
    assert any(not torch.equal(a, b) for a, b in zip(network, network_without))  # ... and reaches the network
    with pytest.raises(ConfigError, match=r"method.consistency=segmentation \(Eq. 13\) for 'w/o SL'"):
        Trainer(cpsl_config(tmp_path, warmup, "name=e5", *PAPER_STEP, "method.consistency=prototype", "method.self_labeling=false"))


@pytest.mark.parametrize(
    ("config", "reduction"),
    [
        ("benchmark/cpsl", "class_mean"),
        ("gta5_to_cityscapes/cpsl", "class_mean"),
        ("synthia_to_cityscapes/cpsl", "class_mean"),
        ("benchmark/cpsl_paper", "pixel_mean"),
        ("gta5_to_cityscapes/cpsl_paper", "pixel_mean"),
    ],
)
def test_cpsl_configs_use_the_authors_consistency_reduction_and_cpsl_paper_the_per_pixel_mean(config: str, reduction: str) -> None:
    cfg = load_config(config)
    assert cfg.recipe == "cpsl"
    assert cpsl_recipe.parse_options(cpsl_recipe.CPSLOptions, cfg.method, "cpsl").consistency_reduction == reduction
    options = cpsl_recipe.CPSLOptions()
    assert options.consistency_reduction == "class_mean" and options.target_view == "weak"  # the authors' code


# The authors' stage-1 step (lslrh/CPSL README: --ema --proto_rectify --rce --proto_consistW 5 --SL_lambda 0.1, the rest
# parser_train.py's defaults), each option where it departs from the paper, and the paper's reading of it.
AUTHORS_AND_PAPER = {
    "consistency": ("prototype", "segmentation"),
    "consistency_reduction": ("class_mean", "pixel_mean"),
    "cutmix_p": (0.5, 0.0),
    "target_loss": ("symmetric_ce", "ce"),
    "contrastive_weight": (0.001, 0.0),
    "output_self_labeling": (True, False),
    "pixel_sampling": ("shared_uniform", "class_balanced"),
    "bank_partial": (False, True),
    "bank_scores": ("unnormalised_prototypes", "cosine"),
    "prototype_init": ("image_means", "pixel_mean"),
    "teacher_view": ("full_frame", "weak"),
    "distribution": ("fixed", "momentum"),
    "pixels_per_image": (256, 512),
}
# where the paper agrees with the authors or is silent: the authors' value in both
SHARED = {"target_view": "weak", "strong_view": "randaugment", "sinkhorn_per_image": True, "momentum_batch_norm": "as_student",
          "sl_through_ema_features_only": True, "lambda1": 0.1, "lambda2": 5.0, "tau": 0.08, "epsilon": 0.05, "sinkhorn_iterations": 3,
          "queue_size": 65536, "ema_momentum": 0.999}
# the authors' code's bugs are not reproduced
CORRECTED = {"randaugment_translate_quirk": False, "contrastive_bank_labels": "sampled", "cutmix_label_sampling": "pixel_centres",
             "source_align_corners": False}


def test_cpsl_defaults_are_the_authors_step_and_cpsl_paper_names_every_departure() -> None:
    """Since 2026-12-07 the recipe's defaults are the authors' released step; ``<benchmark>/cpsl_paper`` sets the paper's
    reading of each option where it differs (the benchmark's M scaled: 32 for the authors' 256, 64 for the paper's 512)."""
    defaults = cpsl_recipe.CPSLOptions().model_dump()
    assert {key: defaults[key] for key in AUTHORS_AND_PAPER} == {key: authors for key, (authors, _) in AUTHORS_AND_PAPER.items()}
    assert {key: defaults[key] for key in SHARED | CORRECTED} == SHARED | CORRECTED
    scaled = {"benchmark": (32, 64), "gta5_to_cityscapes": (256, 512), "synthia_to_cityscapes": (256, 512)}
    for benchmark, (authors_m, paper_m) in scaled.items():
        authors, paper = (
            cpsl_recipe.parse_options(cpsl_recipe.CPSLOptions, load_config(f"{benchmark}/{name}").method, "cpsl").model_dump()
            for name in ("cpsl", "cpsl_paper")
        )
        expected = {key: value for key, (_, value) in AUTHORS_AND_PAPER.items()} | {"pixels_per_image": paper_m}
        assert {key: paper[key] for key in expected} == expected, benchmark
        assert authors["pixels_per_image"] == authors_m
        differ = {key for key in authors if authors[key] != paper[key]}
        assert differ == set(AUTHORS_AND_PAPER), benchmark  # nothing else: the paper agrees or is silent


def test_consistency_reduction_scales_the_step_s_consistency_by_the_class_count(
    tmp_path: Path, warmup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same step with method.consistency_reduction=pixel_mean (benchmark/cpsl_paper) has K times the consistency."""
    values = {}
    for reduction in ("class_mean", "pixel_mean"):
        _, _, _, spy, _, losses, _ = one_step(
            tmp_path, warmup, monkeypatch, reduction, "method.consistency=segmentation", f"method.consistency_reduction={reduction}"
        )
        assert spy.one("symmetric_kl_consistency")["reduction"] == reduction
        values[reduction] = losses["loss_reg"].item()
    assert values["pixel_mean"] > 0 and values["pixel_mean"] == pytest.approx(19 * values["class_mean"], rel=1e-5)
    with pytest.raises(ConfigError, match="consistency_reduction"):
        Trainer(cpsl_config(tmp_path, warmup, "name=bad", "method.consistency_reduction=sum"))


def test_authors_target_term_weak_view_cutmix_and_symmetric_ce(tmp_path: Path, warmup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """method.cutmix_p=1 target_loss=symmetric_ce: L^t_SEG is 0.1 CE + 1.0 RCE of a third forward on the weak view
    (method.target_view=weak, default) with a source box (and its labels) pasted in; the strong view's forward feeds the
    consistency alone. method.target_view=strong trains L^t_SEG on the strong forward and refuses CutMix."""
    options = ("method.cutmix_p=1", "method.target_loss=symmetric_ce")  # method.target_view=weak is the default
    _, recipe, batches, spy, forwards, losses, _ = one_step(tmp_path, warmup, monkeypatch, "authors_target", *PAPER_STEP, *options)
    weak, source = batches["target"]["image"], batches["source"]
    assert [f[0] for f in forwards] == [True, True, True] and losses["cutmix"] == 1.0
    strong, mixed = forwards[1], forwards[2]
    assert torch.equal(spy.one("symmetric_kl_consistency")["strong"], strong[2]) and not torch.equal(strong[1], weak)
    pasted = (mixed[1] != weak).any(1)  # [N, H, W]: where the source replaced the target
    rows, columns = pasted.any(0).any(1).nonzero().flatten(), pasted.any(0).any(0).nonzero().flatten()
    box = (int(rows[0]), int(columns[0]), int(rows[-1]) + 1, int(columns[-1]) + 1)
    assert box[2] - box[0] < weak.shape[2] or box[3] - box[1] < weak.shape[3]  # a box, not the whole crop
    expected_images, expected_labels = cutmix(weak, source["image"], spy.one("rectify_pseudo_labels")["result"], source["label"], box)
    assert torch.equal(mixed[1], expected_images)
    target_labels = spy.calls["supervised_loss"][1]
    assert torch.equal(target_labels, expected_labels)
    logits = mixed[2]
    ce = F.cross_entropy(logits, target_labels, ignore_index=recipe.ignore_index)
    assert losses["loss_target"].item() == pytest.approx((0.1 * ce + reverse_cross_entropy(logits, target_labels)).item(), rel=1e-5)
    # method.target_view=strong (the default before 2026-12-07): L^t_SEG and the consistency share the strong forward
    _, _, _, spy, forwards, losses, _ = one_step(tmp_path, warmup, monkeypatch, "strong_target", *PAPER_STEP, "method.target_view=strong")
    assert len(forwards) == 2 and not torch.equal(forwards[1][1], weak) and "cutmix" not in losses
    assert torch.equal(spy.one("symmetric_kl_consistency")["strong"], forwards[1][2])
    assert torch.equal(spy.calls["supervised_loss"][1], spy.one("rectify_pseudo_labels")["result"])
    with pytest.raises(ConfigError, match="method.cutmix_p=0.5 pastes source boxes .* set method.target_view=weak"):
        Trainer(cpsl_config(tmp_path, warmup, "name=e_cutmix", "method.cutmix_p=0.5", "method.target_view=strong"))
    for switch in ("method.target_view=strong", "method.self_labeling=false"):
        with pytest.raises(ConfigError, match="method.contrastive_weight=0.001 contrasts the student's weak-view features"):
            Trainer(cpsl_config(tmp_path, warmup, "name=e_contrast", *PAPER_STEP, "method.contrastive_weight=0.001", switch))


def test_momentum_network_normalises_like_the_student_unless_told_running(
    tmp_path: Path, warmup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def batch_norms(model: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
        return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    _, recipe, batches, spy, _, _, _ = one_step(tmp_path, warmup, monkeypatch, "as_student", *PAPER_STEP)
    weak = batches["target"]["image"]
    teacher = recipe.ema_model.module
    # batch statistics of the weak batch, as the student's train-mode forward uses (the authors' train-mode teacher)
    expected = copy.deepcopy(teacher).train()(weak).logits
    assert torch.allclose(spy.one("symmetric_kl_consistency")["weak"], expected, atol=1e-5)
    # ... while its running statistics stay those it was given (the warm-up's) and eval mode is restored
    for norm, original in zip(batch_norms(teacher), batch_norms(recipe._warmup.network)):
        assert torch.equal(norm.running_mean, original.running_mean) and torch.equal(norm.running_var, original.running_var)
        assert not norm.training and norm.momentum == original.momentum

    _, recipe, batches, spy, _, _, _ = one_step(tmp_path, warmup, monkeypatch, "running", *PAPER_STEP, "method.momentum_batch_norm=running")
    expected = copy.deepcopy(recipe.ema_model.module).eval()(batches["target"]["image"]).logits
    assert torch.allclose(spy.one("symmetric_kl_consistency")["weak"], expected, atol=1e-5)


def test_batch_norm_as_keeps_frozen_layers_frozen() -> None:
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)).train()
    student[2].eval()  # a frozen layer, as DeepLab-V2's freeze_bn=all keeps them
    teacher = copy.deepcopy(student).eval()
    with batch_norm_as(teacher, student):
        assert [teacher[1].training, teacher[2].training] == [True, False]
    assert not teacher[1].training and teacher[1].momentum == 0.1
    with pytest.raises(ValueError, match="2 BatchNorm layers against 1"):
        with batch_norm_as(teacher, torch.nn.BatchNorm2d(4)):
            pass


def test_cpsl_errors_name_the_key_and_the_fix(tmp_path: Path, warmup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"set model.checkpoint=runs/<warm-up run>/checkpoints/last.pt"):
        Trainer(tiny_config(tmp_path, "name=e1", config="benchmark/cpsl"))
    with pytest.raises(ConfigError, match=r"unknown key 'method.lamda1'; did you mean 'method.lambda1'"):
        Trainer(cpsl_config(tmp_path, warmup, "name=e2", "method.lamda1=0.2"))
    with pytest.raises(ConfigError, match=r"keep at least one of them true"):
        Trainer(cpsl_config(tmp_path, warmup, "name=e3", "method.self_labeling=false", "method.self_training=false"))
    # 'w/o SL' removes the authors' second self-labeling term with the head: the config must say so
    with pytest.raises(ConfigError, match=r"method.output_self_labeling=false \(config benchmark/cpsl_wo_sl does\)"):
        Trainer(cpsl_config(tmp_path, warmup, "name=e6", "method.self_labeling=false", "method.contrastive_weight=0"))
    with pytest.raises(ConfigError, match=r"method.pixels_per_image=129 exceeds the 128 pixels"):
        one_step(tmp_path, warmup, monkeypatch, "e4", "method.pixels_per_image=129")


# ---------------------------------------------------------------------------------------------- adversarial warm-up


def adversarial_config(tmp_path: Path, *extra: str):
    return tiny_config(tmp_path, *CROP, *extra, config="benchmark/adversarial_warmup")


@pytest.mark.parametrize("gan", ["ls", "bce"])
def test_adversarial_step_trains_each_player_only_on_its_own_loss(tmp_path: Path, gan: str) -> None:
    trainer = Trainer(adversarial_config(tmp_path, f"name={gan}", f"method.gan={gan}", "method.disc_channels=8"))
    recipe = trainer.recipe
    assert isinstance(recipe.discriminator, FCDiscriminator) and recipe.discriminator(torch.rand(2, 19, 32, 64)).shape == (2, 1, 1, 2)
    batches = {k: next(loader) for k, loader in trainer._loaders().items()}
    outputs: list[torch.Tensor] = []
    recipe.model.register_forward_hook(lambda m, args, out: outputs.append(out.logits.detach()))
    recipe.train()
    losses = recipe.training_step(batches, 0)
    losses["loss"].backward()
    assert all(p.grad is None for p in recipe.discriminator.parameters())  # the generator loss never trains D
    assert all(p.grad is not None for p in recipe.model.parameters() if p.requires_grad)

    disc = recipe.discriminator
    with torch.no_grad():
        source_probs = F.interpolate(outputs[0], size=(32, 64), mode="bilinear", align_corners=False).softmax(1)
        target_probs = F.interpolate(outputs[1], size=(32, 64), mode="bilinear", align_corners=False).softmax(1)
        d_source, d_target = disc(source_probs), disc(target_probs)
    if gan == "ls":
        expected = 0.5 * (d_source**2).mean() + 0.5 * ((d_target - 1) ** 2).mean()
        expected_adv = (d_target**2).mean()
    else:
        expected = 0.5 * F.softplus(d_source).mean() + 0.5 * F.softplus(-d_target).mean()
        expected_adv = F.softplus(d_target).mean()
    assert losses["loss_disc"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["loss_adv"].item() == pytest.approx(expected_adv.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx((losses["loss_source"] + 0.01 * losses["loss_adv"]).item(), rel=1e-6)

    before = [p.detach().clone() for p in disc.parameters()]
    recipe.after_optimizer_step(1)
    assert all(not torch.equal(a, p) for a, p in zip(before, disc.parameters()))
    state = recipe.disc_optimizer.state_dict()
    assert state["param_groups"][0]["betas"] == (0.9, 0.99) and state["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert all(int(s["step"]) == 1 for s in state["state"].values())


def test_adversarial_warmup_resumes_the_discriminator_and_its_optimizer(tmp_path: Path) -> None:
    common = TINY + FAST + CROP + [f"output_dir={tmp_path}", "method.disc_channels=8", "train.iters=3"]
    stop_after(load_config("benchmark/adversarial_warmup", common + ["name=a"]), 2)
    assert main(["train", str(tmp_path / "a")]) == 0
    assert main(["train", "benchmark/adversarial_warmup", *common, "name=b"]) == 0
    resumed, straight = (load_checkpoint(tmp_path / n / "checkpoints" / "last.pt")["recipe"] for n in "ab")
    for key, value in straight.items():
        if key != "_extra_state":
            assert torch.equal(resumed[key], value), key
    adam_resumed, adam_straight = (s["_extra_state"]["disc_optimizer"] for s in (resumed, straight))
    assert adam_straight["param_groups"][0]["lr"] == pytest.approx(1e-4 * (1 - 2 / 3) ** 0.9)  # poly, as the network
    for index, state in adam_straight["state"].items():
        assert int(state["step"]) == 3
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(adam_resumed["state"][index][name], state[name]), (index, name)


# ---------------------------------------------------------------------------------------------- distillation


def test_cpsl_distill_keeps_the_teacher_frozen_and_out_of_checkpoints(tmp_path: Path, warmup: Path) -> None:
    base = TINY + FAST + CROP + [f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"set method.teacher=runs/<cpsl run>/checkpoints/last.pt"):
        Trainer(load_config("benchmark/cpsl_distill", base + ["name=e"]))
    teacher_before = load_checkpoint(warmup)["model"]
    assert main(["train", "benchmark/cpsl_distill", *base, "name=d", f"method.teacher={warmup}", "train.iters=2"]) == 0
    saved = load_checkpoint(tmp_path / "d" / "checkpoints" / "last.pt")
    assert not any(k.startswith("teacher") for k in saved["recipe"])
    assert all(torch.equal(v, load_checkpoint(warmup)["model"][k]) for k, v in teacher_before.items())
    rows = [row for row in read_metrics(tmp_path / "d") if "loss" in row]
    assert all(row["loss_kd"] >= 0 for row in rows)  # a true KL divergence (the authors' version goes negative)

    trainer = Trainer(load_config("benchmark/cpsl_distill", base + ["name=t", f"method.teacher={warmup}", "method.confidence_threshold=1.0"]))
    batches = {k: next(loader) for k, loader in trainer._loaders().items()}
    trainer.recipe.train()
    losses = trainer.recipe.training_step(batches, 0)
    assert losses["label_density"] == 0 and losses["loss_target"] == 0  # nothing is more confident than 1
    assert trainer.recipe.teacher.network.training is False
    assert losses["loss"].item() == pytest.approx((losses["loss_source"] + losses["loss_kd"]).item(), rel=1e-5)


@pytest.mark.parametrize("empty", ["random", "zero"])
def test_classes_the_warmup_never_predicts_get_the_configured_head_row(tmp_path: Path, warmup: Path, empty: str) -> None:
    trainer = Trainer(cpsl_config(tmp_path, warmup, f"name={empty}", f"method.empty_class_prototype={empty}"))
    counts = torch.load(trainer.cfg.run_dir / "cpsl_init.pt")["class_counts"]
    unseen = counts == 0
    assert unseen.any()  # the tiny warm-up misses some of the 19 classes
    norms = trainer.recipe.head.prototypes.detach().norm(dim=1)
    assert torch.allclose(norms[~unseen], torch.ones(int((~unseen).sum())))
    expected = torch.ones(int(unseen.sum())) if empty == "random" else torch.zeros(int(unseen.sum()))
    assert torch.allclose(norms[unseen], expected)


# ------------------------------------------------------------------- strong view and consistency teacher (authors' code)


@pytest.fixture(scope="module")
def toy_warmup(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source-only warm-up on the 5-class, ignore-7 toy data (not Cityscapes' label space)."""
    out = tmp_path_factory.mktemp("toy_warmup")
    assert main(["train", "benchmark/source_only", *toy_overrides(toy), f"output_dir={out}", "name=w"]) == 0
    return out / "w" / "checkpoints" / "last.pt"


def toy_step(toy: Path, warmup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, *extra: str):
    """One CPSL step on the toy data with ``extra``; returns the recipe, its batches, the spy and the strong views it drew."""
    overrides = [*toy_overrides(toy), f"model.checkpoint={warmup}", "method.pixels_per_image=8", "method.queue_size=64"]
    trainer = Trainer(load_config("benchmark/cpsl", [*overrides, f"output_dir={tmp_path}", f"name={name}", *extra]))
    recipe = trainer.recipe
    batches = {k: next(loader) for k, loader in trainer._loaders().items()}
    spy = Spy(monkeypatch)
    drawn: list[tuple[torch.Tensor, Any]] = []
    original = recipe._strong_view
    monkeypatch.setattr(recipe, "_strong_view", lambda weak: drawn.append(original(weak)) or drawn[-1])
    recipe.train()
    torch.manual_seed(0)
    losses = recipe.training_step(batches, 0)
    return trainer, recipe, batches, spy, drawn[0], losses


def test_randaugment_strong_view_replays_its_geometry_on_the_weak_teacher(
    toy: Path, toy_warmup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = ("method.strong_view=randaugment", "method.teacher_view=weak", "method.consistency=segmentation")  # Eq. 13's spy
    trainer, recipe, batches, spy, (strong, records), losses = toy_step(toy, toy_warmup, tmp_path, monkeypatch, "ra", *extra)
    assert recipe.num_classes == 5 and recipe.ignore_index == 7
    target = batches["target"]
    weak = target["image"]
    assert [r.name for r in records[0]][:3] == ["random_horizontal_flip", "gaussian_blur", "color_jitter"]
    kl = spy.one("symmetric_kl_consistency")
    grid = tuple(kl["strong"].shape[-2:])
    with torch.no_grad():
        teacher = recipe._momentum_outputs(weak).logits
    expected = to_augmented_view(records, teacher.float(), "soft", output_size=grid)
    assert torch.allclose(kl["weak"], expected, atol=1e-5)  # the weak teacher moved through the strong view's geometry
    mask = torch.stack([valid_mask(w + s, w[0].input_size, grid) for w, s in zip(target["replay"], records)])
    assert torch.equal(kl["mask"], mask)
    for image, view_records, image_mask in zip(strong, records, mask):  # the cut-out box is grey and out of L_REG
        top, left, height, width = view_records[-1].boxes[0]
        assert (image[:, top : top + height, left : left + width] == GREY).all()
        box = torch.zeros(weak.shape[-2:], dtype=torch.bool)
        box[top : top + height, left : left + width] = True
        covered = F.interpolate(box[None, None].float(), size=grid, mode="nearest-exact")[0, 0] > 0
        assert not image_mask[covered].any()
    assert math.isfinite(float(losses["loss_reg"]))
    with pytest.raises(ConfigError, match="method.target_view=weak"):
        Trainer(load_config("benchmark/cpsl", [*toy_overrides(toy), f"model.checkpoint={toy_warmup}", f"output_dir={tmp_path}",
                                               "name=bad", "method.strong_view=randaugment", "method.target_view=strong"]))


def test_full_frame_teacher_serves_rectification_sampling_and_the_consistency(
    toy: Path, toy_warmup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``method.teacher_view=full_frame``: the momentum network sees the whole frame once, and every use takes it from there.

    Its features moved into the weak crop (full2weak) give the Eq. 1 cosines and the class-balanced L_SL
    pixels; its logits moved into the crop and then through the strong view's geometry are the consistency
    teacher; with shared_uniform sampling L_SL's pixels come from the whole frame's map.
    """
    # class-balanced sampling of the moved features, one Sinkhorn problem for the batch (one call to check)
    one_problem = ("method.sinkhorn_per_image=false", "method.pixel_sampling=class_balanced")
    extra = ("method.strong_view=randaugment", "method.teacher_view=full_frame", "method.consistency=segmentation", *one_problem)
    trainer, recipe, batches, spy, (strong, records), losses = toy_step(toy, toy_warmup, tmp_path, monkeypatch, "full", *extra)
    assert trainer.cfg.data.target_transforms[0] == {"name": "keep_full_frame"}  # no resize leads: the loaded frame
    assert trainer.cfg.data.train_transforms == load_config("benchmark/cpsl", toy_overrides(toy)).data.train_transforms  # the source's own
    target = batches["target"]
    full = target["full_image"]
    assert full.shape == (2, 3, 40, 56)  # the toy's whole frames, the weak views are 32x48 crops of them
    kl = spy.one("symmetric_kl_consistency")
    grid = tuple(kl["strong"].shape[-2:])
    with torch.no_grad():
        frames = recipe._momentum_outputs(full)
        weak_only = [records_after_full_frame(w) for w in target["replay"]]
        logits = to_augmented_view(weak_only, frames.logits.float(), "soft", output_size=grid)
        features = to_augmented_view(weak_only, frames.features.float(), "soft", output_size=grid)
        cosines = recipe._momentum_head()(features)
    rectify = spy.one("rectify_pseudo_labels")
    assert torch.allclose(rectify["scores"], cosines, atol=1e-5)  # Eq. 1 with the moved features' cosines
    sampled = spy.one("sample_pixels")["result"]
    assert torch.allclose(spy.one("online_self_labeling_loss")["features"], gather_pixel_features(features, sampled).flatten(0, 1), atol=1e-5)
    assert torch.allclose(kl["weak"], to_augmented_view(records, logits, "soft", output_size=grid), atol=1e-5)
    assert torch.equal(kl["mask"], torch.stack([valid_mask(w + s, w[1].input_size, grid) for w, s in zip(target["replay"], records)]))
    # without a strong geometry the full-frame teacher is the weak crop's (full2weak alone)
    trainer, recipe, batches, spy, (strong, records), _ = toy_step(
        toy, toy_warmup, tmp_path, monkeypatch, "full_photometric", "method.teacher_view=full_frame", "method.strong_view=photometric",
        "method.consistency=segmentation",
    )
    assert records is None
    with torch.no_grad():
        frames = recipe._momentum_outputs(batches["target"]["full_image"])
    weak_only = [records_after_full_frame(w) for w in batches["target"]["replay"]]
    kl = spy.one("symmetric_kl_consistency")
    assert torch.allclose(kl["weak"], to_augmented_view(weak_only, frames.logits.float(), "soft", output_size=grid), atol=1e-5)
    # shared_uniform sampling takes L_SL's pixels from the whole frame's grid, as the authors' feat_SL
    drawn: list[torch.Tensor] = []
    original = cpsl_recipe.shared_uniform_pixels
    monkeypatch.setattr(cpsl_recipe, "shared_uniform_pixels", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    trainer, recipe, batches, spy, _, _ = toy_step(
        toy, toy_warmup, tmp_path, monkeypatch, "full_shared", "method.teacher_view=full_frame", "method.pixel_sampling=shared_uniform",
        "method.sinkhorn_per_image=false",
    )
    with torch.no_grad():
        frames = recipe._momentum_outputs(batches["target"]["full_image"])
    assert drawn[0].max() < frames.features.shape[-2] * frames.features.shape[-1]
    expected = gather_pixel_features(frames.features.float(), drawn[0]).flatten(0, 1)
    assert torch.allclose(spy.one("online_self_labeling_loss")["features"], expected, atol=1e-5)


def test_translate_quirk_changes_only_the_replayed_horizontal_shifts(
    toy: Path, toy_warmup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer, recipe, batches, *_ = toy_step(toy, toy_warmup, tmp_path, monkeypatch, "quirk", "method.strong_view=randaugment")
    weak = batches["target"]["image"]
    for seed in range(200):  # a draw with a horizontal shift
        torch.manual_seed(seed)
        image, records = recipe._strong_view(weak)
        if any(r.name == "translate_x" for view in records for r in view):
            break
    recipe.options = recipe.options.model_copy(update={"randaugment_translate_quirk": True})
    torch.manual_seed(seed)
    quirk_image, quirk_records = recipe._strong_view(weak)
    assert torch.equal(quirk_image, image)  # the student's view is the same
    assert quirk_records == [cpsl_methods.translate_x_by_height(view) for view in records] != records
