"""Time :func:`segadapt.methods.cpsl.sinkhorn` (log domain) against the authors' linear-domain Sinkhorn.

The problem is CPSL's (CPSL Sec. 3.2 and 4.1): a full memory bank of 65,536 pixel features
plus one batch (4 images x 512 pixels = 2,048), scored against 19 class prototypes (cosines in
``[-1, 1]``), epsilon 0.05, 3 iterations, with the shipped Cityscapes class marginal. The plain
formulation is the reference's (docs/reference_code.md, "CPSL: Sinkhorn"): ``exp(scores / eps)``
then alternating row and column rescaling. It is faster but overflows in float32 once
``max|score| / eps > 88`` (e.g. eps 0.01 with cosines near 1), which the script also reports.

Not run by the tests. Usage::

    python benchmarks/sinkhorn_benchmark.py                     # CPU, current torch thread count
    python benchmarks/sinkhorn_benchmark.py --device cuda --repeats 50
    python benchmarks/sinkhorn_benchmark.py --threads 2 --rows 65536 --batch 2048

Prints the machine, the date, the median time of each (after warm-up), the ratio, and the
maximum difference between the two results.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from segadapt.methods.cpsl import class_marginal_error, sinkhorn

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


def _time(fn, repeats: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _machine(device: torch.device) -> str:
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
    parser.add_argument("--rows", type=int, default=65536, help="memory bank size")
    parser.add_argument("--batch", type=int, default=2048, help="current batch pixels (4 images x 512)")
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    num_classes = len(CITYSCAPES_R)
    marginal = torch.tensor(CITYSCAPES_R)
    # pixels clustered around their class prototype, classes drawn from the marginal: same-class
    # cosines about 0.6, other classes about 0 +- 0.06, as a 256-d head after prototype init
    prototypes = torch.nn.functional.normalize(torch.randn(num_classes, 256, generator=generator), dim=1)
    labels = torch.multinomial(marginal, args.rows + args.batch, replacement=True, generator=generator)
    noise = 0.08 * torch.randn(args.rows + args.batch, 256, generator=generator)
    features = torch.nn.functional.normalize(prototypes[labels] + noise, dim=1)
    scores = (features @ prototypes.T).to(device)
    marginal = marginal.to(device)

    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {_machine(device)}")
    print(
        f"problem: {args.rows}+{args.batch} samples x {num_classes} classes, float32, "
        f"epsilon {args.epsilon}, {args.iterations} iterations, median of {args.repeats}"
    )
    ours = _time(lambda: sinkhorn(scores, marginal, args.epsilon, args.iterations), args.repeats, device)
    plain = _time(lambda: plain_sinkhorn(scores, marginal, args.epsilon, args.iterations), args.repeats, device)
    q_ours = sinkhorn(scores, marginal, args.epsilon, args.iterations)
    q_plain = plain_sinkhorn(scores, marginal, args.epsilon, args.iterations)
    print(f"log-domain (segadapt): {ours * 1e3:9.3f} ms")
    print(f"linear (reference):    {plain * 1e3:9.3f} ms")
    print(f"ratio log/linear:      {ours / plain:9.2f}x")
    print(f"max |Q_log - Q_linear|: {(q_ours - q_plain).abs().max().item():.2e}")
    print(f"class-marginal error after {args.iterations} iterations: {class_marginal_error(q_ours, marginal):.2e}")
    small_eps = float(scores.abs().max()) / 100  # exp(100) > float32 max (3.4e38)
    q_small = plain_sinkhorn(scores, marginal, small_eps, args.iterations)
    q_small_ours = sinkhorn(scores, marginal, small_eps, args.iterations)
    print(
        f"epsilon {small_eps:.4f} (max|score|/eps = 100): linear finite={bool(torch.isfinite(q_small).all())}, "
        f"log-domain finite={bool(torch.isfinite(q_small_ours).all())}"
    )


if __name__ == "__main__":
    main()
