"""What the step-parity tests share: where the fixtures are, the tolerance, and how a tensor is compared.

A step-parity test (``test_*_step_parity.py``) replays one training step recorded from the authors'
code (``tests/fixtures/parity/scripts/``) with segadapt's recipe and compares every loss term and
gradient with :func:`assert_close`; :class:`RecordedDraws` hands the authors' random draws of a
DACS-style step (coins, ClassMix, jitter, blur) to segadapt's transforms.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

import segadapt.data.transforms.mixing as mixing
import segadapt.data.transforms.photometric as photometric

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
RELATIVE = 1e-5
"""Largest difference allowed, as a share of the largest magnitude in the authors' tensor."""


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """``max |ours - theirs| <= RELATIVE * max |theirs|``; a tensor of as many elements is compared in the authors' shape."""
    ours = ours.reshape(theirs.shape) if ours.numel() == theirs.numel() else ours
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} against {tuple(theirs.shape)}"
    difference = (ours.double() - theirs.double()).abs().max().item()
    scale = theirs.double().abs().max().item()
    assert difference <= RELATIVE * scale, f"{what}: max difference {difference:.3g}, {difference / scale:.3g} of max |authors'|"


@functools.cache
def load_step(name: str) -> dict[str, Any]:
    """A recorded step (``FIXTURES/name``, a ``torch.save`` file of tensors), loaded once per test session."""
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


JITTER_RANGES = [(0.8, 1.2)] * 3 + [(-0.2, 0.2)]
"""The intervals of DACS's colour jitter at strength 0.2: brightness, contrast, saturation, hue."""
BLUR_SIGMA_RANGE = (0.15, 1.15)
"""The interval of DACS's blur sigma."""


class RecordedDraws:
    """The authors' draws of a DACS-style step, handed to segadapt's step at the point where it draws each.

    - a coin with probability ``p`` gets the code's ``U(0, 1)`` draw ``u`` from ``coins`` and applies
      when ``u > 1 - p`` (DACS: jitter when ``u > 0.2``, blur when ``u > 0.5``); a coin of
      probability 0 or 1 (the per-image coins after the batch's, ``augmentation_coins=batch``) is decided;
    - ClassMix's permutation of the ``n`` candidate values starts with the code's
      ``np.random.choice(n, k, replace=False)``: ``choices`` holds ``(n, picks)``;
    - ``uniforms`` holds ``(interval, value)`` in the order segadapt draws them: per image the
      jitter's brightness, contrast, saturation and hue factors (kornia's draws, hue in turns as
      kornia's factor before its ``2 pi``), then the blur sigma;
    - ``orders`` holds the jitter's order of the four operations, one per image.

    Every call checks that segadapt asks for what the authors drew (the same count, the same interval).
    """

    def __init__(
        self,
        coins: list[float],
        choices: list[tuple[int, torch.Tensor]],
        uniforms: list[tuple[tuple[float, float], float]],
        orders: list[torch.Tensor],
    ) -> None:
        self.coins, self.choices, self.uniforms, self.orders = list(coins), list(choices), list(uniforms), list(orders)

    def coin(self, p: float, generator: torch.Generator | None) -> bool:
        if p in (0.0, 1.0):
            return p == 1.0
        return self.coins.pop(0) > 1.0 - p

    def randperm(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        count, chosen = self.choices.pop(0)
        assert n == count, f"ClassMix draws from {n} values, the authors' code from {count}"
        rest = [i for i in range(n) if i not in chosen.tolist()]
        return torch.cat([chosen, torch.tensor(rest, dtype=torch.long)])

    def uniform_in(self, interval: Any, generator: torch.Generator | None) -> float:
        expected, value = self.uniforms.pop(0)
        assert tuple(interval) == pytest.approx(expected), f"segadapt draws from {interval}, the authors' code from {expected}"
        return value

    def jitter_order(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        assert n == 4
        return self.orders.pop(0)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """In place of the transforms' ``_coin``, ``_uniform_in`` and ``_randperm``."""
        monkeypatch.setattr(photometric, "_coin", self.coin)
        monkeypatch.setattr(photometric, "_uniform_in", self.uniform_in)
        monkeypatch.setattr(photometric, "_randperm", self.jitter_order)
        monkeypatch.setattr(mixing, "_randperm", self.randperm)

    def all_used(self) -> bool:
        return not (self.coins or self.choices or self.uniforms or self.orders)


DACS_AUTHORS_STEP = [  # the authors' value of every option of a DACS/DAFormer/HRDA step (docs/daformer.md, "The authors' step")
    "method.source_loss_mean=all",
    "method.teacher_batch_norm=as_student",
    "method.ema_warmup=from_start",
    "method.classmix_classes=batch",
    "method.augmentation_coins=batch",
    "method.blur_kernel=tenth_of_side",
    "method.jitter_maths=kornia",
]
