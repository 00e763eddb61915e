"""Metrics: confusion matrix and scores (vs torchmetrics), protocols, tables, pseudo-label quality."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassJaccardIndex,
)

from segadapt.collectives import all_reduce_sum
from segadapt.data.classes import CITYSCAPES_CLASSES
from segadapt.errors import CheckpointError
from segadapt.metrics import (
    PROTOCOLS,
    ConfusionMatrix,
    PseudoLabelStats,
    compute_scores,
    format_table,
    get_protocol,
    kl_divergence,
    mean_pixel_accuracy,
    protocol_indices,
    pseudo_label_stats,
    scores_for_protocol,
)

NAN = float("nan")


def random_batch(seed: int, num_classes: int = 7, shape=(3, 24, 32), ignore_fraction: float = 0.15):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, shape, generator=generator)
    target[torch.rand(shape, generator=generator) < ignore_fraction] = 255
    # Mostly right, so the scores are far from chance and from each other.
    guess = torch.randint(0, num_classes, shape, generator=generator)
    pred = torch.where(torch.rand(shape, generator=generator) < 0.6, target, guess)
    pred[pred == 255] = 0
    return pred, target


# ---------------------------------------------------------------- confusion matrix and scores


def test_scores_match_torchmetrics_on_random_data_with_ignore():
    num_classes = 7
    pred, target = random_batch(0, num_classes)
    cm = ConfusionMatrix(num_classes, ignore_index=255)
    cm.update(pred, target)
    scores = compute_scores(cm)

    reference_matrix = MulticlassConfusionMatrix(num_classes, ignore_index=255)(pred, target)
    reference_iou = MulticlassJaccardIndex(num_classes, average=None, ignore_index=255)(pred, target)
    reference_mpa = MulticlassAccuracy(num_classes, average="macro", ignore_index=255)(pred, target)
    reference_pa = MulticlassAccuracy(num_classes, average="micro", ignore_index=255)(pred, target)

    assert torch.equal(cm.matrix, reference_matrix)
    assert torch.allclose(scores.per_class_iou, reference_iou.double(), atol=1e-6)
    assert scores.miou == pytest.approx(float(reference_iou.mean()), abs=1e-6)
    assert scores.mpa == pytest.approx(float(reference_mpa), abs=1e-6)
    assert scores.pixel_accuracy == pytest.approx(float(reference_pa), abs=1e-6)
    assert int(cm.matrix.sum()) == int((target != 255).sum())


def test_merge_and_repeated_updates_equal_one_update_on_the_concatenation():
    (pred_a, target_a), (pred_b, target_b) = random_batch(1), random_batch(2)
    whole = ConfusionMatrix(7, ignore_index=255)
    whole.update(torch.cat([pred_a, pred_b]), torch.cat([target_a, target_b]))
    first, second, streamed = ConfusionMatrix(7, ignore_index=255), ConfusionMatrix(7, ignore_index=255), ConfusionMatrix(7, ignore_index=255)
    first.update(pred_a, target_a)
    second.update(pred_b, target_b)
    for image_pred, image_target in zip(torch.cat([pred_a, pred_b]), torch.cat([target_a, target_b])):
        streamed.update(image_pred, image_target)  # [H, W] inputs

    assert torch.equal(first.merge(second).matrix, whole.matrix)
    assert torch.equal(streamed.matrix, whole.matrix)


def test_perfect_prediction_scores_one_and_uint8_labels_are_accepted():
    target = torch.tensor([[0, 1, 2], [2, 255, 1]], dtype=torch.uint8)
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(target.clone().masked_fill(target == 255, 0), target)
    scores = compute_scores(cm, ("road", "car", "sky"))
    assert (scores.miou, scores.mpa, scores.pixel_accuracy) == (1.0, 1.0, 1.0)
    assert scores.per_class_iou.tolist() == [1.0, 1.0, 1.0]


def test_hand_made_matrix_iou_mpa_and_pixel_accuracy():
    # rows: ground truth, columns: prediction (CPSL supplement notation p_ij)
    matrix = torch.tensor([[6, 2, 0], [1, 3, 0], [0, 0, 0]])
    scores = compute_scores(matrix)
    # IoU: class 0: 6 / (8 + 7 - 6); class 1: 3 / (4 + 5 - 3); class 2 absent everywhere
    assert scores.per_class_iou[:2].tolist() == pytest.approx([6 / 9, 3 / 6])
    assert math.isnan(scores.per_class_iou[2])
    assert scores.miou == pytest.approx((6 / 9 + 3 / 6) / 2)
    # CPSL supp. Eq. 2 over the classes with ground truth
    assert scores.mpa == pytest.approx((6 / 8 + 3 / 4) / 2)
    assert scores.pixel_accuracy == pytest.approx(9 / 12)

    zero = compute_scores(matrix, absent_as_zero=True)
    assert zero.per_class_iou[2] == 0.0
    assert zero.miou == pytest.approx((6 / 9 + 3 / 6) / 3)
    assert zero.mpa == pytest.approx((6 / 8 + 3 / 4) / 3)


def test_class_predicted_but_absent_from_ground_truth_has_iou_zero_and_undefined_accuracy():
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(torch.tensor([0, 0, 2, 1]), torch.tensor([0, 0, 0, 1]))
    scores = compute_scores(cm)
    assert scores.per_class_iou.tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    assert scores.per_class_accuracy[:2].tolist() == [2 / 3, 1.0]
    assert math.isnan(scores.per_class_accuracy[2])
    assert mean_pixel_accuracy(cm) == pytest.approx((2 / 3 + 1) / 2)


def test_empty_matrix_scores_are_nan():
    scores = compute_scores(ConfusionMatrix(4, ignore_index=255))
    assert math.isnan(scores.miou) and math.isnan(scores.mpa) and math.isnan(scores.pixel_accuracy)


def test_to_dict_is_strict_json_with_null_for_undefined_classes():
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(torch.tensor([0, 0]), torch.tensor([0, 255]))
    record = compute_scores(cm, ("road", "car")).to_dict("val/")
    assert record == {
        "val/miou": 1.0, "val/pixel_accuracy": 1.0, "val/mpa": 1.0,
        "val/iou/road": 1.0, "val/iou/car": None, "val/acc/road": 1.0, "val/acc/car": None,
    }
    json.dumps(record, allow_nan=False)


def test_state_dict_round_trip_and_reset():
    pred, target = random_batch(3)
    cm = ConfusionMatrix(7, ignore_index=255)
    cm.update(pred, target)
    restored = ConfusionMatrix(7, ignore_index=255)
    restored.load_state_dict(cm.state_dict())
    assert torch.equal(restored.matrix, cm.matrix)
    cm.reset()
    assert int(cm.matrix.sum()) == 0 and int(restored.matrix.sum()) > 0


def test_load_state_dict_for_another_class_count_names_both_sizes():
    with pytest.raises(CheckpointError, match=r"\(5, 5\), expected \(7, 7\)"):
        ConfusionMatrix(7, ignore_index=255).load_state_dict(ConfusionMatrix(5, ignore_index=255).state_dict())


@pytest.mark.parametrize(
    "pred, target, message",
    [
        (torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 5, dtype=torch.long),
         r"\(2, 4, 4\) != target shape \(2, 4, 5\)"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), r"logits\.argmax\(1\)"),
        (torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.long),
         r"prediction must hold integer class ids, got dtype torch\.float32"),
        (torch.tensor([0, 7, -1, 7]), torch.tensor([0, 1, 2, 255]), r"prediction holds id\(s\) -1, 7 outside 0\.\.6;"),
        (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 9, 200, 255]),
         r"target holds id\(s\) 9, 200 outside 0\.\.6 or 255 \(ignore\)"),
    ],
)
def test_update_rejects_bad_inputs_naming_the_problem(pred, target, message):
    cm = ConfusionMatrix(7, ignore_index=255)
    with pytest.raises(ValueError, match=message):
        cm.update(pred, target)
    assert int(cm.matrix.sum()) == 0


def test_merge_rejects_a_different_class_count():
    with pytest.raises(ValueError, match="cannot merge a 5-class matrix"):
        ConfusionMatrix(7, ignore_index=255).merge(ConfusionMatrix(5, ignore_index=255))


def test_all_reduce_without_distributed_is_a_no_op():
    assert not dist.is_initialized()
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    matrix = cm.matrix
    assert cm.all_reduce().matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]] and cm.matrix is matrix
    stats = pseudo_label_stats(torch.tensor([0, 255, 1]), torch.tensor([0, 1, 1]), 3, ignore_index=255)
    before = (stats.pixel_counts.tolist(), stats.class_counts.tolist(), stats.target_class_counts.tolist())
    assert (stats.all_reduce().pixel_counts.tolist(), stats.class_counts.tolist(), stats.target_class_counts.tolist()) == before


def test_the_one_all_reduce_helper_is_a_no_op_without_a_process_group():
    # the helper metrics/ and methods/ share (segadapt/collectives.py); the engine's own collectives are above them
    assert not dist.is_initialized()
    for tensor in (torch.tensor([3, 0, 1]), torch.arange(6.0).reshape(2, 3).T):  # the second is not contiguous
        before = tensor.clone()
        assert all_reduce_sum(tensor) is tensor and torch.equal(tensor, before)


def _all_reduce_worker(rank: int, world_size: int, init_file: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    pred, target = random_batch(10 + rank)
    cm = ConfusionMatrix(7, ignore_index=255)
    cm.update(pred, target)
    stats = pseudo_label_stats(target, target, 7, ignore_index=255)
    cm.all_reduce()
    stats.all_reduce()
    transposed = torch.arange(6.0).reshape(2, 3).T * (rank + 1)  # not contiguous: reduced through a copy
    assert all_reduce_sum(transposed) is transposed
    torch.save((cm.matrix, stats.pixel_counts, stats.class_counts, transposed), f"{result_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_all_reduce_sums_over_two_gloo_ranks(tmp_path):
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    expected = ConfusionMatrix(7, ignore_index=255)
    expected_stats = PseudoLabelStats(7, ignore_index=255)
    for rank in range(2):
        pred, target = random_batch(10 + rank)
        expected.update(pred, target)
        expected_stats.update(target, target)
    for rank in range(2):
        matrix, pixel_counts, class_counts, transposed = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(transposed, torch.arange(6.0).reshape(2, 3).T * 3)  # ranks 1x + 2x
        assert torch.equal(matrix, expected.matrix)
        assert torch.equal(pixel_counts, expected_stats.pixel_counts)
        assert torch.equal(class_counts, expected_stats.class_counts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_counting_on_gpu_matches_cpu_and_the_matrix_follows_the_inputs():
    pred, target = random_batch(4)
    on_cpu, on_gpu = ConfusionMatrix(7, ignore_index=255), ConfusionMatrix(7, ignore_index=255)
    on_cpu.update(pred, target)
    on_gpu.update(pred.cuda(), target.cuda())
    assert on_gpu.matrix.is_cuda
    assert torch.equal(on_gpu.matrix.cpu(), on_cpu.matrix)
    assert compute_scores(on_gpu).miou == compute_scores(on_cpu).miou


# ---------------------------------------------------------------- protocols


def test_protocol_train_ids_follow_datasets_md_3_4():
    assert PROTOCOLS[19].train_ids == tuple(range(19))
    assert PROTOCOLS[16].train_ids == (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    # ProDA n_class=13 to19 list
    assert PROTOCOLS[13].train_ids == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    dropped_16 = set(CITYSCAPES_CLASSES.names) - set(PROTOCOLS[16].class_names)
    dropped_13 = set(PROTOCOLS[16].class_names) - set(PROTOCOLS[13].class_names)
    assert dropped_16 == {"terrain", "truck", "train"}
    assert dropped_13 == {"wall", "fence", "pole"}
    assert get_protocol("mIoU16") is get_protocol("16") is get_protocol(16) is PROTOCOLS[16]
    with pytest.raises(ValueError, match=r"unknown evaluation protocol 15; use one of \[13, 16, 19\]"):
        get_protocol(15)


def synthia_like_matrix() -> torch.Tensor:
    """19x19 counts with a known IoU per class; terrain pixels are predicted as road."""
    matrix = torch.zeros(19, 19, dtype=torch.long)
    for c in range(19):
        matrix[c, c] = 10 + c
    matrix[9, 9] = 0
    matrix[9, 0] = 5  # terrain ground truth predicted as road: a false positive of road
    matrix[3, 4] = 4  # wall predicted as fence
    matrix[14, 14] = matrix[16, 16] = 0  # truck and train absent everywhere
    return matrix


def test_miou16_of_a_19_class_matrix_is_the_mean_of_the_16_per_class_ious():
    matrix = synthia_like_matrix()
    expected_iou = {c: 1.0 for c in range(19)}
    expected_iou[0] = 10 / 15
    expected_iou[3] = 13 / 17
    expected_iou[4] = 14 / 18
    expected_iou[9] = 0.0  # 5 ground-truth pixels, none right
    scores16 = scores_for_protocol(matrix, 16)
    scores13 = scores_for_protocol(matrix, 13)
    assert scores16.per_class_iou.tolist() == pytest.approx([expected_iou[c] for c in PROTOCOLS[16].train_ids])
    assert scores16.miou == pytest.approx(sum(expected_iou[c] for c in PROTOCOLS[16].train_ids) / 16)
    assert scores13.miou == pytest.approx(sum(expected_iou[c] for c in PROTOCOLS[13].train_ids) / 13)
    assert scores16.class_names == PROTOCOLS[16].class_names
    # pixel accuracy over ground-truth pixels of the 16 classes (the terrain row is left out)
    rows16 = list(PROTOCOLS[16].train_ids)
    assert scores16.pixel_accuracy == pytest.approx(float(matrix.diagonal()[rows16].sum() / matrix[rows16].sum()))
    assert scores_for_protocol(matrix, 19).miou == pytest.approx(compute_scores(matrix).miou)


def test_miou16_equals_daformer_rescaling_when_the_three_missing_classes_score_zero():
    matrix = synthia_like_matrix()
    matrix[14, 0] = matrix[16, 2] = 3  # truck and train in the ground truth, never predicted: IoU 0
    assert scores_for_protocol(matrix, 16).miou == pytest.approx(compute_scores(matrix).miou * 19 / 16)


def test_compact_16_class_model_scores_and_mIoU13_from_its_16_ious():
    generator = torch.Generator().manual_seed(5)
    train_ids16 = torch.tensor(PROTOCOLS[16].train_ids)
    target19 = train_ids16[torch.randint(0, 16, (2, 20, 20), generator=generator)]
    guess19 = train_ids16[torch.randint(0, 16, (2, 20, 20), generator=generator)]
    pred19 = torch.where(torch.rand(2, 20, 20, generator=generator) < 0.7, target19, guess19)
    full, compact = ConfusionMatrix(19, ignore_index=255), ConfusionMatrix(16, ignore_index=255)
    full.update(pred19, target19)
    compact.update(PROTOCOLS[16].to_compact(pred19, 255), PROTOCOLS[16].to_compact(target19, 255))

    # Without ground truth of the dropped classes the two spaces agree exactly.
    for protocol in (16, 13):
        compact_iou = scores_for_protocol(compact, protocol).per_class_iou
        assert torch.allclose(compact_iou, scores_for_protocol(full, protocol).per_class_iou)
    positions13 = [0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # the 16 minus wall, fence, pole
    assert protocol_indices(13, 16) == positions13
    compact_iou = compute_scores(compact).per_class_iou
    assert scores_for_protocol(compact, 13).miou == pytest.approx(float(compact_iou[positions13].mean()))


def test_to_compact_maps_dropped_classes_to_ignore():
    labels = torch.tensor([0, 3, 9, 10, 14, 16, 18, 255])
    assert PROTOCOLS[16].to_compact(labels, 255).tolist() == [0, 3, 255, 9, 255, 255, 15, 255]
    assert PROTOCOLS[13].to_compact(labels, 255).tolist() == [0, 255, 255, 6, 255, 255, 12, 255]


def test_protocol_errors_name_the_label_space():
    with pytest.raises(ValueError, match=r"needs classes \['terrain', 'truck', 'train'\] that a 16-class model"):
        scores_for_protocol(ConfusionMatrix(16, ignore_index=255), 19)
    with pytest.raises(ValueError, match="a 7-class label space is neither"):
        scores_for_protocol(ConfusionMatrix(7, ignore_index=255), 16)


# ---------------------------------------------------------------- tables


def test_markdown_table_exact_text():
    scores = compute_scores(torch.tensor([[3, 1, 0], [0, 4, 0], [0, 0, 0]]), ("road", "car", "bus"))
    table = format_table({"oracle": scores, "paper": [0.5, 0.25, 0.123]})
    assert table == (
        "| run | road | car | bus | mIoU |\n"
        "|---|---:|---:|---:|---:|\n"
        "| oracle | 75.0 | 80.0 | - | 77.5 |\n"
        "| paper | 50.0 | 25.0 | 12.3 | 29.1 |"
    )


def test_terminal_table_with_protocols_is_aligned_and_abbreviated():
    matrix = synthia_like_matrix()
    rows = {
        "source-only": compute_scores(matrix, CITYSCAPES_CLASSES.names),
        "oracle": compute_scores(torch.eye(19, dtype=torch.long), CITYSCAPES_CLASSES.names),
    }
    lines = format_table(rows, style="terminal", protocols=(16, 13)).splitlines()
    header = lines[0].split()
    assert header[:4] == ["run", "road", "sidew", "build"]
    assert header[-4:] == ["mbike", "bike", "mIoU16", "mIoU13"]
    assert len(header) == 1 + 16 + 2 and "terr" not in header and "truck" not in header
    assert len({len(line) for line in lines}) == 1  # aligned
    assert set(lines[1]) == {"-"}
    source_only = lines[2].split()
    assert source_only[0] == "source-only"
    assert source_only[1] == f"{100 * 10 / 15:.1f}"
    assert source_only[-2:] == [f"{100 * scores_for_protocol(matrix, p).miou:.1f}" for p in (16, 13)]
    assert lines[3].split()[1:] == ["100.0"] * 18


def test_table_rejects_percentages_and_mismatched_rows():
    with pytest.raises(ValueError, match="fractions in \\[0, 1\\]; divide percentages by 100"):
        format_table({"paper": [45.0, 30.0]}, class_names=("road", "car"))
    with pytest.raises(ValueError, match="row 'paper' has 3 per-class values for 2 classes"):
        format_table({"paper": [0.4, 0.3, 0.1]}, class_names=("road", "car"))
    with pytest.raises(ValueError, match="protocol mIoU16 needs Cityscapes classes that this 19-class label space lacks"):
        format_table({"paper": [0.5] * 19}, class_names=[f"c{i}" for i in range(19)], protocols=16)


# ---------------------------------------------------------------- pseudo-label quality


def test_pseudo_label_stats_hand_made():
    pseudo = torch.tensor([[0, 0, 255, 1], [1, 2, 255, 255]])
    target = torch.tensor([[0, 1, 0, 255], [1, 2, 2, 2]])
    stats = pseudo_label_stats(pseudo, target, num_classes=3, ignore_index=255)
    # valid ground truth: 7 pixels; labelled among them: (0,0) (0,1) (1,0) (1,1) -> 4
    assert stats.density == pytest.approx(4 / 7)
    # right: (0,0), (1,0), (1,1); wrong: (0,1)
    assert stats.accuracy == pytest.approx(3 / 4)
    assert stats.class_counts.tolist() == [2, 2, 1]  # includes the pixel with ignored ground truth
    assert stats.target_class_counts.tolist() == [2, 2, 3]
    expected_kl = kl_divergence(torch.tensor([0.4, 0.4, 0.2]), torch.tensor([2 / 7, 2 / 7, 3 / 7]))
    assert stats.kl_to() == pytest.approx(expected_kl)
    assert stats.to_dict() == {"density": pytest.approx(4 / 7), "accuracy": 0.75, "kl_to_target": pytest.approx(expected_kl)}


def test_pseudo_label_stats_merge_equals_update_on_the_concatenation():
    (pseudo_a, target_a), (pseudo_b, target_b) = random_batch(6), random_batch(7)
    pseudo_a[target_a == 1] = 255  # leave some pixels unlabelled
    whole = pseudo_label_stats(torch.cat([pseudo_a, pseudo_b]), torch.cat([target_a, target_b]), 7, ignore_index=255)
    merged = pseudo_label_stats(pseudo_a, target_a, 7, ignore_index=255).merge(pseudo_label_stats(pseudo_b, target_b, 7, ignore_index=255))
    assert torch.equal(merged.confusion.matrix, whole.confusion.matrix)
    assert torch.equal(merged.pixel_counts, whole.pixel_counts)
    assert (merged.density, merged.accuracy, merged.kl_to()) == (whole.density, whole.accuracy, whole.kl_to())


def test_pseudo_label_stats_without_ground_truth():
    stats = PseudoLabelStats(3, ignore_index=255)
    stats.update(torch.tensor([[0, 255], [2, 2]]))
    assert stats.density == 0.75
    assert stats.class_distribution().tolist() == pytest.approx([1 / 3, 0.0, 2 / 3])
    assert stats.to_dict() == {"density": 0.75}
    with pytest.raises(ValueError, match="needs ground truth"):
        _ = stats.accuracy
    with pytest.raises(ValueError, match="mix batches with and without ground truth"):
        stats.update(torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"pseudo label holds id\(s\) 3 outside 0\.\.2 or 255"):
        stats.update(torch.tensor([3]))


def test_kl_divergence_known_values_and_direction():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    assert kl_divergence(p, q, eps=0) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert kl_divergence(q, p, eps=0) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert kl_divergence(torch.tensor([10, 30]), torch.tensor([1, 3])) == pytest.approx(0.0, abs=1e-12)  # counts
    assert kl_divergence(torch.tensor([0.0, 1.0]), q, eps=0) == pytest.approx(math.log(4 / 3))
    assert kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0]), eps=0) == math.inf
    assert math.isfinite(kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])))
