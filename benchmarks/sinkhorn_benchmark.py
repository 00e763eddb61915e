"""Time :func:`segadapt.methods.sinkhorn.sinkhorn` and its log-domain fallback against the authors' plain Sinkhorn.

The problem is CPSL's (CPSL Eq. 5-6, Sec. 3.2 and 4.1): pixel features scored against 19 class
prototypes (cosines in ``[-1, 1]``), epsilon 0.05, 3 iterations, the shipped Cityscapes class
marginal; at CPSL's size the rows are a full memory bank of 65,536 features plus one batch
(4 images x 512 pixels = 2,048). Three implementations:

- new: :func:`~segadapt.methods.sinkhorn.sinkhorn` (scalings of a row-stabilised ``exp``, checked,
  falling back to the log domain);
- log: :func:`~segadapt.methods.sinkhorn.sinkhorn_log_domain` (the previous implementation);
- plain: the reference's (docs/reference_code.md, "CPSL: Sinkhorn"): ``exp(scores / eps)`` then
  alternating row and column rescaling, which overflows in float32 once ``max|score| / eps > 88``.

The three are timed interleaved (one call of each per round, rotating the order), so the ratios
stay meaningful on a machine loaded by other jobs. Not run by the tests. Usage::

    python benchmarks/sinkhorn_benchmark.py                         # CPU, and CUDA when available
    python benchmarks/sinkhorn_benchmark.py --threads 1 --repeats 30
    python benchmarks/sinkhorn_benchmark.py --devices cuda --repeats 50 --sizes 67584

Prints the date, the machine, per size the median time of each and the ratios new/plain and
log/plain, the largest differences between the results, then whether each result is finite at
``max|score| / epsilon`` = 10, 100 and 1,000 (and whether ``new`` took the log-domain fallback, and
the ratios there: a fallback costs the scaled attempt plus the log domain).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from typing import Callable

import torch

from segadapt.methods.sinkhorn import sinkhorn, sinkhorn_log_domain

# CPSL's shipped warm-up class distribution (docs/reference_code.md, "CPSL: class distribution")
CITYSCAPES_R = [
    0.37922, 0.049299, 0.226651, 0.015507, 0.017205, 0.014027, 0.002186, 0.002213, 0.133376, 0.024243,
    0.043411, 0.013146, 0.001615, 0.066048, 0.004075, 0.002789, 0.001847, 0.001229, 0.001912,
]  # fmt: skip


@torch.no_grad()
def plain_sinkhorn(scores: torch.Tensor, class_marginal: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The authors' formulation, linear domain (lslrh/CPSL ``adaptation_modelv2.py::sinkhorn``)."""
    q = torch.exp(scores / epsilon).T
    q /= q.sum()
    num_samples = q.shape[1]
    marginal = (class_marginal / class_marginal.sum())[:, None]
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q *= marginal
        q /= q.sum(dim=0, keepdim=True)
        q /= num_samples
    return (q * num_samples).T


def cpsl_scores(num_rows: int, marginal: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels clustered around their class prototype, classes drawn from the marginal: same-class
    cosines about 0.6, other classes about 0 +- 0.06, as a 256-d head after prototype init."""
    prototypes = torch.nn.functional.normalize(torch.randn(len(marginal), 256, generator=generator), dim=1)
    labels = torch.multinomial(marginal, num_rows, replacement=True, generator=generator)
    noise = 0.08 * torch.randn(num_rows, 256, generator=generator)
    return torch.nn.functional.normalize(prototypes[labels] + noise, dim=1) @ prototypes.T


def solvers(scores: torch.Tensor, r: torch.Tensor, epsilon: float, iterations: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The three implementations on one problem, as calls without arguments."""
    return {
        "new": lambda: sinkhorn(scores, r, epsilon, iterations),
        "log": lambda: sinkhorn_log_domain(scores, r, epsilon, iterations),
        "plain": lambda: plain_sinkhorn(scores, r, epsilon, iterations),
    }


def time_interleaved(fns: dict[str, Callable[[], torch.Tensor]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, timed in rounds that call each once, in rotating order."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats + 3):  # the first 3 rounds warm up
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fns[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 16384, 65536 + 2048], help="rows B (bank + batch pixels)")
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"problem: B samples x {len(CITYSCAPES_R)} classes, float32, epsilon {args.epsilon}, "
        f"{args.iterations} iterations, median of {args.repeats} interleaved rounds"
    )
    for device in map(torch.device, args.devices):
        generator = torch.Generator().manual_seed(args.seed)
        marginal = torch.tensor(CITYSCAPES_R)
        print(f"\nmachine: {machine(device)}")
        print(f"{'B':>7} | {'new ms':>9} {'log ms':>9} {'plain ms':>9} | {'new/plain':>9} {'log/plain':>9} | max|new-plain| max|log-plain|")
        for size in args.sizes:
            scores, r = cpsl_scores(size, marginal, generator).to(device), marginal.to(device)
            fns = solvers(scores, r, args.epsilon, args.iterations)
            median = time_interleaved(fns, args.repeats, device)
            q_new, q_log, q_plain = (fn() for fn in fns.values())
            print(
                f"{size:>7} | {median['new'] * 1e3:9.3f} {median['log'] * 1e3:9.3f} {median['plain'] * 1e3:9.3f} | "
                f"{median['new'] / median['plain']:8.2f}x {median['log'] / median['plain']:8.2f}x | "
                f"{(q_new - q_plain).abs().max().item():.1e}        {(q_log - q_plain).abs().max().item():.1e}"
            )
        size = args.sizes[-1]
        scores, r = cpsl_scores(size, marginal, generator).to(device), marginal.to(device)
        print(f"\nB {size}: max|score|/eps | finite new log plain | new fell back | new ms  log ms  plain ms | max|new-log|")
        for ratio in (10, 100, 1000):
            eps = float(scores.abs().max()) / ratio
            fns = solvers(scores, r, eps, args.iterations)
            median = time_interleaved(fns, max(3, args.repeats // 4), device)
            q_new, q_log, q_plain = (fn() for fn in fns.values())
            finite = " ".join(f"{bool(torch.isfinite(q).all())!s:>5}" for q in (q_new, q_log, q_plain))
            fell_back = torch.equal(q_new, q_log)  # the fallback returns the log-domain result itself
            print(
                f"{ratio:>21} | {finite:>20} | {'yes' if fell_back else 'no':>13} | "
                f"{median['new'] * 1e3:6.2f} {median['log'] * 1e3:7.2f} {median['plain'] * 1e3:9.2f} | "
                f"{(q_new - q_log).abs().max().item():.1e}"
            )


if __name__ == "__main__":
    main()
