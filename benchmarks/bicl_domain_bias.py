"""Probe: the size of BiCL's class-wise domain biases at the end of runs (supplement Fig. 3).

The supplement shows ``||b_c||`` shrinking during training. This prints, for each run directory's
last checkpoint, the mean and largest ``||b_c|| = ||m_T^c - m_S^c||`` over the classes both
prototype memories hold (:func:`segadapt.methods.bicl.domain_biases`), so runs with and without
the calibration, or with other label kinds, can be compared (docs/RESULTS.md section 0, "BiCL's
label kinds")::

    python benchmarks/bicl_domain_bias.py runs/t16b/bicl_dynamic_s0 runs/t16b/bicl_dyn_nocal_s0 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segadapt.engine.checkpoint import load_checkpoint
from segadapt.methods.bicl import domain_biases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="BiCL run directories (recipe bicl)")
    args = parser.parse_args()
    print("| run | classes | mean ||b_c|| | largest ||b_c|| |")
    print("|---|---:|---:|---:|")
    for run in args.runs:
        buffers = load_checkpoint(run / "checkpoints" / "last.pt")["recipe"]
        if "target_memory.prototypes" not in buffers:
            raise SystemExit(f"{run}: its checkpoint holds no BiCL prototype memories (not a recipe bicl run)")
        both = buffers["source_memory.initialized"] & buffers["target_memory.initialized"]
        norms = domain_biases(buffers["source_memory.prototypes"], buffers["target_memory.prototypes"])[both].norm(dim=1)
        print(f"| {run.name} | {int(both.sum())} | {norms.mean():.3f} | {norms.max():.3f} |")


if __name__ == "__main__":
    main()
