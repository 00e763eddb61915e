"""The segadapt command line.

    segadapt demo                                   the embedded benchmark, end to end
    segadapt train CONFIG|RUN_DIR [key=value ...]   train a recipe (resume=true continues a run)
    segadapt eval CHECKPOINT [key=value ...]        per-class IoU of a checkpoint
    segadapt predict CHECKPOINT INPUT_DIR OUTPUT_DIR   colour / train-id / labelId PNGs
    segadapt pseudo-label CHECKPOINT OUT_DIR [key=value ...]   ST / CBST / DARS pseudo labels
    segadapt rounds CONFIG [key=value ...]          semi-supervised rounds (DARS)
    segadapt report RUN_DIR [RUN_DIR ...] --out DIR  figures and a markdown page
    segadapt make-benchmark [--root DIR]            generate the embedded benchmark
    segadapt check-data PATH | --dataset NAME --root PATH   validate a dataset
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Sequence

from .errors import SegadaptError

# This module parses arguments and turns errors into exit statuses; each command is a module of
# segadapt.commands (imported when its command runs, so --help loads none), whose run() it calls.

OVERRIDES_HELP = "dotted config overrides key=value, before or after the options"
OVERWRITE_HELP = (
    "replace the outputs an earlier `segadapt {command}` wrote in the output folder (deleted first); files it did not "
    "write are never replaced"
)
CHECKPOINT_HELP = (
    "a run directory (its checkpoints/last.pt and config.yaml), a checkpoint RUN_DIR/checkpoints/best.pt or last.pt "
    "(its run's config.yaml is used), or raw weights with --config"
)
SIGPIPE_STATUS = 141
"""The exit status of a command whose reader closed its standard output (``segadapt ... | head``): 128 + SIGPIPE,
what the shell reports for ``cat`` or ``yes`` in the same place."""


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser that takes options and ``key=value`` overrides in any order.

    Plain argparse ends a ``nargs="*"`` positional at the first option, so
    ``eval CKPT --json F eval.flip=true`` left ``eval.flip=true`` unrecognised;
    parse_known_intermixed_args reads the options first, then the positionals. It refuses a parser
    that has subcommands, hence per subcommand parser instead of at the top level.
    """

    _intermixing = False
    _REQUIRED = "the following arguments are required: "

    def error(self, message: str) -> NoReturn:
        """argparse's error, without listing an optional ``nargs="*"`` positional (the overrides) as required.

        The intermixed parse checks the positionals in a pass of its own, which names every one that got
        no value; ``segadapt eval`` alone then said "required: checkpoint, overrides".
        """
        if message.startswith(self._REQUIRED):
            optional = {action.dest for action in self._get_positional_actions() if action.nargs in ("*", "?")}
            names = [name for name in message[len(self._REQUIRED):].split(", ") if name not in optional]
            message = self._REQUIRED + ", ".join(names)
        super().error(message)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing:  # the intermixed parse calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _packaged_configs_help() -> str:
    from .config import PACKAGED_CONFIGS, packaged_config_names

    folders = sorted({name.split("/")[0] for name in packaged_config_names()})
    return (
        "CONFIG may be a packaged config name instead of a file, with or without .yaml, e.g. benchmark/source_only "
        f"or gta5_to_cityscapes/cpsl. The packaged configs are the YAML files in {PACKAGED_CONFIGS} (folders: "
        f"{', '.join(folders)}; docs/recipes.md describes them). A config of your own can start from one with "
        "'base: benchmark/source_only' and change only what differs."
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .commands import train

    return train.run(args.config, args.overrides, resume=args.resume)


def cmd_pseudo_label(args: argparse.Namespace) -> int:
    from .commands import pseudo_label

    return pseudo_label.run(args.checkpoint, args.out, args.config, args.overrides, overwrite=args.overwrite)


def cmd_rounds(args: argparse.Namespace) -> int:
    from .commands import rounds

    return rounds.run(args.config, args.overrides)


def cmd_report(args: argparse.Namespace) -> int:
    from .commands import report

    return report.run(args.runs, args.out, images=args.images)


def cmd_eval(args: argparse.Namespace) -> int:
    from .commands import evaluate

    return evaluate.run(args.checkpoint, args.config, args.overrides, json_path=args.json)


def cmd_predict(args: argparse.Namespace) -> int:
    from .commands import predict

    return predict.run(
        args.checkpoint, args.input, args.output, args.config, args.overrides, formats=args.formats.split(","), overwrite=args.overwrite
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from .commands import demo

    methods = demo.DEFAULT_METHODS if args.methods is None else args.methods
    return demo.run(args.output, seed=args.seed, quick=args.quick, methods=methods)


def cmd_make_benchmark(args: argparse.Namespace) -> int:
    from .commands import make_benchmark

    return make_benchmark.run(args.root, seed=args.seed, size=args.size, force=args.force)


def cmd_check_data(args: argparse.Namespace) -> int:
    from .commands import check_data

    return check_data.run(args.path, dataset=args.dataset, root=args.root, splits=args.split)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segadapt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)
    configs_help = _packaged_configs_help()

    train = sub.add_parser("train", help="train a recipe from a config file (or continue a run directory)", epilog=configs_help)
    train.add_argument("config", help="YAML config file, packaged config name (e.g. benchmark/source_only), or a run directory to continue")
    train.add_argument(
        "overrides", nargs="*",
        help=f"{OVERRIDES_HELP}, e.g. optim.lr=1e-3 train.iters=100 data.crop_size=[256,512] train.threads=2 (CPU threads) resume=true",
    )
    train.add_argument("--resume", action="store_true", help="continue from the run directory's last.pt")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint (per-class IoU, mIoU, MPA)")
    ev.add_argument("checkpoint", help=CHECKPOINT_HELP)
    ev.add_argument("overrides", nargs="*", help=f"{OVERRIDES_HELP}, e.g. eval.flip=true eval.protocols=[19,16,13] data.val.root=...")
    ev.add_argument("--config", help="config file (default: the run directory's config.yaml)")
    ev.add_argument("--json", help="also write the scores to this JSON file")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="predict a folder of images")
    pr.add_argument("checkpoint", help=CHECKPOINT_HELP)
    pr.add_argument("input", help="folder of .png/.jpg images (searched recursively, except OUTPUT inside it)")
    pr.add_argument(
        "output",
        help="a new output folder (or one predict wrote before: see --overwrite), never the input folder or a dataset's: one "
        "subfolder per format, each image's relative path with .png for a suffix (a/x.jpg -> color/a/x.png; two inputs "
        "that would share a name, x.png and x.jpg, are refused); unreadable images are skipped and listed at the end (exit 2)",
    )
    pr.add_argument("overrides", nargs="*", help=f"{OVERRIDES_HELP}, e.g. eval.flip=true eval.size=[512,1024]")
    pr.add_argument("--config", help="config file (default: the run directory's config.yaml)")
    pr.add_argument("--formats", default="color,trainid", help="comma list of color, trainid, labelid (Cityscapes ids)")
    pr.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format(command="predict"))
    pr.set_defaults(func=cmd_predict)

    demo = sub.add_parser("demo", help="source-only, the strongest adaptation method and the oracle on the embedded benchmark, with a report")
    demo.add_argument("--output", default="runs/demo", help="folder of the demo's runs and report (default: runs/demo); "
                      "a finished run found there is reused, an interrupted one resumed")
    demo.add_argument("--seed", type=int, default=0, help="training seed of every run (default: 0); the benchmark data stays the same")
    demo.add_argument("--quick", action="store_true", help="a much shorter schedule (smoke test, not the calibration)")
    demo.add_argument("--methods", nargs="*", default=None, metavar="METHOD",
                      help="adaptation methods trained from the source-only model (benchmark/<METHOD>.yaml; about 2-7 min each); "
                      "default: the strongest on the benchmark (docs/RESULTS.md); --methods with no name: none")
    demo.set_defaults(func=cmd_demo)

    pl = sub.add_parser("pseudo-label", help="pseudo-label data.target with a checkpoint (ST, CBST, DARS)")
    pl.add_argument("checkpoint", help=CHECKPOINT_HELP)
    pl.add_argument(
        "out",
        help="a new output folder (or one pseudo-label wrote before: see --overwrite), never a folder of the run's data: "
        "<name>.png labels, summary.json, summary.md",
    )
    pl.add_argument("overrides", nargs="*", help=f"{OVERRIDES_HELP}, e.g. pseudo_label.rule=dars pseudo_label.ratio=0.5 data.target.root=...")
    pl.add_argument("--config", help="config file (default: the run directory's config.yaml)")
    pl.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format(command="pseudo-label"))
    pl.set_defaults(func=cmd_pseudo_label)

    rd = sub.add_parser("rounds", help="semi-supervised rounds: train, pseudo-label, retrain (DARS)", epilog=configs_help)
    rd.add_argument(
        "config",
        help="YAML config file or packaged config name (e.g. benchmark/semi_supervised); run it again to resume. The run "
        "directory (output_dir/name) must be new or an earlier rounds run's, outside the data",
    )
    rd.add_argument(
        "overrides", nargs="*",
        help=f"{OVERRIDES_HELP}, e.g. rounds.labeling_ratios=[0.2,0.5] rounds.iters=[500,300,300] (rounds.iters, when set, "
        "gives every round's iterations: train.iters on the command line is then an error)",
    )
    rd.set_defaults(func=cmd_rounds)

    rp = sub.add_parser("report", help="figures of runs: curves, per-class IoU, class distributions, predictions, features")
    rp.add_argument("runs", nargs="+", help="run directories (the first one's config gives the validation data)")
    rp.add_argument("--out", help="output folder (default: FIRST_RUN/report)")
    rp.add_argument("--images", type=int, default=4, help="validation images in the prediction grid")
    rp.set_defaults(func=cmd_report)

    mb = sub.add_parser("make-benchmark", help="generate the embedded benchmark (cached)")
    mb.add_argument("--root", help="output folder (default: the cache, $SEGADAPT_HOME/benchmark/...)")
    mb.add_argument("--seed", type=int, default=0, help="seed of the generated images and labels (default: 0); "
                    "data.*.benchmark_seed picks a copy in a config")
    mb.add_argument("--size", default="default", choices=["default", "tiny"],
                    help="default: the published calibration; tiny: a few 32x64 images, for tests (default: default)")
    mb.add_argument("--force", action="store_true", help="regenerate even if present")
    mb.set_defaults(func=cmd_make_benchmark)

    cd = sub.add_parser("check-data", help="validate a dataset and print its class distribution")
    cd.add_argument("path", nargs="?", help="root of a folder dataset (all its splits are checked)")
    cd.add_argument("--dataset", help="a named dataset: cityscapes, gta5, synthia, scannet, folder")
    cd.add_argument("--root", help="root of the named dataset")
    cd.add_argument("--split", action="append", help="split(s) to check (default: the dataset's usual splits)")
    cd.set_defaults(func=cmd_check_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _run(argv)
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not at interpreter exit
        return status
    except BrokenPipeError:
        # `segadapt ... | head`: the reader has what it wanted. Quiet, as a Unix tool killed by SIGPIPE; stdout
        # goes to /dev/null so that the interpreter's own flush at exit has nowhere to fail.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # no file descriptor (stdout replaced, e.g. under a test's capture)
            pass
        return SIGPIPE_STATUS


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        raise  # a closed standard output, not a file of the user's: main() ends quietly
    except SegadaptError as err:
        print(f"segadapt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file system error where segadapt does not name the file itself: still one line
        where = f"{err.filename}: " if err.filename else ""
        print(
            f"segadapt {args.command}: error: {where}{err.strerror or err}; check that path (permissions, free space), "
            "or choose another output folder",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as err:
        # a training run says what its last.pt holds; elsewhere nothing was half-written that matters
        from .progress import is_main_rank

        if is_main_rank():  # under torchrun every process is interrupted: one message
            print(f"segadapt {args.command}: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
