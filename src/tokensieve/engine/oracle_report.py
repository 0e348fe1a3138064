"""What the oracle's value maps say: LITE's Principle 4 measured (`report.md`, `report.json`, `oracle.png`).

    report = oracle_report(read_value_maps("oracle/maps.jsonl"), masks=truth_masks(model, dataset, "synth"))
    write_oracle_report(report, Path("oracle"))
    Console().print(pareto_table(report))

LITE (Hao et al., arXiv:2411.13626, Sec. 3, Principle 4): the oracle's token values follow a Pareto
distribution; most tokens have little value and a few carry most of it. Every clip (one view of a
video) is one row of values in [0, 1] (`ts.oracle`: min-max scaled per clip). From all of them:

- Pareto shares. The share of a clip's total value held by its top x% of tokens, for x in `SHARES`:
  k = max(1, round-half-up(x * N)) tokens of the clip's N, the highest-valued first. Computed per clip
  and averaged over the clips (a clip whose values are all 0 has no shares and is left out), and pooled:
  every token of every clip ranked together (what a histogram of all tokens shows). The Lorenz curve
  (share of value against share of tokens, top-ranked first) draws the same numbers for every k; a
  random selection of x% of the tokens holds x% of the value on average, the diagonal.
- Histogram: all tokens pooled, `BINS` equal bins on [0, 1] (the last one closed).
- Power law: p(v) ∝ v^-alpha fitted by maximum likelihood to the values in [x_min, 1), as a power law
  truncated to that range (values cannot exceed 1, so the tail has an end; the plain Pareto MLE,
  alpha = 1 + n / sum(ln(v / x_min)), assumes it has none and is biased when it has). The likelihood
  is concave in alpha: the estimate is where the model's mean of ln v equals the values' (solved by
  bisection, alpha in [1 - BETA_LIMIT, 1 + BETA_LIMIT]). x_min is chosen as in Clauset, Shalizi &
  Newman (2009, SIAM Review 51:661): the candidate (`FIT_CANDIDATES` quantiles of the values, keeping
  at least `FIT_MIN_TAIL` of them in the tail) whose fit has the smallest Kolmogorov-Smirnov distance
  to the values above it; that distance is reported as the goodness of fit (not R^2 of a log-log
  line: a least-squares line on a log-log plot gives biased exponents and an R^2 near 1 for data
  that are no power law, Clauset et al. Sec. 3.1). Exact 0s (the ReLU's floor) and 1s (each clip's
  maximum, by the min-max scaling) are atoms of the scaling, not of the distribution: left out. Above
  `FIT_SAMPLE` values, a seeded random sample of that size is fitted.
- Foreground (a synthetic set with ground truth, `oracle_maps.truth_masks`): the recall of the
  oracle's top k tokens, for the keeps of `KEEPS`: the share of the object (its coverage of each token,
  summed over the clip) inside those tokens, as the sweep's "fg recall" measures kept tokens; ties in
  value go to the earlier token. A clip without the object (an action that makes it appear or
  vanish) has no recall and is left out. A random selection's recall is k/N on average.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..bench import compact_table
from ..errors import InputError
from .results import write_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from rich.table import Table

__all__ = [
    "BINS",
    "KEEPS",
    "SHARES",
    "OracleReport",
    "ParetoRow",
    "PowerLawFit",
    "RecallRow",
    "fit_power_law",
    "fit_text",
    "oracle_report",
    "pareto_table",
    "recall_at",
    "token_count",
    "top_shares",
    "value_curves",
    "write_oracle_report",
]

log = logging.getLogger(__name__)

SHARES: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5)
"""Fractions of the tokens (top-ranked) whose share of the value the report gives."""
KEEPS: tuple[float, ...] = (0.1, 0.3, 0.5)
"""Fractions of the tokens kept at which the foreground recall is given."""
BINS = 50
"""Histogram bins on [0, 1]."""
FIT_CANDIDATES = 40
FIT_MIN_TAIL = 0.1
FIT_FLOOR = 1e-6
"""x_min candidates: `FIT_CANDIDATES` quantiles of the values in (0, 1), from the least to the
1 - `FIT_MIN_TAIL` quantile, none below `FIT_FLOOR`."""
FIT_SAMPLE = 1_000_000
MIN_FIT_VALUES = 50
"""A tail of fewer values is not fitted."""
BETA_LIMIT = 50.0
"""|1 - alpha| searched; with x_min >= `FIT_FLOOR` every exponential in the fit stays finite."""


# ---------------------------------------------------------------------------------------- shares
def token_count(fraction: float, n: int) -> int:
    """Tokens in the top `fraction` of `n`: round half up, at least 1."""
    return max(1, math.floor(fraction * n + 0.5))


def value_curves(values: Tensor) -> Tensor:
    """Lorenz curves, top-ranked first: the share of each row's total value held by its k highest values.

    Args:
        values: (C, N) non-negative values, one row per clip.

    Returns:
        (C, N + 1) float64, column k for the k highest values (column 0 is 0, column N is 1); NaN rows
        for rows whose values are all 0.
    """
    ordered = values.double().sort(dim=1, descending=True).values  # (C, N)
    held = torch.cat([ordered.new_zeros(len(ordered), 1), ordered.cumsum(1)], 1)  # (C, N + 1)
    total = held[:, -1:]  # (C, 1)
    return torch.where(total > 0, held / total.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)


def top_shares(values: Tensor, fractions: Sequence[float] = SHARES) -> Tensor:
    """(C, F) the share of each row's value held by its top `fractions` of tokens (`token_count`);
    NaN for rows without value."""
    n = values.shape[1]
    return value_curves(values)[:, [token_count(f, n) for f in fractions]]


def recall_at(values: Tensor, masks: Tensor, fractions: Sequence[float] = KEEPS) -> Tensor:
    """Foreground recall of the top tokens by value.

    Args:
        values: (C, N) token values.
        masks: (C, N) the fraction of each token the object covers.
        fractions: fractions of the tokens kept, highest values first (`token_count`; ties go to the
            earlier token).

    Returns:
        (C, F) float64: the share of the object's coverage inside the kept tokens; NaN for a clip
        without the object.
    """
    n = values.shape[1]
    order = values.argsort(dim=1, descending=True, stable=True)  # (C, N)
    held = masks.double().gather(1, order).cumsum(1)  # (C, N) coverage in the top k + 1
    total = held[:, -1:]  # (C, 1)
    kept = held[:, [token_count(f, n) - 1 for f in fractions]]  # (C, F)
    return torch.where(total > 0, kept / total.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)


# ---------------------------------------------------------------------------------------- power law
@dataclass(frozen=True)
class PowerLawFit:
    """p(v) ∝ v^-alpha on [x_min, 1) (module docstring).

    Attributes:
        alpha: the exponent.
        x_min: the lower end of the range fitted.
        tail: tokens in [x_min, 1) (all of them, also when a sample was fitted).
        tail_share: `tail` as a share of all tokens.
        ks: Kolmogorov-Smirnov distance between the fit and the values it was fitted to.
    """

    alpha: float
    x_min: float
    tail: int
    tail_share: float
    ks: float


def _mean_log(beta: float, low: float) -> float:
    """E[ln v] of the density ∝ v^(beta - 1) on [e^low, 1] (low < 0): with u = ln v, a density
    ∝ e^(beta u) on [low, 0], whose mean is low e^t / (e^t - 1) - 1 / beta, t = beta low."""
    t = beta * low
    if abs(t) < 1e-6:  # the series: the closed form cancels to nothing near t = 0
        return low / 2 + beta * low * low / 12
    ratio = -1 / math.expm1(-t) if t > 0 else math.exp(t) / math.expm1(t)  # e^t / (e^t - 1), finite
    return low * ratio - 1 / beta


def _cdf_log(u: np.ndarray, beta: float, low: float) -> np.ndarray:
    """P(ln v <= u) under the density of `_mean_log`."""
    if abs(beta * low) < 1e-12:
        return (u - low) / -low
    return np.expm1(beta * (u - low)) / math.expm1(-beta * low)


def _fit_beta(mean: float, low: float) -> float:
    """The beta (= 1 - alpha) whose `_mean_log` is `mean`: the maximum-likelihood estimate. The mean
    grows with beta (its derivative is the variance of ln v), so bisection finds it."""
    lo, hi = -BETA_LIMIT, BETA_LIMIT
    for _ in range(200):
        mid = (lo + hi) / 2
        if _mean_log(mid, low) < mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _ks(u: np.ndarray, beta: float, low: float) -> float:
    """Kolmogorov-Smirnov distance between sorted log values `u` and the fitted distribution."""
    n = len(u)
    cdf = _cdf_log(u, beta, low)
    steps = np.arange(n + 1) / n
    return float(max((steps[1:] - cdf).max(), (cdf - steps[:-1]).max()))


def fit_power_law(values: Tensor | np.ndarray, *, seed: int = 0) -> PowerLawFit | None:
    """Fit p(v) ∝ v^-alpha to the values in (0, 1) (module docstring); None with fewer than
    `MIN_FIT_VALUES` of them.

    Args:
        values: any shape, values in [0, 1].
        seed: of the sample fitted when there are more than `FIT_SAMPLE` values.
    """
    allv = np.asarray(values.detach().cpu().numpy() if isinstance(values, Tensor) else values, np.float64)
    allv = allv.reshape(-1)
    inside = allv[(allv > 0) & (allv < 1)]
    if inside.size < MIN_FIT_VALUES:
        return None
    x = inside
    if x.size > FIT_SAMPLE:
        x = np.random.default_rng(seed).choice(x, FIT_SAMPLE, replace=False)
    x = np.sort(x)
    u = np.log(x)
    candidates = np.unique(np.quantile(x, np.linspace(0, 1 - FIT_MIN_TAIL, FIT_CANDIDATES)))
    best: tuple[float, float, float] | None = None  # (ks, x_min, beta)
    for x_min in candidates[candidates >= FIT_FLOOR]:
        tail = u[np.searchsorted(x, x_min) :]
        if tail.size < MIN_FIT_VALUES:
            continue
        low = math.log(x_min)
        beta = _fit_beta(float(tail.mean()), low)
        ks = _ks(tail, beta, low)
        if best is None or ks < best[0]:
            best = (ks, float(x_min), beta)
    if best is None:
        return None
    ks, x_min, beta = best
    tail = int((inside >= x_min).sum())
    return PowerLawFit(alpha=1 - beta, x_min=x_min, tail=tail, tail_share=tail / allv.size, ks=ks)


def _fitted_counts(fit: PowerLawFit, edges: np.ndarray) -> np.ndarray:
    """Tokens the fit expects in each histogram bin (0 below x_min)."""
    low, beta = math.log(fit.x_min), 1 - fit.alpha
    ends = np.log(np.clip(edges, fit.x_min, 1.0))
    cdf = _cdf_log(ends, beta, low)
    return fit.tail * np.diff(cdf)


# ---------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class ParetoRow:
    """The share of the value in the top `fraction` of the tokens (`tokens` of each clip's N)."""

    fraction: float
    tokens: int
    per_clip: float | None  # mean over the clips with value
    pooled: float | None  # every token of every clip ranked together


@dataclass(frozen=True)
class RecallRow:
    """Foreground recall of the oracle's top `fraction` of the tokens (`tokens` per clip)."""

    fraction: float
    tokens: int
    recall: float | None  # mean over the clips showing the object
    random: float  # a random selection's, on average: tokens / N


@dataclass(frozen=True)
class OracleReport:
    """Everything `write_oracle_report` and `pareto_table` show (`report.json` is its `asdict`).

    Attributes:
        header: ordered "what: value" lines for the top of report.md.
        videos: videos with maps; clips: their views; tokens: N per clip.
        valueless: clips whose values are all 0 (left out of the per-clip shares).
        pareto: one row per fraction of `SHARES`.
        curve: (N + 1) the mean Lorenz curve of the clips, point k for the top k tokens.
        pooled_curve: (N + 1) the pooled Lorenz curve at the same shares of tokens.
        histogram: `BINS` token counts on [0, 1].
        zeros, ones: shares of the tokens exactly 0 and exactly 1.
        fit: the power law, or None when too few values lie in (0, 1).
        recall: one row per fraction of `KEEPS` when ground truth was given, else None.
        recall_clips: clips showing the object (those the recall is a mean over).
    """

    header: dict[str, str]
    videos: int
    clips: int
    tokens: int
    valueless: int
    pareto: list[ParetoRow]
    curve: list[float]
    pooled_curve: list[float]
    histogram: list[int]
    zeros: float
    ones: float
    fit: PowerLawFit | None
    recall: list[RecallRow] | None = None
    recall_clips: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _mean(column: Tensor) -> float | None:
    """The mean of the non-NaN entries; None if there are none."""
    kept = column[~column.isnan()]
    return float(kept.mean()) if kept.numel() else None


def _pooled_curve(flat: Tensor, n: int) -> Tensor:
    """(n + 1) the Lorenz curve of all `flat` values ranked together, at shares k / n of the tokens
    (the nearest whole count of tokens)."""
    held = value_curves(flat[None])[0]  # (M + 1,)
    at = torch.tensor([token_count(k / n, len(flat)) if k else 0 for k in range(n + 1)])
    return held[at]


def _pareto_rows(values: Tensor, curves: Tensor) -> list[ParetoRow]:
    """The `SHARES` rows from the (C, N) values and their (C, N + 1) Lorenz curves."""
    n = values.shape[1]
    pooled = top_shares(values.flatten()[None])[0]  # (F,) every token ranked together
    rows = []
    for f, p in zip(SHARES, pooled.tolist(), strict=True):
        k = token_count(f, n)
        rows.append(ParetoRow(f, k, _mean(curves[:, k]), None if math.isnan(p) else p))
    return rows


def _recall_rows(
    maps: Mapping[str, Tensor], values: Tensor, masks: Mapping[str, Tensor]
) -> tuple[list[RecallRow], int]:
    """The `KEEPS` rows of the (C, N) values (the views of `maps` in order) against each video's mask,
    and how many clips show the object."""
    missing = [vid for vid in maps if vid not in masks]
    if missing:
        raise InputError(f"no ground-truth mask for video {missing[0]!r} ({len(missing)} missing)")
    n = values.shape[1]
    cover = torch.cat([masks[vid].float().reshape(1, n).expand(m.numel() // n, n) for vid, m in maps.items()])
    hits = recall_at(values, cover)  # (C, K); cover: (C, N), a video's mask for each of its views
    rows = [
        RecallRow(f, token_count(f, n), _mean(hits[:, i]), token_count(f, n) / n) for i, f in enumerate(KEEPS)
    ]
    return rows, int((~hits[:, 0].isnan()).sum())


def oracle_report(
    maps: Mapping[str, Tensor],
    *,
    masks: Mapping[str, Tensor] | None = None,
    header: Mapping[str, str] | None = None,
) -> OracleReport:
    """The statistics of the module docstring over every clip of `maps`.

    Args:
        maps: {video id: (views, N) values in [0, 1]} (`read_value_maps`).
        masks: {video id: (N,) the object's coverage of each token} (`truth_masks`), for the recall;
            every video of `maps` needs one.
        header: "what: value" lines for the top of report.md.

    Raises:
        InputError: no maps, maps of different token counts, or a video without its mask.
    """
    if not maps:
        raise InputError("no value maps to report on (every video failed, or none was mapped)")
    sizes = {m.shape[-1] for m in maps.values()}
    if len(sizes) > 1:
        raise InputError(f"value maps of different token counts ({sorted(sizes)}): one model's maps only")
    values = torch.cat([m.float().reshape(-1, m.shape[-1]) for m in maps.values()])  # (C, N)
    clips, n = values.shape
    curves = value_curves(values)  # (C, N + 1)
    valued = curves[~curves[:, -1].isnan()]  # clips with value
    flat = values.flatten()
    counts, _ = np.histogram(flat.numpy(), bins=BINS, range=(0.0, 1.0))
    recall, showing = _recall_rows(maps, values, masks) if masks is not None else (None, 0)
    return OracleReport(
        header=dict(header or {}), videos=len(maps), clips=clips, tokens=n, valueless=clips - len(valued),
        pareto=_pareto_rows(values, curves), curve=valued.mean(0).tolist() if len(valued) else [],
        pooled_curve=_pooled_curve(flat, n).tolist(), histogram=counts.tolist(),
        zeros=float((flat == 0).double().mean()), ones=float((flat == 1).double().mean()),
        fit=fit_power_law(flat), recall=recall, recall_clips=showing,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- writing
def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _md(text: str) -> str:
    """Free text made literal in Markdown."""
    for ch in "\\`*_[]<>|":
        text = text.replace(ch, "\\" + ch)
    return text


def fit_text(fit: PowerLawFit | None) -> str:
    """One line: the exponent, the range fitted and its goodness of fit."""
    if fit is None:
        return f"power law: not fitted (fewer than {MIN_FIT_VALUES} values strictly between 0 and 1)"
    return (
        f"power law p(v) ∝ v^-α: α = {fit.alpha:.2f} on [{fit.x_min:.3g}, 1) ({_pct(fit.tail_share)}% of the "
        f"tokens), KS distance {fit.ks:.3f} (truncated power-law MLE, x_min by minimum KS)"
    )


_GUIDE = (
    "**How to read this.** The oracle gives every token of a clip a value: the Grad-CAM of the target "
    "class's score at one block's activations (LITE, Eq. 1-2), scaled to [0, 1] per clip. LITE's "
    "Principle 4: these values follow a Pareto distribution, most tokens are worth little and a few "
    "carry most of the value. The table gives the share of a clip's total value held by its top x% of "
    "tokens (a random x% holds x% on average), per clip and averaged, and pooled over all tokens of all "
    "clips. The histogram pools all tokens; the power law is fitted by maximum likelihood to the values "
    "in [x_min, 1) as a power law truncated at 1, with x_min chosen by the smallest Kolmogorov-Smirnov "
    "distance (Clauset, Shalizi & Newman 2009); a KS distance of a few hundredths is a close fit."
)


def _markdown(report: OracleReport) -> str:
    lines = ["# tokensieve oracle", ""]
    lines += [
        f"- **{_md(k)}**: " + (f"`{v}`" if k == "command" and "`" not in v else _md(v))
        for k, v in report.header.items()
    ]
    lines += ["", _GUIDE, "", "![token values: histogram and Lorenz curve](oracle.png)", ""]
    lines += [
        f"{report.videos} videos, {report.clips} clips of {report.tokens} tokens"
        + (f"; {report.valueless} clips without value (all 0) are left out of the per-clip shares" if report.valueless else "")
        + ".",
        "",
        "## Pareto: the share of the value in the top tokens",
        "",
        "| top tokens | tokens per clip | share of value, per clip (mean) % | pooled % |",
        "| ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for row in report.pareto:
        lines.append(
            f"| {_pct(row.fraction, 0)}% | {row.tokens} | {_pct(row.per_clip)} | {_pct(row.pooled)} |"
        )
    lines += [
        "",
        "## The distribution of values",
        "",
        f"{_pct(report.zeros)}% of the tokens are exactly 0 (the ReLU's floor) and {_pct(report.ones, 2)}% exactly 1 "
        "(each clip's maximum).",
        "",
        f"- {_md(fit_text(report.fit))}.",
        "",
    ]  # fmt: skip
    lines += ["## Foreground", ""]
    if report.recall is None:
        lines += [
            "No ground truth lined up with these clips (a synthetic set seen whole, one view per video).",
            "",
        ]
    else:
        lines += [
            f"The share of the object inside the oracle's top tokens, over the {report.recall_clips} clips "
            "showing it (a random selection keeps its share of the tokens).",
            "",
            "| tokens kept | tokens per clip | oracle's foreground recall % | random % |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for r in report.recall:
            lines.append(f"| {_pct(r.fraction, 0)}% | {r.tokens} | {_pct(r.recall)} | {_pct(r.random)} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def write_oracle_report(report: OracleReport, out: Path) -> None:
    """Write `out/oracle.png`, `out/report.json` and `out/report.md` (each atomically; `out` is created).

    Raises:
        OSError: `out` cannot be written, naming the path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "oracle.png", _plot(report))  # before the page that shows it
    write_atomic(out / "report.json", json.dumps(report.to_dict(), indent=2).encode())
    write_atomic(out / "report.md", _markdown(report).encode())
    log.info("%s: report.md, report.json and oracle.png written", out)


# ---------------------------------------------------------------------------------------- oracle.png
def _histogram_panel(ax: Axes, report: OracleReport) -> None:
    """Token counts per value bin (log scale), with the fitted power law's expected counts."""
    edges = np.linspace(0.0, 1.0, BINS + 1)
    counts = np.asarray(report.histogram, dtype=np.float64)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue", alpha=0.7,
           label=f"tokens (all clips; {_pct(report.zeros, 0)}% exactly 0, in the first bin)")  # fmt: skip
    if report.fit is not None:
        expected = _fitted_counts(report.fit, edges)
        centres = (edges[:-1] + edges[1:]) / 2
        shown = (edges[:-1] >= report.fit.x_min) & (expected > 0)  # whole bins: a cut one looks like a drop
        ax.plot(centres[shown], expected[shown], color="tab:red", lw=2,
                label=f"power law, α = {report.fit.alpha:.2f} on [{report.fit.x_min:.2g}, 1)")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("token value (oracle, scaled to [0, 1] per clip)")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title("histogram of token values")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)


def _lorenz_panel(ax: Axes, report: OracleReport) -> None:
    """Share of the value against share of the tokens, top-ranked first, with the `SHARES` points."""
    n = report.tokens
    x = 100 * np.arange(n + 1) / n
    ax.plot([0, 100], [0, 100], "k--", lw=1, label="random selection")
    if report.pooled_curve:
        ax.plot(
            x, 100 * np.asarray(report.pooled_curve), color="tab:orange", lw=1.2, label="pooled over clips"
        )
    if report.curve:
        ax.plot(x, 100 * np.asarray(report.curve), color="tab:blue", lw=2, label="per clip (mean)")
        for row in report.pareto:
            if row.per_clip is None:
                continue
            px, py = 100 * row.tokens / n, 100 * row.per_clip
            ax.plot([px], [py], "o", color="tab:blue", ms=5)
            ax.annotate(f"{_pct(row.fraction, 0)}%: {py:.0f}%", (px, py), textcoords="offset points",
                        xytext=(6, -12), fontsize=8)  # fmt: skip
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 101)
    ax.set_xlabel("share of the tokens, highest value first (%)")
    ax.set_ylabel("share of the value (%)")
    ax.set_title("Pareto: how much value the top tokens hold")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", frameon=False)


def _plot(report: OracleReport) -> bytes:
    """oracle.png as bytes: 1400 x 600 pixels, the histogram and the Lorenz curve."""
    # The object API with the Agg canvas, not pyplot: no global figure state (as engine/report.py).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 6), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    _histogram_panel(left, report)
    _lorenz_panel(right, report)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1, top=0.92, wspace=0.2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- terminal
def pareto_table(report: OracleReport, *, title: str | None = None) -> Table:
    """The Pareto shares as a compact `rich` table (and the foreground recall beside them, when measured)."""
    recall = {r.fraction: r for r in report.recall or []}
    table = compact_table(title=title)
    table.add_column("top\ntokens", justify="right", no_wrap=True)
    table.add_column("per\nclip", justify="right", no_wrap=True)
    table.add_column("share of value %\nper clip (mean)", justify="right", no_wrap=True)
    table.add_column("pooled", justify="right", no_wrap=True)
    if recall:
        table.add_column("fg recall %\noracle", justify="right", no_wrap=True)
        table.add_column("random", justify="right", no_wrap=True)
    for row in report.pareto:
        cells = [f"{_pct(row.fraction, 0)}%", str(row.tokens), _pct(row.per_clip), _pct(row.pooled)]
        if recall:
            r = recall.get(row.fraction)
            cells += [_pct(r.recall), _pct(r.random)] if r is not None else ["", ""]
        table.add_row(*cells)
    return table
