"""``segadapt report``: figures and the markdown page from real (tiny) runs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segadapt.cli import main
from segadapt.errors import SegadaptError
from segadapt.viz.figures import pca_2d, tsne_2d

from data_fixtures import tiny_args


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny runs, shared by the module's report tests: a source-only warm-up and CBST started from it."""
    root = tmp_path_factory.mktemp("runs")
    common = tiny_args(root, "train.eval_every=1", "train.iters=2")
    assert main(["train", "benchmark/source_only", *common, "name=warmup"]) == 0
    warmup = root / "warmup" / "checkpoints" / "last.pt"
    assert main(["train", "benchmark/cbst", *common, "name=cbst", f"model.checkpoint={warmup}"]) == 0
    return root / "warmup", root / "cbst"


@pytest.fixture
def no_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    """scikit-learn unimportable, as when the `tsne` extra is not installed (even if an earlier test imported it)."""
    for name in {"sklearn", "sklearn.manifold", *(m for m in sys.modules if m.startswith("sklearn."))}:
        monkeypatch.setitem(sys.modules, name, None)


def three_clusters(per_cluster: int = 100, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``3 * per_cluster`` points in 3 tight clusters around orthogonal directions (well apart after L2 normalisation), and their clusters."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:3] * 5.0
    labels = torch.arange(3).repeat_interleave(per_cluster)
    return centres[labels] + 0.5 * torch.randn(len(labels), dim, generator=generator), labels


def test_pca_finds_the_direction_of_largest_variance() -> None:
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(500, 3, generator=generator) * torch.tensor([5.0, 1.0, 0.1])
    projected = pca_2d(points)
    assert projected.shape == (500, 2)
    assert projected[:, 0].var() > 20 * projected[:, 1].var() > 0
    assert torch.allclose(projected[:, 0].abs(), (points[:, 0] - points[:, 0].mean()).abs(), atol=0.5)


def test_tsne_separates_clusters_and_repeats_with_a_seed() -> None:
    points, clusters = three_clusters()
    embedded = tsne_2d(points, seed=0)
    assert embedded.shape == (300, 2) and embedded.dtype == torch.float32 and torch.isfinite(embedded).all()
    assert torch.equal(embedded, tsne_2d(points, seed=0))
    distances = torch.cdist(embedded, embedded).fill_diagonal_(float("inf"))
    assert (clusters[distances.argmin(1)] == clusters).float().mean() > 0.95  # each point's nearest neighbour is of its cluster


def test_tsne_caps_the_perplexity_for_few_points() -> None:
    points, _ = three_clusters(per_cluster=4)  # 12 points: the default perplexity 30 is capped at 11 / 3
    assert tsne_2d(points).shape == (12, 2)
    assert tsne_2d(points[:1]).shape == (1, 2)


def test_tsne_without_sklearn_names_the_extra(no_sklearn: None) -> None:
    with pytest.raises(SegadaptError, match=r'pip install "segadapt\[tsne\]"'):
        tsne_2d(three_clusters(per_cluster=4)[0])


def test_report_draws_every_figure_of_two_runs(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    assert main(["report", *map(str, two_runs), "--out", str(tmp_path / "report"), "--images", "2"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    for figure in ("curves", "class_iou", "predictions", "features", "features_tsne", "class_distribution"):
        assert f"({figure}.png)" in report
        image = np.asarray(Image.open(tmp_path / "report" / f"{figure}.png").convert("L"))
        assert image.shape[0] > 60 and image.std() > 5  # drawn, not blank
    assert "t-SNE of the same pixels, as BLV supplement Fig. 2" in report and "segadapt[tsne]" not in report
    assert "| warmup |" in report and "| cbst | cbst |" in report  # scores and pseudo-label rows


def test_report_without_sklearn_says_how_to_get_the_tsne_view(two_runs: tuple[Path, Path], tmp_path: Path, no_sklearn: None) -> None:
    assert main(["report", *map(str, two_runs), "--out", str(tmp_path / "report"), "--images", "2"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "(features.png)" in report and (tmp_path / "report" / "features.png").exists()
    assert "features_tsne" not in report and not (tmp_path / "report" / "features_tsne.png").exists()
    assert 'For the t-SNE view of the same pixels (BLV supplement Fig. 2): `pip install "segadapt[tsne]"`' in report


def test_report_names_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run directory (no config.yaml)" in capsys.readouterr().err
