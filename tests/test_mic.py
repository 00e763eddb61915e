"""Masked image consistency (MIC; Hoyer et al., CVPR 2023): the block mask, the loss, and the ``mic:`` hook on each host recipe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from segadapt.cli import main
from segadapt.config import load_config
from segadapt.engine.logging import read_metrics
from segadapt.engine.trainer import Trainer
from segadapt.errors import ConfigError
from segadapt.methods.mic import block_mask, mask_images, masked_consistency_loss
from segadapt.models.base import InputNormalizer, Normalization

from data_fixtures import toy_overrides

# --------------------------------------------------------------------------- the method on tensors


def test_block_mask_hides_the_ratio_of_whole_blocks_drawn_uniform_per_block() -> None:
    mask = block_mask(4, (64, 128), ratio=0.7, block_size=8, generator=torch.Generator().manual_seed(3))
    assert mask.shape == (4, 1, 64, 128) and mask.dtype == torch.float32
    blocks = mask.view(4, 1, 8, 8, 16, 8)  # [N, 1, rows, 8, cols, 8]: every 8x8 block is one value
    assert torch.equal(blocks.amin(dim=(3, 5)), blocks.amax(dim=(3, 5)))
    # one uniform draw per block in grid order, kept when it exceeds the ratio (the authors' rand > ratio)
    draws = torch.rand((4, 1, 8, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(mask[:, :, ::8, ::8], (draws > 0.7).float())
    assert 1 - float(mask.mean()) == pytest.approx(0.7, abs=0.04)  # 2,048 blocks: the hidden share is near r
    # a side that is no multiple of the block: round(10 / 4) = 2 blocks (Python's rounding), resized nearest
    odd = block_mask(1, (10, 10), ratio=0.0, block_size=4, generator=torch.Generator().manual_seed(0))
    assert odd.shape == (1, 1, 10, 10) and bool(odd.eq(1).all())  # ratio 0 keeps every block
    with pytest.raises(ValueError, match="mask ratio"):
        block_mask(1, (8, 8), ratio=1.0, block_size=4)


@pytest.mark.parametrize("preset", ["imagenet", "proda", "caffe"])
def test_hidden_pixels_are_the_normalisations_zero_as_in_the_authors_normalised_masking(preset: str) -> None:
    norm = Normalization.preset(preset)
    images = torch.rand(2, 3, 8, 8)
    mask = block_mask(2, (8, 8), ratio=0.5, block_size=4, generator=torch.Generator().manual_seed(1))
    masked = mask_images(images, mask, torch.tensor(norm.zero_colour()))
    normalizer = InputNormalizer(norm)
    # the network sees exactly M * normalise(x): zeros where hidden, the image where kept
    assert torch.allclose(normalizer(masked), mask * normalizer(images), atol=1e-5)


def test_masked_consistency_loss_on_a_hand_case() -> None:
    # two classes, three pixels: logits (2, 0) on each; labels 0, 1 and ignored (9)
    logits = torch.tensor([[[[2.0, 2.0, 2.0]], [[0.0, 0.0, 0.0]]]])
    labels = torch.tensor([[[0, 1, 9]]])
    ce0, ce1 = math.log(1 + math.exp(-2)), math.log(1 + math.exp(2))
    weight = torch.full((1, 1, 3), 0.4)  # the teacher's confidence share q^T
    # weighted: the mean over all pixels, the ignored one counting 0 (the authors' reduction), times lambda
    assert float(masked_consistency_loss(logits, labels, weight, 9, mask_lambda=0.5)) == pytest.approx(0.5 * 0.4 * (ce0 + ce1) / 3)
    # without a weight: the mean over the labelled pixels
    assert float(masked_consistency_loss(logits, labels, None, 9)) == pytest.approx((ce0 + ce1) / 2)
    # logits at a stride are upsampled to the labels
    assert masked_consistency_loss(torch.zeros(1, 2, 1, 1), torch.zeros(1, 4, 4, dtype=torch.long), None, 9).item() == pytest.approx(math.log(2))


# --------------------------------------------------------------------------- the hook on every host recipe

HOSTS = {  # host config -> (what it starts from, its extra overrides)
    "benchmark/dacs": ("warm", []),
    "benchmark/daformer": (  # threshold 0: the 1-iteration warm-up is never 0.968 sure, the weight would be 0
        "warm_mitb0", ["method.feature_distance_classes=null", "method.rare_class_min_pixels=10", "method.pseudo_threshold=0"]
    ),
    "benchmark/cpsl": ("warm", ["method.pixels_per_image=8", "method.queue_size=64"]),
    "benchmark/dars_sd": ("warm", []),  # recipe self_training
    "benchmark/bicl_dynamic": (None, ["method.target_ce_labels=same"]),
}
MIC_ON = ["mic.enabled=true", "mic.mask_block_size=8"]



def host_overrides(config: str, toy: Path, warmups: dict[str, Path]) -> list[str]:
    start, extra = HOSTS[config]
    return [*toy_overrides(toy), *extra, *([f"model.checkpoint={warmups[start]}"] if start else [])]


def one_step(config: str, overrides: list[str], tmp_path: Path, name: str) -> tuple[Trainer, dict[str, float]]:
    cfg = load_config(config, [*overrides, f"output_dir={tmp_path}", f"name={name}"])
    trainer = Trainer(cfg, log=lambda _: None)
    torch.manual_seed(0)
    return trainer, trainer._step(trainer._loaders())


def gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in trainer.recipe.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config", sorted(HOSTS))
def test_mic_trains_on_every_host_logs_its_term_and_changes_the_gradients(config: str, toy: Path, warmups: dict[str, Path], tmp_path: Path) -> None:
    overrides = host_overrides(config, toy, warmups)
    # a 2-iteration segadapt train with MIC on: the term is in every metrics record and in the total
    assert main(["train", config, *overrides, *MIC_ON, f"output_dir={tmp_path}", "name=cli"]) == 0
    records = [r for r in read_metrics(tmp_path / "cli") if "loss" in r]
    assert [r["iter"] for r in records] == [1, 2]
    assert all(r["loss_mic"] > 0 and math.isfinite(r["loss_mic"]) for r in records)
    # one step on the same batches and seeds, MIC off and on: the total grows by the MIC term, the gradients change
    off, off_losses = one_step(config, overrides, tmp_path, "off")
    on, on_losses = one_step(config, [*overrides, *MIC_ON], tmp_path, "on")
    assert "loss_mic" not in off_losses and "mic" not in dict(off.recipe.named_children())
    for key, value in off_losses.items():  # MIC comes after the host's terms: they are unchanged
        if key != "loss":
            assert on_losses[key] == pytest.approx(value, rel=1e-6), key
    assert on_losses["loss"] == pytest.approx(off_losses["loss"] + on_losses["loss_mic"], rel=1e-5)
    before, after = gradients(off), gradients(on)
    assert before.keys() == after.keys() and any(not torch.allclose(before[k], after[k]) for k in before)
    # host-mode MIC adds nothing to the checkpoint
    assert on.recipe.state_dict().keys() == off.recipe.state_dict().keys()


def test_mic_off_leaves_the_step_unchanged(toy: Path, warmups: dict[str, Path], tmp_path: Path) -> None:
    overrides = host_overrides("benchmark/dacs", toy, warmups)
    plain, plain_losses = one_step("benchmark/dacs", overrides, tmp_path, "plain")
    off, off_losses = one_step("benchmark/dacs", [*overrides, "mic.enabled=false", "mic.mask_ratio=0.5"], tmp_path, "off")
    assert off_losses == plain_losses
    a, b = gradients(plain), gradients(off)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mic_backward_of_its_own_gives_the_gradients_of_one_backward(toy: Path, warmups: dict[str, Path], tmp_path: Path) -> None:
    overrides = host_overrides("benchmark/dacs", toy, warmups)
    single, single_losses = one_step("benchmark/dacs", [*overrides, *MIC_ON, "train.stream_backward=false"], tmp_path, "single")
    streamed, streamed_losses = one_step("benchmark/dacs", [*overrides, *MIC_ON, "train.stream_backward=true"], tmp_path, "streamed")
    assert streamed_losses["loss"] == pytest.approx(single_losses["loss"], rel=1e-6)
    a, b = gradients(single), gradients(streamed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_mic_with_its_own_ema_teacher_is_saved_and_updated_once_per_step(toy: Path, warmups: dict[str, Path], tmp_path: Path) -> None:
    overrides = [*host_overrides("benchmark/dars_sd", toy, warmups), *MIC_ON, "mic.teacher=ema", "train.iters=3"]
    assert main(["train", "benchmark/dars_sd", *overrides, f"output_dir={tmp_path}", "name=ema"]) == 0
    state = torch.load(tmp_path / "ema" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["recipe"]
    assert int(state["mic.teacher_steps"]) == 2  # updated before steps 2 and 3, from the student after k = 1, 2 steps
    teacher = {k[len("mic.teacher.module."):]: v for k, v in state.items() if k.startswith("mic.teacher.module.")}
    student = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    assert teacher.keys() == student.keys()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher if teacher[k].is_floating_point())


def test_mic_config_errors_name_the_key_and_the_fix(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs"
    assert main(["train", "benchmark/source_only", *toy_overrides(toy), "mic.enabled=true", f"output_dir={out}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "segadapt train: error: mic.enabled: recipe source_only has no target pseudo labels for masked image consistency; "
        "use one of bicl, cpsl, dacs, daformer, hrda, self_training, or set mic.enabled=false"
    )
    assert main(["train", "benchmark/dacs", *toy_overrides(toy), "mic.mask_ratoi=0.5", f"output_dir={out}"]) == 2
    assert "unknown key 'mic.mask_ratoi'; did you mean 'mic.mask_ratio'?" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="mic.mask_ratio"):
        load_config("benchmark/dacs", ["mic.mask_ratio=1.0"])
    assert not out.exists()  # refused before any run directory


def test_the_mic_configs_load_with_the_authors_settings() -> None:
    expected = {  # config -> block size (32 at half resolution, 64 at full, the benchmark's scaled to its crop)
        "gta5_to_cityscapes/mic_daformer": 32,
        "synthia_to_cityscapes/mic_daformer": 32,
        "gta5_to_cityscapes/mic_cpsl": 64,
        "gta5_to_cityscapes/mic_dars_td": 32,
        "benchmark/mic_daformer": 8,
    }
    for name, block in expected.items():
        cfg = load_config(name)
        assert cfg.mic.enabled and cfg.mic.mask_ratio == 0.7 and cfg.mic.mask_lambda == 1.0 and cfg.mic.teacher == "host"
        assert cfg.mic.mask_block_size == block, name


def test_a_run_with_mic_and_its_own_teacher_resumes_exactly(toy: Path, warmups: dict[str, Path], tmp_path: Path) -> None:
    overrides = [  # a constant rate and a numeric momentum: neither may follow the resume's train.iters
        *host_overrides("benchmark/dacs", toy, warmups), *MIC_ON, "mic.teacher=ema", "schedule.name=constant", "method.ema_momentum=0.99",
        f"output_dir={tmp_path}",
    ]
    assert main(["train", "benchmark/dacs", *overrides, "train.iters=3", "name=straight"]) == 0
    assert main(["train", "benchmark/dacs", *overrides, "train.iters=2", "name=resumed"]) == 0
    assert main(["train", "benchmark/dacs", *overrides, "train.iters=3", "name=resumed", "resume=true"]) == 0
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["recipe"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["recipe"]
    assert a.keys() == b.keys() and any(key.startswith("mic.teacher.") for key in a)
    for key, value in a.items():  # student, DACS's teacher and MIC's teacher alike
        assert torch.equal(value, b[key]), key
    # a resume refuses a change of the mic section, as of any section that changes the training
    assert main(["train", "benchmark/dacs", *overrides, "train.iters=4", "name=resumed", "resume=true", "mic.mask_ratio=0.5"]) == 2
