"""Batched inference gives the predictions of one-at-a-time inference; bf16 / channels-last run; options are checked.

The sliding window over a batch of windows vs one window per forward, whole-image evaluation at
val_batch_size > 1 vs 1, and pseudo labelling's per-size grouping, on the ``small`` network
(eval mode, random weights) and random images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from segadapt.config import EvalConfig, load_config
from segadapt.engine.builders import build_eval_loader
from segadapt.engine.evaluation import confusion_over
from segadapt.engine.inference import inference_model, predict_probs, same_shape_groups, window_positions
from segadapt.engine.pseudo_labelling import _predictions, inference_config, pseudo_label_key
from segadapt.errors import ConfigError
from segadapt.models import create_model

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("small", NUM_CLASSES).eval()


def images(count: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


def assert_same_predictions(batched: torch.Tensor, single: torch.Tensor) -> None:
    assert batched.shape == single.shape
    assert torch.allclose(batched, single, atol=1e-5), float((batched - single).abs().max())
    assert torch.equal(batched.argmax(1), single.argmax(1))


# ------------------------------------------------------------------ sliding window


def test_window_grid_shifts_the_last_row_and_column_to_the_border() -> None:
    positions, window = window_positions(50, 90, (24, 40))
    assert window == (24, 40)
    tops, lefts = sorted({t for t, _ in positions}), sorted({left for _, left in positions})
    assert tops == [0, 16, 26] and lefts == [0, 27, 50]  # stride ceil(2/3 window); 26 = 50 - 24, 50 = 90 - 40
    assert len(positions) == 9
    assert window_positions(20, 30, (64, 64)) == ([(0, 0)], (20, 30))  # a window larger than the image shrinks


@pytest.mark.parametrize("window_batch", [2, 4, 100])
def test_batched_windows_match_one_window_at_a_time(model: torch.nn.Module, window_batch: int) -> None:
    batch = images(2, 50, 90)  # a 3x3 grid that does not divide the image
    one = predict_probs(model, batch, cfg=EvalConfig(sliding_window=(24, 40)))
    many = predict_probs(model, batch, cfg=EvalConfig(sliding_window=(24, 40), window_batch=window_batch))
    assert_same_predictions(many, one)


def test_batched_windows_keep_each_image_apart(model: torch.nn.Module) -> None:
    """Two images in one batch, windows batched: each gets the probabilities it gets alone."""
    batch = images(2, 50, 90, seed=2)
    cfg = EvalConfig(sliding_window=(24, 40), window_batch=3, flip=True, scales=[0.75, 1.0])
    together = predict_probs(model, batch, out_size=(40, 70), cfg=cfg)
    alone = torch.cat([predict_probs(model, image[None], out_size=(40, 70), cfg=cfg.model_copy(update={"window_batch": 1})) for image in batch])
    assert_same_predictions(together, alone)


def test_one_window_at_a_time_is_the_plain_window_average(model: torch.nn.Module) -> None:
    """window_batch=1 (the default) is the average of each window's own prediction, bit for bit."""
    image = images(1, 40, 60, seed=3)
    positions, (win_h, win_w) = window_positions(40, 60, (24, 36))
    total, count = torch.zeros(1, NUM_CLASSES, 40, 60), torch.zeros(1, 1, 40, 60)
    with torch.no_grad():
        for top, left in positions:
            logits = model(image[..., top : top + win_h, left : left + win_w]).logits
            probs = torch.nn.functional.interpolate(logits, size=(win_h, win_w), mode="bilinear", align_corners=False).softmax(1)
            total[..., top : top + win_h, left : left + win_w] += probs
            count[..., top : top + win_h, left : left + win_w] += 1
    assert torch.equal(predict_probs(model, image, cfg=EvalConfig(sliding_window=(24, 36))), total / count)


@pytest.mark.parametrize("window_batch", [1, 4])
def test_window_flip_averages_each_window_with_its_mirror(model: torch.nn.Module, window_batch: int) -> None:
    """window_flip=window: the DARS code's net_process per window; image: the flipped image's windows (others here)."""
    image = images(1, 40, 90, seed=4)
    positions, (win_h, win_w) = window_positions(40, 90, (24, 36))
    total, count = torch.zeros(1, NUM_CLASSES, 40, 90), torch.zeros(1, 1, 40, 90)
    with torch.no_grad():
        for top, left in positions:
            crop = image[..., top : top + win_h, left : left + win_w]
            both = model(torch.cat([crop, crop.flip(-1)])).logits
            both = torch.nn.functional.interpolate(both, size=(win_h, win_w), mode="bilinear", align_corners=False).softmax(1)
            total[..., top : top + win_h, left : left + win_w] += (both[:1] + both[1:].flip(-1)) / 2
            count[..., top : top + win_h, left : left + win_w] += 1
    cfg = EvalConfig(sliding_window=(24, 36), flip=True, window_flip="window", window_batch=window_batch)
    assert torch.allclose(predict_probs(model, image, cfg=cfg), total / count, atol=1e-6)


def test_window_flip_changes_the_windows_only_where_the_grid_is_not_symmetric(model: torch.nn.Module) -> None:
    def probs(width: int, window_flip: str) -> torch.Tensor:
        cfg = EvalConfig(sliding_window=(24, 36), flip=True, window_flip=window_flip)
        return predict_probs(model, images(1, 40, width, seed=5), cfg=cfg)
    # width 60: windows at 0 and 24, mirrored onto themselves; width 90: 0, 24, 48, 54, mirrored 54, 30, 6, 0
    assert torch.allclose(probs(60, "window"), probs(60, "image"), atol=1e-6)
    assert not torch.allclose(probs(90, "window"), probs(90, "image"), atol=1e-3)


# ------------------------------------------------------------------ whole images


class Images(torch.utils.data.Dataset):
    """Random images (sizes cycling through ``sizes``) with random labels at the image size."""

    def __init__(self, count: int, sizes: list[tuple[int, int]]) -> None:
        self.items = []
        for index in range(count):
            height, width = sizes[index % len(sizes)]
            generator = torch.Generator().manual_seed(index)
            self.items.append({
                "image": torch.rand(3, height, width, generator=generator),
                "label": torch.randint(0, NUM_CLASSES, (height, width), generator=generator),
                "name": f"image{index}",
            })

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def test_whole_image_batch_matches_one_image_at_a_time(model: torch.nn.Module) -> None:
    batch = images(4, 64, 96, seed=4)
    together = predict_probs(model, batch, out_size=(64, 96))
    alone = torch.cat([predict_probs(model, image[None], out_size=(64, 96)) for image in batch])
    assert_same_predictions(together, alone)


@pytest.mark.parametrize("sizes", [[(64, 96)], [(64, 96), (48, 80)]], ids=["one size", "two sizes"])
def test_evaluation_at_batch_4_counts_what_batch_1_counts(model: torch.nn.Module, sizes: list[tuple[int, int]]) -> None:
    """With two sizes in a batch the images of each size still go through the network together."""
    dataset, cpu = Images(7, sizes), torch.device("cpu")
    matrices = [
        confusion_over(model, build_eval_loader(dataset, None, batch_size, 0), NUM_CLASSES, EvalConfig(flip=True), cpu, 255)
        for batch_size in (1, 4)
    ]
    assert int(matrices[0].matrix.sum()) == sum(h * w for h, w in (sizes * 7)[:7])
    assert torch.equal(matrices[0].matrix, matrices[1].matrix)


def test_pseudo_labelling_groups_images_of_one_size(model: torch.nn.Module) -> None:
    dataset, cpu = Images(5, [(64, 96), (48, 80)]), torch.device("cpu")
    rule = load_config(None, ["pseudo_label.window_batch=4", "pseudo_label.sliding_window=[32,48]"]).pseudo_label
    cfg = inference_config(rule)
    single = {name: probs for name, probs, _ in _predictions(model, build_eval_loader(dataset, None, 1, 0), cfg, cpu, rule)}
    grouped = {name: probs for name, probs, _ in _predictions(model, build_eval_loader(dataset, None, 5, 0), cfg, cpu, rule)}
    assert single.keys() == grouped.keys() == {f"image{i}" for i in range(5)}
    for name in single:
        assert_same_predictions(grouped[name][None], single[name][None])


def test_same_shape_groups_keep_the_order_of_first_appearance() -> None:
    assert same_shape_groups([(3, 4), (5, 6), (3, 4), (5, 6), (1, 1)]) == [[0, 2], [1, 3], [4]]


# ------------------------------------------------------------------ bf16, fp16, channels-last


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_inference_runs_on_the_cpu_close_to_fp32(model: torch.nn.Module, amp: str) -> None:
    batch = images(2, 50, 90, seed=5)
    for window in (None, (24, 40)):
        fp32 = predict_probs(model, batch, cfg=EvalConfig(sliding_window=window, flip=True))
        low = predict_probs(model, batch, cfg=EvalConfig(sliding_window=window, flip=True, amp=amp, window_batch=4))
        assert low.shape == fp32.shape and low.dtype == torch.float32
        assert torch.isfinite(low).all()
        assert float((low - fp32).abs().max()) < 0.05


def test_channels_last_gives_the_fp32_predictions_and_restores_the_model(model: torch.nn.Module) -> None:
    batch = images(2, 50, 90, seed=6)
    cfg = EvalConfig(sliding_window=(24, 40), window_batch=4, channels_last=True)
    plain = predict_probs(model, batch, cfg=EvalConfig(sliding_window=(24, 40)))
    strides = {name: p.stride() for name, p in model.named_parameters()}
    model.train()
    with inference_model(model, cfg):
        assert not model.training
        conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
        assert conv.is_contiguous(memory_format=torch.channels_last)
        assert_same_predictions(predict_probs(model, batch, cfg=cfg), plain)
    assert model.training
    model.eval()
    assert {name: p.stride() for name, p in model.named_parameters()} == strides


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.amp=fp32", "eval.amp"),
        ("eval.window_batch=0", "eval.window_batch"),
        ("eval.channels_last=maybe", "eval.channels_last"),
        ("pseudo_label.amp=fp8", "pseudo_label.amp"),
        ("pseudo_label.window_batch=-2", "pseudo_label.window_batch"),
    ],
)
def test_bad_inference_options_name_their_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def test_inference_option_defaults_and_yaml_off() -> None:
    cfg = load_config(None, ["eval.amp=off", "pseudo_label.amp=bf16"])
    assert (cfg.eval.amp, cfg.eval.window_batch, cfg.eval.channels_last) == ("off", 1, False)
    assert inference_config(cfg.pseudo_label).amp == "bf16"


def test_pseudo_label_key_ignores_the_options_that_keep_the_labels(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    target = ["data.target.dataset=benchmark", "data.target.domain=target"]
    default = pseudo_label_key(load_config(None, target), checkpoint)
    faster = pseudo_label_key(load_config(None, [*target, "pseudo_label.window_batch=8", "pseudo_label.channels_last=true"]), checkpoint)
    bf16 = pseudo_label_key(load_config(None, [*target, "pseudo_label.amp=bf16"]), checkpoint)
    assert faster == default and "amp" not in default["pseudo_label"]
    assert bf16["pseudo_label"]["amp"] == "bf16"
    window = [*target, "pseudo_label.sliding_window=[32,32]"]
    mirrored = pseudo_label_key(load_config(None, [*window, "pseudo_label.window_flip=window"]), checkpoint)
    assert "window_flip" not in pseudo_label_key(load_config(None, window), checkpoint)["pseudo_label"]
    assert "window_flip" not in pseudo_label_key(load_config(None, [*target, "pseudo_label.window_flip=window"]), checkpoint)["pseudo_label"]
    assert mirrored["pseudo_label"]["window_flip"] == "window"  # it changes the labels only with a flipped sliding window
