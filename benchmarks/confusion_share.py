"""How much of one class a run's network gives to another: the share of ground-truth class A's pixels predicted as B.

Used for DACS's sky collapse in docs/RESULTS.md section 0: the warm-up's share of target sky
predicted as traffic light decides whether self-training corrects the confusion or amplifies it.

    python benchmarks/confusion_share.py runs/t16b/source_only_s{0,1,2} runs/t16b/dacs_s{0,1,2} \
        --truth sky --predicted "traffic light"

Each RUN is a run directory (its ``checkpoints/last.pt`` is evaluated on the config's ``data.val``,
as ``segadapt eval`` does) or a checkpoint file. The class names are the validation set's own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segadapt.commands.evaluate import evaluate_checkpoint
from segadapt.errors import ConfigError


def checkpoint_of(run: Path) -> Path:
    return run / "checkpoints" / "last.pt" if run.is_dir() else run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    parser.add_argument("--truth", required=True, help="the ground-truth class, by name")
    parser.add_argument("--predicted", required=True, help="the class it is mistaken for, by name")
    args = parser.parse_args()
    for run in args.runs:
        checkpoint = checkpoint_of(run)
        scores = evaluate_checkpoint(checkpoint)
        names = list(scores["scores"].class_names)
        for name in (args.truth, args.predicted):
            if name not in names:
                raise ConfigError(f"{checkpoint}: no class {name!r} in its validation set; its classes are {', '.join(names)}")
        truth, predicted = names.index(args.truth), names.index(args.predicted)
        matrix = scores["matrix"]["matrix"].double()
        of_truth = matrix[truth, predicted] / matrix[truth].sum().clamp_min(1)
        of_predicted = matrix[truth, predicted] / matrix[:, predicted].sum().clamp_min(1)
        print(
            f"{run}: {100 * of_truth:.1f} % of {args.truth} predicted {args.predicted}; "
            f"{100 * of_predicted:.1f} % of the {args.predicted} predictions are {args.truth}",
            flush=True,
        )


if __name__ == "__main__":
    main()
