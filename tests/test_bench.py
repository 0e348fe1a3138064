"""`tokensieve.benchmark`: result structure, baseline ratios, restoring the model. No timing asserted."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tokensieve as ts
from tokensieve.bench import BenchResult, format_table, to_json

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
    assert halved.gflops == pytest.approx(ts.flops(ts.apply(model, halve)))
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
    with pytest.raises(ValueError, match="token grid"):
        ts.benchmark(model, frames=8, **FAST)  # the model's positions are built for 4 frames
    assert _is_bare(model)


def test_threads_are_set_and_restored(model: ts.VideoBackbone) -> None:
    before = torch.get_num_threads()
    (result,) = ts.benchmark(model, threads=1, **FAST)
    assert result.threads == 1
    assert torch.get_num_threads() == before


def test_bfloat16_runs_under_autocast(model: ts.VideoBackbone) -> None:
    (result,) = ts.benchmark(model, dtype="bfloat16", **FAST)
    assert result.dtype == "bfloat16" and result.seconds > 0
    assert result.gflops == pytest.approx(ts.flops(model))  # counted in float32 whatever the dtype


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "float16"}, "'float32', 'bfloat16'"),
        ({"plans": ["bogus"]}, "valid methods: .*none"),
        ({"plans": "none"}, "sequence of specs"),
        ({"batch_size": 0}, "batch sizes"),
        ({"threads": 0}, "threads"),
        ({"repeats": 0}, "repeats"),
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
    table = format_table(results)
    assert table.row_count == 2 and len(table.columns) == 9
