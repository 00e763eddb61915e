"""The one training loop every recipe runs in.

The trainer owns what is common to all methods: data streams, optimiser and schedule,
AMP, gradient accumulation and clipping, the optional EMA copy, periodic evaluation,
``metrics.jsonl``, atomic ``last.pt``/``best.pt`` and exact resume. A recipe
(:mod:`segadapt.engine.recipes`) only maps batches to losses.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs this loop on its share of each data
stream; gradients are averaged over ranks before each optimiser step, and only rank 0 writes
files and logs (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..config import RunConfig, save_config, with_absolute_paths
from ..data.label_ids import check_label_ids
from ..data.transforms import crop_and_largest_view
from ..errors import CheckpointError, ConfigError, SegadaptError, writing
from ..methods.ema import ModelEMA
from ..models.checkpointing import set_activation_checkpointing
from ..progress import write as write_line
from . import distributed
from .builders import (
    build_dataset_from_spec,
    build_eval_loader,
    build_model,
    build_optimizer,
    build_train_loader,
    build_transform,
    resolve_device,
)
from .checkpoint import atomic_save, load_checkpoint, remove_partial_saves, rng_state, seed_everything, set_rng_state
from .evaluation import evaluate
from .label_space import check_config_against_classes, require_labels, run_classes
from .logging import MetricsLog, Progress, read_metrics
from .losses import build_seg_loss
from .output_folder import check_not_data, stream_folders
from .recipes import Recipe, check_masked_consistency, recipe_class
from .recipes.base import Stream, parse_options
from .resume import check_resume_config, given_options
from .schedule import build_scheduler


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _transforms_key(cfg: RunConfig, stream: Stream) -> str:
    """The ``data.*`` key of a stream's transforms: target streams take ``target_transforms`` when it is set."""
    if stream.spec == "target" and stream.transforms == "train_transforms" and cfg.data.target_transforms is not None:
        return "target_transforms"
    return stream.transforms


def _with_note(err: SegadaptError, note: str) -> SegadaptError:
    """``err`` with ``note`` after its message, of the same class (so the CLI reports it the same way)."""
    try:
        return type(err)(f"{err}; {note}")
    except TypeError:  # a subclass with other constructor arguments
        return SegadaptError(f"{err}; {note}")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; its message says what was saved and how to continue."""


class Trainer:
    """Trains ``cfg.recipe`` for ``cfg.train.iters`` optimiser steps in ``cfg.run_dir``.

    Args:
        cfg: the validated run config (saved, fully resolved, as ``run_dir/config.yaml``).
        resume: continue from ``run_dir/checkpoints/last.pt``. Without it, a run directory
            that already holds checkpoints is an error rather than being overwritten.
        log: where progress lines go.
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.dist = distributed.init_distributed()
        self.is_main = self.dist.is_main
        log = log or write_line  # drawn around a live progress bar in a terminal
        self.log = log if self.is_main else (lambda text: None)
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        self.run_dir = cfg.run_dir
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.recipe_class = recipe_class(cfg.recipe)
        # paths made absolute once (method.teacher too), so the run directory resumes from any working directory
        options = with_absolute_paths(parse_options(self.recipe_class.Options, cfg.method, cfg.recipe))
        check_masked_consistency(self.recipe_class, cfg)
        # the options the config sets, under their current names (a former name is read as the new one)
        cfg = with_absolute_paths(cfg).model_copy(update={"method": {key: getattr(options, key) for key in given_options(cfg)}})
        self.cfg = cfg
        # what config.yaml records: the run as asked (every recipe option spelled out, defaults included, so a
        # run keeps its behaviour when a later version changes a default), not the paths a preparation made
        given = cfg.model_copy(update={"method": options.model_dump(mode="json")})
        if resume:
            # a change it cannot apply is refused before any work; compared as asked (cfg), so that an option
            # left to a default that changed since the run was saved is named as such
            check_resume_config(self.run_dir, cfg, self.log)

        # the label space comes from the data, and every config value tied to it is checked before
        # any work (a recipe's preparation may take minutes) and before the run directory exists
        self.val_set = build_dataset_from_spec(cfg.data.val, with_labels=True) if cfg.data.val else None
        # a stream that trains on the dataset's own labels is built with them now, so that missing labels
        # and label ids outside the class range are found here rather than at some iteration, or after training
        streams = self.recipe_class.streams
        early = {name: build_dataset_from_spec(self._spec(s.spec, name), with_labels=s.needs_ground_truth) for name, s in streams.items()}
        self.classes = run_classes(cfg, dict(early, **({"val": self.val_set} if self.val_set is not None else {})))
        self.num_classes = self.classes.num_classes
        check_config_against_classes(cfg, self.classes)
        self.recipe_class.check_classes(options, self.classes)
        labelled = {name: (early[name], self._spec(s.spec, name)) for name, s in streams.items() if s.needs_ground_truth}
        for name, (dataset, spec) in labelled.items():
            require_labels(dataset, spec, f"recipe {cfg.recipe!r} trains on the labels of its {name} stream")
        if self.val_set is not None:
            require_labels(self.val_set, cfg.data.val, "the run's evaluation needs its labels")
            labelled["val"] = (self.val_set, cfg.data.val)
        # every label file is read once, by rank 0 alone; the other ranks then find its ids cached
        if self.is_main:
            for dataset, spec in labelled.values():
                check_label_ids(dataset, spec.key)
        distributed.barrier()
        if not self.is_main:
            for dataset, spec in labelled.values():
                check_label_ids(dataset, spec.key)

        self._prepare_run_dir(resume, given)
        seed_everything(cfg.seed, cfg.deterministic)
        self.device = resolve_device(cfg.device)
        # rank 0 does a recipe's preparation (pseudo labels, prototypes) alone; the others then
        # find it done in the run directory and reuse it, instead of racing to write the same files
        if self.recipe_class.collective_prepare:
            cfg = self.recipe_class.prepare(cfg, self.run_dir, self.log)
        else:
            if self.is_main:
                cfg = self.recipe_class.prepare(cfg, self.run_dir, self.log)
            distributed.barrier()
            if not self.is_main:
                cfg = self.recipe_class.prepare(cfg, self.run_dir, self.log)
        self.cfg = cfg
        self.train_sets = {
            name: build_dataset_from_spec(self._spec(stream.spec, name), with_labels=stream.labels)
            for name, stream in self.recipe_class.streams.items()
        }
        run_classes(cfg, self.train_sets)  # pseudo labels a preparation made are in the same label space
        if self.is_main:
            self._warn_about_padded_crops()

        model = build_model(cfg.model, self.num_classes).to(self.device)
        if cfg.train.sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise ConfigError("train.sync_bn=true needs GPUs (SyncBatchNorm has no CPU kernel); set train.sync_bn=false on CPU")
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state-dict keys as BatchNorm
            assert converted is model  # it converts the children in place; only a bare BatchNorm is replaced
        if cfg.train.channels_last:
            # Module.to(memory_format=...) exists (it is documented); torch's stubs list only its other overloads
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # before the recipe copies the network (its EMA teacher runs without gradients, so it never recomputes)
        set_activation_checkpointing(model, cfg.train.activation_checkpointing)
        loss = build_seg_loss(cfg.loss, ignore_index=self.classes.ignore_index, run=cfg, num_classes=self.num_classes, log=self.log)
        self.recipe: Recipe = self.recipe_class(cfg, model, loss, self.classes).to(self.device)
        if cfg.train.compile:
            # in place, after the recipe copied its EMA networks (they stay eager): the module keeps its type,
            # attributes and state-dict keys, so checkpoints and resumes are those of an eager run
            model.compile()
        # the run's config spells out every recipe option, defaults included, as its config.yaml does
        cfg = cfg.model_copy(update={"method": self.recipe.options.model_dump(mode="json")})
        self.cfg = cfg
        self.optimizer = build_optimizer(self.recipe.trainable_model(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.iters, cfg.schedule)
        self.ema = ModelEMA(model, cfg.train.ema_momentum) if cfg.train.ema_momentum is not None else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.iteration = 0
        self.consumed = {name: 0 for name in self.train_sets}
        self.best_score = float("-inf")
        self.saved_iteration: int | None = None  # the iteration last.pt holds
        self.metrics_log = MetricsLog(self.run_dir) if self.is_main else None
        if resume:
            self._load(self.checkpoint_dir / "last.pt")
        if self.dist.enabled:
            # every rank starts from rank 0's networks, whatever its own initialisation drew ...
            distributed.broadcast_module(self.recipe)
            if self.ema is not None:
                distributed.broadcast_module(self.ema)
            if not resume and self.dist.rank > 0:
                # ... but draws its own random numbers (dropout, pixel sampling) from here on
                seed_everything(distributed.rank_seed(cfg.seed, self.dist.rank), cfg.deterministic)

    # ---------------------------------------------------------------- setup

    def _spec(self, spec_name: str, stream: str):
        spec = getattr(self.cfg.data, spec_name)
        if spec is None:
            raise ConfigError(
                f"recipe {self.cfg.recipe!r} reads stream {stream!r} from data.{spec_name}, which is not set; "
                f"set data.{spec_name}.dataset and data.{spec_name}.root (or use dataset: benchmark)"
            )
        return spec

    def _prepare_run_dir(self, resume: bool, given: RunConfig) -> None:
        """Make the run directory, with its ``config.yaml`` from the start (``given``: the run as asked).

        A start that fails before its first checkpoint (bad data, a wrong checkpoint) so leaves a run
        directory that ``segadapt train RUN_DIR`` starts again, with overrides applied (nothing is resumed).
        """
        check_not_data(self.run_dir, stream_folders(given), "choose another output_dir= or name=, outside the dataset", what="run directory")
        last = self.checkpoint_dir / "last.pt"
        if resume and not last.exists():
            raise CheckpointError(f"cannot resume: {last} does not exist; start the run without resume")
        if not resume and any(self.checkpoint_dir.glob("*.pt")):
            raise ConfigError(
                f"run directory {self.run_dir} already holds checkpoints; pass resume=true to continue it, "
                "or choose another name= or output_dir= (nothing was overwritten)"
            )
        if not self.is_main:
            return
        with writing(self.checkpoint_dir, "the run directory"):
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            for partial in remove_partial_saves(self.checkpoint_dir):
                self.log(f"removed {partial}, left by a save that was killed mid-way")
            if not resume:
                self._set_aside_logs_of_unfinished_run()
        if not resume:
            with writing(self.run_dir / "config.yaml", "the run's config"):
                save_config(given, self.run_dir / "config.yaml")

    def _set_aside_logs_of_unfinished_run(self) -> None:
        """A fresh run under the name of one killed before its first checkpoint starts a new log.

        Its ``metrics.jsonl`` and TensorBoard events move to ``*.unfinished`` (replacing older ones),
        so the two runs' records are never interleaved and nothing is deleted.
        """
        for name in ("metrics.jsonl", "tensorboard"):
            old = self.run_dir / name
            if old.exists():
                aside = self.run_dir / f"{name}.unfinished"
                if aside.is_dir():
                    shutil.rmtree(aside)
                elif aside.exists():
                    aside.unlink()
                old.rename(aside)
                self.log(f"{old} belongs to an earlier run that saved no checkpoint: moved to {aside}")

    def _warn_about_padded_crops(self) -> None:
        """Say once when even the largest random scale leaves images smaller than the crop (all padding)."""
        for name, stream in self.recipe_class.streams.items():
            key = _transforms_key(self.cfg, stream)
            dataset = self.train_sets[name]
            if len(dataset) == 0:
                continue
            size = dataset.image_size(0)
            crop, largest = crop_and_largest_view(getattr(self.cfg.data, key) or [], size)
            if crop is not None and (largest[0] < crop[0] or largest[1] < crop[1]):
                self.log(
                    f"warning: data.{key} crops {crop[0]}x{crop[1]} but the {name} images "
                    f"({size[0]}x{size[1]}) are at most {largest[0]}x{largest[1]} after scaling: every crop is mostly "
                    f"padding, which costs time and teaches nothing; set data.crop_size=[h,w] to at most "
                    f"[{largest[0]},{largest[1]}]"
                )

    def _loaders(self) -> dict[str, Iterator[dict[str, Any]]]:
        cfg = self.cfg
        loaders: dict[str, Iterator[dict[str, Any]]] = {}
        for index, (name, stream) in enumerate(self.recipe_class.streams.items()):
            spec = getattr(cfg.data, _transforms_key(cfg, stream))
            seed = cfg.seed * 1000 + index
            loader = build_train_loader(
                self.train_sets[name],
                build_transform(spec, self.classes.ignore_index),
                cfg.data.batch_size,
                cfg.data.num_workers,
                seed=seed,
                start=self.consumed[name],
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                sampler=self.recipe.train_sampler(name, self.train_sets[name], seed, self.consumed[name]),
            )
            loaders[name] = iter(loader)
        return loaders

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs; a collective under torchrun (every rank must call it)."""
        rng = rng_state()
        rng_ranks = distributed.all_gather_object(rng) if self.dist.enabled else None
        return {
            "model": self.recipe.model.state_dict(),
            "recipe": self.recipe.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "consumed": dict(self.consumed),
            "best_score": self.best_score,
            "rng": rng,
            "rng_ranks": rng_ranks,  # each rank's generators, for an exact resume with the same process count
            "eval_model": self.eval_model().state_dict() if self.eval_model() is not self.recipe.model else None,
            "classes": dataclasses.asdict(self.classes),
            "model_name": self.cfg.model.name,
            "model_options": dict(self.cfg.model.options),
        }

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path)
        self.recipe.load_state_dict(state["recipe"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["iteration"]
        self.consumed = dict(state["consumed"])
        self.best_score = state["best_score"]
        self.saved_iteration = self.iteration
        rng_ranks = state.get("rng_ranks")
        if rng_ranks is not None and len(rng_ranks) == self.dist.world_size:
            set_rng_state(rng_ranks[self.dist.rank])
        else:
            set_rng_state(state["rng"])
            if self.dist.rank > 0:  # another process count than the saved run: fresh, distinct draws
                seed_everything(distributed.rank_seed(self.cfg.seed + self.iteration, self.dist.rank), self.cfg.deterministic)
        if self.metrics_log is not None:
            self.metrics_log.truncate_after(self.iteration)
        self.log(f"resumed {self.run_dir} at iteration {self.iteration}")

    def save(self, name: str) -> None:
        """Rank 0 writes ``checkpoints/name`` atomically; the other ranks wait until it is on disk."""
        state = self.state_dict()
        if self.is_main:
            atomic_save(state, self.checkpoint_dir / name)
        distributed.barrier()
        if name == "last.pt":
            self.saved_iteration = self.iteration

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.recipe.eval_model()

    # ---------------------------------------------------------------- loop

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.train.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at iteration {self.iteration}; lower optim.lr or enable "
                f"optim.grad_clip (last good checkpoint: {self.checkpoint_dir / 'last.pt'})"
            )

    def _backward(self, loss: torch.Tensor) -> None:
        """Back-propagate (a term of) this step's loss, scaled for AMP and gradient accumulation."""
        self._check_finite(loss)
        with torch.autocast(self.device.type, enabled=False):  # a recipe may call this inside its autocast forward
            self.scaler.scale(loss / self.cfg.train.grad_accum).backward()

    def _step(self, loaders: dict[str, Iterator[dict[str, Any]]]) -> dict[str, float]:
        cfg = self.cfg.train
        self.recipe.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        self.recipe.seg_loss.set_iteration(self.iteration)  # BLV's temporal sigma schedule
        for _ in range(cfg.grad_accum):
            batches = {}
            for name, loader in loaders.items():
                batches[name] = _to_device(next(loader), self.device)
                self.consumed[name] += self.cfg.data.batch_size * self.dist.world_size  # positions of the shared stream
            self.recipe.backward_hook = self._backward if cfg.stream_backward else None
            try:
                with self._autocast():
                    losses = self.recipe.training_step(batches, self.iteration)
            finally:
                self.recipe.backward_hook = None
            if losses["loss"].requires_grad:  # what the recipe did not back-propagate already
                self._backward(losses["loss"])
            else:
                self._check_finite(losses["loss"])
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) / cfg.grad_accum
        # once per step, after all accumulated backward passes: the gradient of the global batch
        distributed.all_reduce_gradients(self.recipe.trainable_model().parameters())
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.recipe.trainable_model().parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        for index, group in enumerate(self.optimizer.param_groups):  # the rate this step used
            totals[f"lr_{group.get('name', index)}"] = group["lr"]
        self.scheduler.step()
        self.iteration += 1
        distributed.average_buffers(self.recipe.trainable_model())  # BatchNorm statistics saw only this rank's batch
        if self.ema is not None:
            self.ema.update(self.recipe.model)
        self.recipe.after_optimizer_step(self.iteration)
        return totals

    def evaluate(self) -> dict[str, Any] | None:
        if self.val_set is None:
            return None
        loader = build_eval_loader(
            self.val_set,
            build_transform(self.cfg.data.val_transforms, self.classes.ignore_index),
            self.cfg.data.val_batch_size,
            self.cfg.data.num_workers,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        return evaluate(self.eval_model(), loader, self.classes, self.cfg.eval, self.device)  # confusion summed over ranks

    def fit(self) -> dict[str, Any] | None:
        """Train to ``train.iters``; returns the final evaluation (None without a validation set).

        ``last.pt`` is written before each evaluation, so an evaluation that fails loses no training;
        a finished run only reports its final evaluation. Ctrl-C raises :class:`TrainingInterrupted`,
        whose message says which iteration ``last.pt`` holds, if any.
        """
        cfg = self.cfg.train
        if self.iteration >= cfg.iters:
            return self._report_finished()
        progress = Progress(cfg.iters, start=self.iteration, prefix=f"[{self.cfg.name}] ")
        final: dict[str, Any] | None = None
        try:
            loaders = self._loaders()
            while self.iteration < cfg.iters:
                losses = self._step(loaders)
                it = self.iteration
                progress.advance(it)  # the terminal bar moves every iteration (no-op in log files)
                if it % cfg.log_every == 0 or it == cfg.iters:
                    losses = self._mean_over_ranks(losses)
                    if self.metrics_log is not None:
                        self.metrics_log.write({"iter": it, **losses})
                        progress.show(it, {k: v for k, v in losses.items() if not k.startswith("lr_")})
                evaluate_now = it == cfg.iters or (cfg.eval_every and it % cfg.eval_every == 0)
                if evaluate_now or (cfg.checkpoint_every and it % cfg.checkpoint_every == 0):
                    self.save("last.pt")
                if evaluate_now:
                    final = self._evaluate_and_log(it)
        except KeyboardInterrupt:
            raise TrainingInterrupted(self._interrupted_message()) from None
        except SegadaptError as err:  # a bad file met mid-way: the message also says what is kept and how to go on
            raise _with_note(err, f"training stopped at iteration {self.iteration} of {cfg.iters}; {self._kept()} once fixed") from err
        except OSError as err:
            note = f"training stopped at iteration {self.iteration} of {cfg.iters}; {self._kept()} once fixed"
            raise OSError(err.errno, f"{err.strerror or err}; {note}", err.filename) from err
        finally:
            progress.close()  # a message after the bar starts on a line of its own
            if self.metrics_log is not None:
                self.metrics_log.close()
        return final

    def _interrupted_message(self) -> str:
        return f"interrupted at iteration {self.iteration} of {self.cfg.train.iters}; {self._kept()}"

    def _kept(self) -> str:
        """What ``last.pt`` holds and how to go on, for a run stopped by Ctrl-C or an error."""
        if self.saved_iteration is None:
            every = self.cfg.train.checkpoint_every
            when = f"every {every} iterations" if every else "at evaluations and at the end (train.checkpoint_every=0)"
            return (
                f"no checkpoint was written yet (they are written {when}), so nothing can be resumed: "
                "run the same command again to start over"
            )
        return (
            f"{self.checkpoint_dir / 'last.pt'} holds iteration {self.saved_iteration}: "
            f"continue with `segadapt train {self.run_dir}`"
        )

    def _report_finished(self) -> dict[str, Any] | None:
        """A finished run: say so, and give its final evaluation (logged if the first attempt failed)."""
        self.log(f"{self.run_dir} is finished (iteration {self.iteration} of {self.cfg.train.iters}); evaluating last.pt")
        scores = self.evaluate()
        logged = any(r.get("iter") == self.iteration and "val/miou" in r for r in read_metrics(self.run_dir))
        if scores is not None and self.metrics_log is not None and not logged:
            self.metrics_log.write({"iter": self.iteration, **{f"val/{k}": v for k, v in scores["flat"].items()}})
        if self.metrics_log is not None:
            self.metrics_log.close()
        return scores

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """The logged losses: means over all ranks' batches (the same keys on every rank)."""
        if not self.dist.enabled:
            return values
        keys = sorted(values)  # one order on every rank, whatever order the recipe returned them in
        means = dict(zip(keys, distributed.all_reduce_mean(torch.tensor([values[k] for k in keys], dtype=torch.float64)).tolist()))
        return {key: means[key] for key in values}

    def _evaluate_and_log(self, iteration: int) -> dict[str, Any] | None:
        scores = self.evaluate()
        if scores is None:
            return None
        if self.metrics_log is not None:
            self.metrics_log.write({"iter": iteration, **{f"val/{k}": v for k, v in scores["flat"].items()}})
        self.log(f"[{self.cfg.name}] it {iteration}: val mIoU {100 * scores['flat']['miou']:.2f}")
        if scores["flat"]["miou"] > self.best_score:
            self.best_score = scores["flat"]["miou"]
            self.save("best.pt")  # best-on-validation: reported beside the last iteration, labelled as such
            self.save("last.pt")  # again, so that a resumed run knows the best score it has to beat
        return scores
