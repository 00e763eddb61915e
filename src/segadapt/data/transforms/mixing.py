"""Batch-level mixing for self-training: ClassMix masks and the mix they drive (DACS).

The recipes mix a source batch into a target batch with one mask for the images, the labels and
the pseudo-label weights.
"""

from __future__ import annotations

import torch

from ..classes import IGNORE_INDEX
from .common import _randperm


def classmix_masks(labels: torch.Tensor, generator: torch.Generator | None = None,
                   ignore_index: int = IGNORE_INDEX, pool: str = "image") -> torch.Tensor:
    """ClassMix masks (Olsson et al., WACV 2021; DACS, Tranheden et al., WACV 2021): per image, half of the
    candidate classes (rounded up, ``(n + n % 2) / 2`` as DACS) are chosen at random; True on the image's
    pixels of the chosen classes.

    ``pool`` says where the ``n`` candidates come from:

    - ``"image"``: the classes present in the image, ``ignore_index`` never one of them, so every chosen
      class is pasted and ignored pixels never are;
    - ``"batch"``: the values present anywhere in the batch's labels, ``ignore_index`` included, drawn
      afresh for each image, as the DACS/DAFormer code does (``torch.unique`` of the whole label batch).
      A chosen class may be absent from the image (fewer pixels are pasted), and the ignored pixels
      are pasted when the ignore value is chosen (with their ignore label).

    Shape:
        labels ``[N, H, W]`` integer -> ``[N, H, W]`` bool, on the labels' device.

    Examples:
        >>> labels = torch.tensor([[[0, 0]], [[1, 9]]])  # the batch holds 0, 1 and the ignore value 9
        >>> classmix_masks(labels, ignore_index=9)[0].tolist()  # image 0 holds one class: always pasted
        [[True, True]]
        >>> int(classmix_masks(labels, ignore_index=9, pool="batch")[0].sum()) in (0, 2)  # 2 of {0, 1, 9} chosen
        True
    """
    if labels.dim() != 3 or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor [N, H, W], got {tuple(labels.shape)} {labels.dtype}")
    if pool not in ("image", "batch"):
        raise ValueError(f"pool must be 'image' or 'batch', got {pool!r}")
    batch_classes = labels.unique().cpu()
    masks = []
    for label in labels:
        if pool == "batch":
            classes = batch_classes
        else:
            classes = label.unique()
            classes = classes[classes != ignore_index].cpu()
        order = _randperm(classes.numel(), generator)
        chosen = classes[order[: (classes.numel() + 1) // 2]].to(label.device)
        masks.append(torch.isin(label, chosen))
    return torch.stack(masks) if masks else torch.zeros_like(labels, dtype=torch.bool)


def mix(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` where ``mask`` is True, else ``b``: mixes images ``[N, C, H, W]``, labels ``[N, H, W]`` or soft maps.

    With a ClassMix mask from source labels, ``mix(mask, source, target)`` pastes the chosen source classes
    onto the target (DACS); use the same mask for images, labels and pseudo-label weights.
    """
    if mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError(f"mask must be bool [N, H, W], got {tuple(mask.shape)} {mask.dtype}")
    if a.shape != b.shape or a.shape[0] != mask.shape[0] or a.shape[-2:] != mask.shape[-2:] or a.dim() not in (3, 4):
        raise ValueError(f"cannot mix {tuple(a.shape)} and {tuple(b.shape)} with a mask {tuple(mask.shape)}")
    return torch.where(mask.unsqueeze(1) if a.dim() == 4 else mask, a, b)
