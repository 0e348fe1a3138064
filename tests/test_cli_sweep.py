"""`tokensieve sweep` through typer's test runner: a run on a tiny model and synthetic set, what it
prints and writes, Ctrl-C and resuming, and bad arguments as one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import interrupt_after_records
from tokensieve.cli import app
from tokensieve.data.synthetic import make_synthetic

runner = CliRunner()
WIDE = {"COLUMNS": "200"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return make_synthetic(root, videos=6, classes=4, frames=4, size=32, patch=8, tubelet=2, partial=True,
                          object_size=(0.3, 0.35))  # fmt: skip


def _sweep(data: Path, out: Path, *extra: str, env: dict | None = None):  # type: ignore[no-untyped-def]
    args = ["sweep", "--model", "videomae-tiny", "--data", str(data), "--out", str(out), "--workers", "0",
            "--stride", "1", "--methods", "random,attention,tome", "--budgets", "0.6,0.8", "--seeds", "2"]  # fmt: skip
    return runner.invoke(app, [*args, *extra], env=env or WIDE)


def test_sweep_writes_its_report_and_prints_the_table(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = _sweep(synth, out)
    assert result.exit_code == 0, result.output
    for name in ("results.jsonl", "report.md", "pareto.png", "summary.json", "examples/tome.png"):
        assert (out / name).is_file(), name
    assert f"report: {out / 'report.md'}" in result.stderr
    for method in ("none", "random", "attention", "tome"):
        assert method in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    rows = {(s["method"], s["budget"]) for s in summary["settings"]}
    assert rows == {("none", None)} | {(m, b) for m in ("random", "attention", "tome") for b in (0.6, 0.8)}
    # the synthetic set's truth sits next to its list: recall is measured
    assert all(s["recall"] is not None for s in summary["settings"] if s["refused"] is None)
    report = (out / "report.md").read_text()
    assert "## Budget 0.8" in report and "## Budget 0.6" in report and "- **command**: `tokensieve " in report


def test_sweep_fits_80_columns(synth: Path, tmp_path: Path) -> None:
    result = _sweep(synth, tmp_path / "s", "--no-speed", "--no-examples", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    table = result.stdout.splitlines()
    assert max(len(line.rstrip()) for line in table) <= 80
    assert "n.s." in result.stdout or "beats" in result.stdout or "worse" in result.stdout
    assert "verdict: the 95% interval" in result.stderr


def test_sweep_ctrl_c_says_how_to_resume(
    synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sweep"
    interrupt_after_records(monkeypatch, 7)
    result = _sweep(synth, out, "--no-speed", "--no-examples")
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == (
        f"interrupted: 7 (video, setting) results are recorded in {out}; rerun the same command to resume"
    ), result.output
    monkeypatch.undo()
    again = _sweep(synth, out, "--no-speed", "--no-examples")
    assert again.exit_code == 0, again.output
    assert "resuming: 7 of" in again.stderr


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (["--budgets", "0.5,x"], ["--budgets takes comma-separated numbers"]),
        (["--budgets", "1.5"], ["budgets must be token ratios in (0, 1)"]),
        (["--methods", "nope"], ["unknown method 'nope'", "valid methods:"]),
        (["--methods", "tome:r=3"], ["tome:r=3: leave r out; the sweep sets it"]),
        (["--views", "4"], ["--views is CLIPSxCROPS"]),
    ],
)
def test_bad_arguments_are_one_line(synth: Path, tmp_path: Path, extra: list[str], names: list[str]) -> None:
    args = ["sweep", "--model", "videomae-tiny", "--data", str(synth), "--out", str(tmp_path / "s"), "--workers",
            "0", "--no-speed", "--no-examples", *extra]  # fmt: skip
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for name in names:
        assert name in result.stderr


def test_data_is_needed_for_another_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sweep", "--model", "videomae-tiny", "--out", str(tmp_path)], env=WIDE)
    assert result.exit_code == 2
    assert "--data is needed for a model other than a built-in one" in result.stderr


def test_torchrun_two_processes_match_one(synth: Path, tmp_path: Path) -> None:
    """Under torchrun the videos split over the processes; the records and the summary equal one
    process's (random draws are keyed by clip, so the split changes nothing)."""
    import os
    import subprocess
    import sys

    def run(out: Path, procs: int) -> dict:
        args = ["sweep", "--model", "videomae-tiny", "--data", str(synth), "--out", str(out), "--workers", "0",
                "--stride", "1", "--methods", "random,tome", "--budgets", "0.7", "--seeds", "2", "--no-speed",
                "--no-examples", "--batch-size", str(2 + procs), "--json"]  # fmt: skip
        launch = [
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(procs),
            "--standalone",
            "-m",
            "tokensieve",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
        done = subprocess.run(
            [sys.executable, *launch, *args], capture_output=True, text=True, env=env, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    for a, b in zip(one["settings"], two["settings"], strict=True):
        assert (a["spec"], a["top1"], a["recall"], a["random_top1"], a["delta"]) == pytest.approx(
            (b["spec"], b["top1"], b["recall"], b["random_top1"], b["delta"])
        )
    from tokensieve.engine.results import read_results

    key = lambda r: (r["setting"], r["id"])  # noqa: E731
    a = sorted(read_results(tmp_path / "one" / "results.jsonl")[1], key=key)
    b = sorted(read_results(tmp_path / "two" / "results.jsonl")[1], key=key)
    assert [key(r) for r in a] == [key(r) for r in b] and len({key(r) for r in b}) == len(b)
    assert not (tmp_path / "two" / "results.jsonl.parts").exists()
