"""`ts.evaluate`: per-video records against a manual loop, failures, resuming after a kill,
metrics by hand, and torchrun with two gloo processes against one."""

from __future__ import annotations

import json
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
from tokensieve.engine.evaluate import summarize
from tokensieve.engine.results import part_path, read_done

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
    return [json.loads(line) for line in out.read_text().splitlines()]


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
    assert len(part.read_text().splitlines()) == 4 and not out.exists()
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


def test_views_larger_than_the_video_allows_are_recorded_as_failed(videos: Path) -> None:
    dataset = VideoDataset(
        [VideoRecord("v0", videos / "v0.mp4", (0,))], frames=4, size=32, stride=3, views=(5, 1)
    )
    summary = ts.evaluate(_model(), dataset, workers=0)  # 10 frames: a 10-frame clip has one position
    assert summary.failed == 1 and "5 views" in summary.errors[0]


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


def _cli_eval(videos: Path, out: Path, nproc: int) -> dict:
    args = ["-m", "tokensieve", "eval", "--model", "videomae-tiny", "--data", str(videos / "list.txt"),
            "--views", "2x3", "--stride", "2", "--out", str(out), "--workers", "1", "--json"]  # fmt: skip
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
    one = _cli_eval(videos, tmp_path / "one.jsonl", 1)
    two = _cli_eval(videos, tmp_path / "two.jsonl", 2)
    for key in ("videos", "evaluated", "failed", "top1", "top5", "mean_class_accuracy"):
        assert one[key] == two[key], key
    ids = [r["id"] for r in _records(tmp_path / "two.jsonl")]
    assert len(ids) == len(set(ids)) == 11  # unpadded: no video twice
    for a, b in zip(_records(tmp_path / "one.jsonl"), _records(tmp_path / "two.jsonl"), strict=True):
        assert a["id"] == b["id"] and a["status"] == b["status"]
        if a["status"] == "ok":
            assert [c for c, _ in a["top5"]] == [c for c, _ in b["top5"]]
            torch.testing.assert_close(torch.tensor(a["top5"]), torch.tensor(b["top5"]), atol=1e-5, rtol=0)
