"""Benchmark scripts run end to end on tiny settings (smoke tests: structure, never timings)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A benchmark script imported as a module (its `main` not run)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_lite_benchmark_runs_on_a_tiny_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lite = _script("lite", monkeypatch)
    out = tmp_path / "lite.json"
    argv = ["--models", "videomae-tiny", "--batch-sizes", "1", "--plus", "videomae-tiny", "4",
            "--warmup", "0", "--repeats", "2", "--json", str(out)]  # fmt: skip
    doc = lite.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert [(s["model"], s["batch"]) for s in doc["shares"]] == [("videomae-tiny", 1), ("videomae-tiny", 4)]
    for share in doc["shares"]:
        assert 0 < share["share"] < 1 and 0 < share["alone_share"] and 0 < share["flop_share"] < 0.1
        assert share["rounds"] == 2 and share["used"] in (share["quiet"], 2) and len(share["others"]) == 2
    plus = doc["plus"]
    assert [r["plan"].split(",low=")[0] for r in plus["rows"]] == [
        "none",
        "lite:keep=0.5",
        "lite++:keep=0.5",
        "lite++:keep=0.7",
    ]
    assert plus["high"] == pytest.approx(sum(sorted(plus["confidences"])[1:3]) / 2)  # their median
    none, fixed, *adaptive = plus["rows"]
    assert none["gflops_ratio"] == 1.0 and fixed["small_share"] is None
    for row in adaptive:
        assert row["small_share"] == 0.5  # the median threshold puts half the clips on the small budget
        assert len(set(row["per_clip"])) == 2 and row["gflops"] == pytest.approx(sum(row["per_clip"]) / 4)
        assert row["gflops_parts"]["glance"] > 0 and row["time_parts"]["glance"] > 0
    assert "LITE++ on videomae-tiny, batch 4" in capsys.readouterr().out


def test_lite_benchmark_compares_the_rounds_in_which_every_run_was_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lite = _script("lite", monkeypatch)
    base = [{"others": o} for o in (0.0, 0.5, 0.1, 0.0)]
    plan = [{"others": o} for o in (0.1, 0.0, 0.0, 0.9)]
    assert lite.quiet_rounds(base) == ([0, 2, 3], 3)
    assert lite.quiet_rounds(base, plan) == ([0, 2], 2)  # both runs of a pair quiet
    loud = [{"others": o} for o in (0.0, 0.5, 0.5, 0.5)]
    assert lite.quiet_rounds(base, loud) == ([0, 1, 2, 3], 1)  # too few: every round


def test_halting_benchmark_runs_on_a_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    halting = _script("halting", monkeypatch)
    out = tmp_path / "halting.json"
    argv = ["--model", "haltingvt-tiny", "--batch", "3", "--target", "0.003", "--repeats", "2", "--warmup", "0",
            "--threads", "1", "--json", str(out)]  # fmt: skip
    doc = halting.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    rows = {row["plan"].split(",halted=")[-1]: row for row in doc["rows"]}
    assert set(rows) == {"none", "glimpser:keep=0.5", "remove", "zero"}
    assert rows["zero"]["gflops"] == pytest.approx(
        rows["glimpser:keep=0.5"]["gflops"]
    )  # zeroed tokens still cost
    assert rows["remove"]["gflops"] < rows["none"]["gflops"] and len(rows["remove"]["clips"]) == 3
    assert rows["zero"]["paper_gflops"] == rows["remove"]["gflops"]


def test_gpu_script_runs_its_commands_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu.sh is one command on a GPU machine; here DEVICE=cpu runs the same `tokensieve bench`
    calls on a tiny model: a table per dtype and kernel in the log, the JSON beside it, and a kernel
    that cannot run here skipped with a line instead of ending the script."""
    out = tmp_path / "gpu"
    env = {**os.environ, "DEVICE": "cpu", "MODELS": "videomae-tiny", "PLANS": "random:keep=0.5",
           "DTYPES": "bfloat16", "BATCHES": "1 2", "SDPAS": "math efficient", "REPEATS": "1", "WARMUP": "1",
           "COMPILE": "0", "OUT": str(out)}  # fmt: skip
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh")], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    log = (out / "videomae-tiny.txt").read_text()
    assert log.count("random:keep=0.5") == 2 + 1  # batch 1 and 2, then the math kernel at batch 8
    assert "math attention" in log and "(efficient attention cannot run these inputs here: skipped)" in log
    assert "MB/clip" in log  # the training step's memory
    results = json.loads((out / "videomae-tiny-bfloat16.json").read_text())["results"]
    assert [(r["plan"], r["batch_size"]) for r in results] == [
        ("none", 1), ("random:keep=0.5", 1), ("none", 2), ("random:keep=0.5", 2)]  # fmt: skip
    assert all(r["train_mb"] is not None and r["device"] == "cpu" for r in results)
    assert json.loads((out / "videomae-tiny-bfloat16-math.json").read_text())["results"][0]["sdpa"] == "math"
    assert sorted(p.name for p in out.iterdir()) == [
        "videomae-tiny-bfloat16-math.json", "videomae-tiny-bfloat16.json", "videomae-tiny.txt"]  # fmt: skip
