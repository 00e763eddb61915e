"""``segadapt check-data PATH | --dataset NAME --root PATH``: validate a dataset and print its class distribution."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..data.check import check_folder_root, check_named_dataset, format_report
from ..errors import SegadaptError


def run(path: str | None = None, dataset: str | None = None, root: str | None = None, splits: Sequence[str] | None = None) -> int:
    """The command: print a report per split; 0 when every split is valid, else 1."""
    if dataset is None:
        if path is None:
            raise SegadaptError("check-data needs a folder-dataset PATH, or --dataset NAME --root PATH")
        reports = check_folder_root(Path(path))
    else:
        root = root or path
        if root is None:
            raise SegadaptError(f"check-data --dataset {dataset} needs --root PATH")
        reports = check_named_dataset(dataset, Path(root), splits)
    ok = True
    for report in reports:
        print(format_report(report))
        ok = ok and report.ok
    return 0 if ok else 1
