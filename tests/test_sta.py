"""STA: the accumulation chain on a hand-computed 3-frame toy, the first-frame drops, the stage
schedule and token counts of the released code, and the paper's GFLOPs."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from tokensieve.reducers import Site, schedule
from tokensieve.reducers.sta import accumulate, drop_first, semantic_score
from tokensieve.tokens import KEYS, TokenState

# Three frames of three tokens, unit keys in 2-D (rows: frames, then tokens).
TOY_KEYS = torch.tensor(
    [
        [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]],
        [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
        [[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]],
    ]
)
TOY_SEMANTIC = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])


def test_first_frame_tome_drop_removes_the_most_redundant_even_token() -> None:
    # A = tokens 0, 2; B = token 1. cos(t0, t1) = 0.6, cos(t2, t1) = 0.8: token 2 goes.
    kept = drop_first(TOY_KEYS[None, 0], torch.arange(3)[None], 1, "tome")
    assert kept.tolist() == [[0, 1]]


def test_accumulated_scores_on_a_three_frame_toy() -> None:
    """Checked by hand (4-5 digits). Frame 1: every first-frame token carries mass 1 (all three,
    including the dropped one); P[i, j] = exp(k1_i . k0_j) / sum_i' exp(k1_i' . k0_j), so
    A1 = P @ 1 = [0.92818, 0.96675, 1.10507] (the three columns each sum to 1: total 3). Scores
    A1 * (1 - F1) = [0.928, 0, 0.553]: token 0 is dropped. A'1 = [0.96675, 1.10507] / 2.07182 =
    [0.46662, 0.53338]. Frame 2 against the kept keys (t1, t2 of frame 1):
    A2 = [0.40720, 0.23016, 0.36264]; no semantic weight, so token 0 is dropped again."""
    first = drop_first(TOY_KEYS[None, 0], torch.arange(3)[None], 1, "tome")
    kept, accumulated = accumulate(TOY_KEYS[None], TOY_SEMANTIC[None], first, 1)
    torch.testing.assert_close(accumulated[0], torch.tensor([[0.92818, 0.96675, 1.10507]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(accumulated[1], torch.tensor([[0.40720, 0.23016, 0.36264]]), atol=1e-4, rtol=0)
    assert [k.sort(1).values.tolist() for k in kept] == [[[0, 1]], [[1, 2]], [[1, 2]]]


def _toy_state(keys: torch.Tensor, semantic_rows: list[list[float]]) -> TokenState:
    """Grid (3, 1, 3); tokens whose sum of |x| is the given per-frame row (min-max'd by STA)."""
    x = torch.tensor(semantic_rows).reshape(1, 9, 1).expand(1, 9, 4) / 4  # sum_c |x| = the row value
    return TokenState.from_grid(x.contiguous(), (3, 1, 3)).with_aux(**{KEYS: keys.reshape(1, 9, 2)})


def test_the_reducer_runs_the_chain_forward_and_backward() -> None:
    rows = [[0.0, 0.0, 0.0], [0.0, 2.0, 1.0], [5.0, 5.0, 5.0]]  # min-max per frame -> TOY_SEMANTIC
    torch.testing.assert_close(semantic_score(_toy_state(TOY_KEYS, rows).x.view(1, 3, 3, 4))[0], TOY_SEMANTIC)
    site = Site(stage=0, position=1, depth=12, grid=(3, 1, 3))
    forward = ts.plan("sta:r=1,order=FBF")[0](_toy_state(TOY_KEYS, rows), site)
    assert forward.pos.tolist() == [[0, 1, 4, 5, 7, 8]] and forward.frames == 3
    # The same clip reversed in time, processed backward: the same tokens survive, mirrored.
    backward = ts.plan("sta:r=1,order=BFB")[0](_toy_state(TOY_KEYS.flip(0), rows[::-1]), site)
    assert backward.pos.tolist() == [[1, 2, 4, 5, 6, 7]]


def test_grid_drop_takes_one_token_from_each_raster_stratum() -> None:
    pos = torch.tensor([[5, 3, 7, 1, 0, 6, 2, 4]])  # tokens stored out of raster order
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        kept = drop_first(torch.randn(1, 8, 2), pos, 4, "grid", generator)
        dropped = sorted(set(range(8)) - set(kept[0].tolist()))
        # strata of raster positions {0,1}, {2,3}, {4,5}, {6,7}: one dropped from each
        assert sorted(int(pos[0, d]) // 2 for d in dropped) == [0, 1, 2, 3]


def test_random_drop_is_reproducible_from_the_seed() -> None:
    keys, pos = torch.randn(2, 16, 4), torch.arange(16).expand(2, -1)
    a = drop_first(keys, pos, 5, "random", torch.Generator().manual_seed(1))
    b = drop_first(keys, pos, 5, "random", torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 11) and not torch.equal(a[0], a[1])


@pytest.mark.parametrize("balance", ["group", "frame"])
def test_stages_and_token_counts_of_the_released_code(balance: str) -> None:
    with torch.device("meta"):
        model = ts.build("videomae-b")
    steps = schedule(model, ts.plan(f"sta:r=64,balance={balance}"))
    assert [s.site.position for s in steps] == [1, 5, 9]  # after blocks 0, 4, 8 (0-based)
    assert [s.tokens_out for s in steps] == [1056, 800, 672]
    assert [s.frames_out for s in steps] == ([8, None, None] if balance == "group" else [8, 8, 8])
    with torch.device("meta"):
        huge = ts.build("videomae-h")
    assert ts.plan("sta")[0].positions(len(huge.blocks)) == (1, 11, 22)  # after blocks 0, 10, 21


@pytest.mark.parametrize("balance", ["group", "frame"])
@pytest.mark.parametrize(("r", "gflops"), [(32, 136), (48, 116), (64, 96)])
def test_gflops_of_the_paper(balance: str, r: int, gflops: float) -> None:
    with torch.device("meta"):
        model = ts.apply(ts.build("videomae-b"), f"sta:r={r},balance={balance}")
    assert ts.flops(model) == pytest.approx(gflops, abs=1.0)


def test_group_balance_prunes_unevenly_between_frames_and_frame_balance_evenly() -> None:
    video = torch.randn(1, 16, 3, 32, 32)  # 8 slices of 4x4 tokens
    counts = {}
    for balance in ("group", "frame"):
        model = ts.apply(ts.build("videomae-tiny", frames=16, depth=12).eval(), f"sta:r=4,balance={balance}")
        with torch.no_grad():
            state = model.forward_features(video)
        counts[balance] = torch.bincount(state.pos[0] // 16, minlength=8)
        assert state.x.shape[1] == 2 * (4 * (16 - 4) - 3 * 4)  # 72 tokens, the same in both
    assert counts["frame"].tolist() == [9] * 8  # 16 - 4 - 2 - 1 per frame
    assert counts["group"].sum() == 72 and counts["group"].tolist() != [9] * 8
