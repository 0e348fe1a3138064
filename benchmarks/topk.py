"""Peak memory and time of `perturbed_topk` (forward + backward) against the naive one-hot formulation.

Variants:
- ours: `tokensieve.ops.perturbed_topk` with `jacobian="full"`, which saves the sorted indices
  (B, S, K) and the noise (B, S, N), scatter-adds the forward and gathers the backward.
- ours-diagonal: the same op with its default `jacobian="diagonal"` (the released code's estimator),
  whose backward also multiplies and scatter-adds one (B, S, K) tensor.
- naive: the one-hot formulation of the released STTS operator, written here from its description:
  the (B, S, K, N) one-hots of every sample are built with `F.one_hot` (int64, then cast to float) and
  saved; the forward is their mean, the backward forms the full Jacobian estimate E[Y Z^T] / sigma as
  a (B, K, N, N) tensor and contracts it with the incoming gradient (the released backward keeps only
  its diagonal, a (B, K, N) tensor; the saved one-hots dominate either way). Same noise, same outputs
  and gradients as `ours`.

Sizes: B=8, N=196, K=98, S=500 for both (a 14x14 frame, keep half, the paper's 500 samples), then
ours alone at token scale N=1568, K=784 (8x14x14 tokens), where the naive one-hots alone would take
B*S*K*N*4 bytes; that size is printed instead of run.

Memory method: every measurement runs in a fresh subprocess. It imports torch, fixes the thread
count, creates the inputs (scores, incoming gradient, generator) and runs the same variant once on a
tiny input so that one-time costs (kernel and thread-pool initialisation) are paid before measuring.
Then it reads the process's resident high-water mark (`getrusage(RUSAGE_SELF).ru_maxrss`), runs one
forward + backward, and reports the increase of the high-water mark: the extra resident memory the
op needed at its peak, everything alive at that moment included (saved tensors, temporaries, the
output and the gradient). It is a resident-set figure, so it counts what the allocator touched, with
page granularity and allocator slack, not just tensor bytes; at the sizes here that noise is a few MB.
Time: median of `--repeats` forward + backward rounds after that first one, in the same subprocess.

Run:  python benchmarks/topk.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from tokensieve.ops import perturbed_topk

SMALL = {"B": 8, "N": 196, "K": 98, "S": 500}
TOKENS = {"B": 8, "N": 1568, "K": 784, "S": 500}
SIGMA = 0.05
TARGET_MEMORY_RATIO = 20.0


class _NaivePerturbedTopK(torch.autograd.Function):
    """The one-hot formulation: materialises (B, S, K, N) in forward and (B, K, N, N) in backward."""

    @staticmethod
    def forward(ctx, scores: Tensor, noise: Tensor, k: int, sigma: float) -> Tensor:
        perturbed = scores.unsqueeze(1) + sigma * noise  # (B, S, N)
        idx = perturbed.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values  # (B, S, K)
        onehots = F.one_hot(idx, scores.shape[1]).to(scores.dtype)  # (B, S, K, N)
        ctx.save_for_backward(onehots, noise)
        ctx.sigma = sigma
        return onehots.mean(dim=1)  # (B, K, N)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        onehots, noise = ctx.saved_tensors  # (B, S, K, N), (B, S, N)
        S = noise.shape[1]
        jacobian = torch.einsum("bskm,bsn->bkmn", onehots, noise) / (S * ctx.sigma)  # (B, K, N, N)
        return torch.einsum("bkm,bkmn->bn", grad_out, jacobian), None, None, None  # (B, N)


def naive_topk(
    scores: Tensor, k: int, *, num_samples: int, sigma: float, generator: torch.Generator
) -> Tensor:
    B, N = scores.shape
    noise = torch.randn((B, num_samples, N), generator=generator, dtype=scores.dtype)  # (B, S, N)
    return _NaivePerturbedTopK.apply(scores, noise, k, sigma)  # (B, K, N)


VARIANTS = {
    "ours": functools.partial(perturbed_topk, jacobian="full"),
    "ours-diagonal": functools.partial(perturbed_topk, jacobian="diagonal"),
    "naive": naive_topk,
}


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _step(fn, scores: Tensor, grad_out: Tensor, k: int, num_samples: int, seed: int) -> None:
    scores.grad = None
    out = fn(scores, k, num_samples=num_samples, sigma=SIGMA, generator=torch.Generator().manual_seed(seed))
    out.backward(grad_out)


def worker(variant: str, B: int, N: int, K: int, S: int, repeats: int, threads: int) -> dict:
    """Runs in its own process: one measured round for memory, then `repeats` timed rounds."""
    torch.set_num_threads(threads)
    fn = VARIANTS[variant]
    tiny = torch.rand(2, 8, requires_grad=True)
    _step(fn, tiny, torch.randn(2, 4, 8), 4, 4, seed=0)  # one-time initialisation, not measured

    scores = torch.rand(B, N, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grad_out = torch.randn(B, K, N, generator=torch.Generator().manual_seed(1))  # (B, K, N)
    baseline = _max_rss_mb()
    start = time.perf_counter()
    _step(fn, scores, grad_out, K, S, seed=2)
    first = time.perf_counter() - start
    peak = _max_rss_mb() - baseline

    times = []
    for i in range(repeats):
        start = time.perf_counter()
        _step(fn, scores, grad_out, K, S, seed=3 + i)
        times.append(time.perf_counter() - start)
    return {"peak_mb": peak, "time_s": statistics.median(times) if times else first}


def measure(variant: str, size: dict, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, *(str(size[key]) for key in "BNKS")]
    cmd += ["--repeats", str(repeats), "--threads", str(threads)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _size(size: dict) -> str:
    return "B={B} N={N} K={K} S={S}".format(**size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=5, metavar=("VARIANT", "B", "N", "K", "S"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, *dims = args.worker
        print(json.dumps(worker(variant, *map(int, dims), repeats=args.repeats, threads=args.threads)))
        return

    print(f"perturbed top-k, forward + backward, float32, sigma={SIGMA}, {args.threads} threads, CPU")
    print(
        f"peak = increase of the process's max RSS over its post-setup level; time = median of {args.repeats}"
    )
    print(f"{'variant':<13} {'size':<28} {'peak MB':>10} {'time ms':>10}")
    results = {}
    runs = [
        ("naive", SMALL),
        ("ours", SMALL),
        ("ours-diagonal", SMALL),
        ("ours", TOKENS),
        ("ours-diagonal", TOKENS),
    ]
    for variant, size in runs:
        r = measure(variant, size, args.repeats, args.threads)
        results[variant, size["N"]] = r
        print(f"{variant:<13} {_size(size):<28} {r['peak_mb']:>10.1f} {1000 * r['time_s']:>10.1f}")

    naive, ours = results["naive", SMALL["N"]], results["ours", SMALL["N"]]
    memory_ratio = naive["peak_mb"] / max(ours["peak_mb"], 1e-3)
    print(
        f"\nat {_size(SMALL)}: naive / ours  memory {memory_ratio:.1f}x  time {naive['time_s'] / ours['time_s']:.1f}x"
    )
    onehot_gb = TOKENS["B"] * TOKENS["S"] * TOKENS["K"] * TOKENS["N"] * 4 / 1e9
    print(
        f"at {_size(TOKENS)}: naive not run; its float32 one-hots alone would take {onehot_gb:.1f} GB "
        f"({2 * onehot_gb:.1f} GB more for F.one_hot's int64 result), ours peaked at "
        f"{results['ours', TOKENS['N']]['peak_mb']:.0f} MB (full), "
        f"{results['ours-diagonal', TOKENS['N']]['peak_mb']:.0f} MB (diagonal)"
    )
    verdict = "met" if memory_ratio >= TARGET_MEMORY_RATIO else "MISSED"
    print(f"target: >= {TARGET_MEMORY_RATIO:.0f}x less memory at {_size(SMALL)}: {verdict}")


if __name__ == "__main__":
    main()
