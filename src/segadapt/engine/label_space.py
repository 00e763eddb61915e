"""The label space of a run comes from its data: class count, names, ignore value and protocols.

Nothing in the engine assumes 19 classes or an ignore value of 255. A run's classes are those of
its datasets (:func:`run_classes`, which checks that the datasets agree), and every config value
tied to the classes is checked against them before any work starts (:func:`check_config_against_classes`):
per-class lists (fields marked :data:`~segadapt.config.PER_CLASS`) and the Cityscapes evaluation
protocols, which apply only to data labelled with Cityscapes classes.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from pydantic import BaseModel

from ..config import RunConfig, per_class_values
from ..data.classes import ClassInfo
from ..errors import ConfigError, DataError
from ..metrics import protocol_indices


def run_classes(cfg: RunConfig, datasets: Mapping[str, Any]) -> ClassInfo:
    """The classes shared by all of a run's datasets (``{stream or "val": dataset}``).

    Raises:
        ConfigError: the datasets differ in class count or ignore value, or ``model.num_classes``
            disagrees with them.
    """
    infos: dict[str, ClassInfo] = {name: dataset.classes for name, dataset in datasets.items()}
    counts = {name: info.num_classes for name, info in infos.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"the datasets disagree on the number of classes: {counts}; use datasets with the same label space")
    ignores = {name: info.ignore_index for name, info in infos.items()}
    if len(set(ignores.values())) > 1:
        raise ConfigError(
            f"the datasets mark unlabelled pixels differently (ignore_index per stream: {ignores}); give every "
            "dataset the same ignore_index (a folder dataset sets it in its dataset.yaml)"
        )
    classes = next(iter(infos.values()))
    if cfg.model.num_classes is not None and cfg.model.num_classes != classes.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the datasets have {classes.num_classes} classes")
    return classes


def require_labels(dataset: Any, spec: Any, purpose: str) -> None:
    """Fail before any work when a stream that needs labels (``purpose``) has none on disk or has them switched off.

    ``spec`` is the stream's :class:`~segadapt.config.DatasetSpec`; the message names its key and split,
    so an unlabelled validation split is refused before training rather than after it.

    Raises:
        ConfigError: ``with_labels: false`` on the spec.
        DataError: the split has no label files (a folder dataset without ``labels/<split>/``).
    """
    if dataset.has_labels:
        return
    key = spec.key
    if not spec.with_labels:
        raise ConfigError(f"{key}.with_labels=false drops the labels of {key}, but {purpose}; set {key}.with_labels=true")
    raise DataError(f"{key} ({purpose}): {dataset.why_unlabelled(key)}")


def check_protocols(classes: ClassInfo, protocols: Sequence[int]) -> None:
    """Fail before any work when ``eval.protocols`` asks for Cityscapes classes the data does not have."""
    for protocol in protocols:
        try:
            protocol_indices(protocol, classes.names)
        except ValueError as err:
            raise ConfigError(
                f"eval.protocols={list(protocols)}: {err}; the {classes.name!r} data is scored by its own mIoU, "
                "so remove the key (or set eval.protocols=[])"
            ) from None


def check_config_against_classes(cfg: BaseModel, classes: ClassInfo) -> None:
    """Every per-class list of ``cfg`` has one entry per class, and its protocols exist in the data.

    Examples:
        >>> from segadapt.config import load_config
        >>> toy = ClassInfo("toy", ("a", "b"), ((0, 0, 0), (1, 1, 1)))
        >>> check_config_against_classes(load_config(None, ["pseudo_label.given_distribution=[1,2,3]"]), toy)
        Traceback (most recent call last):
        ...
        segadapt.errors.ConfigError: pseudo_label.given_distribution has 3 entries but the data ('toy') has 2 classes (a, b); give one value per class, in train-id order
    """  # noqa: E501 (the doctest's exception message is one line)
    for key, values in per_class_values(cfg):
        if len(values) != classes.num_classes:
            names = ", ".join(classes.names[:6]) + (", ..." if classes.num_classes > 6 else "")
            raise ConfigError(
                f"{key} has {len(values)} entries but the data ({classes.name!r}) has {classes.num_classes} classes "
                f"({names}); give one value per class, in train-id order"
            )
    protocols = getattr(getattr(cfg, "eval", None), "protocols", None)
    if protocols:
        check_protocols(classes, protocols)
