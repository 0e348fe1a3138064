"""LITE's selector and LITE++'s per-video budgets on the wall clock, against their FLOPs.

Random weights, 16x224 clips of random pixels (float32, `torch.inference_mode`, 2 threads: `--threads`).
Every number below is measured in one process, in interleaved rounds (the plans of a case run one after
the other, the order rotating every round), `--warmup` untimed rounds then `--repeats` timed ones, and
reported as the median over the timed rounds.

1. The selector's share of the forward, on videomae-s and videomae-b at batch 1 and 8: the wall-clock
   time of LITE's selector inside the `lite:keep=0.5` forward pass, read by forward hooks (perf_counter;
   CPU ops are synchronous) around its slot, so it is the time the real forward spends there: the MLP on
   every token of the clip (1568 at 16x224, hooks on the `Selector` module) plus the rest of the slot
   (top-k, index sort and gather of the kept tokens). Share = slot time / forward time, per round, then the
   median (the range is the interquartile range over rounds). As a cross-check, "alone": right after each
   of those forwards the slot is called 5 more times on the tokens it was given, and the median call over
   that round's forward. Its FLOP share is the selector's part of `ts.flops(model, detail=True).by_module`
   (its slot, "reducers.0"). Target: <= 2% of the forward, in time (inside the forward).

2. LITE++ (`lite++:keep=P`, the glance on 10% of the tokens deciding between P and the small budget 0.3)
   on videomae-b at batch 8, P = 0.5 and 0.7, next to the unreduced model and `lite:keep=0.5`. A random
   model is about equally unsure of every clip (confidences near 1/400), so the thresholds come from the
   batch: one pass measures each clip's glance confidence c, then `low=0` and `high` = the median of c,
   so half the clips (c > high) take the small budget. GFLOPs are counted clip by clip on the same batch
   (`ts.flops(model, video=batch)`, the glance included): the mean per clip. Efficiency = speed-up over the
   unreduced model / (GFLOPs unreduced / mean GFLOPs). Target: >= 0.9 for LITE++.
   Where the time goes is read by the same hooks: the patch embedding, the glance (the `adaptive` slot),
   the selector's MLP, the selection (the rest of the `lite` slot: top-k, or with per-clip budgets the
   ranking, `compact`'s host read of the counts and the gather), and the rest (the blocks, run packed on a
   ragged batch, and the head), each the median over rounds beside its GFLOPs per clip. "blocks eff." is
   the rest's own efficiency against the unreduced model: (its time there / here) / (its GFLOPs there /
   here), the median over rounds.

The batch-8 `lite:keep=0.5` rounds on videomae-b serve both parts. A speed-up is the median over rounds of
the paired ratio (the unreduced model's seconds in that round / the plan's), beside its interquartile range;
seconds per batch are medians. Pairs within a round cancel a change of load between rounds, which a ratio
of medians (`ts.benchmark`'s speed-up) does not: when another process started halfway through a run, three
of LITE++'s five rounds were slow but only two of the unreduced model's, and the ratio of medians gave an
efficiency of 0.52 where the paired median gave 0.96.

On a shared machine a load that comes and goes within a round still skews a pair (the unreduced model's
batch takes 25 s alone, twice that beside another process). So every run also reads how many cores the
rest of the machine used meanwhile (`/proc/stat` minus this process: `Others`; steal time included); a run
is quiet below `QUIET` (0.2 cores), and every number comes from the rounds in which all the runs it
compares were quiet ("quiet rounds" k/n), or from all rounds, marked "(all)", when fewer than 2 were.
Busy rounds matter most for small ops (a 2-thread op waits for a descheduled thread): on a busy machine
the selector's share at batch 1 reads 2-3% instead of 0.5%; the script says so when its time share exceeds
3x its GFLOP share, and when paired speed-ups disagree by more than `tokensieve.bench.BUSY_SPREAD` (15%).

A full run takes about 9 minutes on 2 idle cores (16 beside another busy process), most of it the batch-8
rounds on videomae-b (the unreduced model alone takes 28 s a round); `--repeats 3` cuts it to about 6.
`--quick` (videomae-s only, batch 1 and 4, LITE++ at batch 4, 3 rounds) takes about 1.5 minutes.

Run:  python benchmarks/lite.py [--quick] [--models videomae-s videomae-b] [--batch-sizes 1 8]
                                [--plus videomae-b 8] [--keeps 0.5 0.7] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

import tokensieve as ts
from tokensieve.bench import BUSY_SPREAD, compact_table
from tokensieve.flops import FlopCount
from tokensieve.reducers.base import BUDGETS, At
from tokensieve.reducers.plan import InstalledPlan
from tokensieve.tokens import TokenState

log = logging.getLogger("benchmarks.lite")

NONE, FIXED = "none", "lite:keep=0.5"
TARGET_SHARE = 0.02
TARGET_EFFICIENCY = 0.9
QUIET = 0.2
"""A run is quiet when the rest of the machine used at most this many cores meanwhile (`Others`)."""
MIN_QUIET = 2
"""Numbers come from the quiet rounds when at least this many were quiet, else from every round."""
SLOW_SELECTOR = 3
"""On 2 idle cores the selector's time share is 1.1-1.4x its GFLOP share (its last layer and GELUs are
memory-bound); past this factor its small ops were held up by another process (a busy machine)."""
REDUCERS = "reducers."
"""`FlopCount.by_module` parts of the plan's own work: its slots, "reducers.p"."""
PARTS = ("embed", "glance", "selector", "select", "rest")
"""Where a forward's time goes: the patch embedding, the `adaptive` slot (LITE++'s glance), LITE's MLP,
the rest of the `lite` slot (choosing and gathering the kept tokens), everything else (blocks, head)."""


# ---------------------------------------------------------------------------------------- timing
class Clock:
    """Wall-clock seconds spent inside named modules during a forward pass (forward pre/post hooks; on
    CPU every op is synchronous, so perf_counter around a module's call is its time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def watch(self, name: str, module: nn.Module) -> None:
        self.handles += [
            module.register_forward_pre_hook(functools.partial(self._enter, name)),
            module.register_forward_hook(functools.partial(self._exit, name)),
        ]

    def _enter(self, name: str, *_: object) -> None:
        self._start[name] = time.perf_counter()

    def _exit(self, name: str, *_: object) -> None:
        self.seconds[name] += time.perf_counter() - self._start.pop(name)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def slot(installed: InstalledPlan, method: str) -> At | None:
    """The place where `method` runs in `installed` (LITE and `adaptive` run once, before block 0)."""
    return next((s for s in installed.slots if s.reducer.name == method), None)


def watch_plan(clock: Clock, installed: InstalledPlan) -> None:
    """Hook the parts of `installed` that `parts` reads (not the blocks: watched blocks would not run
    packed, see `VideoBackbone._packed_run`)."""
    if (glance := slot(installed, "adaptive")) is not None:
        clock.watch(f"{installed.spec}/adaptive", glance)
    if (lite := slot(installed, "lite")) is not None:
        clock.watch(f"{installed.spec}/lite", lite)
        clock.watch(f"{installed.spec}/selector", lite.reducer.selector)


def parts(spec: str, total: float, seconds: dict[str, float]) -> dict[str, float]:
    """One forward's seconds split into `PARTS` (and "total") from the clock's readings."""
    embed = seconds.get("embed", 0.0)
    glance = seconds.get(f"{spec}/adaptive", 0.0)
    lite = seconds.get(f"{spec}/lite", 0.0)
    selector = seconds.get(f"{spec}/selector", 0.0)
    return {"total": total, "embed": embed, "glance": glance, "selector": selector, "select": lite - selector,
            "rest": total - embed - glance - lite}  # fmt: skip


class Others:
    """CPU time the rest of the machine used while a run ran, in cores: all CPUs' busy time (`/proc/stat`:
    user, nice, system, irq, softirq, and steal: time the hypervisor gave to other guests) minus this
    process's own. 0.0 where `/proc/stat` is missing (every run then counts as quiet)."""

    def __init__(self) -> None:
        self._start = (0.0, 0.0, 0.0)

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as stat:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(
                    int, stat.readline().split()[1:9]
                )
        except (OSError, ValueError):
            return 0.0
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self._start = (self._busy(), sum(os.times()[:2]), time.perf_counter())

    def cores(self) -> float:
        busy, mine, wall = self._busy(), sum(os.times()[:2]), time.perf_counter()
        return max(0.0, (busy - self._start[0]) - (mine - self._start[1])) / (wall - self._start[2])


def quiet_rounds(*series: list[dict[str, float]]) -> tuple[list[int], int]:
    """(rounds to use, how many were quiet): the rounds in which every run of `series` (per round, one per
    plan) had the rest of the machine below `QUIET` cores, or every round when fewer than `MIN_QUIET` were."""
    rounds = range(len(series[0]))
    quiet = [i for i in rounds if all(runs[i]["others"] <= QUIET for runs in series)]
    return (quiet if len(quiet) >= MIN_QUIET else list(rounds)), len(quiet)


def interleaved(
    model: ts.VideoBackbone,
    video: Tensor,
    plans: dict[str, InstalledPlan],
    *,
    warmup: int,
    repeats: int,
    label: str,
    alone: int = 5,
) -> dict[str, list[dict[str, float]]]:
    """Per plan, per timed round, the forward's seconds split into `PARTS` (and "total"), and "others":
    the cores the rest of the machine used meanwhile (`Others`); for a plan with a fixed-budget `lite`
    slot also "alone": right after its forward, the slot called `alone` times on the tokens it was given
    in that forward, the median seconds of a call."""
    clock, others = Clock(), Others()
    clock.watch("embed", model.embed)
    given: dict[str, TokenState] = {}
    for name, installed in plans.items():
        watch_plan(clock, installed)
        if (lite := slot(installed, "lite")) is not None and not installed.adaptive:
            clock.handles.append(lite.register_forward_pre_hook(functools.partial(_keep_input, given, name)))
    names = list(plans)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    try:
        with torch.inference_mode():
            for r in range(warmup + repeats):
                for i in range(len(names)):
                    name = names[(i + r) % len(names)]  # rotate: no plan always follows another
                    plans[name].install()
                    clock.seconds.clear()
                    others.start()
                    start = time.perf_counter()
                    model(video)
                    total = time.perf_counter() - start
                    run = {**parts(name, total, clock.seconds), "others": others.cores()}
                    if name in given:
                        run["alone"] = statistics.median(
                            _seconds(slot(plans[name], "lite"), given[name], alone)
                        )
                    if r >= warmup:
                        runs[name].append(run)
                timed = f"round {r - warmup + 1}/{repeats}" if r >= warmup else f"warm-up {r + 1}/{warmup}"
                log.info("%s %s: %s", label, timed,
                         ", ".join(f"{short(n)} {runs[n][-1]['total']:.2f}s (others {runs[n][-1]['others']:.2f})"
                                   for n in names if runs[n]))  # fmt: skip
    finally:
        clock.remove()
    return runs


def _keep_input(given: dict[str, TokenState], name: str, _module: nn.Module, args: tuple[TokenState]) -> None:
    given[name] = args[0]


def _seconds(module: nn.Module | None, state: TokenState, calls: int) -> list[float]:
    """Seconds of each of `calls` calls of `module` on `state`."""
    assert module is not None
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        module(state)
        out.append(time.perf_counter() - start)
    return out


def median(runs: list[dict[str, float]], key: str, rounds: Sequence[int] | None = None) -> float:
    """The median of `key` over `rounds` (default all) of `runs`."""
    return statistics.median(runs[i][key] for i in (range(len(runs)) if rounds is None else rounds))


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0])
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q1, q3)


# ---------------------------------------------------------------------------------------- counting
def plan_gflops(count: FlopCount) -> float:
    """GFLOPs per clip of the reducers' own work (their slots)."""
    return sum(v for k, v in count.by_module.items() if k.startswith(REDUCERS)) / count.clips / 1e9


def part_gflops(count: FlopCount, selector: float) -> dict[str, float]:
    """GFLOPs per clip of each of `PARTS`; `selector`: the selector's own GFLOPs per clip when the plan has
    one (the rest of the reducers' work is the glance)."""
    per_clip = {k: v / count.clips / 1e9 for k, v in count.by_module.items()}
    rest = sum(v for k, v in per_clip.items() if not k.startswith((REDUCERS, "embed")))
    return {"total": count.gflops, "embed": per_clip.get("embed", 0.0), "glance": plan_gflops(count) - selector,
            "selector": selector, "select": 0.0, "rest": rest}  # fmt: skip


def confidences(model: ts.VideoBackbone, video: Tensor, keep: float) -> Tensor:
    """(B,) each clip's glance confidence, read from the `adaptive` slot of one forward pass (every clip
    on the small budget, the cheapest pass: the confidence does not depend on the budget)."""
    installed = ts.apply(model, f"lite++:keep={keep},low=0,high=0")
    seen: list[Tensor] = []
    handle = slot(installed, "adaptive").register_forward_hook(  # type: ignore[union-attr]
        lambda _m, _a, out: seen.append(out.aux[BUDGETS].confidence)
    )
    try:
        with torch.inference_mode():
            model(video)
    finally:
        handle.remove()
        installed.remove()
    return seen[0].float().cpu()


# ---------------------------------------------------------------------------------------- cases
@dataclass
class Share:
    """Part 1: the selector's share of the `lite:keep=0.5` forward at one model and batch size."""

    model: str
    batch: int
    clip: str
    quiet: int
    """Timed rounds in which the rest of the machine was quiet (`quiet_rounds`)."""
    rounds: int
    used: int
    """Rounds the numbers come from: the quiet ones, or all when fewer than `MIN_QUIET` were."""
    forward_s: float
    mlp_s: float
    select_s: float
    share: float
    share_iqr: tuple[float, float]
    alone_s: float
    alone_share: float
    alone_iqr: tuple[float, float]
    flop_share: float
    selector_gflops: float
    gflops: float
    others: tuple[float, ...] = ()
    """Cores the rest of the machine used during each round's forward."""


@dataclass
class PlusRow:
    """Part 2: one plan at the LITE++ case."""

    plan: str
    small_share: float | None
    gflops: float
    per_clip: tuple[float, ...]
    gflops_ratio: float
    quiet: int
    """Rounds in which both this plan's and the unreduced model's runs were quiet (`quiet_rounds`)."""
    rounds: int
    used: int
    """Rounds (pairs) the numbers come from: the quiet ones, or all when fewer than `MIN_QUIET` were."""
    seconds: float
    speedup: float
    speedup_iqr: tuple[float, float]
    efficiency: float
    time_parts: dict[str, float] = field(default_factory=dict)
    gflops_parts: dict[str, float] = field(default_factory=dict)
    blocks_efficiency: float = 1.0
    times: tuple[float, ...] = ()
    """Seconds per batch of every timed round, in round order."""
    others: tuple[float, ...] = ()
    """Cores the rest of the machine used during each of them."""

    @property
    def spread(self) -> float:
        """The interquartile range of the per-round paired speed-ups over the speed-up."""
        return (self.speedup_iqr[1] - self.speedup_iqr[0]) / self.speedup


def plus_spec(keep: float, high: float) -> str:
    return f"lite++:keep={keep},low=0,high={high!r}"


def count(model: ts.VideoBackbone, video: Tensor) -> FlopCount:
    """The installed plan's `FlopCount` on `video`, clip by clip."""
    result = ts.flops(model, video=video, detail=True)
    assert isinstance(result, FlopCount)
    return result


def small_when_alone(per_clip: Sequence[float]) -> int:
    """How many clips took the small budget when counted alone: those in the cheaper of the two GFLOPs
    levels (0 when every clip costs the same)."""
    lo, hi = min(per_clip), max(per_clip)
    return sum(g < (lo + hi) / 2 for g in per_clip) if hi - lo > 1e-6 * hi else 0


def run_case(
    name: str, batch: int, *, plus_keeps: Sequence[float], warmup: int, repeats: int, seed: int = 0
) -> tuple[Share, list[PlusRow], dict[str, object]]:
    """One model and batch size: part 1 always; part 2 when `plus_keeps` is not empty."""
    torch.manual_seed(seed)
    model = ts.build(name, num_classes=400).eval()
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, cfg.frames, cfg.channels, cfg.size, cfg.size, generator=generator)
    label = f"{name} batch {batch}"

    plans: dict[str, InstalledPlan] = {}
    counts: dict[str, FlopCount] = {}
    if plus_keeps:
        plans[NONE] = ts.apply(model, None)
        counts[NONE] = count(model, video[:1])
    plans[FIXED] = ts.apply(model, FIXED)
    counts[FIXED] = count(model, video[:1])
    selector_gflops = plan_gflops(counts[FIXED])
    conf: list[float] = []
    high = 1.0
    if plus_keeps:
        log.info("%s: the glance's confidence in every clip", label)
        conf = confidences(model, video, plus_keeps[0]).tolist()
        high = statistics.median(conf)  # c > high: half the clips take the small budget
        for keep in plus_keeps:
            spec = plus_spec(keep, high)
            plans[spec] = ts.apply(model, spec)
            log.info("%s: counting the GFLOPs of %s clip by clip", label, short(spec))
            counts[spec] = count(model, video)

    runs = interleaved(model, video, plans, warmup=warmup, repeats=repeats, label=label)

    fixed = runs[FIXED]
    used, quiet = quiet_rounds(fixed)
    per_round = [(fixed[i]["selector"] + fixed[i]["select"]) / fixed[i]["total"] for i in used]
    alone = [fixed[i]["alone"] / fixed[i]["total"] for i in used]
    share = Share(
        model=name, batch=batch, clip=f"{cfg.frames}x{cfg.size}", quiet=quiet, rounds=len(fixed), used=len(used),
        forward_s=median(fixed, "total", used), mlp_s=median(fixed, "selector", used),
        select_s=median(fixed, "select", used), share=statistics.median(per_round), share_iqr=quartiles(per_round),
        alone_s=median(fixed, "alone", used), alone_share=statistics.median(alone), alone_iqr=quartiles(alone),
        flop_share=selector_gflops / counts[FIXED].gflops, selector_gflops=selector_gflops,
        gflops=counts[FIXED].gflops, others=tuple(r["others"] for r in fixed),
    )  # fmt: skip
    if not plus_keeps:
        return share, [], {}

    rows = []
    base = runs[NONE]
    base_parts = part_gflops(counts[NONE], 0.0)
    small = sum(c > high for c in conf)
    for spec, installed in plans.items():
        mine = runs[spec]
        used, quiet = quiet_rounds(base, mine)
        paired = [base[i]["total"] / mine[i]["total"] for i in used]  # the pairs of a round
        ratio = counts[NONE].gflops / counts[spec].gflops
        gparts = part_gflops(counts[spec], 0.0 if spec == NONE else selector_gflops)
        rest_ratio = base_parts["rest"] / gparts["rest"]
        if installed.adaptive and small_when_alone(counts[spec].per_clip) != small:
            log.warning("%s: %d clips on the small budget in the batch, %d when counted alone", short(spec),
                        small, small_when_alone(counts[spec].per_clip))  # fmt: skip
        rows.append(
            PlusRow(
                plan=spec, small_share=small / batch if installed.adaptive else None,
                gflops=counts[spec].gflops, per_clip=counts[spec].per_clip, gflops_ratio=ratio,
                quiet=quiet, rounds=len(mine), used=len(used), seconds=median(mine, "total", used),
                speedup=statistics.median(paired), speedup_iqr=quartiles(paired),
                efficiency=statistics.median(paired) / ratio, time_parts={p: median(mine, p, used) for p in PARTS},
                gflops_parts=gparts, times=tuple(r["total"] for r in mine), others=tuple(r["others"] for r in mine),
                blocks_efficiency=statistics.median(base[i]["rest"] / mine[i]["rest"] / rest_ratio for i in used),
            )
        )  # fmt: skip
    return share, rows, {"confidences": conf, "low": 0.0, "high": high}


# ---------------------------------------------------------------------------------------- output
def share_table(shares: Sequence[Share]) -> Table:
    table = compact_table()
    columns = ("model", "batch", "quiet\nrounds", "forward\ns", "MLP\nms", "top-k\nms", "share\nin fwd", "IQR", "alone\nms",
               "share\nalone", "IQR", "GFLOPs\nselector", "GFLOP\nshare")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for s in shares:
        table.add_row(
            s.model, str(s.batch), quiet_cell(s.quiet, s.rounds, s.used), f"{s.forward_s:.3f}", f"{1e3 * s.mlp_s:.1f}", f"{1e3 * s.select_s:.1f}",
            f"{100 * s.share:.2f}%", percent_range(s.share_iqr), f"{1e3 * s.alone_s:.1f}",
            f"{100 * s.alone_share:.2f}%", percent_range(s.alone_iqr), f"{s.selector_gflops:.3f}",
            f"{100 * s.flop_share:.2f}%",
        )  # fmt: skip
    return table


def quiet_cell(quiet: int, rounds: int, used: int) -> str:
    """ "3/5": the numbers come from the 3 quiet rounds of 5; "0/5 (all)": too few were quiet, all are used."""
    return f"{quiet}/{rounds}" + (" (all)" if used == rounds and quiet < rounds else "")


def percent_range(q: tuple[float, float]) -> str:
    return f"{100 * q[0]:.2f}-{100 * q[1]:.2f}%"


def plus_table(rows: Sequence[PlusRow]) -> Table:
    table = compact_table()
    columns = (
        "plan",
        "small",
        "GFLOPs",
        "GFLOPs\nratio",
        "quiet\nrounds",
        "s /\nbatch",
        "speed-\nup",
        "IQR",
        "effi-\nciency",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "plan" else "right")
    for r in rows:
        table.add_row(
            short(r.plan), "-" if r.small_share is None else f"{100 * r.small_share:.0f}%", f"{r.gflops:.1f}",
            f"{r.gflops_ratio:.2f}x", quiet_cell(r.quiet, r.rounds, r.used), f"{r.seconds:.2f}", f"{r.speedup:.2f}x",
            "-" if r.plan == NONE else f"{r.speedup_iqr[0]:.2f}-{r.speedup_iqr[1]:.2f}", f"{r.efficiency:.2f}",
            style="dim" if r.plan == NONE else None,
        )  # fmt: skip
    return table


def profile_table(rows: Sequence[PlusRow]) -> Table:
    table = compact_table()
    table.add_column("plan")
    for p in PARTS:
        table.add_column({"select": "top-k etc.", "rest": "blocks+head"}.get(p, p), justify="right")
    table.add_column("blocks\neff.", justify="right")
    for r in rows:
        cells = []
        for p in PARTS:
            ms, g = 1e3 * r.time_parts[p], r.gflops_parts[p]
            if p == "select":
                cells.append("-" if ms < 0.05 else f"{ms:.1f}")
            else:
                cells.append("-" if ms < 0.05 and g == 0 else f"{ms:.0f} ({g:.2f})")
        style = "dim" if r.plan == NONE else None
        table.add_row(short(r.plan), *cells, f"{r.blocks_efficiency:.2f}", style=style)
    return table


def short(spec: str) -> str:
    """A LITE++ spec without its thresholds (they are in the title)."""
    return spec.split(",low=")[0]


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="videomae-s only, batch 1 and 4, 3 rounds")
    parser.add_argument("--models", nargs="+", default=None, help="part 1 (default videomae-s videomae-b)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="part 1 (default 1 8)")
    parser.add_argument("--plus", nargs=2, default=None, metavar=("MODEL", "BATCH"),
                        help="part 2's model and batch size (default videomae-b 8); BATCH 0 skips it")  # fmt: skip
    parser.add_argument("--keeps", nargs="+", type=float, default=[0.5, 0.7], help="LITE++'s base budgets P")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; --quick 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.models = args.models or (["videomae-s"] if quick else ["videomae-s", "videomae-b"])
    args.batch_sizes = args.batch_sizes or ([1, 4] if quick else [1, 8])
    plus = args.plus or (["videomae-s", "4"] if quick else ["videomae-b", "8"])
    args.plus = (plus[0], int(plus[1]))
    args.repeats = args.repeats or (3 if quick else 5)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    console = Console(width=120)
    cases = [(name, batch) for name in args.models for batch in args.batch_sizes]
    if args.plus[1] and args.plus not in cases:
        cases.append(args.plus)
    shares: list[Share] = []
    plus: tuple[list[PlusRow], dict[str, object]] | None = None
    for name, batch in cases:
        keeps = args.keeps if (name, batch) == args.plus else ()
        share, rows, info = run_case(name, batch, plus_keeps=keeps, warmup=args.warmup, repeats=args.repeats)
        shares.append(share)
        if rows:
            plus = (rows, info)

    threads = torch.get_num_threads()
    clip = f"{shares[0].clip}, float32, {threads} threads, medians over the quiet of {args.repeats} rounds"
    console.print(
        f"\n1. LITE's selector in the {FIXED} forward ({clip}): its MLP on every token and the top-k, "
        "timed inside the forward (hooks) and alone (the slot called again on the same tokens); its GFLOPs"
    )
    console.print(share_table(shares))
    failures = [
        f"{s.model} batch {s.batch}: selector {100 * s.share:.2f}% of the forward > {100 * TARGET_SHARE:.0f}%"
        for s in shares
        if s.share > TARGET_SHARE
    ]
    slow = [s for s in shares if s.share > SLOW_SELECTOR * s.flop_share]
    if slow:
        console.print(
            f"the selector ran slow for its FLOPs ({', '.join(f'{s.model} batch {s.batch}' for s in slow)}: time "
            f"share > {SLOW_SELECTOR}x its GFLOP share): small ops wait for a descheduled thread on a busy machine"
        )
    if plus is not None:
        rows, info = plus
        name, batch = args.plus
        conf: list[float] = info["confidences"]  # type: ignore[assignment]
        console.print(
            f"\n2. LITE++ on {name}, batch {batch} ({clip}). Glance confidences {min(conf):.5f}..{max(conf):.5f}; "
            f"thresholds low=0, high={info['high']:.5f} (their median): clips above it take the small budget"
        )
        console.print(plus_table(rows))
        console.print("\n   Where the time goes: ms per batch (GFLOPs per clip)")
        console.print(profile_table(rows))
        failures += [
            f"{name} batch {batch} {short(r.plan)}: efficiency {r.efficiency:.2f} < {TARGET_EFFICIENCY}"
            for r in rows
            if r.small_share is not None and r.efficiency < TARGET_EFFICIENCY
        ]
        busy = [r for r in rows if r.plan != NONE and r.spread > BUSY_SPREAD]
        if busy:
            worst = max(busy, key=lambda r: r.spread)
            console.print(
                f"the machine was busy: the paired speed-ups of {len(busy)} plan(s) disagree by more than "
                f"{BUSY_SPREAD:.0%} (IQR / speed-up), most for {short(worst.plan)} ({worst.spread:.0%})"
            )
    loud = [f"{s.model} batch {s.batch}" for s in shares if s.used == s.rounds and s.quiet < s.rounds]
    loud += [
        f"{short(r.plan)}" for r in (plus[0] if plus else []) if r.used == r.rounds and r.quiet < r.rounds
    ]
    if loud:
        console.print(
            f"fewer than {MIN_QUIET} quiet rounds (another process used > {QUIET} cores) for {', '.join(loud)}: "
            "those numbers come from every round, on a busy machine"
        )
    console.print(
        f"targets: selector <= {100 * TARGET_SHARE:.0f}% of the forward; LITE++ efficiency >= {TARGET_EFFICIENCY}"
    )
    console.print("all targets met" if not failures else "MISSED: " + "; ".join(failures))
    doc = {
        "threads": threads, "warmup": args.warmup, "repeats": args.repeats,
        "shares": [asdict(s) for s in shares],
        "plus": None if plus is None else {"model": args.plus[0], "batch": args.plus[1], **plus[1],
                                           "rows": [asdict(r) for r in plus[0]]},
        "failures": failures,
    }  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
