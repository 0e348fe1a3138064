"""`ts.evaluate`: per-video records against a manual loop, failures, resuming after a kill,
metrics by hand, and torchrun with two gloo processes against one. The results file's safety:
its provenance header and refused resumes, foreign files, short videos, OS errors, the lock."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokensieve as ts
from test_datasets import write_video
from tokensieve.data.datasets import VideoDataset, VideoRecord, read_list
from tokensieve.data.transforms import normalize
from tokensieve.engine import results
from tokensieve.engine.evaluate import model_checksum, summarize
from tokensieve.engine.results import Provenance, part_path, read_done, read_results
from tokensieve.errors import InputError

VIEWS = (2, 3)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven real videos, one truncated, one random bytes, one empty, and a list that also names a missing one."""
    root = tmp_path_factory.mktemp("videos")
    lines = []
    for i in range(7):
        write_video(root / f"v{i}.mp4", frames=10 + 3 * i, seed=i)
        lines.append(f"v{i}.mp4 {i % 3}")
    good = (root / "v6.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (root / "noise.mp4").write_bytes(os.urandom(5000))
    (root / "empty.mp4").touch()
    lines[2:2] = ["truncated.mp4 1", "noise.mp4 2", "empty.mp4 0"]
    lines.append("missing.mp4 0")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root


def _model() -> ts.VideoBackbone:
    torch.manual_seed(0)
    return ts.build("videomae-tiny", num_classes=3).eval()


def _dataset(root: Path) -> VideoDataset:
    return VideoDataset(read_list(root / "list.txt"), frames=4, size=32, views=VIEWS, stride=2, num_classes=3)


def _records(out: Path) -> list[dict]:
    return read_results(out)[1]


def _small(root: Path, **changes) -> VideoDataset:
    """Two readable videos (10 and 13 frames)."""
    settings = {"frames": 4, "size": 32, "views": VIEWS, "stride": 2, "num_classes": 3, **changes}
    return VideoDataset(read_list(root / "list.txt")[:2], **settings)


class Killed(Exception):
    pass


def _kill_after(count: int):
    def progress(done: int, total: int, speed: float) -> None:
        if done == count:
            raise Killed

    return progress


def _leftovers(folder: Path) -> list[str]:
    """Files an evaluation may leave besides its results: temporary files, locks, parts."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".lock", ".parts")))


def test_records_match_a_manual_loop_and_failures_are_recorded(videos: Path, tmp_path: Path) -> None:
    model, dataset = _model(), _dataset(videos)
    out = tmp_path / "results.jsonl"
    summary = ts.evaluate(model, dataset, batch_size=4, workers=2, out=out)
    records = _records(out)
    assert [r["id"] for r in records] == [r.id for r in dataset.records]  # dataset order, each once
    failed = {r["id"]: r["error"] for r in records if r["status"] == "failed"}
    assert set(failed) == {"truncated", "noise", "empty", "missing"}
    assert all("DecodeError" in e for e in failed.values())
    assert (summary.videos, summary.evaluated, summary.failed) == (11, 7, 4)
    for record in records:
        if record["status"] != "ok":
            continue
        index = next(i for i, r in enumerate(dataset.records) if r.id == record["id"])
        views = normalize(dataset.load(index).float() / 255, model.config.mean, model.config.std)
        with torch.no_grad():
            probs = model(views).softmax(-1).mean(0)  # softmax averaged over the 6 views
        values, classes = probs.topk(3)
        assert [c for c, _ in record["top5"]] == classes.tolist()
        torch.testing.assert_close(torch.tensor([p for _, p in record["top5"]]), values, atol=2e-6, rtol=0)
    assert summary.gflops_per_view == pytest.approx(ts.flops(model))
    assert summary.views == VIEWS and summary.clips_per_s > 0
    assert not part_path(out, 0).parent.exists()  # parts merged and removed


def test_a_compiled_evaluation_gives_the_eager_results(videos: Path, tmp_path: Path) -> None:
    """`compile=True` runs the frozen, compiled model: the same predictions up to rounding, the
    installed plan included; a per-clip budget or a plan reading labels is refused before any work."""
    model, dataset = _model(), _small(videos)
    ts.apply(model, "random:keep=0.5")
    eager, compiled = tmp_path / "eager.jsonl", tmp_path / "compiled.jsonl"
    ts.evaluate(model, dataset, batch_size=4, workers=0, out=eager)
    summary = ts.evaluate(model, dataset, batch_size=4, workers=0, out=compiled, compile=True)
    for a, b in zip(_records(eager), _records(compiled), strict=True):
        assert [c for c, _ in a["top5"]] == [c for c, _ in b["top5"]]
        torch.testing.assert_close(torch.tensor([p for _, p in a["top5"]]), torch.tensor([p for _, p in b["top5"]]),
                                   atol=1e-5, rtol=0)  # fmt: skip
    assert summary.evaluated == 2 and summary.plan == "random:keep=0.5"
    for spec, what in [("adaptive:high=0.3+random:keep=0.5", "changes its shapes per clip"),
                       ("oracle:keep=0.5", "reads the labels")]:  # fmt: skip
        ts.apply(model, spec)
        with pytest.raises(ts.InputError, match=what):
            ts.evaluate(model, dataset, out=tmp_path / "never.jsonl", compile=True)
        assert not (tmp_path / "never.jsonl").exists()


def test_resume_after_a_kill_gives_the_uninterrupted_results(videos: Path, tmp_path: Path) -> None:
    model, dataset = _model(), _dataset(videos)
    whole = tmp_path / "whole.jsonl"
    expected = ts.evaluate(model, dataset, batch_size=4, workers=0, out=whole)

    out = tmp_path / "resumed.jsonl"

    class Killed(Exception):
        pass

    def stop_after_four(done: int, total: int, speed: float) -> None:
        if done == 4:
            raise Killed

    with pytest.raises(Killed):
        ts.evaluate(model, dataset, batch_size=4, workers=0, out=out, progress=stop_after_four)
    part = part_path(out, 0)
    assert len(part.read_text().splitlines()) == 1 + 4 and _records(out) == []  # header + 4; none merged
    with part.open("a") as f:  # the kill also tore the next record mid-write
        f.write('{"id":"v3","labels":[0],"sta')
    assert len(read_done(out)) == 4  # the torn line is not a record

    resumed = ts.evaluate(model, dataset, batch_size=4, workers=0, out=out)
    assert _records(out) == _records(whole)  # nothing lost, nothing twice, same numbers
    assert resumed.top1 == expected.top1 and resumed.failed == expected.failed
    again = ts.evaluate(model, dataset, batch_size=4, workers=0, out=out)  # all done: nothing to run
    assert again.clips_per_s is None and _records(out) == _records(whole) and again.top1 == expected.top1


def test_a_reused_output_counts_only_this_datasets_videos(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared.jsonl"
    everything = ts.evaluate(_model(), _dataset(videos), workers=0, out=out)
    subset = VideoDataset(
        read_list(videos / "list.txt")[:2], frames=4, size=32, views=VIEWS, stride=2, num_classes=3
    )
    summary = ts.evaluate(_model(), subset, workers=0, out=out)  # both already recorded: nothing to run
    assert summary.videos == 2 and summary.evaluated + summary.failed == 2 and everything.videos == 11
    assert len(_records(out)) == 11  # the other videos' records are kept


def test_short_videos_give_every_view_for_any_number_of_views(videos: Path) -> None:
    # 10 frames: a 4 x 3 clip spans 10 frames (one start), 4 x 8 spans 25 (longer than the video)
    for stride, views in ((3, (5, 1)), (8, (2, 3)), (8, (7, 3))):
        dataset = VideoDataset(
            [VideoRecord("v0", videos / "v0.mp4", (0,))], frames=4, size=32, stride=stride, views=views
        )
        summary = ts.evaluate(_model(), dataset, workers=0)
        assert (summary.evaluated, summary.failed) == (1, 0), (stride, views, summary.errors)
    segments = VideoDataset(
        [VideoRecord("v0", videos / "v0.mp4", (0,))], frames=4, size=32, sampling="segments", views=(10, 1)
    )  # 40 segment frames of a 10-frame video
    assert ts.evaluate(_model(), segments, workers=0).failed == 0
    # the whole list at 2 x 3 views of 25-frame clips: only the broken files fail
    dataset = VideoDataset(read_list(videos / "list.txt"), frames=4, size=32, views=VIEWS, stride=8)
    summary = ts.evaluate(_model(), dataset, batch_size=12, workers=2)
    assert (summary.evaluated, summary.failed) == (7, 4)
    assert all("DecodeError" in e for e in summary.errors)


# ---------------------------------------------------------------------------------------- provenance
def test_the_header_says_what_produced_the_records(videos: Path, tmp_path: Path) -> None:
    model = ts.apply(_model(), "random:keep=0.5").model
    out = tmp_path / "r.jsonl"
    summary = ts.evaluate(model, _small(videos), workers=0, out=out, model_name="videomae-tiny")
    provenance, records = read_results(out)
    assert provenance == Provenance(
        model="videomae-tiny", checksum=model_checksum(model), plan="random:keep=0.5", views=VIEWS, frames=4,
        size=32, resize=32, sampling="dense", stride=2, short="loop", dtype="float32",
    )  # fmt: skip
    header = json.loads(out.read_text().splitlines()[0])
    assert header["tokensieve"] == "eval-results" and header["format"] == 1 and header["views"] == [2, 3]
    assert [r["id"] for r in records] == ["v0", "v1"] and summary.evaluated == 2
    # the checksum is stable, and any change of any weight changes it
    assert model_checksum(model) == model_checksum(_model()) and model_checksum(model).startswith("sha256:")
    other = _model()
    with torch.no_grad():
        other.head.bias[0] += 1e-7
    assert model_checksum(other) != model_checksum(model)
    segments = Provenance.from_header(json.loads(_header_of(videos, tmp_path, sampling="segments")), tmp_path)
    assert (segments.sampling, segments.stride, segments.short) == ("segments", None, None)
    # plans compare with their defaults filled in; the name never counts
    assert provenance.differences(dataclasses.replace(provenance, plan="random", model="elsewhere")) == []
    assert provenance.differences(dataclasses.replace(provenance, plan="random:keep=0.25")) == [
        "plan (file: random:keep=0.25, now: random:keep=0.5)"
    ]


def _header_of(videos: Path, tmp_path: Path, **changes) -> str:
    out = tmp_path / "header.jsonl"
    ts.evaluate(_model(), _small(videos, **changes), workers=0, out=out)
    return out.read_text().splitlines()[0]


def _seed_1() -> ts.VideoBackbone:
    torch.manual_seed(1)
    return ts.build("videomae-tiny", num_classes=3).eval()


CHANGES = {  # what a resuming run changes -> (model, dataset changes, evaluate arguments)
    "plan": (lambda: ts.apply(_model(), "random:keep=0.5").model, {}, {}),
    "views": (_model, {}, {"views": (1, 3)}),
    "model weights": (_seed_1, {}, {}),
    "dtype": (_model, {}, {"dtype": torch.bfloat16}),
    "stride": (_model, {"stride": 3}, {}),
    "sampling": (_model, {"sampling": "segments"}, {}),
    "short": (_model, {"short": "repeat"}, {}),
}


@pytest.mark.parametrize("field", list(CHANGES))
def test_resuming_with_anything_different_is_refused_naming_it(
    field: str, videos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.jsonl"
    with pytest.raises(Killed):  # a half-finished run: one video in its part file
        ts.evaluate(_model(), _small(videos), workers=0, out=out, progress=_kill_after(1))
    before = {p: p.read_bytes() for p in (out, part_path(out, 0))}
    make, dataset_changes, arguments = CHANGES[field]
    with pytest.raises(
        InputError,
        match=rf"holds results of another run \(1 video, unfinished\).* Differs: {field} \(file: .*, now: .*\)",
    ) as err:
        ts.evaluate(make(), _small(videos, **dataset_changes), workers=0, out=out, **arguments)
    assert err.value.args[0].count("Differs") == 1 and "\n" not in err.value.args[0]
    assert {p: p.read_bytes() for p in before} == before  # nothing added, nothing lost
    assert _leftovers(tmp_path) == ["r.jsonl.parts"]  # the half-finished run's, as it was


def test_a_finished_file_refuses_another_run_and_the_model_name_is_informational(
    videos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.jsonl"
    ts.evaluate(_model(), _small(videos), workers=0, out=out, model_name="videomae-tiny")
    finished = out.read_bytes()
    other = ts.apply(_seed_1(), "random:keep=0.5").model
    with pytest.raises(InputError) as err:
        ts.evaluate(other, _small(videos), views=(1, 1), workers=0, out=out, model_name="videomae-tiny")
    message = err.value.args[0]
    assert message.startswith(
        f"{out} holds results of another run (2 videos); resuming would mix them. Differs: "
    )
    assert "model weights (file: videomae-tiny sha256:" in message
    assert "plan (file: none, now: random:keep=0.5)" in message and "views (file: 2x3, now: 1x1)" in message
    assert out.read_bytes() == finished
    # same weights under another name (a moved checkpoint), a plan spelled out: the same run
    again = ts.evaluate(
        ts.apply(_model(), "none").model, _small(videos), workers=0, out=out, model_name="/elsewhere"
    )
    assert again.done_before == 2 and again.clips_per_s is None and len(_records(out)) == 2
    assert read_results(out)[0].model == "videomae-tiny"  # the header keeps the first name


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"v0.mp4 0\n", "is not a tokensieve results file"),
        (b"v0.mp4 0", "is not a tokensieve results file"),
        (b"\x00\x01\x02 a video, say", "is not a tokensieve results file"),
        (b'{"id":"v0","labels":[0],"status":"ok","top5":[[0,1.0]]}\n', "without a results header"),
    ],
)
def test_a_file_that_is_not_a_results_file_is_never_overwritten(
    content: bytes, message: str, videos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "list.txt"
    out.write_bytes(content)
    with pytest.raises(InputError, match=message):
        ts.evaluate(_model(), _small(videos), workers=0, out=out)
    assert out.read_bytes() == content and _leftovers(tmp_path) == []


def test_an_empty_file_or_a_folder_as_out(videos: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.touch()  # nothing to lose: becomes the results file
    assert ts.evaluate(_model(), _small(videos), workers=0, out=empty).evaluated == 2
    with pytest.raises(IsADirectoryError) as err:
        ts.evaluate(_model(), _small(videos), workers=0, out=tmp_path)
    assert err.value.filename == str(tmp_path)


# ---------------------------------------------------------------------------------------- OS errors
def _full_disk(monkeypatch: pytest.MonkeyPatch, *, when) -> None:
    """Writes of data for which `when(data)` is true write half of it, then find the disk full."""
    real = results._write

    def write(fd: int, data: bytes) -> None:
        if when(bytes(data)):
            real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(results, "_write", write)


def test_a_full_disk_while_recording_keeps_whole_records_for_a_resume(
    videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, records = tmp_path / "r.jsonl", []

    def fourth_record(data: bytes) -> bool:
        records.extend([data] if data.startswith(b'{"id"') else [])
        return len(records) == 4

    _full_disk(monkeypatch, when=fourth_record)
    with pytest.raises(OSError) as err:
        ts.evaluate(_model(), _dataset(videos), workers=0, out=out)
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(part_path(out, 0)))
    lines = part_path(out, 0).read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(line)["id"] for line in lines[1:-1]] == ["v0", "v1", "truncated"]
    assert _leftovers(tmp_path) == ["r.jsonl.parts"]  # no lock, no temporary file
    monkeypatch.undo()
    resumed = ts.evaluate(_model(), _dataset(videos), workers=0, out=out)
    assert resumed.done_before == 3 and [r["id"] for r in _records(out)] == [
        r.id for r in _dataset(videos).records
    ]


def test_a_full_disk_while_merging_leaves_the_file_and_the_parts(
    videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "r.jsonl"
    _full_disk(monkeypatch, when=lambda data: data.count(b"\n") > 1)  # the merged file: header and records
    with pytest.raises(OSError) as err:
        ts.evaluate(_model(), _small(videos), workers=0, out=out)
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(out))
    assert len(out.read_text().splitlines()) == 1 and _leftovers(tmp_path) == ["r.jsonl.parts"]
    monkeypatch.undo()
    again = ts.evaluate(_model(), _small(videos), workers=0, out=out)  # merges what was done
    assert again.done_before == 2 and again.clips_per_s is None and len(_records(out)) == 2


def test_a_read_only_folder_is_refused_before_any_work(
    videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real = os.open

    def open_(path, flags, mode=0o777, *, dir_fd=None):  # chmod does not stop root: refuse here
        if Path(path).parent == read_only and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(OSError) as err:
        ts.evaluate(_model(), _small(videos), workers=0, out=read_only / "r.jsonl", progress=_kill_after(1))
    assert err.value.errno == errno.EROFS and err.value.filename.startswith(str(read_only / "r.jsonl"))
    assert list(read_only.iterdir()) == []


# ---------------------------------------------------------------------------------------- one run at a time
HOLD_LOCK = """
import os, sys, time
from pathlib import Path
from tokensieve.engine.results import RunLock
RunLock(Path(sys.argv[1])).acquire()
child = os.fork()  # as a decoding worker is: it must not keep the lock alive
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_and_a_dead_runs_lock_is_taken_over(
    videos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "r.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    worker = int(holder.stdout.readline())
    try:
        with pytest.raises(
            InputError, match=rf"{out} is being written by another run \(pid {holder.pid} on "
        ):
            ts.evaluate(_model(), _small(videos), workers=0, out=out)
        assert not out.exists()  # refused at the start
        holder.kill()  # SIGKILL: no clean-up, its lock file stays behind; its worker lives on
        holder.wait()
        lock = tmp_path / "r.jsonl.lock"
        assert f"pid {holder.pid} on " in lock.read_text()
        with caplog.at_level(logging.WARNING, logger="tokensieve.engine.results"):
            summary = ts.evaluate(_model(), _small(videos), workers=0, out=out)
        assert summary.evaluated == 2 and not lock.exists()
        assert (
            f"taking over the lock of a run that ended without releasing it (pid {holder.pid} on "
            in caplog.text
        )
    finally:
        holder.kill()
        os.kill(worker, 9)


def test_a_resumed_run_says_how_many_videos_were_done(
    videos: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "r.jsonl"
    with pytest.raises(Killed):
        ts.evaluate(_model(), _dataset(videos), workers=0, out=out, progress=_kill_after(3))
    with caplog.at_level(logging.INFO, logger="tokensieve.engine.evaluate"):
        summary = ts.evaluate(_model(), _dataset(videos), workers=0, out=out)
    assert f"{out}: resuming: 3 of 11 videos already done, 8 to do" in caplog.text
    assert summary.done_before == 3 and summary.evaluated + summary.failed == 11


def test_summary_metrics_by_hand() -> None:
    records = [
        {"id": "a", "labels": [0], "status": "ok", "top5": [[0, 0.9], [1, 0.1]]},
        {"id": "b", "labels": [0], "status": "ok", "top5": [[1, 0.6], [0, 0.4]]},
        {"id": "c", "labels": [1], "status": "ok", "top5": [[1, 0.7], [0, 0.3]]},
        {"id": "d", "labels": [2], "status": "failed", "error": "DecodeError: x"},
    ]
    m = summarize(records, num_classes=3, multilabel=False)
    assert (m["evaluated"], m["failed"]) == (3, 1)
    assert m["top1"] == pytest.approx(2 / 3) and m["top5"] == 1.0
    assert m["mean_class_accuracy"] == pytest.approx((0.5 + 1.0) / 2)


def test_map_by_hand() -> None:
    # class 0: positives ranked 1st and 3rd -> AP = (1/1 + 2/3) / 2; class 1: positive ranked 2nd -> 1/2
    records = [
        {"id": "a", "labels": [0], "status": "ok", "scores": [0.9, 0.1]},
        {"id": "b", "labels": [1], "status": "ok", "scores": [0.8, 0.5]},
        {"id": "c", "labels": [0], "status": "ok", "scores": [0.7, 0.9]},
    ]
    m = summarize(records, num_classes=2, multilabel=True)
    assert m["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)


def _cli_eval(videos: Path, out: Path, nproc: int, *extra: str) -> dict:
    args = ["-m", "tokensieve", "eval", "--model", "videomae-tiny", "--data", str(videos / "list.txt"),
            "--views", "2x3", "--stride", "2", "--out", str(out), "--workers", "1", "--json", *extra]  # fmt: skip
    if nproc > 1:
        args = [
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            "29517",
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_torchrun_two_gloo_processes_match_one(videos: Path, tmp_path: Path) -> None:
    # A random plan: each clip's selection is keyed by the clip, so neither the processes nor the
    # batches (8 clips in one process, other splits in two) change what is kept.
    plan = ("--plan", "random:keep=0.5")
    one = _cli_eval(videos, tmp_path / "one.jsonl", 1, *plan, "--batch-size", "8")
    two = _cli_eval(videos, tmp_path / "two.jsonl", 2, *plan, "--batch-size", "3")
    for key in ("videos", "evaluated", "failed", "top1", "top5", "mean_class_accuracy"):
        assert one[key] == two[key], key
    ids = [r["id"] for r in _records(tmp_path / "two.jsonl")]
    assert len(ids) == len(set(ids)) == 11  # unpadded: no video twice
    for a, b in zip(_records(tmp_path / "one.jsonl"), _records(tmp_path / "two.jsonl"), strict=True):
        assert a["id"] == b["id"] and a["status"] == b["status"]
        if a["status"] == "ok":
            assert [c for c, _ in a["top5"]] == [c for c, _ in b["top5"]]
            torch.testing.assert_close(torch.tensor(a["top5"]), torch.tensor(b["top5"]), atol=1e-5, rtol=0)


def test_torchrun_processes_share_one_lock_and_refuse_together(videos: Path, tmp_path: Path) -> None:
    data, out = tmp_path / "two.txt", tmp_path / "r.jsonl"
    data.write_text("v0.mp4 0\nv1.mp4 1\n")

    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "tokensieve",
                "eval", "--model", "videomae-tiny", "--data", str(data), "--root", str(videos), "--views", "2x3",
                "--stride", "2", "--out", str(out), "--workers", "0", "--json", *extra]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)

    first = torchrun()  # rank 0 holds the lock for both processes: rank 1 is not refused
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout)["evaluated"] == 2 and not (tmp_path / "r.jsonl.lock").exists()
    finished = out.read_bytes()
    other = torchrun("--plan", "random:keep=0.5")  # both processes refuse at the start, none hangs
    assert other.returncode != 0
    refusals = [line for line in other.stderr.splitlines() if line.startswith("error: ")]
    assert len(refusals) == 2 and all(
        "Differs: plan (file: none, now: random:keep=0.5)" in r for r in refusals
    )
    frames = [line for line in other.stderr.splitlines() if line.strip().startswith('File "')]
    assert not any("tokensieve" in line for line in frames)  # only torchrun's own report of the exit codes
    assert out.read_bytes() == finished and other.stdout == ""


def test_an_adaptive_plan_reports_the_mean_gflops_of_the_views_run(videos: Path) -> None:
    """`attention:mass` costs each view what it keeps: the summary's GFLOPs are the mean over the views
    that went through the model (counted as they ran), and say how many."""
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)  # sharper attention: the views keep different counts
    ts.apply(model, "attention:mass=0.6,at=0")
    dataset = _small(videos)
    summary = ts.evaluate(model, dataset, workers=0, batch_size=4)
    views = torch.cat([dataset[i].views for i in range(len(dataset))])  # (12, T, C, S, S) uint8
    x = normalize(views.float().div(255), model.config.mean, model.config.std)
    per_view = ts.flops(model, video=x, detail=True).per_clip
    assert len(set(per_view)) > 1 and summary.gflops_views == len(per_view) == 12
    assert summary.gflops_per_view == pytest.approx(sum(per_view) / 12, rel=1e-9)
    fixed = ts.evaluate(ts.apply(_model(), "random:keep=0.5").model, dataset, workers=0)
    assert fixed.gflops_views == 0  # a fixed budget: counted once
