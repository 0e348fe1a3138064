"""The sweep's statistics, its report (`report.md`), its Pareto plot (`pareto.png`) and its terminal table.

    ci = paired_bootstrap_ci(method_correct, random_correct)      # 95% interval of the mean difference
    verdict(ci)                                                   # "beats random", ...
    verdict(ci, against="resize")                                 # "beats resize", ...
    write_report(SweepReport(settings, header, examples), Path("sweep"))
    Console().print(terminal_table(report))

The sweep engine (`tokensieve sweep`) evaluates every token-reduction method at a grid of budgets and
fills one `Setting` per (method, budget), comparing it with the stronger of two baselines at matched
GFLOPs: `random` (over `RANDOM_SEEDS` seeds) and `resize` (the model on smaller frames). This module
holds what it hands over and what is computed and written from it; it never runs a model.

Statistics (numpy, deterministic given `seed`):
- `bootstrap_ci(values)`: percentile bootstrap interval of the mean of per-video numbers (0/1
  correctness, or correctness averaged over seeds). `samples` resamples of the n videos, drawn with
  replacement as one (samples, n) index matrix from `numpy.random.default_rng(seed)` (in row chunks
  of at most `CHUNK_ELEMENTS` indices; the chunking does not change the result, since the generator
  draws row after row either way). The interval's ends are the (1 - level)/2 and (1 + level)/2
  quantiles of the `samples` resampled means by numpy's default rule ("linear": the sorted means
  interpolated linearly at position q * (samples - 1), Hyndman and Fan's type 7). Equal values give
  the zero-width interval at that value exactly.
- `paired_bootstrap_ci(a, b)`: the same for the mean of a - b, both resampled with the same video
  indices (mean(a[idx]) - mean(b[idx]) = mean((a - b)[idx])): what the two have in common (the easy
  and the hard videos) cancels, so strongly correlated results give a much tighter interval than
  two independent ones would.
- `verdict(ci, against)`: "beats random" when the interval lies above 0, "worse than random" below,
  else "indistinguishable" (with `against="resize"`: "beats resize", "worse than resize").

`write_report` writes `report.md` (header, reading guide, the plot, the unreduced reference, one
table per budget from the mildest (most tokens kept) to the strongest, rows by top-1 descending,
refused settings as lines under their table, a per-method summary and example images) and
`pareto.png` (top-1 against GFLOPs per view and against measured speed-up; Pareto fronts ringed),
both atomically. `terminal_table` is the CLI's compact view of the same settings.
"""

from __future__ import annotations

import io
import logging
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..bench import compact_table
from ..errors import InputError
from .results import write_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from rich.table import Table

__all__ = [
    "BEATS",
    "CHUNK_ELEMENTS",
    "INDISTINGUISHABLE",
    "LEVEL",
    "RANDOM_SEEDS",
    "RESIZE",
    "RESIZE_MATCHED",
    "WORSE",
    "Setting",
    "SweepReport",
    "bootstrap_ci",
    "method_style",
    "paired_bootstrap_ci",
    "pareto_front",
    "terminal_table",
    "verdict",
    "verdict_kind",
    "write_report",
]

log = logging.getLogger(__name__)

LEVEL = 0.95
"""Confidence level of every interval of the sweep."""

RANDOM_SEEDS = 3
"""Seeds of the matched `random` baseline; its per-video correctness is averaged over them."""

CHUNK_ELEMENTS = 1 << 22
"""Most bootstrap indices held at once (32 MB of int64, and as much for the resampled values)."""

BEATS, INDISTINGUISHABLE, WORSE = "beats random", "indistinguishable", "worse than random"
"""The three verdicts, in the order the summary lists them."""

REFERENCE, BASELINE, RESIZE = "none", "random", "resize"
"""The unreduced model's method name, the baseline every method is compared with, and the second
baseline (the model on smaller frames): a method's verdict reads against the stronger of the two."""

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


# ------------------------------------------------------------------------------------- statistics
def _vector(values: ArrayLike, name: str) -> np.ndarray:
    """`values` as a non-empty 1-D float64 array of finite numbers, or an InputError."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name}: a 1-D sequence of per-video numbers ({err})") from None
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(f"{name}: a non-empty 1-D sequence of per-video numbers, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: finite per-video numbers, got NaN or infinity")
    return arr


def _check_settings(level: float, samples: int) -> None:
    if not 0 < level < 1:
        raise InputError(f"level: a confidence level strictly between 0 and 1, got {level}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"samples: a positive number of bootstrap resamples, got {samples!r}")


def _interval(values: np.ndarray, level: float, samples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (n,): see the module docstring."""
    if (values == values[0]).all():
        return float(values[0]), float(values[0])  # every resample is these values: no rounding
    n = values.size
    gen = np.random.default_rng(seed)
    rows = max(1, CHUNK_ELEMENTS // n)
    means = np.empty(samples)
    for start in range(0, samples, rows):
        stop = min(samples, start + rows)
        idx = gen.integers(0, n, size=(stop - start, n))  # (rows, n) video indices, with replacement
        means[start:stop] = values[idx].mean(axis=1)  # (rows,)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])  # method="linear"
    return float(low), float(high)


def bootstrap_ci(
    values: ArrayLike, *, level: float = LEVEL, samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-video numbers, resampling videos.

    Args:
        values: (n,) one number per video, e.g. 0/1 correctness or correctness averaged over seeds.
        level: confidence level in (0, 1).
        samples: bootstrap resamples.
        seed: seed of the resampling; the same arguments give the same interval.

    Returns:
        (low, high): the (1 - level)/2 and (1 + level)/2 quantiles (numpy's linear rule) of the
        resampled means.
    """
    _check_settings(level, samples)
    return _interval(_vector(values, "values"), level, samples, seed)


def paired_bootstrap_ci(
    a: ArrayLike, b: ArrayLike, *, level: float = LEVEL, samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a - b), resampling the same videos for `a` and `b`.

    Args:
        a, b: (n,) per-video numbers of two settings over the same videos in the same order.
        level, samples, seed: as `bootstrap_ci`.

    Returns:
        (low, high) of the mean difference.
    """
    _check_settings(level, samples)
    a_, b_ = _vector(a, "a"), _vector(b, "b")
    if a_.size != b_.size:
        raise InputError(f"paired values: a and b over the same videos, got {a_.size} and {b_.size} values")
    return _interval(a_ - b_, level, samples, seed)


def verdict(ci: tuple[float, float], against: str = BASELINE) -> str:
    """`BEATS` if the interval of (method - random) is above 0, `WORSE` if below, else `INDISTINGUISHABLE`;
    against another baseline, "beats <it>" and "worse than <it>"."""
    low, high = ci
    if not low <= high:  # also NaN
        raise InputError(f"verdict: an interval (low, high) with low <= high, got {ci}")
    return f"beats {against}" if low > 0 else f"worse than {against}" if high < 0 else INDISTINGUISHABLE


def verdict_kind(text: str) -> str:
    """`BEATS`, `INDISTINGUISHABLE` or `WORSE`: which of the three a verdict is, whatever its baseline."""
    return (
        BEATS if text.startswith("beats ") else WORSE if text.startswith("worse than ") else INDISTINGUISHABLE
    )


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which (cost, accuracy) points no other point dominates.

    A point is dominated when another has cost <= and accuracy >= with at least one strict; equal
    points do not dominate each other. For "higher is better" on both axes (speed-up, accuracy),
    pass the negated speed-up as the cost.

    Args:
        points: (P, 2) pairs (cost, accuracy).

    Returns:
        P booleans, True on the front.
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)  # (P, 2)
    if not np.isfinite(p).all():
        raise InputError("pareto_front: finite (cost, accuracy) pairs, got NaN or infinity")
    cost, acc = p[:, 0], p[:, 1]
    # [i, j]: point j is at least as good as point i on both axes / strictly better on one.
    no_worse = (cost[None, :] <= cost[:, None]) & (acc[None, :] >= acc[:, None])  # (P, P)
    better = (cost[None, :] < cost[:, None]) | (acc[None, :] > acc[:, None])  # (P, P)
    return [not d for d in (no_worse & better).any(axis=1).tolist()]


# ------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Setting:
    """One evaluated (method, budget) of a sweep. Accuracies are fractions in [0, 1].

    Attributes:
        method: the method as the sweep was given it ("sta", "attention:per_frame=true", "lite++", "none").
        budget: target token ratio in (0, 1]; None for the unreduced reference "none".
        spec: the plan actually run, e.g. "sta:r=12"; None when refused.
        refused: why the method cannot run at this budget on this model (one line), else None.
        gflops: GFLOPs per view (per clip).
        speedup: clips/s over the unreduced model's, measured in the same process.
        top1, top1_ci: top-1 accuracy and its bootstrap interval (`bootstrap_ci`).
        top5: top-5 accuracy.
        recall: mean foreground recall of the kept tokens (synthetic set), else None.
        random_spec: the matched random baseline, seed-free (e.g. "random:keep=0.4219,at=0").
        random_gflops: its GFLOPs per view; random_speedup: its measured speed-up (one seed timed).
        random_top1: its top-1, the mean over its `RANDOM_SEEDS` seeds.
        resize_spec, resize_gflops, resize_speedup, resize_top1: the same of the matched `resize` baseline
            (the frame size, in whole patches, whose GFLOPs come closest; one run, it draws nothing); None
            for `random`, `resize` and `none`, and where the model cannot run smaller frames.
        baseline: which of the two `delta` and `verdict` read against: the one with the higher top-1 on
            the same videos (`random` on a tie, and for `resize` itself).
        delta, delta_ci: top1 minus that baseline's top-1 and its paired interval (`paired_bootstrap_ci`).
        verdict: `verdict(delta_ci, baseline)`; None for `random` itself and for `none`.
        views: for an adaptive method (each clip keeps its own count: `attention:mass=0.9`), the number
            of views its budget (the measured mean token ratio) and GFLOPs are means over; else None.
    """

    method: str
    budget: float | None
    spec: str | None
    refused: str | None = None
    gflops: float | None = None
    speedup: float | None = None
    top1: float | None = None
    top1_ci: tuple[float, float] | None = None
    top5: float | None = None
    recall: float | None = None
    random_spec: str | None = None
    random_gflops: float | None = None
    random_speedup: float | None = None
    random_top1: float | None = None
    resize_spec: str | None = None
    resize_gflops: float | None = None
    resize_speedup: float | None = None
    resize_top1: float | None = None
    baseline: str | None = None
    delta: float | None = None
    delta_ci: tuple[float, float] | None = None
    verdict: str | None = None
    views: int | None = None


@dataclass(frozen=True)
class SweepReport:
    """Everything `write_report` and `terminal_table` show.

    Attributes:
        settings: every evaluated setting, the reference "none" and refused ones included.
        header: ordered "what: value" lines for the top of report.md (command, date, machine,
            versions, model, data, views, dtype, wall time, share of time decoding).
        examples: method -> path of an example image, relative to the report's folder.
    """

    settings: list[Setting]
    header: dict[str, str]
    examples: dict[str, str]


# ----------------------------------------------------------------------------------- formatting
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _pct_ci(x: float | None, ci: tuple[float, float] | None) -> str:
    if x is None or ci is None:
        return _pct(x)
    return f"{100 * x:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _points_ci(d: float | None, ci: tuple[float, float] | None) -> str:
    """A difference of accuracies in percentage points, signed."""
    if d is None:
        return "-"
    return f"{100 * d:+.1f}" + ("" if ci is None else f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]")


def _gflops(x: float | None) -> str:
    """3 significant digits (4 from 100 up: one decimal), trailing zeros kept so a column reads
    evenly, never an exponent: 0.0271, 0.0140, 1.23, 12.3, 180.5, 1234.5."""
    if x is None:
        return "-"
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(1, 2 - math.floor(math.log10(abs(x))))}f}"


def _speedup(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _budget(b: float) -> str:
    return f"{b:g}"


def _md(text: str) -> str:
    """Free text made literal in Markdown (an `_` or `*` in a path or a command stays as typed)."""
    for ch in "\\`*_[]<>|":
        text = text.replace(ch, "\\" + ch)
    return text


def _by_budget(settings: Iterable[Setting]) -> dict[float, list[Setting]]:
    """Reduced settings grouped by budget, budgets descending (mildest first), rows by top-1 descending;
    refused settings after the others, in their given order."""
    groups: dict[float, list[Setting]] = {}
    for s in settings:
        if s.budget is not None:
            groups.setdefault(s.budget, []).append(s)

    def row_order(s: Setting) -> tuple[bool, float, str]:
        return (s.refused is not None, -(s.top1 if s.top1 is not None else -math.inf), s.method)

    return {b: sorted(groups[b], key=row_order) for b in sorted(groups, reverse=True)}


def _reference(settings: Iterable[Setting]) -> Setting | None:
    return next((s for s in settings if s.method == REFERENCE and s.refused is None), None)


# ------------------------------------------------------------------------------------ report.md
_GUIDE = (
    "**How to read this.** Every method ran at every budget (the target share of tokens kept). "
    "Its verdict compares it with the stronger of two plain baselines at the same cost. The matched `random` "
    "plan drops tokens at random, as many as needed to cost the method's GFLOPs; it runs with {seeds} seeds and "
    "its per-video correctness is averaged over them. The matched `resize` plan runs the model on smaller "
    "frames (antialiased, positions interpolated), the size in whole patches whose GFLOPs come closest (its "
    "cell gives the GFLOPs difference when above 0.5%; more than {far:.0%} cheaper, it is shown but not compared). "
    "Δ is the method's top-1 minus the stronger baseline's "
    "(the one with the higher top-1 on the same videos; the verdict names it), in percentage points, "
    "with the paired bootstrap {level:.0%} interval over the same videos (both resampled with the same "
    "video indices). *{beats}* means the whole interval is above 0, *{worse}* entirely below; "
    "*{same}* means that on this many videos the difference cannot be told from zero. Top-1 intervals "
    "are percentile bootstrap intervals over videos. The measured speed-up (clips/s over the unreduced "
    "model, timed in the same process) is usually below the GFLOPs ratio: the patch embedding, the head, "
    "data movement and per-operation overhead cost the same whatever the number of tokens, the reducer "
    "itself takes time, and small models are bound by that overhead more than by arithmetic."
)


MATCHED = 0.005
"""The matched random baseline's GFLOPs should be within this fraction of the setting's; the report
marks a setting where the token granularity did not allow it."""

RESIZE_MATCHED = 0.1
"""The resize baseline takes part in a verdict when its GFLOPs are at most this fraction below the
setting's (never above: `sweep.matched_resize`); a frame size further below is shown, not compared.
Whole-patch sizes of 14 x 14 grids are a few percent apart; the built-in model's 4 x 4 are far coarser."""


def _mismatch(s: Setting, baseline: str = BASELINE) -> float | None:
    """The relative GFLOPs difference of `s`'s matched `baseline` ("random" or "resize") when above
    `MATCHED`, else None."""
    matched = getattr(s, f"{baseline}_gflops")
    if matched is None or not s.gflops:
        return None
    off = matched / s.gflops - 1
    return off if abs(off) > MATCHED else None


def _resize_cell(s: Setting) -> str:
    """The resize baseline's top-1, with its GFLOPs difference to the setting's when above `MATCHED`."""
    off = _mismatch(s, RESIZE)
    return _pct(s.resize_top1) + (
        "" if off is None or s.resize_top1 is None else f" ({100 * off:+.0f}% GFLOPs)"
    )


def _budget_section(budget: float, rows: list[Setting]) -> list[str]:
    ran = [s for s in rows if s.refused is None]
    refused = [s for s in rows if s.refused is not None]
    lines = [f"## Budget {_budget(budget)} ({budget:.0%} of tokens kept)", ""]
    if ran:
        lines += [
            f"| method | plan | top-1 % [{LEVEL:.0%} CI] | top-5 % | GFLOPs | speed-up | fg recall % "
            f"| random top-1 % | resize top-1 % | Δ vs the stronger, points [{LEVEL:.0%} CI] | verdict |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        notes = []
        for s in ran:
            plan = f"`{s.spec}`" if s.spec else "-"
            rand = _pct(s.random_top1)
            off = _mismatch(s)
            if off is not None:
                notes.append(
                    f"- † {_md(s.method)}: the nearest random token count, `{s.random_spec}`, costs "
                    f"{_gflops(s.random_gflops)} GFLOPs, {100 * off:+.2f}% from the method's (a token is a "
                    "coarse step on a small model)"
                )
                rand += " †"
            gflops = _gflops(s.gflops)
            if s.views is not None:
                notes.append(
                    f"- ‡ {_md(s.method)}: an adaptive budget (each clip keeps its own number of tokens): "
                    f"the share of tokens kept and the GFLOPs are the means over its {s.views} views, "
                    "measured as they ran; random is matched to that mean"
                )
                gflops += " ‡"
            cells = (
                _md(s.method), plan, _pct_ci(s.top1, s.top1_ci), _pct(s.top5), gflops,
                _speedup(s.speedup), _pct(s.recall), rand, _resize_cell(s), _points_ci(s.delta, s.delta_ci),
                s.verdict or ("baseline" if s.method == BASELINE else "-"),
            )  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", *notes, *([""] if notes else [])]
    else:
        lines += ["No method ran at this budget.", ""]
    lines += [f"- {_md(s.method)}: refused — {_md(s.refused or '')}" for s in refused]
    return [*lines, ""] if refused else lines


def _summary(settings: Sequence[Setting]) -> list[str]:
    """Per method (in the order they first appear), the budgets of each verdict."""
    methods = list(dict.fromkeys(s.method for s in settings if s.method not in (REFERENCE, BASELINE)))
    lines = ["## Summary", ""]
    for method in methods:
        mine = sorted((s for s in settings if s.method == method and s.budget is not None),
                      key=lambda s: -(s.budget or 0))  # fmt: skip
        parts = []
        named = dict.fromkeys(s.verdict for s in mine if s.verdict is not None)  # "beats resize", ...
        order = (BEATS, INDISTINGUISHABLE, WORSE)
        for name in sorted(named, key=lambda v: (order.index(verdict_kind(v)), v)):
            budgets = [_budget(s.budget) for s in mine if s.verdict == name and s.budget is not None]
            if budgets:
                parts.append(f"{name} at {', '.join(budgets)}")
        refused = [_budget(s.budget) for s in mine if s.refused is not None and s.budget is not None]
        if refused:
            parts.append(f"refused at {', '.join(refused)}")
        parts += [  # a setting refused before it had a budget (an adaptive method without its weights)
            f"refused ({_md(s.refused)})"
            for s in settings
            if s.method == method and s.budget is None and s.refused
        ]
        lines.append(f"- **{_md(method)}**: {'; '.join(parts) or 'no verdict'}.")
    if not methods:
        lines.append("No method other than the baselines ran.")
    return [*lines, ""]


def _markdown(report: SweepReport) -> str:
    lines = ["# tokensieve sweep", ""]
    lines += [
        f"- **{_md(k)}**: " + (f"`{v}`" if k == "command" and "`" not in v else _md(v))
        for k, v in report.header.items()
    ]
    lines += [
        "",
        _GUIDE.format(
            seeds=RANDOM_SEEDS,
            level=LEVEL,
            beats=BEATS,
            worse=WORSE,
            same=INDISTINGUISHABLE,
            far=RESIZE_MATCHED,
        ),
    ]
    lines += ["", "![top-1 against GFLOPs per view and against measured speed-up](pareto.png)", ""]
    ref = _reference(report.settings)
    if ref is not None:
        lines += [
            f"**Unreduced reference** (`{REFERENCE}`): top-1 {_pct_ci(ref.top1, ref.top1_ci)} %, "
            f"top-5 {_pct(ref.top5)} %, {_gflops(ref.gflops)} GFLOPs per view.",
            "",
        ]
    else:
        lines += ["No unreduced reference in this sweep.", ""]
    lines += ["Budgets from the mildest (most tokens kept) to the strongest; rows by top-1, best first.", ""]
    for budget, rows in _by_budget(report.settings).items():
        lines += _budget_section(budget, rows)
    lines += _summary(report.settings)
    if report.examples:
        lines += ["## Examples", ""]
        for method, path in report.examples.items():
            target = f"<{path}>" if " " in path else path  # CommonMark's form for a path with spaces
            lines += [f"![{_md(method)}]({target})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(report: SweepReport, out: Path) -> None:
    """Write `out/report.md` and `out/pareto.png` (each atomically; the folder is created).

    Raises:
        InputError: a report without settings.
        OSError: `out` cannot be written, naming the path.
    """
    if not report.settings:
        raise InputError("write_report: a sweep report with at least one setting")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "pareto.png", _plot(report.settings))  # before the page that shows it
    write_atomic(out / "report.md", _markdown(report).encode())
    log.info("%s: report.md and pareto.png written", out)


# ------------------------------------------------------------------------------------ pareto.png
_STYLES: dict[str, tuple[str, str]] = {
    REFERENCE: ("black", "*"),
    BASELINE: ("black", "."),
    "sta": ("tab:blue", "o"),
    "tome": ("tab:orange", "s"),
    "attention": ("tab:green", "^"),
    "stts": ("tab:red", "D"),
    "uniform": ("tab:purple", "v"),
    "random_frames": ("tab:brown", "P"),
    RESIZE: ("0.45", "s"),
    "halting": ("tab:cyan", "h"),
    "tokenlearner": ("gold", ">"),  # not "*": that is the unreduced model's
}
_SPARE_COLOURS = ("tab:pink", "tab:olive", "tab:cyan", "tab:gray", "gold", "teal", "navy", "maroon")
_SPARE_MARKERS = ("X", "p", "h", "<", ">", "d")


def method_style(method: str) -> tuple[str, str]:
    """The (matplotlib colour, marker) a method always has, in every plot; a method not in the table
    gets one from a hash of its name (crc32, the same in every process)."""
    if method in _STYLES:
        return _STYLES[method]
    h = zlib.crc32(method.encode())
    return _SPARE_COLOURS[h % len(_SPARE_COLOURS)], _SPARE_MARKERS[h % len(_SPARE_MARKERS)]


def _baseline_curve(
    settings: Sequence[Setting], baseline: str = BASELINE, *, x_of: str = "gflops"
) -> list[tuple[float, float]]:
    """(GFLOPs or speed-up, top-1) of a baseline ("random" or "resize"): its own settings and every
    matched point, sorted."""
    own = [(getattr(s, x_of), s.top1) for s in settings if s.method == baseline and s.refused is None]
    matched = [(getattr(s, f"{baseline}_{x_of}"), getattr(s, f"{baseline}_top1")) for s in settings]
    return sorted({(x, y) for x, y in own + matched if x is not None and y is not None})


def _ring_front(ax: Axes, points: list[tuple[float, float]], *, higher_x_better: bool) -> None:
    """Ring the front's points and join them with a grey step line."""
    if not points:
        return
    costs = [(-x if higher_x_better else x, y) for x, y in points]
    front = sorted(p for p, on in zip(points, pareto_front(costs), strict=True) if on)
    xs, ys = [p[0] for p in front], [p[1] for p in front]
    ax.step(xs, ys, where="pre" if higher_x_better else "post", color="0.6", lw=1, zorder=1)
    ax.scatter(xs, ys, s=170, facecolors="none", edgecolors="0.4", linewidths=1.2, zorder=4,
               label="Pareto front")  # fmt: skip


def _yerr(rows: Sequence[Setting]) -> list[list[float]]:
    """(2, R) distances from each top-1 down and up to its interval's ends, in points (0 without one)."""
    ci = [(s.top1_ci or (s.top1, s.top1)) if s.top1 is not None else (0.0, 0.0) for s in rows]
    return [
        [max(0.0, 100 * ((s.top1 or 0.0) - lo)) for s, (lo, _) in zip(rows, ci, strict=True)],
        [max(0.0, 100 * (hi - (s.top1 or 0.0))) for s, (_, hi) in zip(rows, ci, strict=True)],
    ]


def _panel(ax: Axes, settings: Sequence[Setting], *, x_of: str) -> None:
    """One panel: top-1 (%) against `x_of` ("gflops" or "speedup") of every method, the random
    curve, the reference star and the front."""
    speed = x_of == "speedup"
    points: list[tuple[float, float]] = []
    methods = dict.fromkeys(s.method for s in settings if s.method not in (REFERENCE, BASELINE, RESIZE))
    for method in methods:
        rows = sorted(
            (s for s in settings if s.method == method and s.refused is None), key=lambda s: -(s.budget or 0)
        )
        rows = [s for s in rows if getattr(s, x_of) is not None and s.top1 is not None]
        if not rows:
            continue
        colour, marker = method_style(method)
        xs = [getattr(s, x_of) for s in rows]
        ys = [100 * s.top1 for s in rows]
        ax.errorbar(xs, ys, yerr=_yerr(rows), color=colour, marker=marker, ms=6, lw=1.6, elinewidth=0.7, capsize=2,
                    label=method, zorder=3)  # fmt: skip
        points += zip(xs, ys, strict=True)
    for baseline, style, label in ((BASELINE, dict(color="k", ls="--", marker="."), "random"),
                                   (RESIZE, dict(color="0.45", ls="-.", marker="s", ms=4), "resize (smaller frames)")):  # fmt: skip
        curve = _baseline_curve(settings, baseline, x_of=x_of)
        if curve:
            ax.plot(
                [x for x, _ in curve], [100 * y for _, y in curve], lw=1.2, zorder=2, label=label, **style
            )
            points += [(x, 100 * y) for x, y in curve]
    ref = _reference(settings)
    if ref is not None and ref.top1 is not None:
        x = (ref.speedup or 1.0) if speed else ref.gflops
        if x is not None:
            ax.plot([x], [100 * ref.top1], marker="*", ms=16, color="black", ls="none", zorder=5,
                    label="unreduced")  # fmt: skip
            points.append((x, 100 * ref.top1))
    _ring_front(ax, points, higher_x_better=speed)
    if speed:
        ax.axvline(1.0, color="0.85", lw=0.8, ls=":", zorder=0)
        ax.set_xlabel("measured speed-up over the unreduced model (x)")
        ax.set_title("top-1 vs measured speed-up (front: faster and more accurate)")
    else:
        ax.set_xlabel("GFLOPs per view")
        ax.set_title("top-1 vs compute (front: cheaper and more accurate)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    if not points:
        ax.text(0.5, 0.5, "no evaluated setting", ha="center", va="center", transform=ax.transAxes)


def _plot(settings: Sequence[Setting]) -> bytes:
    """pareto.png as bytes: 1400 x 600 pixels, two panels, one legend to their right."""
    # The object API with the Agg canvas, not pyplot: no global figure state and no switch of the
    # caller's backend (a notebook calling write_report keeps its own).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 6), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    _panel(left, settings, x_of="gflops")
    _panel(right, settings, x_of="speedup")
    entries: dict[str, object] = {}  # label -> handle, from both panels (a method may lack speed-ups)
    for ax in (left, right):
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, h)
    last = ("random", "resize (smaller frames)", "unreduced", "Pareto front")  # methods, then the references
    labels = [k for k in entries if k not in last] + [k for k in last if k in entries]
    fig.subplots_adjust(left=0.05, right=0.84, bottom=0.1, top=0.92, wspace=0.2)
    if labels:
        fig.legend([entries[k] for k in labels], labels, loc="center left", bbox_to_anchor=(0.845, 0.5),
                   frameon=False)  # fmt: skip
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# ------------------------------------------------------------------------------------- terminal
_VERDICT_STYLES = {BEATS: "green", INDISTINGUISHABLE: "yellow", WORSE: "red"}


def refused_lines(settings: Sequence[Setting]) -> list[str]:
    """One line per method and reason of the refused settings: "tome at 0.25, 0.4: why"."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for s in settings:
        if s.refused is not None:
            grouped.setdefault((s.method, s.refused), []).append(_budget(s.budget) if s.budget else "-")
    return [f"{method} at {', '.join(budgets)}: {why}" for (method, why), budgets in grouped.items()]


SHORT_VERDICTS = {BEATS: "beats", INDISTINGUISHABLE: "n.s.", WORSE: "worse"}
"""Verdicts in the narrow terminal table by kind (`verdict_kind`), " rs" added when the baseline is resize
("beats rs"); "n.s." = not significant (indistinguishable from the baseline)."""


def _short(text: str) -> str:
    if text in ("baseline", "-"):
        return text
    return SHORT_VERDICTS[verdict_kind(text)] + (" rs" if text.endswith(RESIZE) else "")


def terminal_table(report: SweepReport, *, title: str | None = None, wide: bool = True) -> Table:
    """One compact `rich` table of every setting: the reference first, then one section per budget
    (descending), rows by top-1 descending, refused settings dimmed (`refused_lines` says why); verdicts
    green (beats the stronger baseline), yellow (indistinguishable) or red (worse). Plans are in report.md.
    Not `wide` (for 80 columns): top-1 without its interval, no baseline top-1 columns, and the verdicts
    of `SHORT_VERDICTS`."""
    from rich.text import Text

    recall = any(s.recall is not None for s in report.settings)
    table = compact_table(title=title)
    table.add_column("budget", justify="right", no_wrap=True)
    table.add_column("method", no_wrap=True)
    table.add_column(f"top-1 % [{LEVEL:.0%} CI]" if wide else "top-1\n%", justify="right", no_wrap=True)
    table.add_column("GFLOPs", justify="right", no_wrap=True)
    table.add_column("speed-\nup", justify="right", no_wrap=True)
    if recall:
        table.add_column("fg\nrecall", justify="right", no_wrap=True)
    if wide:
        table.add_column("random\ntop-1", justify="right", no_wrap=True)
        table.add_column("resize\ntop-1", justify="right", no_wrap=True)
    table.add_column(f"Δ vs baseline, points\n[{LEVEL:.0%} CI]", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    numbers = 3 + recall + 2 * wide  # the numeric columns before Δ

    def add(s: Setting, budget: str, *, end: bool) -> None:
        if s.refused is not None:
            table.add_row(budget, s.method, *["-"] * numbers, "-", "refused", style="dim", end_section=end)
            return
        shown = s.verdict or ("baseline" if s.method == BASELINE else "-")
        label = shown if wide else _short(shown)
        table.add_row(
            budget, s.method + (" ‡" if s.views is not None else ""),
            _pct_ci(s.top1, s.top1_ci) if wide else _pct(s.top1), _gflops(s.gflops),
            _speedup(s.speedup), *([_pct(s.recall)] if recall else []),
            *([_pct(s.random_top1), _pct(s.resize_top1)] if wide else []), _points_ci(s.delta, s.delta_ci),
            Text(label, style=_VERDICT_STYLES.get(verdict_kind(shown), "") if s.verdict else ""), end_section=end,
        )  # fmt: skip

    ref = _reference(report.settings)
    if ref is not None:
        add(ref, "-", end=True)
    for budget, rows in _by_budget(report.settings).items():
        for i, s in enumerate(rows):
            add(s, _budget(budget) if i == 0 else "", end=i == len(rows) - 1)
    return table
