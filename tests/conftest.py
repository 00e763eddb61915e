"""Shared test settings.

One intra-op thread: stable on small CI machines, and the same numerics in subprocesses.

The suite specifies CPU behaviour (bit-exact resume, ranks that hold identical weights under
gloo, recipes stepped by hand on CPU batches), so GPUs are hidden from it and from the
processes it starts. The tests that are about CUDA run with them visible::

    SEGADAPT_TEST_CUDA=1 python -m pytest tests/test_metrics.py tests/test_pseudo_labels.py -k gpu
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
if os.environ.get("SEGADAPT_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read when CUDA initialises, which nothing has done yet

import torch  # noqa: E402

torch.set_num_threads(1)


from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from data_fixtures import make_toy, toy_overrides  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def segadapt_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``SEGADAPT_HOME`` in the session's temp folder, for every test and the processes it starts.

    The tiny benchmark is generated there once and shared by the whole session; no test writes to
    the user's ``~/.cache/segadapt``. A test may still point ``SEGADAPT_HOME`` elsewhere with
    ``monkeypatch``, which restores this value afterwards.
    """
    home = tmp_path_factory.getbasetemp() / "segadapt_home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEGADAPT_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests, whatever an earlier test set (``train.threads`` sets it in-process).

    On a shared 2-core machine two intra-op threads fight other processes and run the big networks'
    forwards 10-30x slower than one thread does. Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory):
    """The 5-class, ignore-7 folder dataset of :func:`data_fixtures.make_toy` (read-only: shared by the session)."""
    return make_toy(tmp_path_factory.mktemp("toy5"))


@pytest.fixture(scope="session")
def warmups(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-iteration warm-ups on :func:`toy`: ``warm`` (SmallSegNet) and ``warm_mitb0`` (DAFormer MiT-B0), by name."""
    from segadapt.cli import main

    out = tmp_path_factory.mktemp("warmups")
    made = {}
    for name, config in (("warm", "benchmark/source_only"), ("warm_mitb0", "benchmark/source_only_mitb0")):
        assert main(["train", config, *toy_overrides(toy), "train.iters=1", f"output_dir={out}", f"name={name}"]) == 0
        made[name] = out / name / "checkpoints" / "last.pt"
    return made
