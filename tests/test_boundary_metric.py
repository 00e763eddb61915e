"""Scores near label boundaries (``eval.boundary_width``): the band, and what evaluation reports in it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from segadapt.config import EvalConfig
from segadapt.data.classes import ClassInfo
from segadapt.engine.evaluation import evaluate
from segadapt.metrics import band_target, boundary_band
from segadapt.models.base import SegOutput


def halves(height: int = 8, width: int = 8, split: int = 4) -> torch.Tensor:
    """Class 0 left of column ``split``, class 1 from it on."""
    label = torch.zeros(height, width, dtype=torch.long)
    label[:, split:] = 1
    return label


def test_the_band_is_every_pixel_within_width_of_a_boundary_between_two_classes() -> None:
    label = halves()
    for width, columns in ((1, [2, 3, 4, 5]), (2, [1, 2, 3, 4, 5, 6])):
        band = boundary_band(label, width, ignore_index=255)
        assert band.shape == label.shape and band.dtype == torch.bool
        assert band.all(0).nonzero().flatten().tolist() == columns  # whole columns, nothing else
        assert int(band.sum()) == 8 * len(columns)
    assert not boundary_band(torch.zeros(6, 6, dtype=torch.long), 3, 255).any()  # one class: no boundary


def test_an_edge_against_ignored_pixels_is_no_boundary_and_any_ignore_value_works() -> None:
    label = torch.zeros(8, 8, dtype=torch.long)
    label[:, 4:] = 7  # 7 is the ignore value of this 3-class label space
    assert not boundary_band(label, 2, ignore_index=7).any()
    label[4:, :4] = 2  # a boundary between classes 0 and 2 across the left half only
    band = boundary_band(label, 1, ignore_index=7)
    assert band[3:5, :4].all() and int(band[:, :3].sum()) == 4 * 3  # rows 2-5 of columns 0-2
    assert not band[:2].any() and not band[6:].any()
    restricted = band_target(label, 1, ignore_index=7)
    assert ((restricted == 7) | band).all() and torch.equal(restricted[band], label[band])


def test_a_batch_gives_the_band_of_each_image() -> None:
    batch = torch.stack([halves(split=2), halves(split=6)])
    band = boundary_band(batch, 1, ignore_index=255)
    assert torch.equal(band[0], boundary_band(batch[0], 1, 255)) and torch.equal(band[1], boundary_band(batch[1], 1, 255))
    assert band[0].all(0).nonzero().flatten().tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("target", "width", "message"),
    [(torch.zeros(4, 4, dtype=torch.long), 0, "at least 1 pixel, got 0"), (torch.zeros(4, 4), 1, "integer class ids")],
)
def test_bad_band_inputs_say_what_is_wrong(target: torch.Tensor, width: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        boundary_band(target, width, 255)


class ReadsItsPrediction(nn.Module):
    """A 'network' whose image's first channel holds the class it predicts at each pixel."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device and a dtype

    def forward(self, images: torch.Tensor) -> SegOutput:
        logits = 10 * nn.functional.one_hot(images[:, 0].round().long(), self.num_classes).permute(0, 3, 1, 2).float()
        return SegOutput(logits, logits)


def test_evaluation_scores_the_band_beside_the_whole_image() -> None:
    # Ground truth splits at column 4; the prediction at column 5, one column of error at the boundary.
    prediction = halves(split=5).float()
    items = [{"image": prediction.expand(3, 8, 8).clone(), "label": halves(split=4)} for _ in range(2)]
    classes = ClassInfo("halves", ("left", "right"), ((0, 0, 0), (255, 255, 255)), ignore_index=9)
    result = evaluate(ReadsItsPrediction(2), DataLoader(items, batch_size=2), classes, EvalConfig(boundary_width=1), torch.device("cpu"))
    flat = result["flat"]
    assert flat["miou"] == pytest.approx((32 / 40 + 24 / 32) / 2)  # the whole image: 0.775
    # The band is columns 2-5: class 0 on 2-3 (predicted on 2-4), class 1 on 4-5 (predicted on 5).
    assert flat["boundary_width"] == 1
    assert flat["boundary_iou/left"] == pytest.approx(16 / 24) and flat["boundary_iou/right"] == pytest.approx(8 / 16)
    assert flat["boundary_miou"] == pytest.approx((16 / 24 + 8 / 16) / 2)
    assert flat["boundary_pixel_accuracy"] == pytest.approx(24 / 32)
    assert "within 1 px of a label boundary: mIoU 58.33" in result["table"]
    plain = evaluate(ReadsItsPrediction(2), DataLoader(items, batch_size=2), classes, EvalConfig(), torch.device("cpu"))["flat"]
    assert not any(key.startswith("boundary") for key in plain) and plain["miou"] == flat["miou"]


def test_the_width_is_a_non_negative_eval_option() -> None:
    assert EvalConfig().boundary_width == 0
    with pytest.raises(ValueError, match="boundary_width"):
        EvalConfig(boundary_width=-1)
