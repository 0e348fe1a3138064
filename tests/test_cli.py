"""The `tokensieve` command line (bench, flops, info) through typer's test runner."""

from __future__ import annotations

import errno
import json
import os
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


# ---------------------------------------------------------------------------------------- eval
@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's synthetic benchmark, small: six 16-frame videos of 32 x 32."""
    from tokensieve.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synth"), videos=6, classes=3, size=32)


def _eval(data: Path, out: Path | None, *extra: str) -> object:
    # --stride 8 makes a 25-frame clip of the tiny model's 4 frames: longer than the 16-frame videos,
    # as the README's 16 x 4 clips (61 frames) of videomae-s are
    args = ["eval", "--model", "videomae-tiny", "--data", str(data), "--stride", "8", "--workers", "0"]
    return runner.invoke(app, [*args, *(["--out", str(out)] if out else []), *extra], env=WIDE)


def _one_error_line(result, *names: str) -> None:
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    for name in names:
        assert name in result.stderr, result.stderr


def test_eval_readme_example_on_16_frame_videos(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "sta.jsonl"
    result = _eval(synth, out, "--plan", "random:keep=0.5", "--views", "2x3", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["videos"], doc["evaluated"], doc["failed"], doc["views"]) == (6, 6, 0, [2, 3])
    assert json.loads((tmp_path / "sta.jsonl.summary.json").read_text()) == doc
    # the same command again: everything is done, and it says so
    again = _eval(synth, out, "--plan", "random:keep=0.5", "--views", "2x3")
    assert again.exit_code == 0, again.output
    assert f"{out}: resuming: 6 of 6 videos already done, 0 to do" in again.stderr
    assert "evaluated" in again.stdout


def test_eval_exit_codes(synth: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.txt"  # one missing video among the six
    broken.write_text(synth.read_text().replace("videos/000001.mp4", "videos/missing.mp4"))
    root = ("--root", str(synth.parent))
    assert _eval(broken, None, *root).exit_code == 0  # failures are reported, the run counts
    strict = _eval(broken, None, *root, "--strict")
    assert strict.exit_code == 1 and "error: 1 of 6 videos failed (--strict)" in strict.stderr
    missing = tmp_path / "missing.txt"
    missing.write_text("nothing.mp4 0\nnowhere.mp4 1\n")
    nothing = _eval(missing, None, "--json")
    assert nothing.exit_code == 1 and "error: no video could be evaluated: all 2 failed" in nothing.stderr
    assert json.loads(nothing.stdout)["evaluated"] == 0
    empty = tmp_path / "empty.txt"
    empty.write_text("# no videos\n")
    result = _eval(empty, None)
    assert result.exit_code == 2
    _one_error_line(result, "lists no videos")


def test_eval_refuses_an_out_of_another_run_or_not_a_results_file(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    assert _eval(synth, out, "--views", "2x3").exit_code == 0
    written = out.read_bytes()
    result = _eval(synth, out, "--views", "1x1", "--plan", "random:keep=0.5")
    assert result.exit_code == 2
    _one_error_line(result, "holds results of another run (6 videos)", "plan (file: none, now: random:keep=0.5)",
                    "views (file: 2x3, now: 1x1)")  # fmt: skip
    assert out.read_bytes() == written
    listing = tmp_path / "list.txt"  # a one-line list file given as --out by mistake
    listing.write_text("videos/000000.mp4 0\n")
    result = _eval(synth, listing)
    assert result.exit_code == 2
    _one_error_line(result, f"{listing} is not a tokensieve results file")
    assert listing.read_text() == "videos/000000.mp4 0\n"


def _no_space(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokensieve.engine import results

    def write(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results, "_write", write)


@pytest.mark.parametrize("problem", ["folder", "parent is a file", "disk full", "read-only"])
def test_eval_os_errors_are_one_line_and_leave_nothing(
    problem: str, synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, expected = tmp_path / "r.jsonl", ""
    if problem == "folder":
        out, expected = tmp_path, f"cannot use {tmp_path}: Is a directory"
    elif problem == "parent is a file":
        (tmp_path / "file").touch()
        out, expected = (
            tmp_path / "file" / "sub" / "r.jsonl",
            f"cannot use {tmp_path / 'file'}: Not a directory",
        )
    elif problem == "disk full":
        _no_space(monkeypatch)
        expected = "No space left on device"
    else:
        real = os.open

        def open_(path, flags, mode=0o777, *, dir_fd=None):  # chmod does not stop root
            if Path(path).parent == tmp_path and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, flags, mode, dir_fd=dir_fd)

        monkeypatch.setattr(os, "open", open_)
        expected = f"cannot use {out}.lock: Read-only file system"
    before = sorted(tmp_path.iterdir())
    result = _eval(synth, out)
    assert result.exit_code == 2
    _one_error_line(result, expected)
    assert sorted(tmp_path.iterdir()) == before  # nothing half-written, no lock, no temporary file


def test_eval_ctrl_c_says_how_to_resume(synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokensieve.engine.results import RecordWriter

    out, written = tmp_path / "r.jsonl", []
    real = RecordWriter.write

    def write(self, record: dict) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(record)
        real(self, record)

    monkeypatch.setattr(RecordWriter, "write", write)
    result = _eval(synth, out, "--views", "2x3")
    assert result.exit_code == 130 and "Traceback" not in result.output
    # the last line (after the progress bar's last state, printed when not on a terminal)
    assert result.stderr.splitlines()[-1] == (
        f"interrupted: 2 of 6 videos are recorded in {out}; rerun the same command to resume"
    ), result.output
    monkeypatch.undo()
    again = _eval(synth, out, "--views", "2x3", "--json")
    assert again.exit_code == 0, again.output
    assert "resuming: 2 of 6 videos already done, 4 to do" in again.stderr
    assert json.loads(again.stdout)["done_before"] == 2
