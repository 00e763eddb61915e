"""The ``segadapt`` command line.

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
import sys
from pathlib import Path
from typing import Sequence

from .errors import SegadaptError


def _split_resume(overrides: Sequence[str]) -> tuple[list[str], bool]:
    """``resume=true`` is an action, not a config value: take it out of the overrides."""
    kept, resume = [], False
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "resume":
            resume = value.strip().lower() in ("1", "true", "yes", "on")
        else:
            kept.append(item)
    return kept, resume


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine.trainer import Trainer

    overrides, resume = _split_resume(args.overrides)
    resume = resume or args.resume
    path = Path(args.config)
    if path.is_dir():  # a run directory: its saved config, resumed by default
        config_path = path / "config.yaml"
        if not config_path.exists():
            raise SegadaptError(f"{path} is a directory without config.yaml; pass a config file or a run directory")
        cfg = load_config(config_path, overrides)
        resume = resume or (path / "checkpoints" / "last.pt").exists()
    else:
        cfg = load_config(path, overrides)
    scores = Trainer(cfg, resume=resume).fit()
    from .engine.distributed import is_main_process

    if is_main_process():  # under torchrun every process returns here: one table
        print(f"run directory: {cfg.run_dir}")
        if scores is not None:
            print(scores["table"])
    return 0


def cmd_pseudo_label(args: argparse.Namespace) -> int:
    from .engine.pseudo_label import pseudo_label_checkpoint, summary_markdown

    summary = pseudo_label_checkpoint(args.checkpoint, args.out, args.config, args.overrides)
    print(summary_markdown(summary))
    print(f"pseudo labels written to {args.out}")
    return 0


def cmd_rounds(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine.rounds import run_rounds

    cfg = load_config(args.config, args.overrides)
    results = run_rounds(cfg, log=lambda text: print(text, file=sys.stderr, flush=True))
    from .engine.distributed import is_main_process

    if is_main_process():
        for index, scores in enumerate(results):
            if scores is not None:
                print(f"round {index}: val mIoU {100 * scores['flat']['miou']:.2f}")
        print(f"run directory: {cfg.run_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .viz.report import write_report

    out = args.out or str(Path(args.runs[0]) / "report")
    print(f"report: {write_report(args.runs, out, images=args.images)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine.evaluation import evaluate_checkpoint

    from .engine.distributed import is_main_process

    scores = evaluate_checkpoint(args.checkpoint, args.config, args.overrides)
    if not is_main_process():
        return 0
    print(scores["table"])
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(scores["flat"], indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .engine.predict import predict_folder

    written = predict_folder(args.checkpoint, args.input, args.output, args.config, args.overrides, formats=args.formats.split(","))
    print(f"wrote predictions for {written} images to {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .engine.demo import run_demo

    run_demo(Path(args.output), seed=args.seed, quick=args.quick, methods=args.methods)
    return 0


def cmd_make_benchmark(args: argparse.Namespace) -> int:
    import json

    from .data.benchmark import default_benchmark_dir, ensure_benchmark, generate_benchmark

    if args.force:
        root = generate_benchmark(Path(args.root) if args.root else default_benchmark_dir(args.seed, args.size), seed=args.seed, size=args.size)
    else:
        root = ensure_benchmark(args.root, seed=args.seed, size=args.size)
    summary = json.loads((root / "benchmark.json").read_text())
    print(f"embedded benchmark ({args.size}, seed {args.seed}) at {root}")
    print(json.dumps(summary.get("counts", {}), indent=None))
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from .data.check import check_folder_root, check_named_dataset, format_report

    if args.dataset is None:
        if args.path is None:
            raise SegadaptError("check-data needs a folder-dataset PATH, or --dataset NAME --root PATH")
        reports = check_folder_root(Path(args.path))
    else:
        root = args.root or args.path
        if root is None:
            raise SegadaptError(f"check-data --dataset {args.dataset} needs --root PATH")
        reports = check_named_dataset(args.dataset, Path(root), args.split)
    ok = True
    for report in reports:
        print(format_report(report))
        ok = ok and report.ok
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segadapt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe from a config file (or continue a run directory)")
    train.add_argument("config", help="YAML config file, or a run directory to continue")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 train.iters=100 resume=true")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's last.pt")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint (per-class IoU, mIoU, MPA)")
    ev.add_argument("checkpoint")
    ev.add_argument("overrides", nargs="*", help="e.g. eval.flip=true eval.protocols=[19,16,13] data.val.root=...")
    ev.add_argument("--config", help="config file (default: the run directory's config.yaml)")
    ev.add_argument("--json", help="also write the scores to this JSON file")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="predict a folder of images")
    pr.add_argument("checkpoint")
    pr.add_argument("input", help="folder of .png/.jpg images (searched recursively)")
    pr.add_argument("output")
    pr.add_argument("overrides", nargs="*")
    pr.add_argument("--config", help="config file (default: the run directory's config.yaml)")
    pr.add_argument("--formats", default="color,trainid", help="comma list of color, trainid, labelid (Cityscapes ids)")
    pr.set_defaults(func=cmd_predict)

    demo = sub.add_parser("demo", help="source-only vs oracle on the embedded benchmark, with a report")
    demo.add_argument("--output", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a much shorter schedule (smoke test, not the calibration)")
    demo.add_argument("--methods", nargs="*", default=[], metavar="METHOD",
                      help="adaptation methods to add from the source-only model, e.g. cpsl dars_td (benchmark/<METHOD>.yaml; about 4 min each)")
    demo.set_defaults(func=cmd_demo)

    pl = sub.add_parser("pseudo-label", help="pseudo-label data.target with a checkpoint (ST, CBST, DARS)")
    pl.add_argument("checkpoint")
    pl.add_argument("out", help="output folder: <name>.png labels, summary.json, summary.md")
    pl.add_argument("overrides", nargs="*", help="e.g. pseudo_label.rule=dars pseudo_label.ratio=0.5 data.target.root=...")
    pl.add_argument("--config", help="config file (default: the run directory's config.yaml)")
    pl.set_defaults(func=cmd_pseudo_label)

    rd = sub.add_parser("rounds", help="semi-supervised rounds: train, pseudo-label, retrain (DARS)")
    rd.add_argument("config")
    rd.add_argument("overrides", nargs="*", help="e.g. rounds.labeling_ratios=[0.2,0.5] train.iters=500")
    rd.set_defaults(func=cmd_rounds)

    rp = sub.add_parser("report", help="figures of runs: curves, per-class IoU, class distributions, predictions, features")
    rp.add_argument("runs", nargs="+", help="run directories (the first one's config gives the validation data)")
    rp.add_argument("--out", help="output folder (default: FIRST_RUN/report)")
    rp.add_argument("--images", type=int, default=4, help="validation images in the prediction grid")
    rp.set_defaults(func=cmd_report)

    mb = sub.add_parser("make-benchmark", help="generate the embedded benchmark (cached)")
    mb.add_argument("--root", help="output folder (default: the cache, $SEGADAPT_HOME/benchmark/...)")
    mb.add_argument("--seed", type=int, default=0)
    mb.add_argument("--size", default="default", choices=["default", "tiny"])
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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SegadaptError as err:
        print(f"segadapt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (resume with resume=true)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
