"""The output folder of a command that writes files (``predict``, ``pseudo-label``, ``rounds``): never a user's data.

Two rules, checked before any work, each refusal one line naming the folder or file and the fix:

1. The folder is not a folder of the data: not the image or label folder of a stream of the run
   (``data.source``, ``data.target``, ``data.val``, by each dataset's layout,
   :meth:`~segadapt.data.base.SegDataset.data_folders`; a stream's ``pseudo_labels`` folder), nor
   inside one, nor a folder that holds one. ``predict`` adds its input folder, inside which its
   output folder may lie (the output folder is then never read as input).
2. The folder holds only what the same command wrote there. The command records the files it is
   about to write in ``OUT/segadapt-outputs.json`` (:data:`MANIFEST`) *before* writing them, so an
   interrupted command's files are still its own. A file the record does not list (a user's, another
   command's) is refused; the command's own earlier outputs are replaced only with ``--overwrite``
   (``predict``, ``pseudo-label``: they are deleted first, so the folder holds one run), while
   ``rounds``, which owns its whole run directory, continues it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from ..config import DatasetSpec, RunConfig
from ..errors import ConfigError, OutputError
from . import distributed
from .run_cache import atomic_write_text

MANIFEST = "segadapt-outputs.json"
"""The record of what a command wrote in its output folder: ``{"command": ..., "files": [...] or null}``."""


@dataclass(frozen=True)
class DataFolder:
    """A folder no output may touch, and what it is (``"the labels of data.target"``, for messages)."""

    path: Path
    what: str
    output_may_lie_inside: bool = False


def spec_folders(spec: DatasetSpec) -> list[Path]:
    """The image and label folders of a dataset spec, from its layout alone (nothing is generated or read).

    A spec whose dataset or root is not known yet yields nothing: its errors belong to the command
    that builds it.
    """
    from ..data import DATASETS
    from ..data.folder import FolderDataset

    folders: list[Path] = []
    if spec.dataset == "benchmark":
        from ..data.benchmark import default_benchmark_dir

        root = Path(spec.root).expanduser() if spec.root else default_benchmark_dir(spec.benchmark_seed, spec.benchmark_size)
        folders += FolderDataset.data_folders(root / spec.domain, spec.split) if spec.domain else [root]
    elif spec.dataset in DATASETS and spec.root is not None:
        folders += DATASETS[spec.dataset].data_folders(Path(spec.root).expanduser(), spec.split)
    if spec.pseudo_labels is not None:
        folders.append(Path(spec.pseudo_labels).expanduser())
    return folders


def stream_folders(cfg: RunConfig) -> list[DataFolder]:
    """The data folders of every stream of ``cfg`` (module docstring, rule 1)."""
    found = []
    for key in ("source", "target", "val"):
        spec: DatasetSpec | None = getattr(cfg.data, key)
        if spec is not None:
            found += [DataFolder(folder, f"a folder of data.{key} ({spec.dataset}, split {spec.split})") for folder in spec_folders(spec)]
    return found


def check_not_data(out: str | Path, folders: Iterable[DataFolder], fix: str, what: str = "output folder") -> None:
    """Refuse ``out`` when it is, lies inside or holds one of ``folders`` (module docstring, rule 1).

    ``what`` names ``out`` in the message (``run directory`` for ``rounds``).

    Raises:
        ConfigError: naming the output folder, the data folder and ``fix``.
    """
    target = _absolute(out)
    for folder in folders:
        data = _absolute(folder.path)
        if target == data:
            relation = f"is {folder.what}"
        elif data.is_relative_to(target):
            relation = f"holds {data}, {folder.what}"
        elif target.is_relative_to(data) and not folder.output_may_lie_inside:
            relation = f"lies inside {data}, {folder.what}"
        else:
            continue
        raise ConfigError(f"{what} {out} {relation}: writing there would mix outputs with the data or replace it "
                          f"(nothing was written); {fix}")


def _absolute(path: str | Path) -> Path:
    """``path`` made absolute with its symbolic links resolved, as far as it exists."""
    return Path(path).expanduser().resolve()


class OutputFolder:
    """The output folder of one command (module docstring, rule 2).

    ``files=None`` in :meth:`claim` marks a folder the command owns whole and continues (a
    ``rounds`` run directory); otherwise the relative paths it is about to write.

    Args:
        path: the folder.
        command: the command's name, as typed (``pseudo-label``).
        overwrite: replace the command's own earlier outputs instead of refusing them.
        what: how messages name the folder (``run directory`` for ``rounds``).
    """

    def __init__(self, path: str | Path, command: str, overwrite: bool = False, what: str = "output folder") -> None:
        self.path = Path(path)
        self.command = command
        self.overwrite = overwrite
        self.what = what
        self.earlier: list[str] = []

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    def check(self, fix: str, continues: bool = False, adopt: Callable[[set[str]], bool] | None = None) -> None:
        """Refuse a folder that holds files this command did not write, or (without ``--overwrite``) its earlier outputs.

        ``continues``: the command continues what it wrote before (``rounds``) instead of replacing
        it. ``adopt``: given the top-level names of a folder without a record, whether it is the
        command's own output from a version that kept no record.

        Raises:
            ConfigError: naming the folder, the first file at fault and ``fix``.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.what} {self.path} is a file; {fix}")
        present = sorted(self._files())
        if not present:
            return
        owned = self._recorded(present, adopt)
        foreign = [] if owned is None else [name for name in present if name not in owned]
        if foreign:
            more = f" and {len(foreign) - 1} other file(s)" if len(foreign) > 1 else ""
            raise ConfigError(
                f"{self.what} {self.path} holds {self.path / foreign[0]}{more} that `segadapt {self.command}` did not write; "
                f"it never writes where files of others are (nothing was written): {fix}"
            )
        self.earlier = present
        if not continues and not self.overwrite:
            raise ConfigError(
                f"{self.what} {self.path} holds the outputs of an earlier `segadapt {self.command}` ({len(present)} file(s), "
                f"e.g. {self.path / present[0]}); pass --overwrite to replace them, or {fix} (nothing was written)"
            )

    def claim(self, files: Sequence[str] | None, writer: bool = True) -> None:
        """Record ``files`` (relative paths; None: the whole folder) as this command's, before writing them.

        With ``--overwrite`` the earlier outputs :meth:`check` found are deleted first. Under
        torchrun every process calls this after :meth:`check`; ``writer`` (rank 0) deletes and records.
        """
        distributed.barrier()  # every process has checked the folder before it changes
        if writer:
            if self.overwrite and files is not None:
                self._delete(self.earlier)
            record = {"command": self.command, "files": None if files is None else sorted(set(files))}
            atomic_write_text(self.manifest, json.dumps(record, indent=1) + "\n", "the record of written files")
        distributed.barrier()  # and none writes before the earlier outputs are gone

    def _files(self) -> Iterator[str]:
        """Every file and link under the folder (relative, POSIX), except the record and its temporary copies."""
        for folder, dirs, names in os.walk(self.path):
            here = Path(folder)
            entries = names + [name for name in dirs if (here / name).is_symlink()]
            for name in entries:
                relative = (here / name).relative_to(self.path).as_posix()
                if relative != MANIFEST and not (relative.startswith(f".{MANIFEST}.") and relative.endswith(".tmp")):
                    yield relative

    def _recorded(self, present: list[str], adopt: Callable[[set[str]], bool] | None) -> set[str] | None:
        """The files this command recorded (None: all of the folder), or an empty set when nothing of it is its."""
        try:
            record = json.loads(self.manifest.read_text())
        except FileNotFoundError:
            return None if adopt is not None and adopt({name.split("/")[0] for name in present}) else set()
        except (OSError, ValueError) as err:
            raise OutputError(f"cannot read {self.manifest}: {err}; remove it, or choose another output folder") from err
        if not isinstance(record, dict) or record.get("command") != self.command:
            return set()
        files = record.get("files")
        return None if files is None else set(files)

    def _delete(self, names: Sequence[str]) -> None:
        """Delete the earlier outputs (their record listed them), then the folders that left empty."""
        folders: set[Path] = set()
        for name in names:
            (self.path / name).unlink(missing_ok=True)
            folders.update(parent for parent in (self.path / name).parents if parent.is_relative_to(self.path) and parent != self.path)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
