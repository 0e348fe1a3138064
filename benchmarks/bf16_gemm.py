"""Where bfloat16 loses the token saving on CPU: the cost per token row of the linear layers of a ViT
block, by the number of rows (batch x tokens), in float32 and bfloat16.

A reduction plan makes the blocks' matrix products shorter (fewer rows M = batch x tokens); its speed-up
follows the GFLOPs only if a product's time falls with M. In float32 it does (oneDNN/MKL: about the same
microseconds per row from 196 rows to 1568). In bfloat16 (AMX on this Xeon) the time per row about doubles
below roughly 1000 rows at 2 threads: a videomae-s clip halved (1568 -> 784 tokens) falls below it at
batch 1, not at batch 8 (6272 rows), which is where `tokensieve bench --dtype bfloat16` found efficiency
0.78 for `random:keep=0.5` at batch 1 and 1.10 at batch 8. Packed once (the last column, what the blocks
run since), the curve is flatter (2.15 us per row at 784 rows, 1.51 at 1568; 2.53 and 1.71 unpacked) and
random reaches 0.87 at batch 1; what is left of it is mostly fc2 (4C -> C).

The second table splits the packed column by product. fc2 is oneDNN's choice, not a fixed cost of ours: its
time per row doubles below 1024 rows at 2 threads (videomae-s: 0.99 us at 784 rows, 0.49 at 1024) and for
width 768 a product of 784 rows takes as long as one of 1568. The kernel is the same (`brg_matmul` with AMX,
ONEDNN_VERBOSE=1); what changes is how oneDNN splits the work between the threads, and with it the order of
the sums (cutting the rows into tiles changes the result bits). Tiles of 256-384 rows run some of these
shapes 1.4x faster and others slower, a pattern that moves with the width and the thread count: not a rule
to ship (docs/design.md, "Performance on CPU").

Times `torch.nn.functional.linear` for the four products of a block of width `--dim` (qkv: C -> 3C,
proj: C -> C, fc1: C -> 4C, fc2: 4C -> C), median of `--repeats` runs after warm-up, per row count; and
the blocks' `layers.Linear` in bfloat16, whose weight is packed once for oneDNN (`F.linear` has it
reordered at every call: the fixed cost that made the time per row fall with the rows).

Run:  python benchmarks/bf16_gemm.py [--dim 384] [--threads 2] [--rows 196 392 784 1000 1568 3136]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from tokensieve.backbones.layers import Linear

ROWS = (196, 392, 784, 1000, 1176, 1568, 3136, 6272)


def seconds(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384, help="block width C (videomae-s: 384, -b: 768)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    C = args.dim
    shapes = {"qkv": (C, 3 * C), "proj": (C, C), "fc1": (C, 4 * C), "fc2": (4 * C, C)}
    table = Table("rows", "float32 us/row", "bfloat16 us/row", "bfloat16 packed us/row", "packed speed-up",
                  title=f"linear layers of one block, width {C}, {args.threads} threads (sum of qkv, proj, fc1, fc2)")  # fmt: skip
    per_layer = Table("rows", *shapes, title="the same, bfloat16 packed, us per row of each product")
    for rows in args.rows:
        per_row = {}
        for dtype in (torch.float32, torch.bfloat16):
            total = 0.0
            for k, n in shapes.values():
                x = torch.randn(rows, k, dtype=dtype)
                w, b = torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
                with torch.inference_mode():
                    total += seconds(lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b), args.repeats)
            per_row[dtype] = 1e6 * total / rows
        layer_us = {}
        for name, (k, n) in shapes.items():
            x, layer = torch.randn(rows, k, dtype=torch.bfloat16), Linear(k, n).to(torch.bfloat16)
            with torch.inference_mode():
                layer_us[name] = 1e6 * seconds(lambda x=x, layer=layer: layer(x), args.repeats) / rows
        packed = sum(layer_us.values())
        per_layer.add_row(str(rows), *(f"{v:.2f}" for v in layer_us.values()))
        table.add_row(str(rows), f"{per_row[torch.float32]:.2f}", f"{per_row[torch.bfloat16]:.2f}", f"{packed:.2f}",
                      f"{per_row[torch.float32] / packed:.2f}x")  # fmt: skip
    Console(width=110).print(table)
    Console(width=110).print(per_layer)


if __name__ == "__main__":
    main()
