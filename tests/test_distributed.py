"""Two gloo processes under torchrun on CPU: synchronised weights, rank-0 files, resume and sharded evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from segadapt.commands.evaluate import evaluate_checkpoint
from segadapt.config import load_config
from segadapt.data.benchmark import ensure_benchmark
from segadapt.engine import distributed
from segadapt.engine.builders import RankShard, build_eval_loader, build_train_loader
from segadapt.engine.checkpoint import load_checkpoint
from segadapt.engine.logging import read_metrics
from segadapt.engine.sampling import ResumableStreamSampler
from segadapt.engine.trainer import Trainer

from data_fixtures import FAST_LOG2, TINY, tiny_config


@pytest.fixture(autouse=True)
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """No launcher variables from the environment: each test starts its own ranks."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


# Runs on each rank: the real ``segadapt train`` command line, with a hook that saves what this
# rank holds after training (rank 1 writes no files of its own); then the same run again,
# interrupted after the checkpoint of iteration 2 and resumed; then ``segadapt eval``'s code.
# One launch keeps the test short.
RANK_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from segadapt.cli import main
    from segadapt.commands.evaluate import evaluate_checkpoint
    from segadapt.engine import distributed
    from segadapt.engine.trainer import Trainer

    out, args = Path(sys.argv[1]), sys.argv[2:]
    fit = Trainer.fit

    def fit_and_record(self):
        final = fit(self)
        torch.save(
            {"model": self.recipe.model.state_dict(), "optimizer": self.optimizer.state_dict()["state"],
             "rank": distributed.get_rank(), "world_size": distributed.get_world_size()},
            out / f"{self.cfg.name}_rank{distributed.get_rank()}.pt",
        )
        return final

    Trainer.fit = fit_and_record
    save = Trainer.save

    def save_then_stop(self, name):
        save(self, name)
        if self.cfg.name == "resumed" and self.iteration == 2 and not (out / "stopped").exists():
            distributed.barrier()
            if distributed.is_main_process():
                (out / "stopped").touch()
            raise KeyboardInterrupt  # on every rank, like Ctrl-C on the whole job

    Trainer.save = save_then_stop
    assert main(["train", *args, "name=ddp", "train.iters=4"]) == 0
    assert main(["train", *args, "name=resumed", "train.iters=4", "train.checkpoint_every=2"]) == 130
    assert main(["train", *args, "name=resumed", "train.iters=4", "train.checkpoint_every=2", "resume=true"]) == 0
    scores = evaluate_checkpoint(out / "ddp" / "checkpoints" / "last.pt")
    torch.save(scores["matrix"]["matrix"], out / f"eval{distributed.get_rank()}.pt")
    """
)


def run_two_ranks(tmp_path: Path, *args: str) -> None:
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def test_two_processes_train_one_model_that_resumes_and_evaluates_like_one_process(tmp_path: Path) -> None:
    ensure_benchmark(seed=0, size="tiny")  # before the ranks start: neither pays for generating it
    run = tmp_path / "ddp"
    run_two_ranks(tmp_path, "benchmark/source_only", *TINY, *FAST_LOG2, f"output_dir={tmp_path}")

    # both ranks hold the same weights and optimiser state, and they are what rank 0 saved
    ranks = [torch.load(tmp_path / f"ddp_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [state["rank"] for state in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    initial = Trainer(tiny_config(tmp_path, "name=fresh", fast=FAST_LOG2)).recipe.model
    moved = 0
    for key, value in checkpoint["model"].items():
        assert torch.equal(ranks[0]["model"][key], value) and torch.equal(ranks[1]["model"][key], value), key
        moved += value.is_floating_point() and not torch.equal(value, initial.state_dict()[key])
    assert moved > 0  # training did change the network
    for index, state in ranks[0]["optimizer"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, ranks[1]["optimizer"][index][name]), (index, name)
    assert sorted(checkpoint["model"]) == sorted(initial.state_dict())  # plain module keys: no DDP "module." prefix

    # each step consumed 2 samples per rank of the one shared source stream; rank 0 alone logged
    assert checkpoint["iteration"] == 4 and checkpoint["consumed"] == {"source": 4 * 2 * 2}
    assert len(checkpoint["rng_ranks"]) == 2
    assert not torch.equal(checkpoint["rng_ranks"][0]["torch"], checkpoint["rng_ranks"][1]["torch"])
    records = read_metrics(run)
    assert [r["iter"] for r in records if "loss" in r] == [2, 4]
    assert [r["iter"] for r in records if "val/miou" in r] == [4]

    # interrupted at iteration 2 and resumed with 2 processes: the uninterrupted run's weights
    assert (tmp_path / "stopped").exists()
    resumed_ranks = [torch.load(tmp_path / f"resumed_rank{r}.pt", weights_only=False) for r in (0, 1)]
    for key, value in checkpoint["model"].items():
        assert all(torch.equal(state["model"][key], value) for state in resumed_ranks), key

    # the sharded evaluation equals a single-process evaluation of the checkpoint, count for count
    single = evaluate_checkpoint(run / "checkpoints" / "last.pt")
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"eval{rank}.pt"), single["matrix"]["matrix"])
    assert single["matrix"]["matrix"].sum() > 0
    assert records[-1]["val/miou"] == pytest.approx(single["flat"]["miou"], abs=0)

    # the checkpoint resumes in a single process, continuing the shared stream
    resumed = Trainer(load_config(run / "config.yaml", ["train.iters=5"]), resume=True)
    for key, value in checkpoint["model"].items():
        assert torch.equal(resumed.recipe.model.state_dict()[key], value), key
    assert resumed.iteration == 4
    resumed.fit()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["consumed"] == {"source": 16 + 2}


def test_sharded_streams_partition_the_single_process_stream() -> None:
    stream = ResumableStreamSampler(7, seed=3, start=5)
    whole = [item for item, _ in zip(stream, range(12))]
    shards = [[item for item, _ in zip(RankShard(ResumableStreamSampler(7, seed=3, start=5), rank, 3), range(4))] for rank in range(3)]
    assert [shards[i % 3][i // 3] for i in range(12)] == whole  # a recipe's own sampler is split like the default one
    dataset = [{"index": torch.tensor(i)} for i in range(10)]
    loaders = [build_eval_loader(dataset, None, 3, 0, rank, 3) for rank in range(3)]
    seen = [[int(x) for batch in loader for x in batch["index"]] for loader in loaders]
    assert seen == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    train = build_train_loader(dataset, None, 2, 0, seed=1, start=0, rank=1, world_size=2, sampler=ResumableStreamSampler(10, 1))
    assert isinstance(train.sampler, RankShard)


def _collectives_worker(rank: int, store: str, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        local = torch.full((rank + 1, 3), float(rank + 1), requires_grad=True)  # 1 row on rank 0, 2 on rank 1
        gathered = distributed.all_gather_cat(local)
        (gathered * torch.arange(1.0, 4.0)[:, None]).sum().backward()  # rows weighted 1, 2, 3
        used, sometimes, never = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
        for param in used.parameters():
            param.grad = torch.full_like(param, float(rank + 1))
        if rank == 1:
            for param in sometimes.parameters():
                param.grad = torch.full_like(param, 4.0)
        distributed.all_reduce_gradients([*used.parameters(), *sometimes.parameters(), *never.parameters()])
        norm = nn.BatchNorm1d(3)
        norm.running_mean.fill_(float(rank))
        norm.num_batches_tracked.fill_(7)
        distributed.average_buffers(norm)
        torch.save(
            {
                "gathered": gathered.detach(), "local_grad": local.grad, "used": [p.grad for p in used.parameters()],
                "sometimes": [p.grad for p in sometimes.parameters()], "never": [p.grad for p in never.parameters()],
                "running_mean": norm.running_mean, "tracked": norm.num_batches_tracked,
                "mean": distributed.all_reduce_mean(torch.tensor([float(rank)])),
                "objects": distributed.all_gather_object({"rank": rank}),
            },
            out / f"collectives{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_collectives_over_two_gloo_processes(tmp_path: Path) -> None:
    mp.start_processes(_collectives_worker, args=(str(tmp_path / "store"), tmp_path), nprocs=2, start_method="fork")
    results = [torch.load(tmp_path / f"collectives{rank}.pt", weights_only=False) for rank in (0, 1)]
    for rank, result in enumerate(results):
        # ranks of different lengths, concatenated in rank order; the gradient reaches the local rows only
        assert torch.equal(result["gathered"], torch.tensor([[1.0] * 3, [2.0] * 3, [2.0] * 3]))
        expected_grad = torch.ones(1, 3) if rank == 0 else torch.tensor([[2.0] * 3, [3.0] * 3])
        assert torch.equal(result["local_grad"], expected_grad)
        # gradients are the mean over ranks; a gradient on one rank only counts as zero on the other;
        # a parameter no rank reached keeps no gradient, as in one process
        assert all(torch.equal(grad, torch.full_like(grad, 1.5)) for grad in result["used"])
        assert all(torch.equal(grad, torch.full_like(grad, 2.0)) for grad in result["sometimes"])
        assert result["never"] == [None, None]
        assert torch.equal(result["running_mean"], torch.full((3,), 0.5)) and int(result["tracked"]) == 7
        assert torch.equal(result["mean"], torch.tensor([0.5]))
        assert result["objects"] == [{"rank": 0}, {"rank": 1}]


def _cleanup_worker(rank: int, store: str, out: Path, peer_leaves: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    distributed.SHUTDOWN_TIMEOUT = timedelta(seconds=2)
    if rank == 1:
        time.sleep(0.5)  # still at work while rank 0 wants to leave
        (out / "rank1_done").touch()
        if not peer_leaves:  # a rank that fails leaves without meeting the others
            time.sleep(4)
            dist.destroy_process_group()
            return
    distributed.cleanup()
    (out / f"left{rank}.json").write_text(json.dumps({"peer_done": (out / "rank1_done").exists(), "joined": dist.is_initialized()}))


@pytest.mark.parametrize("peer_leaves", [True, False])
def test_ranks_leave_the_group_together_and_not_waiting_for_a_failed_peer(tmp_path: Path, peer_leaves: bool) -> None:
    mp.start_processes(_cleanup_worker, args=(str(tmp_path / "store"), tmp_path, peer_leaves), nprocs=2, start_method="fork")
    left = json.loads((tmp_path / "left0.json").read_text())
    # rank 0 leaves only once rank 1 finished its work; without rank 1 it leaves after the timeout
    assert left == {"peer_done": True, "joined": False}
    assert (tmp_path / "left1.json").exists() == peer_leaves
    distributed.cleanup()  # no group in this process: nothing to leave


def test_single_process_helpers_are_identities() -> None:
    assert distributed.env_info() == distributed.DistInfo(0, 1, 0)
    assert distributed.init_distributed().enabled is False and distributed.is_main_process()
    x = torch.arange(6.0).reshape(3, 2).requires_grad_()
    assert distributed.all_gather_cat(x) is x
    assert torch.equal(distributed.all_reduce_mean(x), x)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]


def test_inconsistent_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from segadapt.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2 and WORLD_SIZE=2"):
        distributed.env_info()


# Runs on each rank: ``segadapt pseudo-label`` sharded over the two processes, then a
# self-training run whose preparation (its pseudo labels) the two processes also share.
PSEUDO_LABEL_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    from segadapt.cli import main
    from segadapt.engine import distributed, pseudo_labelling

    checkpoint, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    predictions = pseudo_labelling._predictions

    def recorded(*a, **k):  # which images this process predicts
        for name, probs, label in predictions(*a, **k):
            with open(f"{out}/seen{distributed.get_rank()}.txt", "a") as seen:
                seen.write(name + "\\n")
            yield name, probs, label

    pseudo_labelling._predictions = recorded
    assert main(["pseudo-label", checkpoint, out + "/sharded", "pseudo_label.rule=dars", "pseudo_label.ratio=0.5"]) == 0
    assert main(["train", "benchmark/st", f"model.checkpoint={checkpoint}", f"output_dir={out}", "name=st",
                 "train.iters=2", *args]) == 0
    """
)


def test_two_processes_share_pseudo_labelling_and_write_what_one_process_writes(tmp_path: Path) -> None:
    from segadapt.commands.pseudo_label import pseudo_label_checkpoint
    from segadapt.engine.pseudo_labelling import SUMMARY

    ensure_benchmark(seed=0, size="tiny")
    warmup = Trainer(tiny_config(tmp_path, "name=warmup", "train.iters=2", fast=FAST_LOG2))
    warmup.fit()
    checkpoint = tmp_path / "warmup" / "checkpoints" / "last.pt"
    script = tmp_path / "pseudo_label_script.py"
    script.write_text(PSEUDO_LABEL_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(checkpoint), str(tmp_path), *TINY, *FAST_LOG2]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    single = pseudo_label_checkpoint(
        checkpoint, tmp_path / "single", overrides=["pseudo_label.rule=dars", "pseudo_label.ratio=0.5"], log=lambda _: None
    )
    sharded = tmp_path / "sharded"
    assert json.loads((sharded / SUMMARY).read_text()) == single  # thresholds, counts, accuracy, KL: summed over both
    names = sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*.png"))
    assert len(names) == single["num_images"] > 2
    assert sorted(p.relative_to(sharded) for p in sharded.rglob("*.png")) == names
    for name in names:  # DARS's random subsampling included
        assert (sharded / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name

    # each process predicted its own half of the images, twice (one pass for the histogram, one to label),
    # in the command and again in the self-training run's preparation
    seen = [(tmp_path / f"seen{rank}.txt").read_text().split() for rank in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == single["num_images"]
    assert sorted(seen[0] + seen[1]) == sorted(4 * (list(set(seen[0])) + list(set(seen[1]))))

    # the self-training run's labels were made by both processes together, then trained on
    labels = tmp_path / "st" / "pseudo_labels"
    assert json.loads((labels / SUMMARY).read_text())["num_images"] == single["num_images"]
    assert len(list(labels.rglob("*.png"))) == single["num_images"]
    assert load_checkpoint(tmp_path / "st" / "checkpoints" / "last.pt")["iteration"] == 2
