"""Split files: the published formats (docs/datasets/cityscapes.md, "Semi-supervised splits"), make_split, write/read, dataset restriction."""

from __future__ import annotations

import random

import pytest

from segadapt.data import GTA5, Cityscapes, make_split, read_split, read_split_entries, write_split
from segadapt.data.splits import SplitEntry
from segadapt.errors import ConfigError, DataError

from data_fixtures import make_cityscapes, make_gta5

UNIMATCH = (
    "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png "
    "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png\n"
    "leftImg8bit/train/monchengladbach/monchengladbach_000000_026602_leftImg8bit.png "
    "gtFine/train/monchengladbach/monchengladbach_000000_026602_gtFine_labelTrainIds.png"  # no newline at EOF
)


def test_unimatch_two_column_lines_without_final_newline(tmp_path) -> None:
    path = tmp_path / "labeled.txt"
    path.write_text(UNIMATCH)
    assert read_split_entries(path) == [
        SplitEntry(
            "aachen_000000_000019",
            "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
            "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png",
        ),
        SplitEntry(
            "monchengladbach_000000_026602",
            "leftImg8bit/train/monchengladbach/monchengladbach_000000_026602_leftImg8bit.png",
            "gtFine/train/monchengladbach/monchengladbach_000000_026602_gtFine_labelTrainIds.png",
        ),
    ]


def test_u2pl_one_column_lines_derive_the_label_path(tmp_path) -> None:
    path = tmp_path / "labeled.txt"
    path.write_text("leftImg8bit/train/ulm/ulm_000001_000019_leftImg8bit.png\n")
    assert read_split_entries(path) == [
        SplitEntry(
            "ulm_000001_000019",
            "leftImg8bit/train/ulm/ulm_000001_000019_leftImg8bit.png",
            "gtFine/train/ulm/ulm_000001_000019_gtFine_labelTrainIds.png",
        )
    ]


def test_cps_dars_plain_and_scannet_lines_reduce_to_the_same_names(tmp_path) -> None:
    cps = tmp_path / "cps.txt"
    cps.write_text("/images/train/aachen_000000_000019.png\t/segmentation/train/aachen_000000_000019_gtFine.png\n")
    dars = tmp_path / "cs_split8_labeled_match_len.txt"  # DARS repeats the labeled list
    dars.write_text(UNIMATCH + "\n" + UNIMATCH + "\n\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("00001.png\n00002\nscene0011_00\n  \n2D/scene0011_00/color/0.jpg 2D/scene0011_00/label/0.png\n")
    assert read_split(cps) == ["aachen_000000_000019"]
    assert read_split(dars) == ["aachen_000000_000019", "monchengladbach_000000_026602"]
    assert len(read_split_entries(dars)) == 4
    assert read_split(plain) == ["00001", "00002", "scene0011_00", "scene0011_00/0"]


def test_missing_or_empty_split_file_is_a_data_error(tmp_path) -> None:
    with pytest.raises(DataError, match=rf"split file not found: {tmp_path / 'nope.txt'}"):
        read_split(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="lists no items"):
        read_split(tmp_path / "empty.txt")


CITYSCAPES_TRAIN_NAMES = [f"city{i % 18:02d}_{i:06d}_000019" for i in range(2975)]


@pytest.mark.parametrize(("ratio", "labeled"), [(1 / 16, 186), (1 / 8, 372), (1 / 4, 744), (1 / 2, 1488), (1 / 30, 99)])
def test_make_split_counts_follow_the_published_rounding(ratio: float, labeled: int) -> None:
    # docs/datasets/cityscapes.md, "Semi-supervised splits": labeled = round(2975 / k); 2975/30 = 99.17 (UniMatch's 1/30 uses 100 instead)
    part, rest = make_split(CITYSCAPES_TRAIN_NAMES, ratio=ratio)
    assert (len(part), len(rest)) == (labeled, 2975 - labeled)


def test_make_split_is_deterministic_order_independent_nested_and_a_partition() -> None:
    names = CITYSCAPES_TRAIN_NAMES[:200]
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    labeled, unlabeled = make_split(names, ratio=1 / 8, seed=3)
    assert make_split(shuffled + names[:5], ratio=1 / 8, seed=3) == (labeled, unlabeled)
    assert labeled == sorted(labeled) and unlabeled == sorted(unlabeled)
    assert set(labeled).isdisjoint(unlabeled) and set(labeled) | set(unlabeled) == set(names)
    quarter, _ = make_split(names, ratio=1 / 4, seed=3)
    assert set(labeled) < set(quarter)
    assert make_split(names, count=25, seed=3) == (labeled, unlabeled)
    assert make_split(names, ratio=1 / 8, seed=4)[0] != labeled


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({}, "exactly one of ratio"), ({"ratio": 0.5, "count": 3}, "exactly one of ratio"),
     ({"ratio": 0.0}, r"ratio must be in \(0, 1\]"), ({"count": 11}, r"count must be in 1..10")],
)
def test_make_split_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_split([f"n{i}" for i in range(10)], **kwargs)


def test_write_split_round_trips_and_restricts_a_dataset(tmp_path) -> None:
    tree = make_cityscapes(tmp_path / "cs")
    dataset = Cityscapes(tree.root, "train")
    labeled, unlabeled = make_split(dataset.names, count=1, seed=0)
    write_split(tmp_path / "splits" / "labeled.txt", labeled)
    assert read_split(tmp_path / "splits" / "labeled.txt") == labeled
    assert Cityscapes(tree.root, "train", split_file=tmp_path / "splits" / "labeled.txt").names == labeled
    assert Cityscapes(tree.root, "train", names=unlabeled, with_labels=False).names == unlabeled
    with pytest.raises(ConfigError, match="single lines"):
        write_split(tmp_path / "bad.txt", ["a\nb"])


def test_split_file_in_unimatch_format_restricts_cityscapes(tmp_path) -> None:
    tree = make_cityscapes(tmp_path / "cs")
    path = tmp_path / "labeled.txt"
    path.write_text(
        "leftImg8bit/train/bochum/bochum_000000_000019_leftImg8bit.png "
        "gtFine/train/bochum/bochum_000000_000019_gtFine_labelTrainIds.png"
    )
    assert Cityscapes(tree.root, "train", split_file=path).names == ["bochum_000000_000019"]


def test_listed_names_missing_on_disk_are_an_error_or_skipped(tmp_path) -> None:
    tree = make_gta5(tmp_path / "gta5")
    path = tmp_path / "list.txt"
    path.write_text("00001.png\n00002.png\n09999.png\n")
    with pytest.raises(DataError, match=rf"09999: listed in split file {path} but not found"):
        GTA5(tree.root, split_file=path, missing_files="error")
    dataset = GTA5(tree.root, split_file=path)
    assert dataset.names == ["00001", "00002"]
    assert ("missing_file", "09999") in {(p.kind, p.path) for p in dataset.skipped}
    with pytest.raises(ConfigError, match="not both"):
        GTA5(tree.root, split_file=path, names=["00001"])
