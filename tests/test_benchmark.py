"""The embedded benchmark: determinism, on-disk format, label statistics, caching, domain shift."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from segadapt.data.benchmark import (
    GENERATOR_VERSION,
    SIZES,
    SPLITS,
    default_benchmark_dir,
    domains,  # a module: the tests read its _DOMAINS
    ensure_benchmark,
    generate,  # a module: the tests patch the functions ensure_benchmark calls
    generate_benchmark,
    generate_sample,
    is_complete,
    sample_rng,
    sample_scene,
)
from segadapt.data.classes import CITYSCAPES_CLASSES
from segadapt.errors import DataError

TINY = SIZES["tiny"]
ID = {name: i for i, name in enumerate(CITYSCAPES_CLASSES.names)}


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_benchmark(tmp_path_factory.mktemp("bench") / "tiny", seed=0, size="tiny")


def read_split(root: Path, domain: str, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, labels = [], []
    for path in sorted((root / domain / "images" / split).glob("*.png")):
        images.append(np.asarray(Image.open(path)))
        labels.append(np.asarray(Image.open(root / domain / "labels" / split / path.name)))
    return images, labels


# ---- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tiny: Path, tmp_path: Path) -> None:
    again = generate_benchmark(tmp_path / "again", seed=0, size="tiny")
    assert files_of(again) == files_of(tiny)
    other = files_of(generate_benchmark(tmp_path / "other", seed=1, size="tiny"))
    reference = files_of(tiny)
    assert other.keys() == reference.keys()
    pngs = [name for name in reference if name.endswith(".png")]
    assert all(other[name] != reference[name] for name in pngs)


def test_worker_processes_do_not_change_the_output(tiny: Path, tmp_path: Path) -> None:
    parallel = generate_benchmark(tmp_path / "parallel", seed=0, size="tiny", num_workers=2)
    assert files_of(parallel) == files_of(tiny)


def test_each_image_has_its_own_stream_independent_of_order() -> None:
    first = generate_sample(3, "target", "val", 2, "tiny")
    generate_sample(3, "target", "val", 1, "tiny")
    second = generate_sample(3, "target", "val", 2, "tiny")
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert sample_rng(0, "source", "train", 0).random() != sample_rng(0, "target", "train", 0).random()


# ---- on-disk format ----------------------------------------------------------------------------


def test_folder_layout_counts_and_png_modes(tiny: Path) -> None:
    assert sorted(p.name for p in tiny.iterdir()) == ["benchmark.json", "source", "target"]
    assert not (tiny / "source" / "images" / "val").exists()
    for domain, split in SPLITS:
        images = sorted(p.name for p in (tiny / domain / "images" / split).iterdir())
        labels = sorted(p.name for p in (tiny / domain / "labels" / split).iterdir())
        assert images == labels == [f"{domain}_{split}_{i:04d}.png" for i in range(TINY.count(domain, split))]
        image = Image.open(tiny / domain / "images" / split / images[0])
        label = Image.open(tiny / domain / "labels" / split / labels[0])
        assert (image.mode, label.mode) == ("RGB", "L")
        assert image.size == label.size == (TINY.width, TINY.height)


def test_dataset_yaml_lists_the_cityscapes_classes_and_colours(tiny: Path) -> None:
    for domain in ("source", "target"):
        content = yaml.safe_load((tiny / domain / "dataset.yaml").read_text())
        assert content["name"] == f"benchmark-{domain}"
        assert content["ignore_index"] == 255
        assert [c["name"] for c in content["classes"]] == list(CITYSCAPES_CLASSES.names)
        assert [tuple(c["color"]) for c in content["classes"]] == list(CITYSCAPES_CLASSES.colors)
        assert content["classes"][10] == {"name": "sky", "color": [70, 130, 180]}


def test_labels_are_train_ids_or_ignore_and_only_target_has_an_ego_hood(tiny: Path) -> None:
    for domain, split in SPLITS:
        values = np.unique(np.concatenate([label.ravel() for label in read_split(tiny, domain, split)[1]]))
        assert set(values.tolist()) <= set(range(19)) | {255}
        assert (255 in values) == (domain == "target")
        assert {ID["road"], ID["sky"], ID["building"]} <= set(values.tolist())


def test_summary_matches_the_label_files(tiny: Path) -> None:
    summary = json.loads((tiny / "benchmark.json").read_text())
    assert (summary["generator_version"], summary["seed"], summary["size"]) == (GENERATOR_VERSION, 0, "tiny")
    assert summary["image_size"] == [TINY.height, TINY.width]
    assert summary["counts"] == {"source/train": 6, "target/train": 4, "target/val": 3}
    for domain, split in SPLITS:
        labels = np.concatenate([label.ravel() for label in read_split(tiny, domain, split)[1]])
        histogram = np.bincount(labels, minlength=256)
        shares = summary["class_distribution"][f"{domain}/{split}"]
        assert list(shares) == list(CITYSCAPES_CLASSES.names)
        expected = histogram[:19] / histogram[:19].sum()
        np.testing.assert_allclose([shares[name] for name in CITYSCAPES_CLASSES.names], expected, atol=1e-6)
        assert summary["ignored_fraction"][f"{domain}/{split}"] == pytest.approx(histogram[255] / labels.size, abs=1e-6)


def test_tiny_class_distribution_is_led_by_road_and_long_tailed(tiny: Path) -> None:
    summary = json.loads((tiny / "benchmark.json").read_text())
    shares = np.zeros(19)
    for split_shares in summary["class_distribution"].values():
        shares += np.asarray(list(split_shares.values()))
    shares /= len(summary["class_distribution"])
    assert shares.argmax() == ID["road"]
    assert 0.25 < shares[ID["road"]] < 0.5
    present = shares[shares > 0]
    assert present.max() / present.min() > 50


@pytest.fixture(scope="module")
def default_size_shares() -> dict[str, np.ndarray]:
    """Class shares of 60 default-size layouts per domain (layout only: no rendering, fast)."""
    size = SIZES["default"]
    shares = {}
    for domain, (prior, _) in domains._DOMAINS.items():
        histogram = np.zeros(256)
        for index in range(60):
            canvas = sample_scene(size.height, size.width, prior, sample_rng(0, domain, "train", index))
            histogram += np.bincount(canvas.label.ravel(), minlength=256)
        shares[domain] = histogram[:19] / histogram[:19].sum()
    return shares


def test_default_size_is_long_tailed_like_cityscapes(default_size_shares: dict[str, np.ndarray]) -> None:
    for shares in default_size_shares.values():
        assert shares.argmax() == ID["road"]
        assert 0.28 < shares[ID["road"]] < 0.42
        assert (shares < 0.005).sum() >= 4
        assert (shares > 0).sum() >= 18  # the rarest class may miss 60 layouts of a domain
    assert (sum(default_size_shares.values()) > 0).all()
    tail = [ID[name] for name in ("traffic light", "rider", "motorcycle")]
    assert (default_size_shares["target"][tail] < 0.005).all()


def test_domains_have_different_class_priors(default_size_shares: dict[str, np.ndarray]) -> None:
    source, target = default_size_shares["source"], default_size_shares["target"]
    # GTA5-like source: more sky and heavy vehicles; Cityscapes-like target: more vegetation and people.
    assert source[ID["sky"]] > 1.5 * target[ID["sky"]]
    assert source[ID["truck"]] > target[ID["truck"]]
    assert target[ID["vegetation"]] > 1.5 * source[ID["vegetation"]]
    assert target[ID["person"]] > 2 * source[ID["person"]]
    assert target[ID["bicycle"]] > 2 * source[ID["bicycle"]]


# ---- appearance --------------------------------------------------------------------------------


def class_pixels(domain: str, class_id: int, count: int = 8) -> np.ndarray:
    pixels = []
    for index in range(count):
        image, label = generate_sample(0, domain, "train", index, "default")
        pixels.append(image[label == class_id].astype(np.float64) / 255.0)
    return np.concatenate(pixels)


@pytest.mark.parametrize("name", ["road", "sky", "vegetation", "sidewalk"])
def test_same_class_looks_different_across_domains(name: str) -> None:
    source, target = class_pixels("source", ID[name]), class_pixels("target", ID[name])
    assert len(source) > 1000 and len(target) > 1000
    mean_gap = np.linalg.norm(source.mean(0) - target.mean(0))
    assert mean_gap > 0.12


def test_target_is_noisy_inside_regions() -> None:
    def visible_steps(domain: str) -> float:
        """Fraction of vertical steps above 0.03 inside regions: texture and sensor noise, not edges."""
        steps = []
        for index in range(4):
            image, label = generate_sample(0, domain, "train", index, "default")
            inside = label[1:, :] == label[:-1, :]
            steps.append(np.abs(np.diff(image.astype(np.float64) / 255.0, axis=0))[inside] > 0.03)
        return float(np.concatenate(steps).mean())

    assert visible_steps("target") > 2 * visible_steps("source")


# ---- caching -----------------------------------------------------------------------------------


def test_ensure_reuses_a_complete_copy(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete benchmark")

    monkeypatch.setattr(generate, "generate_benchmark", fail)  # what ensure_benchmark calls
    assert ensure_benchmark(tiny, seed=0, size="tiny") == tiny


def test_ensure_regenerates_a_partial_or_outdated_copy(tiny: Path, tmp_path: Path) -> None:
    root = ensure_benchmark(tmp_path / "cache", seed=0, size="tiny")
    reference = files_of(tiny)
    assert files_of(root) == reference
    (root / "target" / "labels" / "val" / "target_val_0001.png").unlink()
    assert not is_complete(root, 0, "tiny")
    assert files_of(ensure_benchmark(root, seed=0, size="tiny")) == reference

    summary = json.loads((root / "benchmark.json").read_text())
    summary["generator_version"] = GENERATOR_VERSION - 1
    (root / "benchmark.json").write_text(json.dumps(summary))
    assert files_of(ensure_benchmark(root, seed=0, size="tiny")) == reference

    partial = tmp_path / "partial"  # an interrupted non-atomic copy: files but no benchmark.json
    (partial / "source" / "images" / "train").mkdir(parents=True)
    (partial / "source" / "images" / "train" / "source_train_0000.png").write_bytes(b"truncated")
    assert files_of(ensure_benchmark(partial, seed=0, size="tiny")) == reference


def test_a_copy_another_process_finished_meanwhile_is_kept_not_replaced(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two trainings started together on a fresh machine both generate; the one that finishes first may
    already read its tree, so the later one must not delete and re-rename it (a lost file mid-run)."""
    root = tmp_path / "cache"
    original = generate._write_tree
    first: list[int] = []

    def another_process_finishes_first(staging: Path, *args: Any) -> None:
        original(staging, *args)
        shutil.copytree(tiny, root)  # the other process's rename lands while this one is writing
        first.append(root.stat().st_ino)

    monkeypatch.setattr(generate, "_write_tree", another_process_finishes_first)
    assert ensure_benchmark(root, seed=0, size="tiny") == root
    assert root.stat().st_ino == first[0]  # the tree the other process may be reading is still there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # this process's copy is discarded
    assert files_of(root) == files_of(tiny)
    # an explicit generation (segadapt make-benchmark) still replaces what is there
    monkeypatch.setattr(generate, "_write_tree", original)
    generate.generate_benchmark(root, seed=0, size="tiny")
    assert root.stat().st_ino != first[0] and files_of(root) == files_of(tiny)


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = generate._write_sample

    def crash_after_three(job):
        calls.append(job)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return original(job)

    monkeypatch.setattr(generate, "_write_sample", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        ensure_benchmark(tmp_path / "bench", seed=0, size="tiny")
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_follows_segadapt_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGADAPT_HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / "benchmark" / f"tiny-seed7-v{GENERATOR_VERSION}"
    assert default_benchmark_dir(7, "tiny") == expected
    assert ensure_benchmark(seed=7, size="tiny") == expected
    assert is_complete(expected, 7, "tiny")
    monkeypatch.delenv("SEGADAPT_HOME")
    assert default_benchmark_dir(0, "default") == Path.home() / ".cache" / "segadapt" / "benchmark" / f"default-seed0-v{GENERATOR_VERSION}"


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match=r"mine.*not a segadapt benchmark.*--root"):
        ensure_benchmark(tmp_path / "mine", seed=0, size="tiny")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_unknown_size_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown benchmark size 'huge'.*\['default', 'tiny'\]"):
        generate_benchmark(tmp_path / "b", size="huge")
    assert not (tmp_path / "b").exists()
