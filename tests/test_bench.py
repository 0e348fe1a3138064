"""`tokensieve.benchmark`: result structure, baseline ratios, restoring the model. No timing asserted."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch
from torch import nn

import tokensieve as ts
from tokensieve import bench
from tokensieve.bench import BUSY_SPREAD, BenchResult, busy_warning, format_table, to_json

FAST = {"warmup": 1, "repeats": 2}


@pytest.fixture
def halve() -> str:
    """A plan with fewer FLOPs: half of the frames after the first block."""
    return "uniform:keep=0.5,at=1"


@pytest.fixture
def model() -> ts.VideoBackbone:
    return ts.build("videomae-tiny")


def _is_bare(model: ts.VideoBackbone) -> bool:
    return all(isinstance(r, nn.Identity) for r in model.reducers) and not any(b.record for b in model.blocks)


def test_baseline_comes_first_with_unit_ratios(model: ts.VideoBackbone) -> None:
    (result,) = ts.benchmark(model, **FAST)
    assert isinstance(result, BenchResult)
    assert result.plan == "none" and result.is_baseline
    assert result.speedup == 1.0 and result.gflops_ratio == 1.0
    assert (result.batch_size, result.dtype, result.frames, result.size) == (1, "float32", 4, 32)
    assert len(result.times) == 2 and result.seconds > 0
    assert result.clips_per_s == pytest.approx(1 / result.seconds)
    q1, q3 = result.seconds_iqr
    assert min(result.times) <= q1 <= result.seconds <= q3 <= max(result.times)


def test_baseline_is_added_and_not_duplicated(model: ts.VideoBackbone, halve: str) -> None:
    results = ts.benchmark(model, plans=[halve], **FAST)
    assert [r.plan for r in results] == ["none", halve]
    results = ts.benchmark(model, plans=[halve, "none", halve], **FAST)
    assert [r.plan for r in results] == ["none", halve]


def test_gflops_are_those_of_the_installed_plan(model: ts.VideoBackbone, halve: str) -> None:
    base, halved = ts.benchmark(model, plans=["none", halve], **FAST)
    assert base.gflops == pytest.approx(ts.flops(model))
    assert halved.gflops == pytest.approx(ts.flops(ts.apply(model, halve).model))
    assert halved.gflops < base.gflops
    assert halved.gflops_ratio == pytest.approx(base.gflops / halved.gflops)
    assert halved.speedup == pytest.approx(halved.clips_per_s / base.clips_per_s)


def test_several_batch_sizes_group_rows_baseline_first(model: ts.VideoBackbone, halve: str) -> None:
    results = ts.benchmark(model, plans=[halve], batch_size=[1, 3], **FAST)
    assert [(r.batch_size, r.plan) for r in results] == [(1, "none"), (1, halve), (3, "none"), (3, halve)]
    assert results[2].speedup == 1.0
    assert results[3].clips_per_s == pytest.approx(3 / results[3].seconds)


def test_model_state_is_restored(model: ts.VideoBackbone, halve: str) -> None:
    model.train()
    ts.benchmark(model, plans=[halve], **FAST)
    assert _is_bare(model) and model.training

    ts.apply(model, halve)
    installed = model.reducers[1]
    ts.benchmark(model, plans=["none"], **FAST)
    assert model.reducers[1] is installed  # the very plan the user had, not a fresh one


def test_model_state_is_restored_after_an_error(model: ts.VideoBackbone) -> None:
    with pytest.raises(ValueError, match="divisible by the tubelet size 2"):
        ts.benchmark(model, frames=3, **FAST)  # tubelets of 2 frames
    assert _is_bare(model)


def test_threads_are_set_and_restored(model: ts.VideoBackbone) -> None:
    before = torch.get_num_threads()
    (result,) = ts.benchmark(model, threads=1, **FAST)
    assert result.threads == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("precision", ["autocast", "weights"])
def test_bfloat16_runs_as_asked_and_leaves_the_model_as_it_was(
    model: ts.VideoBackbone, halve: str, precision: str
) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = ts.benchmark(model, plans=[halve], dtype="bfloat16", precision=precision, **FAST)
    assert [(r.dtype, r.precision) for r in results] == [("bfloat16", precision)] * 2
    assert all(r.seconds > 0 for r in results)
    assert results[0].gflops == pytest.approx(ts.flops(model))  # counted in float32 whatever the dtype
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())
    assert model.spec is None


def test_bfloat16_auto_times_both_and_says_which(
    model: ts.VideoBackbone, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="tokensieve.bench"):
        (result,) = ts.benchmark(model, dtype="bfloat16", **FAST)
    assert result.precision in ("autocast", "weights")
    chosen = "bfloat16 weights" if result.precision == "weights" else "autocast"
    assert f"bfloat16: {chosen} (autocast " in caplog.text
    (plain,) = ts.benchmark(model, **FAST)
    assert plain.precision == ""


def test_peak_memory_counts_the_tensors_held_at_once() -> None:
    """Hand-checked: 4 MB, then 4 MB more while the first is alive (8), the first freed, a view (nothing
    new), 2 MB more (6 live): the peak is 8 MB. Tensors alive before are not counted."""
    outside = torch.ones(2000, 1000)

    def run() -> None:
        a = torch.ones(1000, 1000) + outside[:1000]  # 4 MB (the sum; the ones are freed at once: 8 peak)
        b = a * 2
        del a
        b.view(-1)
        torch.ones(500, 1000)

    assert bench.peak_tensor_bytes(run) == 2 * 4_000_000
    assert bench.peak_tensor_bytes(lambda: outside[:10]) == 0


def test_peak_memory_per_clip_falls_with_the_tokens() -> None:
    """Keeping a quarter of the tokens after block 1 holds fewer activations at once than the whole
    model, and per clip the peak is about the same at batch 1 and 2 (activations grow with the batch).
    A model 4x as wide as videomae-tiny: on the tiny one the embedding's copy of the 4x32x32 input is
    the peak, whatever the plan."""
    model = ts.build("videomae-tiny", dim=128, mlp_dim=512)
    results = ts.benchmark(model, plans=["random:keep=0.25"], batch_size=[1, 2], **FAST)
    peak = {(r.plan, r.batch_size): r.peak_mb for r in results}
    assert all(v is not None and v > 0 for v in peak.values())
    assert peak[("random:keep=0.25", 1)] < peak[("none", 1)]
    assert peak[("none", 2)] == pytest.approx(peak[("none", 1)], rel=0.1)
    (unmeasured,) = ts.benchmark(model, memory=False, **FAST)
    assert unmeasured.peak_mb is None


def test_a_training_step_holds_more_than_a_forward_and_less_with_fewer_tokens(
    model: ts.VideoBackbone,
) -> None:
    """A training step keeps every block's activations for the backward pass: more than the forward's
    peak, and less when a quarter of the frames run from block 1. The gradients (allocated before) are
    not counted: a second measurement gives the same bytes; a plan that needs labels to train gets None."""
    was_training = model.training
    results = ts.benchmark(model, plans=["random:keep=0.25", "lite:keep=0.5"], train_memory=True, **FAST)
    peak = {r.plan: r for r in results}
    assert peak["none"].train_mb > 2 * peak["none"].peak_mb
    assert peak["random:keep=0.25"].train_mb < 0.75 * peak["none"].train_mb
    assert peak["lite:keep=0.5"].train_mb is None  # LITE trains against the oracle of the true labels
    again = ts.benchmark(model, train_memory=True, **FAST)[0]
    assert again.train_mb == peak["none"].train_mb
    assert all(p.grad is None for p in model.parameters()) and model.training == was_training
    assert ts.benchmark(model, **FAST)[0].train_mb is None


def test_compiled_plans_run_without_recompiling_in_timed_rounds(model: ts.VideoBackbone, halve: str) -> None:
    """One compiled copy per plan, compiled in the warm-up: the timed rounds run under
    `fail_on_recompile`, so two batch sizes and two plans time without an error; the caller's model is
    left uncompiled with its plan. The reducer share is not measured (None), nor CPU memory."""
    torch._dynamo.reset()
    results = ts.benchmark(model, plans=[halve], batch_size=[1, 2], compile=True, **FAST)
    assert [(r.plan, r.batch_size, r.compiled) for r in results] == [
        ("none", 1, True), (halve, 1, True), ("none", 2, True), (halve, 2, True)]  # fmt: skip
    assert all(r.reducer_share is None and r.peak_mb is None and r.speedup > 0 for r in results)
    assert _is_bare(model) and not hasattr(model, "_orig_mod")
    share = next(c for c in format_table(results).columns if "share" in str(c.header))
    assert list(share.cells) == ["-"] * 4


def test_one_attention_kernel_can_be_chosen(model: ts.VideoBackbone) -> None:
    (result,) = ts.benchmark(model, sdpa="math", memory=False, **FAST)
    assert result.sdpa == "math" and result.clips_per_s > 0


def test_host_syncs_counts_what_makes_the_host_wait() -> None:
    """Hand-checked: .tolist(), .item(), bool(), boolean-mask indexing, nonzero and repeat_interleave
    without output_size each wait for values; arithmetic, topk, gather and repeat_interleave with
    output_size do not. `Tensor.tolist` is put back afterwards."""
    x = torch.arange(6.0)
    with bench.host_syncs() as seen:
        x.tolist()
        x.sum().item()
        bool(x.any())
        x[x > 2]
        x.nonzero()
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.long))
        y = (x * 2).topk(3).indices
        x.gather(0, y)
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.long), output_size=6)
    assert seen == {"tolist": 1, "_local_scalar_dense": 2, "index (boolean mask)": 1, "nonzero": 1,
                    "repeat_interleave (no output_size)": 1}  # fmt: skip
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "float64"}, "'float32', 'bfloat16', 'float16'"),
        ({"sdpa": "fast"}, "'auto', 'flash', 'efficient', 'cudnn', 'math'"),
        ({"sdpa": "efficient"}, "no efficient attention kernel for torch.float32 heads of width 16 on cpu"),
        ({"plans": ["bogus"]}, "valid methods: .*none"),
        ({"plans": "none"}, "sequence of specs"),
        ({"batch_size": 0}, "batch sizes"),
        ({"threads": 0}, "threads"),
        ({"repeats": 0}, "repeats"),
        ({"dtype": "bfloat16", "precision": "half"}, "'auto', 'autocast', 'weights'"),
    ],
)
def test_bad_arguments_fail_before_measuring(model: ts.VideoBackbone, kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        ts.benchmark(model, **kwargs)


def test_meta_and_half_models_are_refused() -> None:
    with torch.device("meta"):
        meta = ts.build("videomae-tiny")
    with pytest.raises(ValueError, match="meta"):
        ts.benchmark(meta, **FAST)
    with pytest.raises(ValueError, match="float32 weights"):
        ts.benchmark(ts.build("videomae-tiny").to(torch.bfloat16), **FAST)


def test_json_and_table(model: ts.VideoBackbone, halve: str) -> None:
    results = ts.benchmark(model, plans=[halve], **FAST)
    doc = json.loads(to_json(results, meta={"model": "videomae-tiny"}))
    assert doc["model"] == "videomae-tiny"
    assert {"tokensieve", "torch"} <= doc["environment"].keys()
    assert [r["plan"] for r in doc["results"]] == ["none", halve]
    assert doc["results"][1]["gflops_ratio"] == pytest.approx(results[1].gflops_ratio)
    assert doc["results"][1]["peak_mb"] == pytest.approx(results[1].peak_mb)
    table = format_table(results)
    assert table.row_count == 2 and len(table.columns) == 10  # with the peak memory
    assert len(format_table([r.__class__(**{**r.__dict__, "peak_mb": None}) for r in results]).columns) == 9
    trained = format_table([r.__class__(**{**r.__dict__, "train_mb": 1.0}) for r in results])
    headers = [str(c.header) for c in trained.columns]  # the training column; the GFLOPs ratio makes room
    assert "train\nMB/clip" in headers and "GFLOPs\nratio" not in headers and len(headers) == 10


def _result(plan: str, *, seconds: float, seconds_iqr: tuple[float, float], speedup: float = 1.0,
            speedup_iqr: tuple[float, float] = (1.0, 1.0)) -> BenchResult:  # fmt: skip
    """A result made by hand: no timing in unit tests."""
    return BenchResult(
        plan=plan, batch_size=1, dtype="float32", frames=4, size=32, device="cpu", threads=1, gflops=1.0,
        gflops_ratio=1.0, seconds=seconds, seconds_iqr=seconds_iqr, times=(seconds,), clips_per_s=1 / seconds,
        speedup=speedup, speedup_iqr=speedup_iqr,
    )  # fmt: skip


def test_spread_is_the_paired_range_for_plans_and_the_seconds_range_for_the_baseline() -> None:
    base = _result("none", seconds=2.0, seconds_iqr=(1.9, 2.3))
    plan = _result(
        "random:keep=0.5", seconds=1.0, seconds_iqr=(0.5, 1.5), speedup=2.0, speedup_iqr=(1.9, 2.1)
    )
    assert base.spread == pytest.approx(0.2)  # (2.3 - 1.9) / 2.0
    assert plan.spread == pytest.approx(0.1)  # (2.1 - 1.9) / 2.0: drift in the seconds cancels in the pairs
    table = format_table([base, plan])
    assert list(table.columns[-1].cells) == ["20.0%", "10.0%"]  # the IQR column shows the spread


def test_a_long_plan_folds_and_every_number_stays_in_80_columns() -> None:
    from rich.console import Console

    long = "random:keep=0.673469,per_frame=true,at=2+random:keep=0.510204,per_frame=true,at=4"
    results = [_result("none", seconds=2.0, seconds_iqr=(1.9, 2.1)),
               _result(long, seconds=1.0, seconds_iqr=(0.9, 1.1), speedup=2.0, speedup_iqr=(1.9, 2.1))]  # fmt: skip
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(format_table(results))
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80
    assert "2.00x" in text and "10.0%" in text  # the plan's speed-up and IQR are there
    assert "at=4" in text  # and the whole plan, folded, not cut


def test_busy_warning_names_the_noisiest_result_above_the_threshold() -> None:
    quiet = [
        _result("none", seconds=1.0, seconds_iqr=(0.99, 1.01)),
        _result("tome:r=8", seconds=0.5, seconds_iqr=(0.4, 0.6), speedup=2.0, speedup_iqr=(1.91, 2.09)),
    ]
    assert quiet[1].spread < BUSY_SPREAD < quiet[1].seconds_iqr[1] / quiet[1].seconds - 1  # the pairs decide
    assert busy_warning(quiet) is None and busy_warning([]) is None
    doc = json.loads(to_json(quiet))
    assert doc["busy"] is None and doc["results"][1]["spread"] == pytest.approx(0.09)

    noisy = [*quiet, _result("random:keep=0.5", seconds=0.5, seconds_iqr=(0.4, 0.7), speedup=2.0,
                             speedup_iqr=(1.6, 2.2))]  # fmt: skip
    warning = busy_warning(noisy)
    assert warning is not None and "\n" not in warning
    assert (
        "busy" in warning and "1 of 3 results" in warning and "'random:keep=0.5' at batch 1 (30%)" in warning
    )
    assert json.loads(to_json(noisy))["busy"] == warning


def test_benchmark_logs_the_busy_warning(
    model: ts.VideoBackbone, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def disagreeing_rounds(num_plans: int, **_: object) -> tuple[list[list[float]], list[list[float]]]:
        return [[1.0, 2.0] for _ in range(num_plans)], [[0.0, 0.0] for _ in range(num_plans)]

    monkeypatch.setattr(bench, "_timed_rounds", disagreeing_rounds)  # whatever this machine does
    with caplog.at_level(logging.WARNING, logger="tokensieve.bench"):
        (result,) = ts.benchmark(model, **FAST)
    assert result.spread > BUSY_SPREAD
    assert [r.getMessage() for r in caplog.records] == [busy_warning([result])]
