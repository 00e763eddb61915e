"""check-data: every problem reported with its file, and class pixel counts equal to numpy's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segadapt.data import GTA5, check_dataset, check_folder_root, check_named_dataset, class_pixel_counts, format_report
from segadapt.errors import DataError

from data_fixtures import make_cityscapes, make_folder, make_gta5


def numpy_counts(labels: list[np.ndarray], num_classes: int) -> tuple[np.ndarray, int]:
    stacked = np.concatenate([label.ravel() for label in labels])
    counts = np.array([(stacked == c).sum() for c in range(num_classes)])
    return counts, int(stacked.size - counts.sum())


def test_the_one_pixel_counter_skips_ignore_and_refuses_out_of_range_ids_naming_them() -> None:
    label = np.array([[0, 1, 1, 255], [2, 2, 2, 255]], dtype=np.uint8)
    counts = class_pixel_counts(label, 3)  # numpy label maps as datasets load them; int64 on the CPU
    assert counts.dtype == torch.int64 and counts.tolist() == [1, 2, 3]
    assert torch.equal(class_pixel_counts(torch.from_numpy(label), 3), counts)  # tensors: the same counts
    with pytest.raises(DataError, match=r"labels hold ids \[-1, 3, 7\] outside 0..2 that are not the ignore index 255; map raw"):
        class_pixel_counts(np.array([[0, 7, 3], [-1, 255, 7]]), 3)  # never dropped silently
    with pytest.raises(DataError, match=r"labels hold ids \[255\] outside 0..2 that are not the ignore index 0"):
        class_pixel_counts(label, 3, ignore_index=0)  # 255 is only ignored when it is the ignore index
    many = torch.arange(3, 20)
    with pytest.raises(DataError, match=r"ids \[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, \.\.\.\]"):
        class_pixel_counts(many, 3)
    with pytest.raises(DataError, match="labels must hold integer class ids, got dtype torch.float32"):
        class_pixel_counts(torch.zeros(2), 3)
    with pytest.raises(DataError, match="labels must hold integer class ids, got dtype float64"):
        class_pixel_counts(np.zeros(2), 3)


def test_check_gta5_reports_every_problem_and_counts_pixels(tmp_path) -> None:
    tree = make_gta5(tmp_path / "gta5")
    report = check_dataset(GTA5(tree.root))
    assert (report.num_images, report.num_labels) == (3, 3)
    # counted at each label's own resolution, 00003's 32x17 included, id 34 as ignored
    expected, ignored = numpy_counts([tree.labels[name] for name in ("00001", "00002", "00003")], 19)
    np.testing.assert_array_equal(report.class_pixels, expected)
    assert report.ignored_pixels == ignored
    problems = {(p.kind, f"{Path(p.path).parent.name}/{Path(p.path).name}") for p in report.problems}
    assert problems == {
        ("known_bad", "images/15188.png"),
        ("missing_pair", "labels/00004.png"),
        ("missing_pair", "images/00005.png"),
        ("size_mismatch", "labels/00003.png"),
        ("unknown_ids", "labels/00001.png"),
        ("unknown_ids", "labels/00002.png"),
        ("unknown_ids", "labels/00003.png"),
    }
    unknown = next(p for p in report.problems if p.kind == "unknown_ids")
    assert "ids [34]" in unknown.detail and "mapped to ignore" in unknown.detail
    assert not report.ok


def test_format_report_lists_counts_problems_and_the_distribution(tmp_path) -> None:
    tree = make_gta5(tmp_path / "gta5")
    report = check_dataset(GTA5(tree.root))
    text = format_report(report)
    assert text.splitlines()[0] == f"GTA5 all ({tree.root}): 3 images, 3 labels"
    assert "7 problem(s):" in text and f"[size_mismatch] {tree.root / 'labels' / '00003.png'}" in text
    road_share = 100 * report.class_pixels[0] / report.class_pixels.sum()
    road_line = next(line for line in text.splitlines() if " road " in line)
    assert road_line.split() == ["0", "road", f"{int(report.class_pixels[0]):,}", f"{road_share:.3f}%"]
    assert "traffic light" in text and "bicycle" in text


def test_check_named_cityscapes_is_clean(tmp_path) -> None:
    tree = make_cityscapes(tmp_path / "cs")
    train, val = check_named_dataset("cityscapes", tree.root)  # the default splits
    assert (train.num_labels, val.num_labels) == (3, 1)
    [report] = check_named_dataset("cityscapes", tree.root, ["train"])
    assert report.ok and "no problems found" in format_report(report)
    names = ["aachen_000000_000019", "aachen_000001_000123", "bochum_000000_000019"]
    expected, ignored = numpy_counts([tree.labels[name] for name in names], 19)
    np.testing.assert_array_equal(report.class_pixels, expected)
    assert report.ignored_pixels == ignored


def test_check_folder_root_checks_every_split(tmp_path) -> None:
    tree = make_folder(tmp_path / "toy")
    label = tree.labels["a"].copy()
    label[0, 0] = 7
    Image.fromarray(label).save(tree.root / "labels" / "train" / "a.png")
    (tree.root / "images" / "train" / "b.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    (tree.root / "labels" / "train" / "z.png").write_bytes(b"")  # a label without an image
    extra, train = check_folder_root(tree.root)
    assert [r.description for r in check_named_dataset("folder", tree.root)] == [extra.description, train.description]
    assert (extra.num_images, extra.num_labels, extra.ok) == (1, 0, True)
    assert (train.num_images, train.num_labels) == (2, 2)
    kinds = {(p.kind, Path(p.path).name) for p in train.problems}
    assert kinds == {("unknown_ids", "a.png"), ("unreadable", "b.jpg"), ("missing_pair", "z.png")}
    assert "ids [7]" in next(p.detail for p in train.problems if p.kind == "unknown_ids")
    expected, ignored = numpy_counts([np.where(label == 7, 255, label), tree.labels["b"]], 3)
    np.testing.assert_array_equal(train.class_pixels, expected)
    assert train.ignored_pixels == ignored
