"""`engine.report`: bootstrap intervals on hand-made cases, verdicts, the Pareto front, report.md,
pareto.png and the terminal table of a hand-made sweep."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from tokensieve import InputError
from tokensieve.engine import report as rp
from tokensieve.engine.report import (
    BEATS,
    INDISTINGUISHABLE,
    WORSE,
    Setting,
    SweepReport,
    bootstrap_ci,
    method_style,
    paired_bootstrap_ci,
    pareto_front,
    terminal_table,
    verdict,
    write_report,
)


# ------------------------------------------------------------------------------------- statistics
def test_two_videos_interval_spans_both_outcomes() -> None:
    # Resampled means of [1, 0] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% quantiles of enough of them are the extremes.
    assert bootstrap_ci([1.0, 0.0], samples=4000) == (0.0, 1.0)


@pytest.mark.parametrize("value", [0.0, 1.0, 0.3, 2 / 3])
def test_constant_values_give_a_zero_width_interval_at_the_value(value: float) -> None:
    assert bootstrap_ci([value] * 37) == (value, value)


def test_proportion_matches_the_normal_approximation() -> None:
    values = np.r_[np.ones(320), np.zeros(80)]  # mean 0.8, standard error sqrt(0.8 * 0.2 / 400) = 0.02
    low, high = bootstrap_ci(values)
    assert low == pytest.approx(0.8 - 1.96 * 0.02, abs=0.01)
    assert high == pytest.approx(0.8 + 1.96 * 0.02, abs=0.01)
    narrower = bootstrap_ci(values, level=0.5)
    assert low < narrower[0] < 0.8 < narrower[1] < high


def test_same_seed_same_interval_and_inputs_of_any_kind() -> None:
    values = np.random.default_rng(1).random(50)
    ci = bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values.tolist(), seed=7) == ci
    assert bootstrap_ci(torch.from_numpy(values), seed=7) == ci
    assert bootstrap_ci(values, seed=8) != ci
    assert paired_bootstrap_ci(values, values[::-1], seed=3) == paired_bootstrap_ci(
        values, values[::-1], seed=3
    )


def test_chunking_does_not_change_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    values = np.random.default_rng(2).random(13)
    whole = bootstrap_ci(values, samples=501, seed=4)
    monkeypatch.setattr(rp, "CHUNK_ELEMENTS", 30)  # 2 resamples per chunk, the last one alone
    assert bootstrap_ci(values, samples=501, seed=4) == whole


def test_paired_identical_and_shifted() -> None:
    a = (np.random.default_rng(3).random(200) < 0.6).astype(float)
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0)
    assert paired_bootstrap_ci(a, a - 0.25) == (0.25, 0.25)  # exact in binary: every difference is 0.25
    shifted = paired_bootstrap_ci(a + 0.1, a)  # differences equal up to rounding
    assert shifted == pytest.approx((0.1, 0.1), abs=1e-12)


def test_pairing_cancels_what_the_videos_share() -> None:
    gen = np.random.default_rng(4)
    difficulty = gen.random(500)  # per-video accuracy varies a lot, both settings alike
    a = difficulty + 0.05 + 0.01 * gen.standard_normal(500)
    b = difficulty
    low, high = paired_bootstrap_ci(a, b)
    assert low < 0.05 < high and low > 0
    (la, ha), (lb, hb) = bootstrap_ci(a), bootstrap_ci(b)
    unpaired = float(np.hypot(ha - la, hb - lb))  # width of an interval of two independent means
    assert unpaired > 0.04  # it would contain 0 ...
    assert high - low < 0.1 * unpaired  # ... the paired one is tight


def test_bad_statistics_input_is_an_input_error() -> None:
    for call in (
        lambda: bootstrap_ci([]),
        lambda: bootstrap_ci([[1.0, 0.0]]),
        lambda: bootstrap_ci([1.0, float("nan")]),
        lambda: bootstrap_ci(["a", "b"]),
        lambda: bootstrap_ci([1.0], level=1.0),
        lambda: bootstrap_ci([1.0], samples=0),
        lambda: paired_bootstrap_ci([1.0, 0.0], [1.0]),
        lambda: verdict((0.2, 0.1)),
        lambda: pareto_front([(1.0, float("nan"))]),
    ):
        with pytest.raises(InputError):
            call()


def test_verdict() -> None:
    assert verdict((0.001, 0.05)) == BEATS
    assert verdict((-0.05, -0.001)) == WORSE
    assert verdict((-0.01, 0.02)) == verdict((0.0, 0.02)) == verdict((0.0, 0.0)) == INDISTINGUISHABLE


def test_pareto_front_hand_checked() -> None:
    points = [
        (1.0, 0.5),  # on the front
        (2.0, 0.7),  # on the front: the most accurate at the lowest cost reaching it
        (2.0, 0.6),  # dominated by (2, 0.7): same cost, less accurate
        (3.0, 0.7),  # dominated by (2, 0.7): same accuracy, more cost
        (0.5, 0.4),  # on the front: the cheapest
        (1.0, 0.5),  # equal to the first: equal points do not dominate each other
        (1.5, 0.45),  # dominated by (1, 0.5)
    ]
    assert pareto_front(points) == [True, True, False, False, True, True, False]
    assert pareto_front([]) == []
    # Higher is better on both axes: negate the speed-up.
    speed = [(1.0, 0.8), (2.0, 0.7), (1.5, 0.6), (2.0, 0.75)]
    assert pareto_front([(-s, a) for s, a in speed]) == [True, False, False, True]


# ----------------------------------------------------------------------------------- the report
def _sweep() -> SweepReport:
    """3 methods (random among them) x 2 budgets, one refused setting, the resize baseline at one budget,
    the unreduced reference. sta at 0.5 reads against resize (stronger there, 5% cheaper)."""
    same, worse = INDISTINGUISHABLE, WORSE
    settings = [
        Setting("random", 0.5, "random:keep=0.5", gflops=0.0140, speedup=1.7, top1=0.70, top1_ci=(0.65, 0.75),
                top5=0.90),
        Setting("random", 0.25, "random:keep=0.25", gflops=0.00715, speedup=2.6, top1=0.55, top1_ci=(0.50, 0.60),
                top5=0.80),
        Setting("sta", 0.5, "sta:r=12", gflops=0.0141, speedup=1.5, top1=0.78, top1_ci=(0.74, 0.82), top5=0.94,
                recall=0.9, random_spec="random:keep=0.51,at=0", random_gflops=0.0141, random_top1=0.71,
                resize_spec="resize:keep=0.510204", resize_gflops=0.0134, resize_top1=0.74, baseline="resize",
                delta=0.04, delta_ci=(0.01, 0.07), verdict="beats resize"),
        Setting("resize", 0.25, "resize:keep=0.255102", gflops=0.0070, speedup=3.1, top1=0.53,
                top1_ci=(0.48, 0.58), top5=0.79, random_spec="random:keep=0.24,at=0", random_gflops=0.0070,
                random_top1=0.545, baseline="random", delta=-0.015, delta_ci=(-0.05, 0.02), verdict=same),
        Setting("sta", 0.25, "sta:r=20", gflops=0.0075, speedup=2.2, top1=0.52, top1_ci=(0.47, 0.57), top5=0.8,
                recall=0.7, random_spec="random:keep=0.26,at=0", random_gflops=0.0075, random_top1=0.555,
                resize_spec="resize:keep=0.255102", resize_gflops=0.0070, resize_top1=0.53, baseline="random",
                delta=-0.035, delta_ci=(-0.07, 0.005), verdict=same),
        Setting("tome", 0.5, "tome:r=8", gflops=0.0139, speedup=1.3, top1=0.66, top1_ci=(0.61, 0.71), top5=0.88,
                random_spec="random:keep=0.49,at=0", random_gflops=0.0139, random_top1=0.695, delta=-0.035,
                delta_ci=(-0.06, -0.01), verdict=worse),
        Setting("tome", 0.25, None, refused="r=30 merges more tokens than a block holds (at most 16)"),
        Setting("none", None, "none", gflops=0.0271, speedup=1.0, top1=0.80, top1_ci=(0.76, 0.84), top5=0.95),
    ]  # fmt: skip
    header = {
        "command": "tokensieve sweep --model videomae_tiny",
        "date": "2025-06-01",
        "model": "videomae-tiny",
    }
    return SweepReport(settings=settings, header=header, examples={"sta": "examples/sta.png"})


def _tables(md: str) -> dict[str, list[list[str]]]:
    """Budget heading -> the rows of its table (cells stripped), header and rule excluded."""
    tables: dict[str, list[list[str]]] = {}
    for section in re.split(r"^## ", md, flags=re.M)[1:]:
        title, _, body = section.partition("\n")
        rows = [line for line in body.splitlines() if line.startswith("|")]
        tables[title] = [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]
    return tables


def test_write_report_markdown(tmp_path: Path) -> None:
    write_report(_sweep(), tmp_path / "sweep")
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert md.startswith("# ")
    assert "- **command**: `tokensieve sweep --model videomae_tiny`" in md  # the command as code
    assert "![" in md and "](pareto.png)" in md
    assert "**Unreduced reference** (`none`): top-1 80.0 [76.0, 84.0] %" in md and "0.0271 GFLOPs" in md
    tables = _tables(md)
    budgets = [t for t in tables if t.startswith("Budget")]
    assert budgets == ["Budget 0.5 (50% of tokens kept)", "Budget 0.25 (25% of tokens kept)"]  # descending
    first, second = (tables[b] for b in budgets)
    assert [r[0] for r in first] == ["sta", "random", "tome"]  # by top-1, best first
    assert [r[0] for r in second] == ["random", "resize", "sta"]  # tome refused: no row
    sta = first[0]
    assert sta[1] == "`sta:r=12`"
    assert sta[2:] == [
        "78.0 [74.0, 82.0]",
        "94.0",
        "0.0141",
        "1.50x",
        "90.0",
        "71.0",
        "74.0 (-5% GFLOPs)",  # the nearest frame size is 5% cheaper: said in its cell
        "+4.0 [+1.0, +7.0]",  # against resize, the stronger baseline
        "beats resize",
    ]
    assert first[1][-1] == "baseline" and first[1][6] == "-"  # random: no recall, no verdict of its own
    assert first[2][-2:] == ["-3.5 [-6.0, -1.0]", WORSE]
    assert second[0][4] == "0.00715" and second[2][-1] == INDISTINGUISHABLE
    assert second[2][8] == "53.0 (-7% GFLOPs)" and second[1][8] == "-"  # resize has no resize baseline
    assert "- tome: refused — r=30 merges more tokens than a block holds (at most 16)" in md
    assert md.index("refused —") > md.index("Budget 0.25")
    summary = md[md.index("## Summary") :]
    assert f"- **sta**: beats resize at 0.5; {INDISTINGUISHABLE} at 0.25." in summary
    assert f"- **resize**: {INDISTINGUISHABLE} at 0.25." in summary  # resize is a method against random
    assert f"- **tome**: {WORSE} at 0.5; refused at 0.25." in summary
    assert "**random**" not in summary and "**none**" not in summary
    assert "![sta](examples/sta.png)" in md
    assert not list((tmp_path / "sweep").glob("*.tmp"))  # atomic writes leave no temporary file


def test_write_report_png(tmp_path: Path) -> None:
    write_report(_sweep(), tmp_path)
    png = tmp_path / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1400, 600)


def test_write_report_degenerate_sweeps(tmp_path: Path) -> None:
    only_refused = SweepReport(
        [Setting("tome", 0.25, None, refused="too few tokens")], header={}, examples={}
    )
    write_report(only_refused, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "No unreduced reference" in md and "No method ran at this budget." in md
    assert "- tome: refused — too few tokens" in md
    no_budget = SweepReport(  # refused before it had a budget: an adaptive method without trained weights
        [Setting("halting", None, None, refused="halting is learned and this model has no trained halting weights")],
        header={}, examples={},
    )  # fmt: skip
    write_report(no_budget, tmp_path)
    summary = (tmp_path / "report.md").read_text().split("## Summary")[1]
    assert (
        "- **halting**: refused (halting is learned and this model has no trained halting weights)."
        in summary
    )
    with Image.open(tmp_path / "pareto.png") as image:
        assert image.size == (1400, 600)
    with pytest.raises(InputError):
        write_report(SweepReport([], header={}, examples={}), tmp_path)


def test_write_report_names_an_unwritable_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(OSError, match="file"):
        write_report(_sweep(), tmp_path / "file")


def test_gflops_keep_significant_digits() -> None:
    cases = {
        0.0271: "0.0271",
        0.014: "0.0140",
        1.234: "1.23",
        12.34: "12.3",
        180.46: "180.5",
        1234.5: "1234.5",
    }
    assert {x: rp._gflops(x) for x in cases} == cases


def test_method_styles_are_fixed_and_distinct() -> None:
    from tokensieve.reducers import REGISTRY

    reduced = [m for m in REGISTRY if m not in ("none", "random")]
    styles = [method_style(m) for m in reduced]
    assert len({colour for colour, _ in styles}) == len(styles)
    assert all(colour != "black" for colour, _ in styles)  # black is the references'
    assert method_style("some_new_method") == method_style("some_new_method")


def test_terminal_table_renders_every_setting() -> None:
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(terminal_table(_sweep(), title="sweep"))
    text = console.export_text(clear=False)
    for method in ("none", "random", "sta", "tome"):
        assert method in text
    for word in ("beats resize", INDISTINGUISHABLE, WORSE, "refused"):
        assert word in text
    assert text.index("none") < text.index("0.5") < text.index("0.25")
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 120
    styled = console.export_html(inline_styles=True)  # rich's standard green, yellow and red
    for colour, word in (("#008000", "beats resize"), ("#808000", INDISTINGUISHABLE), ("#800000", WORSE)):
        assert re.search(f"color: {colour}[^>]*>{word} *<", styled), word
    narrow = Console(record=True, width=80, file=io.StringIO())
    narrow.print(terminal_table(_sweep(), wide=False))
    assert "beats rs" in narrow.export_text()  # beats resize, in 80 columns


def test_a_random_baseline_off_by_more_than_half_a_percent_is_marked(tmp_path: Path) -> None:
    def row(method: str, random_gflops: float) -> Setting:
        return Setting(method, 0.25, f"{method}:keep=0.2", gflops=0.0152, top1=0.9, top1_ci=(0.85, 0.95),
                       random_spec="random:keep=0.25,at=0", random_gflops=random_gflops, random_top1=0.6,
                       delta=0.3, delta_ci=(0.25, 0.35), verdict="beats random")  # fmt: skip

    ref = Setting("none", None, "none", gflops=0.0555, top1=0.96, top1_ci=(0.94, 0.98))
    write_report(SweepReport([ref, row("stts", 0.0151), row("uniform", 0.01515)], {}, {}), tmp_path)
    md = (tmp_path / "report.md").read_text()
    marked = [line for line in md.splitlines() if "†" in line]
    assert len(marked) == 2  # the stts row (0.66% off) and its note; uniform (0.33% off) is not marked
    assert marked[0].startswith("| stts |") and "-0.66% from the method's" in marked[1]


def test_an_adaptive_setting_is_marked_with_its_measured_means(tmp_path: Path) -> None:
    """A method with an adaptive budget (`views` set) sits in the table of its measured budget; report.md
    and the terminal table mark it ‡ and the note says over how many views its numbers are means."""
    ref = Setting("none", None, "none", gflops=0.0555, top1=0.96, top1_ci=(0.94, 0.98))
    adaptive = Setting("attention:mass=0.9", 0.37, "attention:mass=0.9", gflops=0.03, top1=0.9,
                       top1_ci=(0.85, 0.95), random_spec="random:keep=0.3,at=0", random_gflops=0.03,
                       random_top1=0.7, delta=0.2, delta_ci=(0.1, 0.3), verdict=BEATS, views=400)  # fmt: skip
    write_report(SweepReport([ref, adaptive], {}, {}), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Budget 0.37 (37% of tokens kept)" in md
    (row,) = _tables(md)["Budget 0.37 (37% of tokens kept)"]
    assert row[4] == "0.0300 ‡"
    assert "means over its 400 views, measured as they ran; random is matched to that mean" in md
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(terminal_table(SweepReport([ref, adaptive], {}, {})))
    assert "attention:mass=0.9 ‡" in console.export_text()
