"""The embedded benchmark: procedurally generated two-domain street scenes (docs/datasets/benchmark.md).

Each image is a street seen from a car: sky, façades of buildings and tree rows along both
sides, road and sidewalks in perspective, terrain strips, poles with traffic lights and
signs, vehicles, pedestrians and cyclists, labelled with the 19 Cityscapes train ids and
colours (docs/datasets/cityscapes.md, "Labels"). Two domains share the scene geometry and
differ in everything a camera sees:

- **source** looks synthetic: flat, saturated per-class colours, hard edges, no noise, and
  a GTA5-like class prior (more sky and heavy vehicles, fewer pedestrians; docs/datasets/gta5.md,
  "Class distribution");
- **target** looks real: a different per-class palette, texture, lighting and colour
  casts, sensor noise, blur, an ego-vehicle hood (labelled 255, as in Cityscapes), objects
  at a slightly different scale, and a Cityscapes-like class prior (docs/datasets/cityscapes.md,
  "Class distribution").

The output uses the folder-dataset format (docs/datasets/folder.md, "Layout"; docs/architecture.md,
"Contract: sample and label space")::

    ROOT/benchmark.json                  seed, size, generator version, counts, class shares
    ROOT/source/dataset.yaml
    ROOT/source/{images,labels}/train/source_train_0000.png ...
    ROOT/target/dataset.yaml
    ROOT/target/{images,labels}/{train,val}/target_train_0000.png ...

Target train labels are on disk for the target-supervised oracle; adaptation recipes
must not read them. Every image is drawn from its own seed (benchmark seed, domain,
split, index), so a benchmark is identical whatever the number of worker processes.

Modules, by concern: :mod:`~segadapt.data.benchmark.scene` (the street layout and its label map),
:mod:`~segadapt.data.benchmark.style` (materials and rendering),
:mod:`~segadapt.data.benchmark.domains` (the two domains' priors and styles),
:mod:`~segadapt.data.benchmark.generate` (sizes, per-image seeds, the folder tree, the cache).
Every public name is importable from this package.

Examples:
    >>> root = ensure_benchmark(size="tiny")  # doctest: +SKIP
    >>> sorted(p.name for p in root.iterdir())  # doctest: +SKIP
    ['benchmark.json', 'source', 'target']
"""

from .domains import SOURCE_MATERIALS, SOURCE_PRIOR, SOURCE_STYLE, TARGET_PRIOR, TARGET_REPAINTS, TARGET_STYLE
from .generate import (
    GENERATOR_VERSION,
    SIZES,
    SPLITS,
    BenchmarkSize,
    default_benchmark_dir,
    ensure_benchmark,
    generate_benchmark,
    generate_sample,
    is_complete,
    sample_rng,
)
from .scene import CAMERA_HEIGHT, CLASSES, MAX_DEPTH, ScenePrior, sample_scene
from .style import DomainStyle, Material, render

__all__ = [
    "CAMERA_HEIGHT",
    "CLASSES",
    "GENERATOR_VERSION",
    "MAX_DEPTH",
    "SIZES",
    "SOURCE_MATERIALS",
    "SOURCE_PRIOR",
    "SOURCE_STYLE",
    "SPLITS",
    "TARGET_PRIOR",
    "TARGET_REPAINTS",
    "TARGET_STYLE",
    "BenchmarkSize",
    "DomainStyle",
    "Material",
    "ScenePrior",
    "default_benchmark_dir",
    "ensure_benchmark",
    "generate_benchmark",
    "generate_sample",
    "is_complete",
    "render",
    "sample_rng",
    "sample_scene",
]
