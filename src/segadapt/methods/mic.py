"""Masked image consistency (MIC; Hoyer et al., CVPR 2023), on tensors.

MIC trains the student on a target image of which most square blocks are hidden, against the
pseudo labels the teacher made on the *whole* image, so that the network learns to infer a hidden
region from its context (Sec. 3.2). The pieces:

- :func:`block_mask`: the patch mask ``M`` of Eq. 3: the image is cut into ``b x b`` blocks and each
  block is kept when a uniform draw exceeds the mask ratio ``r`` (so a share ``r`` of the blocks is
  hidden in expectation);
- :func:`mask_images`: the masked image ``x^M = M * x^T`` of Eq. 4. The authors multiply the
  *normalised* image, so a hidden pixel is the normalisation's zero (the mean colour);
  :func:`mask_images` takes that colour, since segadapt's images are RGB in ``[0, 1]`` and the
  network normalises inside;
- :func:`confidence_share_weight` (from :mod:`.common`) is the quality estimate ``q^T`` of Eq. 7:
  the share of the teacher's pixels whose confidence exceeds a threshold;
- :func:`masked_consistency_loss`: ``lambda^M * L^M`` with ``L^M = q^T H(y^M, p^T)`` (Eq. 8, weighted
  by ``lambda^M`` in the total of Eq. 10): the confidence-weighted cross-entropy of the masked
  image's prediction against the pseudo labels, averaged over every pixel (ignored ones counting 0,
  the authors' reduction).

The authors' defaults: ``r = 0.7``, ``b = 64`` at full resolution (HRDA's crops), ``b = 32`` when
training at half resolution (MIC(DAFormer), its 512 x 512 crops of half-size images), ``lambda^M =
1``, colour jitter and Gaussian blur on the target before masking. The training recipe that switches
MIC on is the engine's (``mic:`` in the run config; docs/recipes.md, "MIC on any recipe").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import confidence_share_weight

__all__ = ["block_mask", "confidence_share_weight", "mask_images", "masked_consistency_loss"]


@torch.no_grad()
def block_mask(
    batch: int,
    size: tuple[int, int],
    ratio: float,
    block_size: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """float32 ``[batch, 1, H, W]``: 1 where a pixel is kept, 0 where it is hidden (MIC, Eq. 3).

    One uniform draw per block and image; a block is kept when its draw is ``> ratio``. The block
    grid has ``round(H / block_size) x round(W / block_size)`` cells (Python's rounding, as the
    authors' code) and is resized nearest to ``H x W``, so a side that is no multiple of the block
    size gets blocks of nearly equal size.

    Examples:
        >>> torch.rand((1, 1, 2, 3), generator=torch.Generator().manual_seed(0))  # the draws of the 2 x 3 blocks
        tensor([[[[0.4963, 0.7682, 0.0885],
                  [0.1320, 0.3074, 0.6341]]]])
        >>> block_mask(1, (4, 6), ratio=0.5, block_size=2, generator=torch.Generator().manual_seed(0))[0, 0]
        tensor([[0., 0., 1., 1., 0., 0.],
                [0., 0., 1., 1., 0., 0.],
                [0., 0., 0., 0., 1., 1.],
                [0., 0., 0., 0., 1., 1.]])
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    if block_size < 1:
        raise ValueError(f"mask block size must be at least 1, got {block_size}")
    height, width = size
    grid = (max(1, round(height / block_size)), max(1, round(width / block_size)))
    draws = torch.rand((batch, 1, *grid), generator=generator, device=device)
    keep = (draws > ratio).float()
    return F.interpolate(keep, size=(height, width), mode="nearest")


def mask_images(images: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """``images`` ``[N, 3, H, W]`` with the pixels where ``mask`` ``[N, 1, H, W]`` is 0 set to ``fill`` (MIC, Eq. 4).

    ``fill`` is a colour ``[3]`` (default black). The authors mask normalised images with zeros; on
    RGB in ``[0, 1]`` the same image is the one whose hidden pixels hold the colour the network's
    normalisation maps to zero (:meth:`segadapt.models.base.Normalization.zero_colour`).
    """
    if fill is None:
        return images * mask
    fill = fill.to(device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return images * mask + fill * (1.0 - mask)


def masked_consistency_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    mask_lambda: float = 1.0,
) -> torch.Tensor:
    """``lambda^M * mean(q^T * CE(y^M, p^T))``: MIC's loss on the masked image (Eq. 8, weighted as in Eq. 10).

    ``logits`` ``[N, C, h, w]`` are the student's on the masked image (bilinearly upsampled to the
    labels), ``labels`` ``[N, H, W]`` the pseudo labels of the unmasked image, ``weight`` ``[N, H, W]``
    their confidence weight. With a weight the mean runs over all pixels, ignored ones counting 0
    (the authors' reduction); without one it is the mean over the labelled pixels. The engine's
    hook computes the same term with the run's segmentation loss (``loss.name``), so that BLV's
    variation composes with it.

    Examples:
        >>> logits = torch.zeros(1, 2, 1, 2)  # uniform: CE = log 2 everywhere
        >>> labels = torch.tensor([[[0, 9]]])  # the second pixel is ignored
        >>> weight = torch.full((1, 1, 2), 0.5)
        >>> round(float(masked_consistency_loss(logits, labels, weight, ignore_index=9)), 4)  # 0.5 * log 2 / 2
        0.1733
    """
    if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    pixelwise = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    if weight is None:
        labelled = labels != ignore_index
        loss = pixelwise.sum() / labelled.sum().clamp_min(1)
    else:
        loss = (weight.float() * pixelwise).mean()
    return mask_lambda * loss
