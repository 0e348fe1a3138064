"""TokenLearner on the wall clock: its own share of the forward and how much of its GFLOPs saving the clock
sees, on videomae-b with 8 learned tokens per slice at the middle (block 6 of 12), batch 1 and 8.

videomae-b (16x224: 8 slices of 14x14 tokens), random weights and pixels (timing does not depend on them:
TokenLearner's count is fixed), float32, `torch.inference_mode`, `ts.benchmark`'s interleaved rounds with
the unreduced model measured in the same process (tokensieve.bench has the method). Rows: the released
V1.1 module (`tokenlearner`, the targets' row), the paper's V1 (three 3x3 convolutions over each slice's
grid), and both TokenFusers (TokenLearner -> block -> fuser at every block from the middle on, the
full-resolution tokens kept in between), whose own share includes the fusers.

Targets for `tokenlearner:at=0.5,tokens=8`: its own share <= 3% of the forward, and efficiency (speed-up /
GFLOPs ratio) >= 0.9, at batch 1 and 8.

About 8 minutes on 2 idle cores.

Run:  python benchmarks/tokenlearner.py [--batch-sizes 1 8] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console

import tokensieve as ts
from tokensieve.bench import format_table, to_json

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/reducers.py's target check
from reducers import misses, timing_arguments

MODEL = "videomae-b"
TARGET = "tokenlearner:at=0.5,tokens=8"
PLANS = (
    TARGET,
    "tokenlearner:at=0.5,tokens=8,version=1",
    "tokenlearner:at=0.5,tokens=8,fuser=released",
    "tokenlearner:at=0.5,tokens=8,fuser=paper",
)
TARGET_EFFICIENCY = 0.9
TARGET_SHARE = 0.03


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    timing_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = ts.build(args.model)
    results = ts.benchmark(model, plans=PLANS, batch_size=args.batch_sizes, threads=args.threads,
                           warmup=args.warmup, repeats=args.repeats)  # fmt: skip
    first = results[0]
    console = Console(width=130)
    title = (
        f"TokenLearner on {args.model}, {first.frames}x{first.size}, float32, {first.threads} threads, "
        f"median of {args.repeats} rounds"
    )
    console.print(format_table(results, title=title))
    failures = [miss for r in results if r.plan == TARGET
                for miss in misses(r, efficiency=TARGET_EFFICIENCY, share=TARGET_SHARE)]  # fmt: skip
    if args.json:
        args.json.write_text(to_json(results))
    console.print(
        f"targets for {TARGET}: efficiency >= {TARGET_EFFICIENCY}, own share <= {100 * TARGET_SHARE:.0f}%"
    )
    console.print("MISSED: " + "; ".join(failures) if failures else "all targets met")


if __name__ == "__main__":
    main()
