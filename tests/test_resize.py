"""`resize`: the frame sizes it chooses (hand-checked), the model it runs (equal to the bare model on the
resized clip), its GFLOPs on videomae-b, where it may stand in a plan, and the sweep's resize baseline:
matched at or below a setting's GFLOPs, and the verdict read against the stronger of random and resize."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from conftest import tiny_video
from tokensieve.engine.report import INDISTINGUISHABLE
from tokensieve.engine.sweep import (
    MATCH_TOLERANCE,
    Planned,
    _Flops,
    _settings_table,
    canonical,
    matched_resize,
    plan_settings,
)
from tokensieve.reducers.resize import resized_sides


@pytest.mark.parametrize(
    ("H", "W", "keep", "sides"),
    [
        (14, 14, 0.5, (10, 10)),  # 9.90 -> {9, 10}: 81, 90, 100 tokens for a target of 98
        (14, 14, 0.25, (7, 7)),  # exactly half of each side
        (14, 14, 0.3, (8, 7)),  # 7.67 -> {7, 8}: 49, 56, 64 for 58.8; 8x7 and 7x8 tie: the taller
        (14, 14, 1.0, (14, 14)),
        (4, 4, 0.5, (3, 3)),  # 2.83 -> {2, 3}: 4, 6, 9 for 8
        (12, 16, 0.5, (8, 12)),  # 8.49 -> {8, 9}, 11.31 -> {11, 12}: 88, 96, 99, 108 for 96
    ],
)
def test_sides_by_hand(H: int, W: int, keep: float, sides: tuple[int, int]) -> None:
    assert resized_sides(H, W, keep) == sides


def test_the_plan_is_the_bare_model_on_the_resized_clip() -> None:
    model = ts.build("videomae-tiny").eval()  # 4 frames of 32x32, patch 8: a 4x4 grid per frame
    video = tiny_video("videomae-tiny")
    with torch.no_grad():
        bare = model(
            F.interpolate(video.flatten(0, 1), size=(24, 24), mode="bilinear", antialias=True).view(
                2, 4, 3, 24, 24
            )
        )
        with ts.apply(model, "resize:keep=0.5") as installed:  # 4x4 -> 3x3 patches: 24x24 pixels
            assert installed.steps[0].tokens_out == 2 * 3 * 3
            resized = model(video)
    assert torch.equal(resized, bare)


def test_gflops_on_videomae_b() -> None:
    """keep=0.5 on 16x224: 10x10 patches (160x160 pixels), 0.447 of the unreduced GFLOPs (attention is
    quadratic in the tokens); the sweep's resize matched to half the GFLOPs is 10x11 patches, 0.2% under."""
    model = ts.build("videomae-b")
    full = ts.flops(model)
    with ts.apply(model, "resize:keep=0.5"):
        half = ts.flops(model)
    assert half == pytest.approx(ts.flops(model, size=160), rel=1e-12)
    assert half == pytest.approx(80.762, abs=1e-3) and full == pytest.approx(180.489, abs=1e-3)
    spec = matched_resize(model, full / 2, _Flops(model))
    assert spec == "resize:keep=0.561224"  # 110 of 196 tokens: 10x11
    with ts.apply(model, spec):
        matched = ts.flops(model)
    assert abs(matched / (full / 2) - 1) < 0.02 and matched <= full / 2 * (1 + MATCH_TOLERANCE)


def test_resize_goes_first_and_alone() -> None:
    model = ts.build("videomae-tiny")
    for spec in ("random:keep=0.5+resize:keep=0.5", "resize:keep=0.5+resize:keep=0.7"):
        with pytest.raises(ts.InputError, match="must be the plan's first method, and only one per plan"):
            ts.apply(model, spec)
    steps = ts.apply(model, "resize:keep=0.5+random:keep=0.5").steps  # random sees the resized grid
    assert [s.tokens_in for s in steps] == [32, 18] and steps[1].site.grid == (2, 3, 3)


def test_at_another_input_size() -> None:
    """A clip of 48x40 pixels (6x5 patches) with keep=0.5: 5x3 patches (40x24 pixels), the count exact."""
    model = ts.apply(ts.build("videomae-tiny").eval(), "resize:keep=0.5").model
    video = torch.randn(2, 4, 3, 48, 40)
    assert resized_sides(6, 5, 0.5) == (5, 3)  # 4.24 -> {4, 5}, 3.54 -> {3, 4}: 12, 15, 16, 20 for 15
    with torch.no_grad():
        state = model.forward_features(video)
    assert state.grid == (2, 5, 3) and state.x.shape[1] == 30


def test_every_setting_gets_a_resize_baseline_at_or_below_its_gflops() -> None:
    model = ts.build("videomae-tiny", num_classes=4, frames=8, size=64, depth=4).eval()  # 8x8 patches
    count = _Flops(model)
    settings = plan_settings(model, ["sta", "resize"], [0.4, 0.7], count=count)
    sta = [s for s in settings if s.method == "sta" and s.spec]
    assert sta and all(s.resize and s.resize_gflops <= s.gflops * (1 + MATCH_TOLERANCE) for s in sta)
    for s in sta:  # the nearest size below: the next larger one costs more than the setting
        sizes = {f"resize:keep={h * w / 64:.6g}" for h in range(1, 9) for w in range(1, 9)}
        costs = sorted(count(x) for x in sizes if resized_sides(8, 8, float(x.split("=")[1])) != (8, 8))
        above = [c for c in costs if c > s.resize_gflops]
        assert not above or above[0] > s.gflops * (1 + MATCH_TOLERANCE)
    assert all(s.resize is None for s in settings if s.method in ("resize", "none"))


def _records(spec: str, hits: list[bool]) -> list[dict]:
    return [{"id": f"v{i}", "setting": canonical(spec), "labels": [0], "status": "ok", "top5": [[0 if h else 1, 0.9]]}
            for i, h in enumerate(hits)]  # fmt: skip


def test_the_verdict_reads_against_the_stronger_baseline() -> None:
    """40 videos: the method right on 36, random on 20 (every seed), resize on 30: Δ against resize."""
    n = 40
    item = Planned("sta", 0.5, spec="sta:r=2", gflops=1.0, random="random:keep=0.5,at=0", random_gflops=1.0,
                   seeds=[f"random:keep=0.5,at=0,seed={s}" for s in range(3)], resize="resize:keep=0.5",
                   resize_gflops=0.97)  # fmt: skip
    own = _records("sta:r=2", [i < 36 for i in range(n)])
    rand = [
        r for s in range(3) for r in _records(f"random:keep=0.5,at=0,seed={s}", [i < 20 for i in range(n)])
    ]
    size = _records("resize:keep=0.5", [i < 30 for i in range(n)])
    (row,) = _settings_table([item], own + rand + size, [f"v{i}" for i in range(n)], {})
    assert row.baseline == "resize" and row.resize_top1 == 0.75 and row.random_top1 == 0.5
    assert row.delta == pytest.approx(0.15) and row.verdict == "beats resize"
    weak = _records("resize:keep=0.5", [i < 10 for i in range(n)])  # now random is the stronger
    (row,) = _settings_table([item], own + rand + weak, [f"v{i}" for i in range(n)], {})
    assert row.baseline == "random" and row.delta == pytest.approx(0.4) and row.verdict == "beats random"
    far = dataclasses.replace(item, resize_gflops=0.85)  # 15% cheaper: shown, not compared
    (row,) = _settings_table([far], own + rand + size, [f"v{i}" for i in range(n)], {})
    assert row.resize_top1 == 0.75 and row.baseline == "random" and row.verdict == "beats random"
    tie = _records("sta:r=2", [i < 30 for i in range(n)])  # equal to resize on every video
    (row,) = _settings_table([item], tie + rand + size, [f"v{i}" for i in range(n)], {})
    assert row.delta == 0 and row.verdict == INDISTINGUISHABLE


def test_a_measured_token_ratio_is_a_share_of_the_clips_grid() -> None:
    """What the sweep measures for a plan as it runs (`_measuring`, used for adaptive plans): with resize
    first, the tokens the blocks take (2 x 3 x 3) over the clip's grid (2 x 4 x 4), not the resized one."""
    from tokensieve.engine.sweep import _measuring

    model = ts.apply(ts.build("videomae-tiny").eval(), "resize:keep=0.5").model
    measured: dict[str, float] = {}
    with torch.no_grad(), _measuring(model, measured, (2, 4, 4)):
        model(tiny_video("videomae-tiny"))
    assert measured["ratio"] == 18 / 32 and measured["gflops"] == pytest.approx(ts.flops(model))
