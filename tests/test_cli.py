"""The command line: make-benchmark, check-data output, and user errors reported without tracebacks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segadapt.cli import main
from segadapt.data.classes import CITYSCAPES_CLASSES


def test_make_benchmark_then_check_data_prints_the_true_distribution(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "bench"
    assert main(["make-benchmark", "--root", str(root), "--size", "tiny", "--seed", "3"]) == 0
    assert "target/val" in capsys.readouterr().out
    labels = np.concatenate([np.asarray(Image.open(p)).ravel() for p in sorted((root / "source" / "labels" / "train").glob("*.png"))])
    labelled = labels[labels != 255]
    assert main(["check-data", str(root / "source")]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out
    for class_id, name in enumerate(CITYSCAPES_CLASSES.names):
        match = re.search(rf"^\s*{class_id} {re.escape(name)}\s+([\d,]+)\s+([\d.]+)%", out, re.MULTILINE)
        assert match, name
        pixels = int(match.group(1).replace(",", ""))
        assert pixels == int((labelled == class_id).sum())
        assert float(match.group(2)) == pytest.approx(100 * pixels / labelled.size, abs=1e-3)


def test_check_data_reports_bad_files_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "bench"
    main(["make-benchmark", "--root", str(root), "--size", "tiny"])
    capsys.readouterr()
    label = next((root / "target" / "labels" / "val").glob("*.png"))
    Image.fromarray(np.full((8, 8), 42, dtype=np.uint8)).save(label)  # wrong size and an unknown id
    assert main(["check-data", str(root / "target")]) == 1
    assert label.name in capsys.readouterr().out


def test_config_errors_are_one_line_messages(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "benchmark/source_only", "optim.lrate=1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'optim.lr'" in err and "Traceback" not in err
    assert main(["train", "benchmark/source_onyl"]) == 2
    assert "did you mean 'benchmark/source_only.yaml'" in capsys.readouterr().err


def test_demo_adapts_with_the_strongest_benchmark_method_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from segadapt.commands import demo

    calls: list[tuple] = []
    monkeypatch.setattr(demo, "run", lambda output, seed, quick, methods: calls.append(tuple(methods)) or 0)
    assert main(["demo", "--output", str(tmp_path)]) == 0
    assert main(["demo", "--output", str(tmp_path), "--methods"]) == 0
    assert main(["demo", "--output", str(tmp_path), "--methods", "cpsl", "st"]) == 0
    assert calls == [demo.DEFAULT_METHODS, (), ("cpsl", "st")]
    assert all((demo.packaged_config(f"benchmark/{method}")).exists() for method in demo.DEFAULT_METHODS)
