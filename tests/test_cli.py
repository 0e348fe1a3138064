"""The `tokensieve` command line (bench, flops, info) through typer's test runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokensieve import PRESETS
from tokensieve.cli import app

runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # rich fits tables to the terminal; keep every name whole


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # stdout holds the JSON document and nothing else


def test_bench_json() -> None:
    doc = _json(["bench", "--model", "videomae-tiny", "--repeats", "2", "--warmup", "1", "--json"])
    assert doc["model"] == "videomae-tiny"
    (row,) = doc["results"]
    expected = {"plan", "batch_size", "dtype", "gflops", "gflops_ratio", "seconds", "seconds_iqr", "clips_per_s",
                "speedup", "speedup_iqr", "times", "threads", "frames", "size"}  # fmt: skip
    assert expected <= row.keys()
    assert (row["plan"], row["batch_size"], row["dtype"], row["speedup"]) == ("none", 1, "float32", 1.0)
    assert len(row["times"]) == 2


def test_bench_table_with_batch_sizes_dtype_and_threads() -> None:
    args = ["bench", "-m", "videomae-tiny", "--repeats", "2", "--warmup", "0", "-b", "1", "-b", "2",
            "--dtype", "bfloat16", "--threads", "1"]  # fmt: skip
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    assert "videomae-tiny, 4x32, bfloat16, cpu, 1 threads" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["none"]]
    assert [row[1] for row in rows] == ["1", "2"]  # one row per batch size


def test_flops_videomae_b_is_the_papers_180() -> None:
    doc = _json(["flops", "--model", "videomae-b", "--json"])
    (row,) = doc["results"]
    assert (doc["frames"], doc["size"], row["plan"]) == (16, 224, "none")
    assert row["gflops"] == pytest.approx(180.5, abs=1.0)
    assert sum(row["by_module"].values()) == pytest.approx(row["gflops"])
    assert row["by_module"]["blocks"] > 0.9 * row["gflops"]


def test_flops_table_and_input_override() -> None:
    result = runner.invoke(app, ["flops", "-m", "videomae-tiny", "--frames", "8"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "videomae-tiny, 8x32" in result.stdout
    assert "blocks" in result.stdout


def test_info_lists_presets_and_methods() -> None:
    result = runner.invoke(app, ["info"], env=WIDE)
    assert result.exit_code == 0, result.output
    for name in PRESETS:
        assert name in result.stdout
    assert "none" in result.stdout
    doc = _json(["info", "--json"])
    assert [p["name"] for p in doc["presets"]] == list(PRESETS)
    assert "none" in [m["name"] for m in doc["methods"]]
    videomae_b = next(p for p in doc["presets"] if p["name"] == "videomae-b")
    assert videomae_b["params_m"] == pytest.approx(86.5, abs=0.5)
    assert videomae_b["gflops"] == pytest.approx(180.5, abs=1.0)
    assert doc["versions"]["torch"]


def test_local_checkpoint_directory(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.VideoMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_frames=4, tubelet_size=2, num_labels=5,
    )  # fmt: skip
    transformers.VideoMAEForVideoClassification(config).save_pretrained(tmp_path)
    doc = _json(["flops", "--model", str(tmp_path), "--json"])
    assert (doc["frames"], doc["size"]) == (4, 32)
    assert doc["results"][0]["gflops"] > 0
    doc = _json(["bench", "--model", str(tmp_path), "--repeats", "1", "--warmup", "0", "--json"])
    assert doc["results"][0]["plan"] == "none"


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["bench", "--model", "videomae-nope"], ["unknown model", "videomae-s", "videomae-tiny"]),
        (["flops", "--model", "videomae-nope"], ["unknown model", "videomae-b"]),
        (["flops", "--model", "./no/such/dir"], ["unknown model", "local checkpoint directory"]),
        (
            ["flops", "--model", "videomae-tiny", "--plan", "bogus:r=3"],
            ["unknown method", "valid methods: attention, none, random"],
        ),
        (["bench", "--model", "videomae-tiny", "--plan", "none:r=3"], ["no parameter 'r'"]),
        (["bench", "--model", "videomae-tiny", "--dtype", "float16"], ["float32", "bfloat16"]),
        # --methods adds every main setting; STA's r=64 does not fit a 16-token frame
        (["bench", "--model", "videomae-tiny", "--methods"], ["sta: r=64 is not smaller than the 16 tokens"]),
        (["flops", "--model", "videomae-tiny", "--frames", "5"], ["divisible"]),
        (["eval", "--model", "videomae-tiny", "--data", "no/such/list.txt"], ["no such dataset"]),
        (["eval", "--model", "videomae-tiny", "--data", ".", "--views", "4x2"], ["--views is CLIPSxCROPS"]),
        (["eval", "--model", "videomae-tiny", "--data", ".", "--sampling", "random"], ["dense or segments"]),
        (["eval", "--model", "videomae-tiny", "--data", ".", "--plan", "tome:r=99"], ["more than half"]),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], names: list[str]) -> None:
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    for name in names:
        assert name in result.stderr


def test_python_dash_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokensieve", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    for command in ("bench", "flops", "info", "eval", "make-synthetic", "train"):
        assert command in result.stdout
