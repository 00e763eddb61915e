"""Dataset loaders on tiny trees in the real on-disk formats (tests/data_fixtures.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segadapt.data import (
    GTA5,
    Cityscapes,
    FolderDataset,
    ScanNet2D,
    Synthia,
    build_dataset,
    read_image,
    read_label,
    train_id_to_label_id,
)
from segadapt.data.classes import CITYSCAPES_CLASSES, SCANNET20_CLASSES, SYNTHIA16_CLASSES
from segadapt.data.synthia import read_png_channel
from segadapt.errors import ConfigError, DataError

from data_fixtures import (
    SYNTHIA_ID_TO_TRAIN16,
    lut,
    make_cityscapes,
    make_folder,
    make_gta5,
    make_scannet_25k,
    make_scannet_raw,
    make_synthia,
    write_png16,
)


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    return make_cityscapes(tmp_path_factory.mktemp("cityscapes"))


@pytest.fixture(scope="module")
def gta5(tmp_path_factory):
    return make_gta5(tmp_path_factory.mktemp("gta5"))


@pytest.fixture(scope="module")
def synthia(tmp_path_factory):
    return make_synthia(tmp_path_factory.mktemp("synthia"))


def assert_sample(sample: dict, image: np.ndarray, label: np.ndarray | None) -> None:
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, *image.shape[:2])
    assert torch.equal(sample["image"], torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert sample["replay"] == []
    if label is None:
        assert "label" not in sample
    else:
        assert sample["label"].dtype == torch.int64
        np.testing.assert_array_equal(sample["label"].numpy(), label)


# ---------------------------------------------------------------------------------------------
# Cityscapes


def test_cityscapes_maps_label_ids_with_the_35_row_table(cityscapes) -> None:
    dataset = Cityscapes(cityscapes.root, "train")
    assert dataset.names == ["aachen_000000_000019", "aachen_000001_000123", "bochum_000000_000019"]
    assert dataset.classes is CITYSCAPES_CLASSES
    for index, name in enumerate(dataset.names):
        sample = dataset[index]
        assert sample["name"] == name
        assert_sample(sample, cityscapes.images[name], cityscapes.labels[name])
        # parking (9), caravan (29) and the ego vehicle (1) are ignored; road (7) is 0
        assert sample["label"][0, :3].tolist() == [255, 255, 0] and (sample["label"][-2:] == 255).all()


def test_cityscapes_label_train_ids_give_the_same_labels(cityscapes) -> None:
    by_ids = Cityscapes(cityscapes.root, "val")
    by_train_ids = Cityscapes(cityscapes.root, "val", label_type="labelTrainIds")
    assert by_train_ids.label_map is None
    assert torch.equal(by_ids[0]["label"], by_train_ids[0]["label"])


def test_train_id_to_label_id_inverts_the_map_and_sends_ignore_to_unlabeled(cityscapes) -> None:
    name = "aachen_000000_000019"
    label_ids = cityscapes.raw[name]
    evaluated = np.isin(label_ids, [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33])
    np.testing.assert_array_equal(train_id_to_label_id(cityscapes.labels[name]), np.where(evaluated, label_ids, 0))
    with pytest.raises(ValueError, match=r"\[19\]"):
        train_id_to_label_id(np.array([18, 19]))


def test_cityscapes_test_split_without_labels(tmp_path) -> None:
    root = tmp_path / "cs"
    (root / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)
    Image.new("RGB", (32, 16)).save(root / "leftImg8bit" / "test" / "berlin" / "berlin_000000_000019_leftImg8bit.png")
    with pytest.raises(DataError, match="with_labels=false"):
        Cityscapes(root, "test")
    sample = Cityscapes(root, "test", with_labels=False)[0]
    assert "label" not in sample and sample["name"] == "berlin_000000_000019"


def test_cityscapes_unknown_label_id_is_an_error_naming_file_and_id(tmp_path) -> None:
    tree = make_cityscapes(tmp_path / "cs")
    path = tree.root / "gtFine" / "val" / "frankfurt" / "frankfurt_000001_007973_gtFine_labelIds.png"
    ids = tree.raw["frankfurt_000001_007973"].copy()
    ids[5, 5] = 40
    Image.fromarray(ids).save(path)
    with pytest.raises(DataError, match=rf"{path}.*\[40\].*options.unknown_ids=ignore"):
        Cityscapes(tree.root, "val")[0]
    label = Cityscapes(tree.root, "val", unknown_ids="ignore")[0]["label"]
    assert label[5, 5] == 255


def test_train_id_labels_with_ids_beyond_the_classes_are_an_error(tmp_path) -> None:
    tree = make_cityscapes(tmp_path / "cs")
    path = tree.root / "gtFine" / "val" / "frankfurt" / "frankfurt_000001_007973_gtFine_labelTrainIds.png"
    label = tree.labels["frankfurt_000001_007973"].astype(np.uint8)
    label[0, 0], label[0, 1] = 19, 254
    Image.fromarray(label).save(path)
    with pytest.raises(DataError, match=rf"{path} holds ids \[19, 254\].*19 classes"):
        Cityscapes(tree.root, "val", label_type="labelTrainIds", unknown_ids="ignore")[0]


def test_missing_label_is_an_error_or_counted_when_skipped(tmp_path, caplog) -> None:
    tree = make_cityscapes(tmp_path / "cs")
    missing = tree.root / "gtFine" / "train" / "aachen" / "aachen_000001_000123_gtFine_labelIds.png"
    missing.unlink()
    expected = rf"(?s)1 missing file.*aachen_000001_000123_leftImg8bit.png: no label file {missing}"
    with pytest.raises(DataError, match=expected):
        Cityscapes(tree.root, "train")
    with caplog.at_level(logging.WARNING, logger="segadapt.data"):
        dataset = Cityscapes(tree.root, "train", missing_files="skip")
    assert dataset.names == ["aachen_000000_000019", "bochum_000000_000019"]
    assert [(p.kind, p.detail) for p in dataset.skipped] == [("missing_pair", f"no label file {missing}")]
    assert "skipped 1 item(s)" in caplog.text


def test_corrupt_and_vanished_files_raise_data_errors_naming_them(tmp_path) -> None:
    tree = make_cityscapes(tmp_path / "cs")
    dataset = Cityscapes(tree.root, "train")
    image_path, label_path = dataset.items[0].image, dataset.items[1].label
    image_path.write_bytes(image_path.read_bytes()[:60])  # truncated PNG
    label_path.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=rf"cannot read image {image_path}.*re-extract"):
        dataset[0]
    with pytest.raises(DataError, match=rf"cannot read label {label_path}"):
        dataset[1]
    dataset.items[2].image.unlink()
    with pytest.raises(DataError, match=rf"image file not found: {dataset.items[2].image}"):
        dataset[2]


def test_colour_png_given_as_label_is_rejected(cityscapes) -> None:
    path = cityscapes.root / "gtFine" / "val" / "frankfurt" / "frankfurt_000001_007973_gtFine_color.png"
    with pytest.raises(DataError, match=rf"label {path} is a RGBA image; expected a single-channel id map"):
        read_label(path)


def test_datasets_return_untransformed_samples_and_take_no_transform(cityscapes) -> None:
    # transforms belong to the engine's loader wrapper (SeededTransformDataset), never to a dataset
    sample = Cityscapes(cityscapes.root, "val")[0]
    assert sample["replay"] == [] and sample["label"].shape == sample["image"].shape[1:]
    with pytest.raises(ConfigError, match=r"unknown option 'transform' for dataset 'cityscapes'"):
        build_dataset("cityscapes", cityscapes.root, "val", transform=lambda sample: sample)


# ---------------------------------------------------------------------------------------------
# GTA5


def test_gta5_reads_palette_indices_and_intersects_images_with_labels(gta5, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="segadapt.data"):
        dataset = GTA5(gta5.root)
    assert dataset.names == ["00001", "00002", "00003"]
    assert {(p.kind, Path(p.path).name) for p in dataset.skipped} == {
        ("known_bad", "15188.png"), ("missing_pair", "00004.png"), ("missing_pair", "00005.png"),
    }
    assert "skipped 3 item(s)" in caplog.text
    with Image.open(gta5.root / "labels" / "00001.png") as label_file:
        assert label_file.mode == "P"
    for index, name in enumerate(["00001", "00002"]):
        sample = dataset[index]
        assert_sample(sample, gta5.images[name], gta5.labels[name])
        # ids 0 -> 255, 7 road -> 0, 26 car -> 13, 33 bicycle -> 18, 34 (outside the table) -> 255
        assert sample["label"][0, :5].tolist() == [255, 0, 13, 18, 255]


def test_gta5_unknown_id_34_can_be_made_an_error(gta5) -> None:
    with pytest.raises(DataError, match=r"00001.png holds ids \[34\]"):
        GTA5(gta5.root, unknown_ids="error")[0]


def test_gta5_size_mismatch_policies(gta5, caplog) -> None:
    image, ids = gta5.images["00003"], gta5.raw["00003"]  # 18 image rows, 17 label rows
    with caplog.at_level(logging.WARNING, logger="segadapt.data"):
        sample = GTA5(gta5.root, names=["00003"])[0]
    # nearest neighbour: output row i samples input row floor((i + 0.5) * 17 / 18)
    rows = np.floor((np.arange(18) + 0.5) * 17 / 18).astype(int)
    assert_sample(sample, image, lut({7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                                      24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18})[ids[rows]])
    assert "label " in caplog.text and "is 32x17 (WxH) but its image" in caplog.text

    resized_image = GTA5(gta5.root, names=["00003"], size_mismatch="resize_image")[0]
    assert resized_image["image"].shape == (3, 17, 32) and resized_image["label"].shape == (17, 32)

    message = r"00003.png is 32x17 \(WxH\) but its image .*00003.png is 32x18.*options.size_mismatch=resize_label.*or skip"
    with pytest.raises(DataError, match=message):
        GTA5(gta5.root, names=["00003"], size_mismatch="error")[0]

    skipping = GTA5(gta5.root, size_mismatch="skip")
    assert skipping.names == ["00001", "00002"]
    assert ("size_mismatch", str(gta5.root / "labels" / "00003.png")) in {(p.kind, p.path) for p in skipping.skipped}


def test_gta5_known_bad_frames_and_strict_pairing(gta5) -> None:
    assert "15188" in GTA5(gta5.root, drop_known_bad=False).names
    expected = r"(?s)2 missing file\(s\).*00004.png: label without an image.*options.missing_files=skip"
    with pytest.raises(DataError, match=expected):
        GTA5(gta5.root, missing_files="error")
    with pytest.raises(DataError, match="GTA5 has no 'val' split"):
        GTA5(gta5.root, "val")


# ---------------------------------------------------------------------------------------------
# SYNTHIA


def test_16_bit_rgb_png_reader_returns_full_values_where_pil_returns_the_high_byte(tmp_path) -> None:
    values = np.random.default_rng(0).integers(0, 65536, (7, 9, 3)).astype(np.uint16)
    write_png16(tmp_path / "rgb16.png", values)
    for channel in range(3):
        np.testing.assert_array_equal(read_png_channel(tmp_path / "rgb16.png", channel), values[..., channel])
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "rgb16.png")), values >> 8)  # why the reader exists
    rgba = np.random.default_rng(1).integers(0, 65536, (4, 5, 4)).astype(np.uint16)
    write_png16(tmp_path / "rgba16.png", rgba)
    np.testing.assert_array_equal(read_png_channel(tmp_path / "rgba16.png", 3), rgba[..., 3])


def test_synthia_19_class_map(synthia) -> None:
    dataset = Synthia(synthia.root)
    assert dataset.names == ["0000000", "0000001"] and dataset.classes.num_classes == 19
    for index, name in enumerate(dataset.names):
        sample = dataset[index]
        assert_sample(sample, synthia.images[name], synthia.labels[name])
        # void 0, parking 13, road-work 14, lanemarking 22 -> 255; terrain 16, truck 18, train 20 -> 9, 14, 16
        assert sample["label"][0, :7].tolist() == [255, 255, 255, 255, 9, 14, 16]


def test_synthia_16_class_map(synthia) -> None:
    dataset = Synthia(synthia.root, num_classes=16)
    assert dataset.classes == SYNTHIA16_CLASSES
    name = "0000001"
    sample = dataset[1]
    np.testing.assert_array_equal(sample["label"].numpy(), lut(SYNTHIA_ID_TO_TRAIN16)[synthia.raw[name]])
    assert sample["label"][0, :7].tolist() == [255] * 7  # terrain, truck, train do not exist in the 16


def test_synthia_class_ids_beyond_22_are_an_error(tmp_path) -> None:
    tree = make_synthia(tmp_path / "synthia")
    classes = tree.raw["0000000"].copy()
    classes[1, 1] = 300
    write_png16(tree.root / "GT" / "LABELS" / "0000000.png", np.stack([classes, classes, classes], -1))
    with pytest.raises(DataError, match=r"0000000.png holds ids \[300\].*first channel of GT/LABELS"):
        Synthia(tree.root)[0]
    with pytest.raises(ConfigError, match="use 19 or 16"):
        Synthia(tree.root, num_classes=13)


def test_synthia_protocol_class_ids() -> None:
    from segadapt.data import MIOU13_CLASS_IDS, MIOU13_CLASS_IDS_OF_16, MIOU16_CLASS_IDS

    assert MIOU16_CLASS_IDS == (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)  # docs/datasets/synthia.md, "Evaluation protocols"
    assert MIOU13_CLASS_IDS == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)  # same section: mIoU13
    assert [SYNTHIA16_CLASSES.names[i] for i in MIOU13_CLASS_IDS_OF_16] == [
        CITYSCAPES_CLASSES.names[i] for i in MIOU13_CLASS_IDS
    ]


# ---------------------------------------------------------------------------------------------
# ScanNet


def test_scannet_25k_nyu40_labels_scene_splits_and_label_resize(tmp_path) -> None:
    tree = make_scannet_25k(tmp_path / "scannet")
    train = ScanNet2D(tree.root, "train")
    assert train.names == ["scene0000_00/000000", "scene0000_00/000100"] and train.classes == SCANNET20_CLASSES
    sample = train[0]
    assert_sample(sample, tree.images["scene0000_00/000000"], tree.labels["scene0000_00/000000"])
    # NYU40 0, 13, 22, 40 -> ignore; wall 1 -> 0, floor 2 -> 1, otherfurniture 39 -> 19
    assert sample["label"][0, :7].tolist() == [255, 0, 1, 255, 255, 19, 255]
    small = train[1]  # 20x15 label of a 40x30 image: label resized by nearest (x2)
    np.testing.assert_array_equal(small["label"].numpy(), np.kron(tree.labels["scene0000_00/000100"], np.ones((2, 2))))
    by_image = ScanNet2D(tree.root, "train", names=["scene0000_00/000100"], size_mismatch="resize_image")[0]
    assert by_image["image"].shape == (3, 15, 20)
    assert ScanNet2D(tree.root, "val").names == ["scene0001_00/000000"]
    assert len(ScanNet2D(tree.root, "all", names=["scene0000_00"])) == 2
    with pytest.raises(DataError, match=r"scannetv2_test.txt.*Tasks/Benchmark"):
        ScanNet2D(tree.root, "test")


def test_scannet_raw_label_ids_through_the_tsv(tmp_path) -> None:
    tree = make_scannet_raw(tmp_path / "scannet")
    dataset = ScanNet2D(tree.root, "all", label_type="raw")
    assert dataset.names == ["scene0002_00/0", "scene0002_00/20"]
    for index, name in enumerate(dataset.names):
        label = dataset[index]["label"]
        assert label.shape == (30, 40)
        np.testing.assert_array_equal(label.numpy(), np.kron(tree.labels[name], np.ones((2, 2))))
    with pytest.raises(DataError, match=r"holds ids \[1163, 1357\].*options.label_type=raw"):
        ScanNet2D(tree.root, "all", label_dir="label-filt")[0]  # raw ids read as NYU40
    (tree.root / "scannetv2-labels.combined.tsv").unlink()
    with pytest.raises(DataError, match=r"scannetv2-labels.combined.tsv.*label_tsv=PATH"):
        ScanNet2D(tree.root, "all", label_type="raw")


# ---------------------------------------------------------------------------------------------
# folder


def test_folder_dataset_labelled_and_unlabeled_splits(tmp_path) -> None:
    tree = make_folder(tmp_path / "toy")
    train = FolderDataset(tree.root, "train")
    assert train.names == ["a", "b"] and train.classes.names == ("road", "car", "sky")
    assert train.classes.colors[1] == (0, 0, 142) and train.description.startswith("toy train")
    for index, name in enumerate(train.names):
        assert_sample(train[index], tree.images[name], tree.labels[name])
    extra = FolderDataset(tree.root, "extra")
    assert not extra.has_labels
    assert_sample(extra[0], tree.images["c"], None)
    assert "label" not in FolderDataset(tree.root, "train", with_labels=False)[0]
    with pytest.raises(DataError, match=r"splits of .* are \['extra', 'train'\]"):
        FolderDataset(tree.root, "val")


def test_folder_label_ids_beyond_the_classes_name_file_and_ids(tmp_path) -> None:
    tree = make_folder(tmp_path / "toy")
    label = tree.labels["a"].copy()
    label[0, 0] = 3
    Image.fromarray(label).save(tree.root / "labels" / "train" / "a.png")
    with pytest.raises(DataError, match=rf"{tree.root / 'labels' / 'train' / 'a.png'} holds ids \[3\].*3 classes"):
        FolderDataset(tree.root, "train")[0]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("name: t\nclases: []\n", r"unknown key 'clases'; did you mean 'classes'\?"),
        ("name: t\n", r"missing key 'classes'"),
        ("name: t\nclasses:\n  - {name: a, color: [1, 2]}\n", r"'classes\[0\].color' must be three integers"),
        ("name: t\nclasses:\n  - {name: a, colour: [1, 2, 3]}\n",
         r"unknown key 'classes\[0\].colour'; did you mean 'classes\[0\].color'"),
        ("name: t\nignore_index: 1\nclasses:\n  - {name: a, color: [1, 2, 3]}\n  - {name: b, color: [1, 2, 3]}\n",
         r"'ignore_index' must be an integer in 2..255"),
        ("name: t\nclasses:\n  - {name: a, color: [1, 2, 3]}\n  - {name: a, color: [1, 2, 3]}\n", r"repeated: \['a'\]"),
        ("- just a list\n", r"expected a mapping"),
    ],
)
def test_dataset_yaml_validation_names_the_key(tmp_path, yaml_text: str, message: str) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "dataset.yaml").write_text(yaml_text)
    with pytest.raises(DataError, match=message) as error:
        FolderDataset(tmp_path, "train")
    assert str(tmp_path / "dataset.yaml") in str(error.value)


# ---------------------------------------------------------------------------------------------
# readers and registry


def test_read_image_returns_rgb_uint8(tmp_path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    assert image.dtype == np.uint8 and image.shape == (3, 4, 3)
    np.testing.assert_array_equal(image, np.repeat(gray[..., None], 3, axis=2))


def test_build_dataset_registry(cityscapes, gta5) -> None:
    assert isinstance(build_dataset("cityscapes", cityscapes.root, "val", label_type="labelTrainIds"), Cityscapes)
    assert build_dataset("gta5", gta5.root, "train").names == ["00001", "00002", "00003"]
    with pytest.raises(ConfigError, match=r"unknown dataset 'gta'; valid names: cityscapes, gta5, synthia, scannet"):
        build_dataset("gta", gta5.root, "train")
    expected = r"unknown option 'label_typ' for dataset 'cityscapes'; did you mean 'label_type'"
    with pytest.raises(ConfigError, match=expected):
        build_dataset("cityscapes", cityscapes.root, "val", label_typ="labelIds")
    with pytest.raises(ConfigError, match=r"size_mismatch='resize' is not valid; use one of error, resize_label"):
        build_dataset("gta5", gta5.root, "all", size_mismatch="resize")
