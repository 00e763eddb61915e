"""What the step-parity tests share: where the fixtures are, the tolerance, and how a tensor is compared.

A step-parity test (``test_*_step_parity.py``) replays one training step recorded from the authors'
code (``tests/fixtures/parity/scripts/``) with segadapt's recipe and compares every loss term and
gradient with :func:`assert_close`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

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
