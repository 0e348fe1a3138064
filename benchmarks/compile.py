"""torch.compile against eager for the baseline and every fixed-budget method (`tokensieve bench --compile`).

For each dtype and batch size, one `ts.benchmark` runs the plans eagerly and one runs each plan as
`torch.compile(copy, dynamic=False)` of its own copy (compiled during the warm-up), back to back in this
process; each gives the speed-ups over its own unreduced model, and the table sets them side by side with
compiled / eager clips/s.

    python benchmarks/compile.py                                     # videomae-s, float32 and bfloat16, batch 1 and 8
    python benchmarks/compile.py --model videomae-tiny --batches 1 --repeats 2 --plans random:keep=0.5

About 30 minutes for the default on 2 CPU cores (each plan compiles once per dtype and batch size).
"""

from __future__ import annotations

import argparse
import logging

import torch

import tokensieve as ts
from tokensieve.bench import BenchResult, compact_table

PLANS = ["random:keep=0.5", "sta:r=64", "tome:r=100", "attention:keep=0.5", "uniform:keep=0.5"]


def table(eager: list[BenchResult], compiled: list[BenchResult], title: str):  # type: ignore[no-untyped-def]
    out = compact_table(title=title)
    for name in ("plan", "batch", "eager\nclips/s", "compiled\nclips/s", "compiled\n/ eager",
                 "eager\nspeed-up", "compiled\nspeed-up"):  # fmt: skip
        out.add_column(name, justify="left" if name == "plan" else "right", no_wrap=name == "plan")
    for e, c in zip(eager, compiled, strict=True):
        assert (e.plan, e.batch_size) == (c.plan, c.batch_size)
        out.add_row(e.plan, str(e.batch_size), f"{e.clips_per_s:.2f}", f"{c.clips_per_s:.2f}",
                    f"{c.clips_per_s / e.clips_per_s:.2f}x", f"{e.speedup:.2f}x", f"{c.speedup:.2f}x")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="videomae-s")
    parser.add_argument("--plans", default=",".join(PLANS), help="comma-separated fixed-budget specs")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from rich.console import Console

    console = Console(width=100)
    torch.manual_seed(0)
    model = ts.build(args.model)
    plans = [p for p in args.plans.split(",") if p]
    for dtype in args.dtypes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            runs = {
                flag: ts.benchmark(model, plans=plans, batch_size=batch, dtype=dtype, threads=args.threads,
                                   warmup=args.warmup, repeats=args.repeats, memory=False, compile=flag)
                for flag in (False, True)
            }  # fmt: skip
            first = runs[False][0]
            precision = f" ({first.precision})" if first.precision else ""
            console.print(table(runs[False], runs[True],
                                f"{args.model}, {dtype}{precision}, batch {batch}, {first.threads} threads, "
                                f"median of {args.repeats} rounds"))  # fmt: skip


if __name__ == "__main__":
    main()
