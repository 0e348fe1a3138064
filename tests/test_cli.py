"""The `tokensieve` command line through typer's test runner: every command, its errors and exit codes."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.core import TyperCommand, TyperGroup
from typer.testing import CliRunner

from conftest import interrupt_after_records
from tokensieve import PRESETS, assets
from tokensieve.bench import BenchResult, busy_warning
from tokensieve.cli import app, measure
from tokensieve.data.synthetic import make_synthetic
from tokensieve.reducers import REGISTRY

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


def test_bench_saves_what_json_prints_and_refuses_a_device_it_lacks(tmp_path: Path) -> None:
    saved = tmp_path / "bench.json"
    args = ["bench", "--model", "videomae-tiny", "--repeats", "1", "--warmup", "0", "--sdpa", "math"]
    result = runner.invoke(app, [*args, "--save", str(saved)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "cpu, math attention, " in result.stdout  # the table, and the JSON beside it
    (row,) = json.loads(saved.read_text())["results"]
    assert (row["plan"], row["sdpa"], row["compiled"]) == ("none", "math", False)
    for device, message in [("gpu", "--device must be cpu, cuda, cuda:N or mps; got 'gpu'"),
                            ("cuda", "--device cuda: this torch has no usable CUDA device")]:  # fmt: skip
        bad = runner.invoke(app, [*args, "--device", device])
        assert bad.exit_code == 2 and message in bad.output


def test_bench_table_with_batch_sizes_dtype_and_threads() -> None:
    args = ["bench", "-m", "videomae-tiny", "--repeats", "2", "--warmup", "0", "-b", "1", "-b", "2",
            "--dtype", "bfloat16", "--threads", "1"]  # fmt: skip
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    # bfloat16 as autocast or with bfloat16 weights, whichever ran faster; the title says which
    assert re.search(
        r"videomae-tiny, 4x32, bfloat16 \((autocast|bfloat16 weights)\), cpu, 1 threads", result.stdout
    )
    assert "MB /" in result.stdout  # the peak memory column
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


def test_flops_says_when_a_plan_costs_what_each_clip_keeps() -> None:
    doc = _json(["flops", "--model", "videomae-tiny", "--plan", "attention:mass=0.9", "--json"])
    assert [(r["plan"], r["adaptive"]) for r in doc["results"]] == [
        ("none", False),
        ("attention:mass=0.9", True),
    ]
    result = runner.invoke(app, ["flops", "-m", "videomae-tiny", "--plan", "attention:mass=0.9"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "keeps a different number of tokens in each clip: counted on one random clip" in result.stderr


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
    (builtin,) = doc["builtin_models"]
    assert builtin["name"] == "builtin:synthetic" and "builtin:synthetic" in result.stdout
    assert builtin["heldout_top1"] == assets.card()["heldout_top1"]["none"]


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
            [
                "unknown method",
                "valid methods: adaptive, attention, glimpser, halting, lite, none, oracle, random",
            ],
        ),
        (["bench", "--model", "videomae-tiny", "--plan", "none:r=3"], ["no parameter 'r'"]),
        (["bench", "--model", "videomae-tiny", "--dtype", "float64"], ["float32", "bfloat16", "float16"]),
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


@pytest.mark.parametrize("error", [ValueError, KeyError, TypeError, RuntimeError])
def test_an_internal_error_keeps_its_traceback(
    error: type[Exception], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise error("a bug inside the library")

    monkeypatch.setattr(measure, "flops", broken)
    result = runner.invoke(app, ["flops", "--model", "videomae-tiny"], env=WIDE)
    assert result.exit_code == 1 and isinstance(result.exception, error)  # not turned into a usage error
    assert "error: " not in result.stderr


def test_python_dash_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokensieve", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    for command in ("bench", "flops", "info", "eval", "make-synthetic", "train"):
        assert command in result.stdout


# ---------------------------------------------------------------------------------------------- hardening
def _commands() -> dict[str, TyperCommand]:
    """Every registered command, by name, from the app itself (a new command is covered unasked)."""
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    return dict(group.commands)


@pytest.mark.parametrize("name", [None, *_commands()])
def test_help_at_80_columns_shows_every_option_name_whole(name: str | None) -> None:
    result = runner.invoke(
        app, [*([name] if name else []), "--help"], env={"COLUMNS": "80"}, terminal_width=80
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80, "\n".join(line for line in lines if len(line) > 80)
    if name is None:
        expected = list(_commands())
    else:
        params = _commands()[name].params
        expected = [opt for p in params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")]
        assert expected
    for word in expected:  # whole: not cut ("--freeze-backb…") nor glued to a neighbour
        assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", result.stdout), f"{word} missing or cut"


def test_info_lists_pattern_parameters() -> None:
    doc = _json(["info", "--json"])
    stts = next(m for m in doc["methods"] if m["name"] == "stts")
    by_name = {p["name"]: p for p in stts["params"]}
    assert {"T<block>", "S<block>", "samples"} <= by_name.keys()
    assert by_name["T<block>"] == {"name": "T<block>", "pattern": r"T\d+", "type": "float", "default": None,
                                   "required": False}  # fmt: skip
    assert by_name["samples"]["pattern"] is None
    for name, cls in REGISTRY.items():  # every method's patterns, from the registry
        method = next(m for m in doc["methods"] if m["name"] == name)
        assert [p["pattern"] for p in method["params"] if p["pattern"]] == list(cls.pattern_parameters)
    result = runner.invoke(app, ["info"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "T<block>=<float>, S<block>=<float>, samples=500" in result.stdout


def _fake_result(plan: str, *, spread: float) -> BenchResult:
    """A bench result made by hand, whose rounds disagree by `spread` (no timing in unit tests)."""
    paired = (1.0 - spread / 2, 1.0 + spread / 2)
    return BenchResult(
        plan=plan, batch_size=1, dtype="float32", frames=4, size=32, device="cpu", threads=1, gflops=1.0,
        gflops_ratio=1.0, seconds=1.0, seconds_iqr=paired, times=(1.0,), clips_per_s=1.0, speedup=1.0,
        speedup_iqr=paired,
    )  # fmt: skip


@pytest.mark.parametrize("busy", [False, True])
def test_bench_explains_iqr_and_warns_when_the_machine_was_busy(
    monkeypatch: pytest.MonkeyPatch, busy: bool
) -> None:
    results = [
        _fake_result("none", spread=0.02),
        _fake_result("random:keep=0.5", spread=0.3 if busy else 0.05),
    ]
    monkeypatch.setattr(measure, "benchmark", lambda *args, **kwargs: results)
    args = ["bench", "--model", "videomae-tiny", "--plan", "random:keep=0.5"]
    table = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    assert (
        "IQR: how much the timed rounds disagree" in table.stdout
        and "over 15%: a busy machine" in table.stdout
    )
    assert ("30.0%" if busy else "5.0%") in table.stdout  # the plan's spread, in the IQR column
    doc = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert [r["spread"] for r in doc["results"]] == pytest.approx([0.02, 0.3 if busy else 0.05])
    warnings = [line for line in table.stderr.splitlines() if line.strip()]
    if busy:
        assert warnings == [f"warning: {busy_warning(results)}"]
        assert doc["busy"] == busy_warning(results) and "'random:keep=0.5'" in doc["busy"]
    else:
        assert warnings == [] and doc["busy"] is None


def test_make_synthetic_refuses_a_folder_holding_another_set(tmp_path: Path) -> None:
    args = ["make-synthetic", str(tmp_path / "set"), "--videos", "1", "--frames", "4", "--size", "32"]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)  # the same set: written again
    assert again.exit_code == 0, again.output
    other = runner.invoke(app, [*args, "--seed", "1"], env=WIDE)
    assert other.exit_code == 2 and other.stdout == ""
    assert other.stderr == f"error: {tmp_path / 'set'} holds another synthetic set (seed=0 there, 1 here); " \
        "write it into a new or empty folder\n"  # fmt: skip
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    unrelated = runner.invoke(app, ["make-synthetic", str(tmp_path / "notes"), "--videos", "1"], env=WIDE)
    assert unrelated.exit_code == 2 and unrelated.stderr.count("\n") == 1
    assert "not empty and holds no synthetic set" in unrelated.stderr


def test_train_warns_once_about_clips_a_partial_batch_leaves_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    listing = make_synthetic(tmp_path / "data", videos=5, classes=2, frames=4, size=32)
    args = ["train", "--model", "videomae-tiny", "--data", str(listing), "--out", str(tmp_path / "run"),
            "--batch-size", "2", "--epochs", "2", "--workers", "0", "--stride", "1"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="tokensieve.engine.train"):
        result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    expected = ("1 of the 5 training clips are not used in each epoch: a step takes one global batch of 2 "
                "clips (1 processes x batch_size 2)")  # fmt: skip
    assert [r.getMessage()[: len(expected)] for r in caplog.records if "not used" in r.getMessage()] == [
        expected
    ]
    assert f"warning: {expected}" in result.stderr  # shown above the progress bar, once
    assert result.stderr.count("not used in each epoch") == 1
    # The synthetic classes move left and right: a flip would change the label, so flips are off.
    assert result.stderr.count("warning: random horizontal flips are off: the classes name directions") == 1


# ---------------------------------------------------------------------------------------- trained runs as models
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A two-step `tokensieve train` run of an STTS plan: (its list file, its folder)."""
    from test_datasets import write_video

    root = tmp_path_factory.mktemp("cli-run")
    for i in range(4):
        write_video(root / f"v{i}.mp4", frames=12, seed=i)
    (root / "list.txt").write_text("".join(f"v{i}.mp4 {i % 3}\n" for i in range(4)))
    out = root / "run"
    args = ["train", "--model", "videomae-tiny", "--data", str(root / "list.txt"), "--plan", "stts:T0=0.5",
            "--out", str(out), "--batch-size", "2", "--workers", "0", "--num-classes", "3", "--stride", "2"]  # fmt: skip
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    # The end of training says how to use the result.
    assert f"model: {out} (tokensieve eval --model {out}" in " ".join(result.stderr.split())
    return root / "list.txt", out


def test_eval_bench_and_flops_take_a_run_and_a_saved_model(
    trained_run: tuple[Path, Path], tmp_path: Path
) -> None:
    import tokensieve as ts

    listing, run = trained_run
    saved = ts.save(ts.load(run), tmp_path / "saved")
    top1 = []
    for model in (run, run / "last.pt", saved):
        doc = _json(["eval", "--model", str(model), "--data", str(listing), "--stride", "2", "--workers", "0",
                     "--json"])  # fmt: skip
        assert (doc["plan"], doc["videos"], doc["failed"]) == ("stts:T0=0.5", 4, 0)  # the trained plan ran
        top1.append(doc["top1"])
        doc = _json(["flops", "--model", str(model), "--json"])
        assert [r["plan"] for r in doc["results"]] == ["none", "stts:T0=0.5"]  # its own plan by default
        assert doc["results"][1]["gflops_ratio"] > 1.5  # half the frames
        doc = _json(["bench", "--model", str(model), "--repeats", "1", "--warmup", "0", "--json"])
        assert [r["plan"] for r in doc["results"]] == ["none", "stts:T0=0.5"]
    assert top1[0] == top1[1] == top1[2]


def test_the_same_plan_keeps_a_loaded_models_trained_reducers(trained_run: tuple[Path, Path]) -> None:
    import tokensieve as ts
    from tokensieve.cli.common import install_plan

    net = ts.load(trained_run[1])
    trained = net.plan[0]
    assert install_plan(net, None).plan[0] is trained
    assert install_plan(net, "stts:T0=.5").plan[0] is trained  # the same spec, written differently
    assert install_plan(net, "stts:T0=1.0").plan[0] is not trained  # another plan replaces it
    assert install_plan(net, "none").spec == "none"


def test_a_mistyped_local_model_path_is_not_looked_up_on_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["flops", "--model", "runs/stts2"], env=WIDE)  # a typo of runs/stts
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "no such model: runs/stts2 (not a file or folder; runs/ is a local folder)" in result.stderr


def test_damaged_checkpoints_are_one_line_naming_the_file(
    trained_run: tuple[Path, Path], tmp_path: Path
) -> None:
    import torch

    listing, run = trained_run
    folder = tmp_path / "torn"
    folder.mkdir()
    data = (run / "last.pt").read_bytes()
    (folder / "last.pt").write_bytes(data[: len(data) // 3])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    eval_args = ["--data", str(listing), "--workers", "0"]
    cases = [
        (["eval", "--model", str(folder), *eval_args], folder / "last.pt"),
        (["flops", "--model", str(folder / "last.pt")], folder / "last.pt"),
        (["bench", "--model", str(foreign)], foreign),
        (["train", "--model", str(foreign), *eval_args, "--out", str(tmp_path / "new")], foreign),
        (["train", "--model", "videomae-tiny", *eval_args, "--num-classes", "3", "--batch-size", "2", "--out",
          str(folder), "--resume"], folder / "last.pt"),
    ]  # fmt: skip
    for args, path in cases:
        result = runner.invoke(app, args, env=WIDE)
        assert result.exit_code == 2, (args, result.output)
        # `train --resume` reads the checkpoint inside ts.train, after its progress bar has started.
        lines = result.stderr.splitlines()[1:] if args[-1] == "--resume" else result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert str(path) in " ".join(result.stderr.split()) and "Traceback" not in result.output


def test_weights_that_do_not_fit_are_a_usage_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    import tokensieve as ts

    saved = ts.save(ts.build("videomae-tiny"), tmp_path / "saved")
    tensors = load_file(saved / "model.safetensors")
    del tensors["head.bias"]
    save_file(tensors, saved / "model.safetensors")
    result = runner.invoke(app, ["flops", "--model", str(saved)], env=WIDE)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "missing" in result.stderr and "head.bias" in result.stderr  # the mismatch lists the keys


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
    out = tmp_path / "r.jsonl"
    interrupt_after_records(monkeypatch, 2)
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


def test_eval_at_another_clip_size_says_positions_are_interpolated(synth: Path) -> None:
    """--frames/--size: the model (4 frames of 32x32) runs 6 frames of 40x40 with its positions carried
    there, says so in one line, and counts the GFLOPs of those clips; sizes its patch does not divide
    are one error line."""
    import tokensieve as ts

    result = _eval(synth, None, "--frames", "6", "--size", "40", "--json")
    assert result.exit_code == 0, result.output
    assert 'interpolated to the dataset\'s 6x40 (docs/design.md, "Input sizes")' in result.stderr
    assert json.loads(result.stdout)["gflops_per_view"] == pytest.approx(
        ts.flops(ts.build("videomae-tiny"), frames=6, size=40)
    )
    bad = _eval(synth, None, "--size", "36")
    assert bad.exit_code == 2
    _one_error_line(bad, "frame size 36x36 must be divisible by the patch size 8")


def test_flops_and_bench_of_a_saved_model_at_another_size(tmp_path: Path) -> None:
    """A saved model keeps the size its learned positions were made for; --size runs it at another, its
    positions interpolated (it used to be rebuilt at that size and refuse its own checkpoint)."""
    import tokensieve as ts

    saved = ts.save(ts.build("joint-tiny"), tmp_path / "saved")
    doc = _json(["flops", "--model", str(saved), "--size", "40", "-p", "random:keep=0.5", "--json"])
    assert doc["size"] == 40 and doc["results"][0]["gflops"] == pytest.approx(
        ts.flops(ts.build("joint-tiny"), size=40)
    )
    doc = _json(["bench", "--model", str(saved), "--size", "40", "--repeats", "1", "--warmup", "0", "--json"])
    assert [r["plan"] for r in doc["results"]] == ["none"]
