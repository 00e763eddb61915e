"""Per-stream backward (``train.stream_backward``): the source graph is freed before the target graph is built,
and the gradients are those of one backward of the summed loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segadapt.engine.trainer import Trainer

from data_fixtures import toy_overrides

TWO_STREAM = {  # config -> what it starts from
    "benchmark/dacs": "warm",
    "benchmark/cpsl": "warm",
    "benchmark/cpsl_distill": "teacher",
    "benchmark/adversarial_warmup": None,
    "benchmark/daformer": "warm_mitb0",
    "benchmark/dars_sd": "warm",  # self-training forwards its two batches separately (the DARS code)
}



def one_step(config: str, overrides: list[str], stream_backward: bool, tmp_path: Path) -> tuple[Trainer, dict[str, float]]:
    from segadapt.config import load_config

    name = f"{config.split('/')[-1]}_{stream_backward}"
    cfg = load_config(config, [*overrides, f"train.stream_backward={str(stream_backward).lower()}", f"output_dir={tmp_path}", f"name={name}"])
    trainer = Trainer(cfg, log=lambda _: None)
    return trainer, trainer._step(trainer._loaders())


@pytest.mark.parametrize("config", sorted(TWO_STREAM))
def test_per_stream_backward_gives_the_gradients_of_one_backward(config: str, toy: Path, warmups: dict[str, Path], tmp_path: Path) -> None:
    start = TWO_STREAM[config]
    overrides = [*toy_overrides(toy), "train.iters=1"]
    if start in ("warm", "warm_mitb0"):
        overrides.append(f"model.checkpoint={warmups[start]}")
    if start == "teacher":
        overrides.append(f"method.teacher={warmups['warm']}")
    if config.endswith("cpsl"):
        overrides += ["method.pixels_per_image=8", "method.queue_size=64"]
    if config.endswith("daformer"):
        overrides += ["method.feature_distance_classes=null", "method.rare_class_min_pixels=10"]
    torch.manual_seed(0)
    single, single_losses = one_step(config, overrides, False, tmp_path)
    torch.manual_seed(0)
    streamed, streamed_losses = one_step(config, overrides, True, tmp_path)
    assert streamed_losses["loss"] == pytest.approx(single_losses["loss"], rel=1e-6)
    compared = 0
    for (name, a), (_, b) in zip(single.recipe.trainable_model().named_parameters(), streamed.recipe.trainable_model().named_parameters()):
        if a.grad is None:
            assert b.grad is None, name
            continue
        assert torch.equal(a.grad, b.grad), name
        compared += 1
    assert compared > 0


def test_a_released_term_is_back_propagated_once_and_logged_in_the_total(toy: Path, warmups: dict[str, Path], tmp_path: Path) -> None:
    overrides = [*toy_overrides(toy), "train.iters=1", f"model.checkpoint={warmups['warm']}"]
    calls: list[float] = []
    trainer, _ = one_step("benchmark/dacs", overrides, True, tmp_path)
    trainer.recipe.backward_hook = lambda loss: calls.append(float(loss.detach()))
    batches = {name: next(loader) for name, loader in trainer._loaders().items()}
    losses = trainer.recipe.training_step(batches, 1)
    assert calls == [pytest.approx(float(losses["loss_source"]))]  # the source term, before the mixed forward
    assert float(losses["loss"].detach()) == pytest.approx(float(losses["loss_source"]) + float(losses["loss_mix"]), rel=1e-6)
    trainer.recipe.backward_hook = None
    kept = trainer.recipe.training_step(batches, 1)
    assert kept["loss"].requires_grad  # without the hook the total carries the whole graph


def test_train_compile_compiles_the_trained_network_in_place(toy: Path, tmp_path: Path) -> None:
    from segadapt.config import load_config

    cfg = load_config("benchmark/dacs", [*toy_overrides(toy), "train.compile=true", f"output_dir={tmp_path}", "name=c"])
    trainer = Trainer(cfg, log=lambda _: None)
    model = trainer.recipe.model
    assert model._compiled_call_impl is not None  # compiled lazily, at its first call
    assert trainer.recipe.teacher.module._compiled_call_impl is None  # the EMA teacher stays eager
    assert not any("_orig_mod" in key for key in trainer.recipe.state_dict())  # checkpoints as an eager run's
