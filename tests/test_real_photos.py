"""The real-photograph check of a network (benchmarks/real_photos.py): its mosaics and their labels."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # last: a benchmark script never shadows a module
import real_photos  # noqa: E402

from segadapt.data.folder import FolderDataset  # noqa: E402


def flat_regions(count: int) -> list[np.ndarray]:
    """One flat-coloured 'photograph' per class, so that a pixel's colour tells where it was cut from."""
    return [np.full((200, 300, 3), 20 * index + 5, np.uint8) for index in range(count)]


def test_every_mosaic_pixel_is_labelled_with_the_photograph_it_was_cut_from() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        image, label = real_photos.mosaic(flat_regions(4), rng, max_cells=7)
        assert image.shape == (real_photos.SIZE, real_photos.SIZE, 3) and label.shape == image.shape[:2]
        np.testing.assert_array_equal(image[..., 0], 20 * label + 5)
        assert 1 <= len(np.unique(label)) <= 4


def test_training_and_validation_cut_from_disjoint_columns_of_each_photograph() -> None:
    photo = np.arange(10 * 100 * 3, dtype=np.int64).reshape(10, 100, 3)
    train, val = real_photos.photo_region(photo, "train"), real_photos.photo_region(photo, "val")
    assert train.shape[1] + val.shape[1] == 100 and train.shape[1] == int(100 * real_photos.TRAIN_FRACTION)
    assert not set(train[..., 0].ravel()) & set(val[..., 0].ravel())


def test_make_writes_a_folder_dataset_and_never_writes_into_a_used_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(real_photos, "load_photos", lambda grey=False: flat_regions(len(real_photos.PHOTOS)))
    real_photos.make(tmp_path / "mosaics", train_images=3, val_images=2, seed=0)
    dataset = FolderDataset(tmp_path / "mosaics", "val")
    assert len(dataset) == 2 and dataset.classes.num_classes == len(real_photos.PHOTOS)
    label = np.asarray(Image.open(tmp_path / "mosaics" / "labels" / "train" / "0000.png"))
    assert label.max() < len(real_photos.PHOTOS)
    with pytest.raises(SystemExit, match="not empty"):
        real_photos.make(tmp_path / "mosaics", train_images=1, val_images=1, seed=0)
