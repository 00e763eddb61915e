"""Shared test settings: one intra-op thread (stable timings on small CI machines, same numerics in subprocesses)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
