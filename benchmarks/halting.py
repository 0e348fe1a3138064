"""HaltingVT on the wall clock: halted tokens leaving the computation (`halted=remove`, ours) against the
released code's zeroed-but-attended tokens (`halted=zero`), next to the unreduced model.

`haltingvt-s` (8x224, DeiT-S widths, 2 divided + 10 joint blocks), random weights, random pixels, float32,
`torch.inference_mode`, batch 8 (`--batch`), 2 threads (`--threads`). A trained-looking halting pattern
without training: with the Glimpser at R = 0.5, beta is set by bisection (gamma = 10) so that the mean
GFLOPs per clip on the timed batch come nearest to the paper's 20.5 (Table 1, R = 0.5 with the Motion
Loss; `--target`); tokens then halt at different blocks, set by their own channel 0, and clips keep
different counts. Both variants run with that beta, so they halt the same tokens: `halted=zero` computes
the same readout at the unreduced model's cost.

Every number is measured in one process, in interleaved rounds (benchmarks/lite.py's `interleaved`: the
order rotates, the rest of the machine's load is read from /proc/stat, and the numbers come from the
rounds in which every run was quiet, or all rounds, marked, when fewer than 2 were), `--warmup` untimed,
`--repeats` timed. Speed-up: the median over rounds of the paired ratio (the unreduced model's seconds in
that round / the plan's). GFLOPs: each clip's own, counted on the timed batch (`ts.flops(model,
video=batch)`), their mean. Efficiency = speed-up / (unreduced GFLOPs / mean GFLOPs). For `halted=zero` the
GFLOPs the paper would count from its token counts are those of `halted=remove` ("paper GFLOPs"). The
Glimpser alone (`glimpser:keep=0.5`) is measured too: the released code does gather the Glimpser's tokens,
so its zeroed halting is as fast as the Glimpser alone ("vs glimpser" about 1.0x): halting saves nothing.

Targets: efficiency >= 0.9 for `halted=remove`; `halted=zero` about 1.0x over the Glimpser alone.

About 4 minutes on 2 idle cores (the unreduced batch takes about 10 s); `--quick` (batch 2, 3 rounds) 1.

Run:  python benchmarks/halting.py [--quick] [--batch 8] [--target 20.5] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

import tokensieve as ts
from tokensieve.bench import BUSY_SPREAD

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/lite.py's rounds and load reading
from lite import MIN_QUIET, QUIET, interleaved, quartiles, quiet_rounds

log = logging.getLogger("benchmarks.halting")

MODEL = "haltingvt-s"
GLIMPSER = 0.5
TARGET_GFLOPS = 20.5  # HaltingVT Table 1: R = 0.5 with the Motion Loss, GFLOPs/V
TARGET_EFFICIENCY = 0.9
NONE = "none"
GLIMPSE = f"glimpser:keep={GLIMPSER}"  # the Glimpser alone: what the released code saves


def spec(beta: float, halted: str) -> str:
    return f"halting:beta={beta:.4f},glimpser={GLIMPSER},halted={halted}"


def mean_gflops(model: ts.VideoBackbone, video: Tensor) -> float:
    return ts.flops(model, video=video).__float__()


def choose_beta(
    model: ts.VideoBackbone, video: Tensor, target: float, steps: int = 12
) -> tuple[float, float]:
    """(beta, mean GFLOPs) nearest `target` by bisection: a larger beta halts later and costs more."""
    low, high = -5.0, 20.0
    best = (low, float("inf"))
    for _ in range(steps):
        beta = (low + high) / 2
        ts.apply(model, spec(beta, "remove"))
        gflops = mean_gflops(model, video)
        if abs(gflops - target) < abs(best[1] - target):
            best = (beta, gflops)
        low, high = (beta, high) if gflops < target else (low, beta)
    return best


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 2, 3 rounds")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--batch", type=int, default=None, help="default 8; --quick 2")
    parser.add_argument("--target", type=float, default=TARGET_GFLOPS, help="mean GFLOPs per clip to halt at")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; --quick 3)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    batch = args.batch or (2 if args.quick else 8)
    repeats = args.repeats or (3 if args.quick else 5)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ts.build(args.model).eval()
    cfg = model.config
    video = torch.rand(
        batch, cfg.frames, cfg.channels, cfg.size, cfg.size, generator=torch.Generator().manual_seed(0)
    )
    video = ts.data.transforms.normalize(video, cfg.mean, cfg.std)
    full = float(ts.flops(model))
    beta, _ = choose_beta(model, video, min(args.target, full))
    log.info(
        "beta %.4f (gamma 10, glimpser %s) halts at about %.1f GFLOPs per clip", beta, GLIMPSER, args.target
    )
    plans = {NONE: ts.apply(model, None), GLIMPSE: ts.apply(model, GLIMPSE)}
    gflops = {NONE: full, GLIMPSE: float(ts.flops(model))}
    per_clip: dict[str, list[float]] = {}
    for halted in ("remove", "zero"):
        name = spec(beta, halted)
        plans[name] = ts.apply(model, name)
        count = ts.flops(model, video=video, detail=True)
        gflops[name], per_clip[name] = float(count.gflops), list(count.per_clip)
    runs = interleaved(model, video, plans, warmup=args.warmup, repeats=repeats, label=f"batch {batch}")
    rounds, quiet = quiet_rounds(*runs.values())
    remove = spec(beta, "remove")
    rows = []
    for name in plans:
        ratios = [runs[NONE][i]["total"] / runs[name][i]["total"] for i in rounds]
        speedup = statistics.median(ratios)
        q1, q3 = quartiles(ratios)
        counted = (
            gflops[remove] if name.startswith("halting") else gflops[name]
        )  # the paper's, from token counts
        rows.append({
            "plan": name, "seconds": statistics.median(runs[name][i]["total"] for i in rounds),
            "gflops": gflops[name], "paper_gflops": counted, "speedup": speedup, "spread": (q3 - q1) / speedup,
            "over_glimpser": statistics.median(runs[GLIMPSE][i]["total"] / runs[name][i]["total"] for i in rounds),
            "efficiency": speedup / (full / gflops[name]), "paper_efficiency": speedup / (full / counted),
            "clips": per_clip.get(name),
        })  # fmt: skip
    table = Table("plan", "s / batch", "GFLOPs / clip", "paper GFLOPs", "speed-up", "IQR", "vs glimpser",
                  "efficiency", "vs paper GFLOPs")  # fmt: skip
    for r in rows:
        table.add_row(
            r["plan"].replace(f"halting:beta={beta:.4f},glimpser={GLIMPSER},halted=", "halting "),
            f"{r['seconds']:.2f}",
            f"{r['gflops']:.2f}", f"{r['paper_gflops']:.2f}", f"{r['speedup']:.2f}x", f"{100 * r['spread']:.0f}%",
            f"{r['over_glimpser']:.2f}x", f"{r['efficiency']:.2f}", f"{r['paper_efficiency']:.2f}",
        )  # fmt: skip
    console = Console(width=130)
    clips = per_clip[remove]
    console.print(
        f"\nHaltingVT on {args.model}, batch {batch}, float32, {torch.get_num_threads()} threads; halting:beta={beta:.4f}"
        f",glimpser={GLIMPSER} (gamma 10); clips cost {min(clips):.1f}..{max(clips):.1f} GFLOPs with halted=remove; "
        f"medians over {len(rounds)} of {repeats} rounds ({quiet} quiet)"
    )
    console.print(table)
    if len(rounds) == repeats and quiet < repeats and quiet < MIN_QUIET:
        console.print(
            f"fewer than {MIN_QUIET} quiet rounds (another process used > {QUIET} cores): every round used"
        )
    failures = [f"halted=remove efficiency {r['efficiency']:.2f} < {TARGET_EFFICIENCY}" for r in rows
                if r["plan"] == remove and r["efficiency"] < TARGET_EFFICIENCY]  # fmt: skip
    if any(r["spread"] > BUSY_SPREAD for r in rows if r["plan"] != NONE):
        console.print(f"the machine was busy: paired speed-ups disagree by more than {BUSY_SPREAD:.0%}")
    console.print("all targets met" if not failures else "MISSED: " + "; ".join(failures))
    doc = {"model": args.model, "batch": batch, "beta": beta, "threads": torch.get_num_threads(),
           "repeats": repeats, "quiet": quiet, "rows": rows, "failures": failures}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
