"""`tokensieve oracle` and its engine: the stored maps against `ts.oracle` on the same clips, a killed
run resuming, other oracle settings refused, the report's numbers by hand (Pareto shares, recall of the
top tokens, the power-law fit on Pareto samples), ground truth lined up, and the command end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tokensieve as ts
from conftest import interrupt_after_records
from tokensieve.cli import app
from tokensieve.data import VideoDataset, make_synthetic, read_list
from tokensieve.data.datasets import VideoRecord
from tokensieve.data.synthetic import load_truth
from tokensieve.data.transforms import normalize
from tokensieve.engine.oracle_maps import (
    decode_values,
    encode_values,
    read_value_maps,
    truth_masks,
    value_maps,
)
from tokensieve.engine.oracle_report import (
    SHARES,
    fit_power_law,
    oracle_report,
    recall_at,
    token_count,
    top_shares,
)
from tokensieve.engine.results import read_results
from tokensieve.errors import InputError

runner = CliRunner()
WIDE = {"COLUMNS": "200"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 4-frame videos of 32 x 32 whose truth grid (2 x 4 x 4) is videomae-tiny's token grid."""
    root = tmp_path_factory.mktemp("synth")
    return make_synthetic(root, videos=6, classes=4, frames=4, size=32, patch=8, tubelet=2, partial=True,
                          object_size=(0.3, 0.35))  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny"
    ts.save(_model(), path)
    return path


def _model() -> ts.VideoBackbone:
    torch.manual_seed(0)
    return ts.build("videomae-tiny", num_classes=4).eval()


def _dataset(listing: Path, views: tuple[int, int] = (1, 1), stride: int = 1) -> VideoDataset:
    return VideoDataset(read_list(listing), frames=4, size=32, views=views, stride=stride, num_classes=4)


# ---------------------------------------------------------------------------------------- engine
def test_maps_read_back_equal_the_oracle_on_the_same_clips(synth: Path, tmp_path: Path) -> None:
    model, dataset = _model(), _dataset(synth, views=(2, 1))
    out = tmp_path / "maps.jsonl"
    summary = value_maps(model, dataset, out=out, batch_size=3, workers=0)  # batches straddle videos
    assert (summary.videos, summary.mapped, summary.failed, summary.done_before) == (6, 6, 0, 0)
    assert summary.setting == "oracle-maps:label=true,block=2,tensor=output,value=gradcam"
    maps = read_value_maps(out)
    assert list(maps) == [r.id for r in dataset.records]
    for i, record in enumerate(dataset.records):
        x = normalize(
            dataset[i].views.float().div(255), model.config.mean, model.config.std
        )  # (2, T, C, S, S)
        expected = ts.oracle(model, x, torch.tensor(record.labels * 2))  # (2, 32)
        assert maps[record.id].shape == (2, 32) and maps[record.id].dtype == torch.float32
        torch.testing.assert_close(maps[record.id], expected, atol=5e-4, rtol=0)  # float16 rounding
    provenance, records = read_results(out)
    assert provenance.plan == summary.setting and provenance.views == (2, 1)
    assert records[0]["values"]["dtype"] == "float16" and records[0]["values"]["shape"] == [2, 32]


def test_encoding_round_trips_and_refuses_damage() -> None:
    values = torch.tensor([[0.0, 1.0, 0.5, 1e-5], [0.123, 0.999, 6e-8, 0.25]])
    entry = encode_values(values)
    back = decode_values(entry)
    assert torch.equal(back, values.half().float())
    with pytest.raises(InputError, match="does not fill shape"):
        decode_values({**entry, "shape": [2, 5]}, where="v1")
    with pytest.raises(InputError, match="v1: a damaged value map"):
        decode_values({"shape": [2, 4], "dtype": "float16"}, where="v1")


def test_a_killed_run_resumes_without_redoing_or_duplicating_videos(
    synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, dataset = _model(), _dataset(synth)
    out = tmp_path / "maps.jsonl"
    interrupt_after_records(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        value_maps(model, dataset, out=out, batch_size=2, workers=0)
    monkeypatch.undo()
    totals: list[int] = []
    summary = value_maps(model, dataset, out=out, batch_size=2, workers=0,
                         progress=lambda done, total, rate: totals.append(total))  # fmt: skip
    assert summary.done_before == 2 and set(totals) == {4}  # only the four left were mapped
    ids = [r["id"] for r in read_results(out)[1]]
    assert ids == [r.id for r in dataset.records]  # each once, in dataset order
    assert not (tmp_path / "maps.jsonl.parts").exists() and not (tmp_path / "maps.jsonl.lock").exists()
    fresh = tmp_path / "fresh.jsonl"
    value_maps(model, dataset, out=fresh, batch_size=2, workers=0)
    for vid, values in read_value_maps(fresh).items():
        torch.testing.assert_close(read_value_maps(out)[vid], values, atol=5e-4, rtol=0)


def test_other_oracle_settings_are_refused_and_the_same_resume(synth: Path, tmp_path: Path) -> None:
    model, dataset = _model(), _dataset(synth)
    out = tmp_path / "maps.jsonl"
    value_maps(model, dataset, out=out, workers=0)
    written = out.read_bytes()
    with pytest.raises(InputError, match=r"plan \(file: oracle-maps:label=true,block=2,tensor=output,value=gradcam, now: "
                                         r"oracle-maps:label=pred,block=2,tensor=output,value=gradcam\)"):  # fmt: skip
        value_maps(model, dataset, out=out, label="pred", workers=0)
    with pytest.raises(InputError, match="tensor=hidden"):
        value_maps(model, dataset, out=out, tensor="hidden", workers=0)
    assert out.read_bytes() == written
    # the default block of a mean-pooled model is its last: -1 names the same setting, so it resumes
    again = value_maps(model, dataset, out=out, block=-1, workers=0)
    assert again.done_before == 6 and again.mapped == 6
    # an installed plan, learned weights and all, changes nothing the oracle computes (it runs the model bare)
    ts.apply(model, "stts:T0=0.5")
    assert value_maps(model, dataset, out=out, workers=0).done_before == 6
    ts.evaluate(model, dataset, workers=0, out=tmp_path / "eval.jsonl")
    with pytest.raises(
        InputError, match=r"holds evaluation results \(plan stts:T0=0.5\), not oracle value maps"
    ):
        read_value_maps(tmp_path / "eval.jsonl")


def test_unlabelled_videos_need_label_pred(tmp_path: Path) -> None:
    records = [VideoRecord("a", tmp_path / "a.mp4", ()), VideoRecord("b", tmp_path / "b.mp4", (1,))]
    dataset = VideoDataset(records, frames=4, size=32)
    with pytest.raises(InputError, match=r"1 of 2 videos have no label.*label=pred"):
        value_maps(_model(), dataset, out=tmp_path / "maps.jsonl", workers=0)
    assert not (tmp_path / "maps.jsonl").exists()  # refused before anything was written
    summary = value_maps(_model(), dataset, out=tmp_path / "maps.jsonl", label="pred", workers=0)
    assert summary.failed == 2  # the files do not exist; the run went on


# ---------------------------------------------------------------------------------------- statistics
def test_token_counts_round_half_up_and_keep_one() -> None:
    assert token_count(0.1, 128) == 13 and token_count(0.01, 10) == 1 and token_count(0.5, 5) == 3
    assert token_count(0.01, 32) == 1 and token_count(0.3, 10) == 3


def test_pareto_shares_by_hand() -> None:
    steep = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.25, 0, 0, 0, 0, 0])  # total 2
    flat = torch.full((10,), 0.1)  # total 1
    nothing = torch.zeros(10)
    shares = top_shares(torch.stack([steep, flat, nothing]))  # (3, 6) at 1, 5, 10, 20, 30, 50%
    # k = 1, 1, 1, 2, 3, 5 of 10 tokens
    torch.testing.assert_close(
        shares[0], torch.tensor([0.5, 0.5, 0.5, 0.75, 0.875, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(shares[1], torch.tensor([0.1, 0.1, 0.1, 0.2, 0.3, 0.5], dtype=torch.float64))
    assert shares[2].isnan().all()
    report = oracle_report({"a": torch.stack([steep, nothing]), "b": flat[None]})
    assert (report.videos, report.clips, report.tokens, report.valueless) == (2, 3, 10, 1)
    per_clip = [row.per_clip for row in report.pareto]
    assert per_clip == pytest.approx([0.3, 0.3, 0.3, 0.475, 0.5875, 0.75])  # the mean of steep's and flat's
    # pooled: 30 tokens of total value 3, k = 1, 2, 3, 6, 9, 15 (round half up of 0.3 and 1.5)
    pooled = [1.0, 1.5, 1.75, 2.2, 2.5, 3.0]  # sorted: 1, 0.5, 0.25, 0.25, ten 0.1s, zeros
    assert [row.pooled for row in report.pareto] == pytest.approx([v / 3 for v in pooled])
    assert [row.tokens for row in report.pareto] == [token_count(f, 10) for f in SHARES]
    assert report.zeros == pytest.approx(16 / 30) and report.ones == pytest.approx(1 / 30)
    assert sum(report.histogram) == 30 and report.histogram[0] == 16 and report.histogram[-1] == 1
    assert report.curve[0] == 0 and report.curve[-1] == pytest.approx(1.0) and len(report.curve) == 11


def test_recall_of_the_top_tokens_by_hand() -> None:
    values = torch.tensor([[0.9, 0.1, 0.8, 0, 0, 0.7, 0, 0, 0, 0.2], [0.5] * 10, [1.0] + [0.0] * 9])
    masks = torch.tensor([[0, 1, 0.5, 0, 0, 0.5, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0, 0, 1], [0.0] * 10])
    recall = recall_at(values, masks)  # keep 1, 3, 5 of 10
    # top 1: token 0 (no object); top 3: 0, 2, 5 hold 1 of 2; top 5: also 9 and 1, the rest
    torch.testing.assert_close(recall[0], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    # equal values: the first tokens win; token 3 is among the first 5
    torch.testing.assert_close(recall[1], torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64))
    assert recall[2].isnan().all()  # no object in the clip
    report = oracle_report({"a": values[:2], "b": values[2:]}, masks={"a": masks[0], "b": masks[2]})
    assert report.recall_clips == 2  # "a"'s mask goes with both its views
    assert [r.tokens for r in report.recall] == [1, 3, 5]
    assert [r.random for r in report.recall] == [0.1, 0.3, 0.5]
    # view 2 of "a" (all 0.5) under "a"'s mask: top 1 is token 0 (0), top 3 and 5 hold tokens 1, 2 (0.75)
    assert [r.recall for r in report.recall] == pytest.approx([0.0, (0.5 + 0.75) / 2, (1.0 + 0.75) / 2])
    with pytest.raises(InputError, match="no ground-truth mask for video 'b'"):
        oracle_report({"a": values[:2], "b": values[2:]}, masks={"a": masks[0]})


def _pareto_samples(alpha: float, x_min: float, n: int, seed: int) -> np.ndarray:
    """Pareto samples of exponent `alpha` (density ∝ x^-alpha above x_min), those <= 1 kept."""
    rng = np.random.default_rng(seed)
    x = x_min * (1 - rng.random(n)) ** (-1 / (alpha - 1))
    return x[x <= 1]


@pytest.mark.parametrize("alpha", [1.5, 2.5])
def test_the_power_law_fit_recovers_the_exponent_of_pareto_samples(alpha: float) -> None:
    tail = _pareto_samples(alpha, 0.01, 20_000, seed=1)  # alpha 1.5: 10% of the samples lie above 1
    rng = np.random.default_rng(2)
    below = rng.uniform(0, 0.01, 5_000)  # not a power law: x_min must leave it out
    values = np.concatenate([tail, below, np.zeros(20_000), np.ones(500)])
    fit = fit_power_law(torch.from_numpy(values).float())
    assert fit is not None
    assert fit.alpha == pytest.approx(alpha, abs=0.1)
    assert 0.005 <= fit.x_min <= 0.03
    assert fit.ks < 0.02
    assert fit.tail == int(((values >= fit.x_min) & (values < 1)).sum())
    assert fit.tail_share == pytest.approx(fit.tail / values.size)
    if alpha == 1.5:  # why truncated: the plain Pareto MLE, blind to the end at 1, is far off here
        above = tail[tail >= 0.01]
        assert 1 + above.size / np.log(above / 0.01).sum() > alpha + 0.1


def test_the_power_law_fit_of_flat_values_is_flat() -> None:
    values = np.random.default_rng(0).uniform(0, 1, 20_000)  # density ∝ v^0
    fit = fit_power_law(values)
    assert fit is not None and abs(fit.alpha) < 0.1
    assert fit_power_law(np.array([0.0, 1.0, 0.5])) is None  # too few values to fit


# ---------------------------------------------------------------------------------------- truth
def test_truth_lines_up_only_with_whole_clips(synth: Path, tmp_path: Path) -> None:
    model = _model()
    masks = truth_masks(model, _dataset(synth), synth.parent)
    assert masks is not None and set(masks) == {r.id for r in _dataset(synth).records}
    first = _dataset(synth).records[0].id
    assert torch.equal(masks[first], load_truth(synth.parent, first)["mask"].flatten())
    assert truth_masks(model, _dataset(synth, views=(2, 1)), synth.parent) is None
    assert truth_masks(model, _dataset(synth, stride=2), synth.parent) is None  # a clip past the video's end
    # a finer truth grid (patch 4: 2 x 8 x 8) is pooled onto the model's 2 x 4 x 4 tokens
    fine = make_synthetic(tmp_path / "fine", videos=2, classes=4, frames=4, size=32, patch=4, tubelet=2)
    pooled = truth_masks(model, _dataset(fine), fine.parent)
    assert pooled is not None
    mask = load_truth(fine.parent, "000000")["mask"]  # (2, 8, 8)
    expected = mask.view(2, 4, 2, 4, 2).mean((2, 4)).flatten()  # (32,) 2 x 2 patches per token
    torch.testing.assert_close(pooled["videos/000000"], expected)


# ---------------------------------------------------------------------------------------- the command
def _oracle(data: Path, out: Path, model: Path | str, *extra: str):  # type: ignore[no-untyped-def]
    args = ["oracle", "--model", str(model), "--data", str(data), "--out", str(out), "--workers", "0"]
    return runner.invoke(app, [*args, *extra], env=WIDE)


def test_the_command_writes_maps_and_report(synth: Path, saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "oracle"
    result = _oracle(synth, out, saved)
    assert result.exit_code == 0, result.output
    for name in ("maps.jsonl", "report.md", "report.json", "oracle.png"):
        assert (out / name).is_file(), name
    assert (out / "oracle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for share in ("1%", "5%", "10%", "20%", "30%", "50%"):
        assert share in result.stdout
    assert "power law p(v) ∝ v^-α: α = " in result.stdout and f"report: {out / 'report.md'}" in result.stderr
    doc = json.loads((out / "report.json").read_text())
    assert doc["videos"] == 6 and doc["tokens"] == 32 and len(doc["histogram"]) == 50
    assert doc["recall"] is not None  # the synthetic set's truth next to its list, stride 1 by default
    assert doc["header"]["oracle"] == "oracle-maps:label=true,block=2,tensor=output,value=gradcam"
    report = (out / "report.md").read_text()
    assert "## Pareto" in report and "![token values" in report and "## Foreground" in report
    again = _oracle(synth, out, saved, "--json")
    assert again.exit_code == 0, again.output
    assert "resuming: 6 of 6 videos already done, 0 to do" in again.stderr
    assert json.loads(again.stdout)["done_before"] == 6


def test_the_command_on_the_builtin_model_and_a_made_set(tmp_path: Path) -> None:
    made = runner.invoke(app, ["make-synthetic", str(tmp_path / "synth"), "--videos", "3", "--classes", "4",
                               "--size", "64", "--partial"])  # fmt: skip
    assert made.exit_code == 0, made.output
    out = tmp_path / "oracle"
    result = _oracle(tmp_path / "synth" / "list.txt", out, "builtin:synthetic", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["mapped"] == 3 and doc["report"]["tokens"] == 128
    assert doc["report"]["recall"] is not None  # 64-pixel frames at patch 16: the model's 4 x 4 grid
    assert read_value_maps(out / "maps.jsonl")["videos/000000"].shape == (1, 128)


def test_ctrl_c_says_how_to_resume(
    synth: Path, saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "oracle"
    interrupt_after_records(monkeypatch, 2)
    result = _oracle(synth, out, saved)
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == (
        f"interrupted: 2 of 6 videos are recorded in {out / 'maps.jsonl'}; rerun the same command to resume"
    ), result.output
    monkeypatch.undo()
    again = _oracle(synth, out, saved)
    assert again.exit_code == 0, again.output
    assert "resuming: 2 of 6 videos already done, 4 to do" in again.stderr


def test_exit_codes_follow_eval(synth: Path, saved: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.txt"  # one missing video among the six
    broken.write_text(synth.read_text().replace("videos/000001.mp4", "videos/missing.mp4"))
    root = ("--root", str(synth.parent), "--truth", str(synth.parent))
    ok = _oracle(broken, tmp_path / "a", saved, *root)
    assert ok.exit_code == 0, ok.output
    assert "failed: videos/missing: " in ok.stderr
    strict = _oracle(broken, tmp_path / "b", saved, *root, "--strict")
    assert strict.exit_code == 1 and "error: 1 of 6 videos failed (--strict)" in strict.stderr
    assert (tmp_path / "b" / "report.md").is_file()  # the report of the five is written all the same
    missing = tmp_path / "missing.txt"
    missing.write_text("nothing.mp4 0\nnowhere.mp4 1\n")
    nothing = _oracle(missing, tmp_path / "c", saved)
    assert nothing.exit_code == 1 and "error: no video could be mapped: all 2 failed" in nothing.stderr


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (["--label", "maybe"], ["--label must be one of true, pred; got 'maybe'"]),
        (["--tensor", "mlp"], ["--tensor must be one of output, hidden, embed; got 'mlp'"]),
        (["--value", "saliency"], ["--value must be one of gradcam, gradxact, gradnorm; got 'saliency'"]),
        (["--block", "7"], ["--block must be in [-3, 2] for this model of 3 blocks; got 7"]),
        (["--views", "4"], ["--views is CLIPSxCROPS"]),
        (["--sampling", "sparse"], ["--sampling must be dense or segments"]),
    ],
)
def test_bad_arguments_are_one_line(
    synth: Path, saved: Path, tmp_path: Path, extra: list[str], names: list[str]
) -> None:
    result = _oracle(synth, tmp_path / "o", saved, *extra)
    _one_error_line(result, 2, names)


def test_another_label_on_the_same_out_is_one_line(synth: Path, saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert _oracle(synth, out, saved).exit_code == 0
    written = (out / "maps.jsonl").read_bytes()
    result = _oracle(synth, out, saved, "--label", "pred")
    _one_error_line(result, 2, ["holds results of another run (6 videos)", "label=true", "label=pred"])
    assert (out / "maps.jsonl").read_bytes() == written


def _one_error_line(result, code: int, names: list[str]) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for name in names:
        assert name in result.stderr, result.stderr


def test_torchrun_two_processes_map_what_one_does(synth: Path, saved: Path, tmp_path: Path) -> None:
    def run(out: Path, procs: int) -> dict:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--standalone", "-m", "tokensieve",
                "oracle", "--model", str(saved), "--data", str(synth), "--out", str(out), "--workers", "0",
                "--batch-size", "2", "--json"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert one["mapped"] == two["mapped"] == 6
    a, b = read_value_maps(tmp_path / "one" / "maps.jsonl"), read_value_maps(tmp_path / "two" / "maps.jsonl")
    assert list(a) == list(b)  # merged in dataset order, each video once
    for vid in a:
        torch.testing.assert_close(a[vid], b[vid], atol=5e-4, rtol=0)
    assert not (tmp_path / "two" / "maps.jsonl.parts").exists()
    shares = [row["per_clip"] for row in two["report"]["pareto"]]
    assert shares == pytest.approx([row["per_clip"] for row in one["report"]["pareto"]], abs=1e-3)
    assert not math.isnan(shares[0])
