"""A batch whose videos keep different numbers of tokens, paid for by the tokens kept.

For videomae-s and videomae-b (16x224, float32, random weights), a batch of 8 clips whose per-video
keep ratios are spread evenly over [0.2, 1.0] (random tokens right after the patch embedding, each
clip keeping its own share: a ragged batch), timed in interleaved rounds in one process:

- `none`: the unreduced model on the same batch (the baseline);
- `packed`: the ragged batch run packed (projections and MLP on the real tokens, attention per video);
- `padded`: the same batch run with a padding mask (every row computed, the reference path);
- `one by one`: the 8 videos run one at a time, each with its own keep ratio.

Reported per path: median seconds per batch, speed-up over `none`, and for `packed` the efficiency
= speed-up / (baseline GFLOPs / mean per-video GFLOPs), the per-video GFLOPs counted from each clip's
real tokens (`ts.flops(model, video=batch)`). Targets: efficiency >= 0.9, and packed faster than
both padded and one by one. Then batch 32 on videomae-s (ratios spread the same way).

Run:  python benchmarks/ragged.py [--models videomae-s videomae-b] [--repeats 5] [--big 32]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

import tokensieve as ts
from tokensieve import rng
from tokensieve.reducers.base import REGISTRY, Reducer, Site, keep_top, ragged_count, register
from tokensieve.tokens import CLIP_KEY, Layout, TokenState

TARGET_EFFICIENCY = 0.9
PATHS = ("none", "packed", "padded", "one by one")


@register("per_video_random")
class PerVideoRandom(Reducer):
    """Benchmark-only: random tokens after the patch embedding, each clip keeping the share the
    benchmark gave its clip key (`budgets`), so a clip keeps the same tokens in a batch or alone."""

    keyed_random = True
    takes_ragged = True

    def __init__(self) -> None:
        super().__init__()
        self.budgets: dict[int, float] = {}  # clip key -> keep ratio

    def positions(self, depth: int) -> tuple[int, ...]:
        return (0,)

    def count(self, layout: Layout, site: Site) -> Layout:
        return ragged_count(layout, per_frame=False, method=self.name)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        keys, stream = self.draw_stream(state, site, 0)
        scores = rng.uniform_bits(keys, state.x.shape[1], stream=stream)  # (B, N) random ranks
        keep = torch.tensor([self.budgets[k] for k in state.aux[CLIP_KEY].tolist()], dtype=torch.float64)
        return keep_top(state, scores, keep)


def _timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        run()
    return time.perf_counter() - start


def measure(name: str, batch: int, repeats: int, warmup: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = ts.build(name).eval()
    cfg = model.config
    video = torch.randn(batch, cfg.frames, cfg.channels, cfg.size, cfg.size)
    keeps = torch.linspace(0.2, 1.0, batch).tolist()
    keys = rng.clip_keys(video).tolist()
    base_gflops = ts.flops(model, video=video[:1])
    reducer = ts.apply(model, "per_video_random").reducers[0]
    reducer.budgets = dict(zip(keys, keeps, strict=True))
    counted = ts.flops(model, video=video, detail=True)
    mean_gflops = counted.gflops
    plan = model.__dict__["installed"]

    def bare() -> None:
        plan.remove()
        model(video)
        plan.install()

    def packed() -> None:
        model(video)

    def padded() -> None:
        model.ragged = "padded"
        model(video)
        model.ragged = "packed"

    def one_by_one() -> None:
        for clip in video.split(1):
            model(clip)

    runs = dict(zip(PATHS, (bare, packed, padded, one_by_one), strict=True))
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for r in range(warmup + repeats):
        order = PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)]  # rotate: no path always follows another
        for path in order:
            seconds = _timed(runs[path])
            if r >= warmup:
                times[path].append(seconds)
        logging.info("%s batch %d round %d: %s", name, batch, r,
                     ", ".join(f"{p} {times[p][-1]:.2f}s" for p in PATHS if times[p]))  # fmt: skip
    median = {p: statistics.median(t) for p, t in times.items()}
    speedup = {p: median["none"] / median[p] for p in PATHS}
    ratio = base_gflops / mean_gflops
    return {
        "model": name, "clip": f"{cfg.frames}x{cfg.size}", "batch": batch, "threads": torch.get_num_threads(), "keeps": keeps,
        "per_clip_gflops": counted.per_clip, "base_gflops": base_gflops, "mean_gflops": mean_gflops,
        "gflops_ratio": ratio, "seconds": median, "speedup": speedup, "efficiency": speedup["packed"] / ratio,
        "times": times,
    }  # fmt: skip


def table(result: dict[str, object]) -> Table:
    t = Table(
        title=(
            f"{result['model']}, {result['clip']}, float32, batch {result['batch']}, {result['threads']} threads; "
            f"keep ratios {result['keeps'][0]:.1f}..{result['keeps'][-1]:.1f}; "
            f"GFLOPs per clip {result['base_gflops']:.1f} -> mean {result['mean_gflops']:.1f} "
            f"(ratio {result['gflops_ratio']:.2f})"
        )
    )
    for column in ("path", "s / batch", "speed-up", "efficiency"):
        t.add_column(column, justify="left" if column == "path" else "right")
    for path in PATHS:
        eff = f"{result['efficiency']:.2f}" if path == "packed" else "-"
        t.add_row(path, f"{result['seconds'][path]:.3f}", f"{result['speedup'][path]:.2f}x", eff)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["videomae-s", "videomae-b"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--big", type=int, default=32, help="a larger batch on the first model (0: skip)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    console = Console(width=140)
    cases = [(name, args.batch) for name in args.models]
    if args.big:
        cases.append((args.models[0], args.big))
    failures = []
    try:
        for name, batch in cases:
            result = measure(name, batch, args.repeats, args.warmup)
            console.print(table(result))
            s = result["seconds"]
            if result["efficiency"] < TARGET_EFFICIENCY:
                failures.append(
                    f"{name} batch {batch}: efficiency {result['efficiency']:.2f} < {TARGET_EFFICIENCY}"
                )
            for other in ("padded", "one by one"):
                if s["packed"] >= s[other]:
                    failures.append(
                        f"{name} batch {batch}: packed ({s['packed']:.3f}s) not faster than {other}"
                    )
    finally:
        REGISTRY.pop("per_video_random", None)
    console.print("targets: " + ("all met" if not failures else "MISSED: " + "; ".join(failures)))


if __name__ == "__main__":
    main()
