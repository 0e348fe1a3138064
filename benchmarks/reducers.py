"""Real speed-ups of the training-free methods against the unreduced baseline, in one process.

For videomae-s and videomae-b (16x224, float32, random weights: timing does not depend on them for
fixed-budget methods), batch 1 and 8, every method's main setting (`tokensieve.bench.main_plans`):
GFLOPs ratio, measured speed-up, efficiency = speed-up / GFLOPs ratio, and the reducers' own share
of the forward time. Then the targets: efficiency >= 0.9 for random, STA and ToMe at their main
settings, reducer share <= 3% for every method.

The same table per model, from the command line:

    tokensieve bench --model videomae-b --methods -b 1 -b 8 --warmup 1 --repeats 5

Run:  python benchmarks/reducers.py [--models videomae-s videomae-b] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console

import tokensieve as ts
from tokensieve.bench import BenchResult, format_table, main_plans, to_json

TARGET_EFFICIENCY = 0.9
TARGET_SHARE = 0.03
EFFICIENCY_METHODS = ("random", "sta", "tome")


def timing_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a `ts.benchmark` run: batch sizes, warm-up and timed rounds, threads, --json."""
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")


def misses(r: BenchResult, *, efficiency: float | None, share: float) -> list[str]:
    """The targets result `r` misses: efficiency (speed-up / GFLOPs ratio) >= `efficiency` (None: not a
    target) and the reducers' own share of the forward <= `share`."""
    found = []
    if efficiency is not None and r.efficiency < efficiency:
        found.append(f"batch {r.batch_size} {r.plan}: efficiency {r.efficiency:.2f} < {efficiency}")
    if r.reducer_share is not None and r.reducer_share > share:
        found.append(
            f"batch {r.batch_size} {r.plan}: reducer share {100 * r.reducer_share:.1f}% > {100 * share:.0f}%"
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["videomae-s", "videomae-b"])
    timing_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    console = Console(width=120)
    plans = main_plans()
    failures, everything = [], []
    for name in args.models:
        model = ts.build(name)
        results = ts.benchmark(
            model, plans=plans, batch_size=args.batch_sizes, threads=args.threads,
            warmup=args.warmup, repeats=args.repeats,
        )  # fmt: skip
        everything += results
        first = results[0]
        title = f"{name}, {first.frames}x{first.size}, float32, {first.threads} threads, median of {args.repeats} rounds"
        console.print(format_table(results, title=title))
        for r in results:
            if not r.is_baseline:
                efficiency = TARGET_EFFICIENCY if r.plan.split(":")[0] in EFFICIENCY_METHODS else None
                failures += [
                    f"{name} {miss}" for miss in misses(r, efficiency=efficiency, share=TARGET_SHARE)
                ]
    if args.json:
        args.json.write_text(to_json(everything))
    console.print(
        f"targets: efficiency >= {TARGET_EFFICIENCY} for {', '.join(EFFICIENCY_METHODS)}; reducer share <= 3%"
    )
    console.print("\n".join(failures) if failures else "all targets met")


if __name__ == "__main__":
    main()
