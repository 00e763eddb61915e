"""``segadapt report``: figures and the markdown page from real (tiny) runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segadapt.cli import main
from segadapt.viz.figures import pca_2d

from data_fixtures import tiny_args


def test_pca_finds_the_direction_of_largest_variance() -> None:
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(500, 3, generator=generator) * torch.tensor([5.0, 1.0, 0.1])
    projected = pca_2d(points)
    assert projected.shape == (500, 2)
    assert projected[:, 0].var() > 20 * projected[:, 1].var() > 0
    assert torch.allclose(projected[:, 0].abs(), (points[:, 0] - points[:, 0].mean()).abs(), atol=0.5)


def test_report_draws_every_figure_of_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = tiny_args(tmp_path, "train.eval_every=1", "train.iters=2")
    assert main(["train", "benchmark/source_only", *common, "name=warmup"]) == 0
    warmup = tmp_path / "warmup" / "checkpoints" / "last.pt"
    assert main(["train", "benchmark/cbst", *common, "name=cbst", f"model.checkpoint={warmup}"]) == 0
    assert main(["report", str(tmp_path / "warmup"), str(tmp_path / "cbst"), "--out", str(tmp_path / "report"), "--images", "2"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    for figure in ("curves", "class_iou", "predictions", "features", "class_distribution"):
        assert f"({figure}.png)" in report
        image = np.asarray(Image.open(tmp_path / "report" / f"{figure}.png").convert("L"))
        assert image.shape[0] > 60 and image.std() > 5  # drawn, not blank
    assert "| warmup |" in report and "| cbst | cbst |" in report  # scores and pseudo-label rows


def test_report_names_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run directory (no metrics.jsonl)" in capsys.readouterr().err
