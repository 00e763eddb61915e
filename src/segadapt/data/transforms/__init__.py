"""Joint image/label transforms that record what they drew, so any tensor can be replayed into the view.

A transform is a callable ``transform(sample, generator=None) -> sample``. The sample is a dict with
``image`` (float ``[3, H, W]``, RGB in ``[0, 1]``), optionally ``label`` (int64 ``[H, W]``, 255 = ignore)
and any extra dense maps a recipe adds (``soft_label`` ``[C, H, W]``, ``confidence`` ``[H, W]`` ...).
Geometric transforms move every dense map with the image: float maps are resampled bilinearly and
padded with 0, integer maps take the nearest value and are padded with the ignore index. Photometric
transforms touch the image only. Every transform appends one record of its drawn parameters to
``sample["replay"]`` (an identity record when its coin flip said no), so that a recipe can replay the
geometry on pseudo labels, soft labels or features (ProDA/CPSL ``full2weak``; docs/reference_code.md,
"CPSL: momentum network and views").

Random draws come from the ``torch.Generator`` passed to the call, or from the global torch RNG when
none is given (DataLoader workers seed that one per worker), so runs are reproducible.

Modules, by kind: :mod:`~segadapt.data.transforms.geometry` (replayable resize, scale, crop, flip,
rotate; replay and valid masks), :mod:`~segadapt.data.transforms.photometric` (colour jitter, blur,
cutout, strong augmentation), :mod:`~segadapt.data.transforms.mixing` (ClassMix), :mod:`~segadapt.data.transforms.randaugment`
(FixMatch's RandAugment, CPSL's strong view, every draw recorded),
:mod:`~segadapt.data.transforms.pipeline` (:class:`Compose` and :func:`build_transforms` from
configs), :mod:`~segadapt.data.transforms.records` (what each transform drew). Every public name is
importable from this package.

Examples:
    >>> import torch
    >>> pipeline = build_transforms([{"name": "random_scale", "min": 0.5, "max": 1.5},
    ...                              {"name": "random_crop", "size": [64, 64]},
    ...                              {"name": "random_horizontal_flip"}])
    >>> sample = {"image": torch.rand(3, 48, 80), "label": torch.zeros(48, 80, dtype=torch.long)}
    >>> view = pipeline(sample, torch.Generator().manual_seed(0))
    >>> torch.equal(replay_geometric(view["replay"], sample["label"], "label"), view["label"])
    True
"""

from .common import Kind, Sample, Transform
from .geometry import (
    FULL_IMAGE_KEY,
    KeepFullFrame,
    RandomCrop,
    RandomHorizontalFlip,
    RandomRotate,
    RandomScale,
    Resize,
    affine,
    affine_theta,
    records_after_full_frame,
    replay_geometric,
    resize,
    rotate,
    to_augmented_view,
    valid_mask,
)
from .mixing import classmix_masks, mix
from .photometric import (
    ColorJitter,
    Cutout,
    GaussianBlur,
    apply_color_jitter,
    gaussian_blur,
    gaussian_kernel,
    hsv_to_rgb,
    rgb_to_hsv,
    strong_augment,
)
from .pipeline import TRANSFORMS, Compose, build_transforms, crop_and_largest_view
from .randaugment import RANDAUGMENT_OPS, RandAugmentMC, apply_cutout, apply_op, cutout_box, geometric_record, op_value
from .records import (
    AffineRecord,
    BlurRecord,
    CropRecord,
    CutoutRecord,
    EnhanceRecord,
    FlipRecord,
    FullFrameRecord,
    GeometricRecord,
    JitterRecord,
    Record,
    RotateRecord,
    ScaleRecord,
)

__all__ = [
    "FULL_IMAGE_KEY",
    "RANDAUGMENT_OPS",
    "TRANSFORMS",
    "AffineRecord",
    "EnhanceRecord",
    "FullFrameRecord",
    "KeepFullFrame",
    "RandAugmentMC",
    "affine",
    "affine_theta",
    "apply_cutout",
    "apply_op",
    "cutout_box",
    "geometric_record",
    "op_value",
    "records_after_full_frame",
    "BlurRecord",
    "ColorJitter",
    "Compose",
    "CropRecord",
    "Cutout",
    "CutoutRecord",
    "FlipRecord",
    "GaussianBlur",
    "GeometricRecord",
    "JitterRecord",
    "Kind",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomRotate",
    "RandomScale",
    "Record",
    "Resize",
    "RotateRecord",
    "Sample",
    "ScaleRecord",
    "Transform",
    "apply_color_jitter",
    "build_transforms",
    "classmix_masks",
    "crop_and_largest_view",
    "gaussian_blur",
    "gaussian_kernel",
    "hsv_to_rgb",
    "mix",
    "replay_geometric",
    "resize",
    "rgb_to_hsv",
    "rotate",
    "strong_augment",
    "to_augmented_view",
    "valid_mask",
]
