"""STA: the accumulation chain on a hand-computed 3-frame toy, the first-frame drops, the three
stages against a slow re-statement of the released code (kept tokens and the order it stores them),
the stage schedule and token counts of the released code, and the paper's GFLOPs."""

from __future__ import annotations

import math

import pytest
import torch

import tokensieve as ts
from tokensieve.reducers import Site, schedule
from tokensieve.reducers.sta import STA_ORDER, accumulate, drop_first, semantic_score
from tokensieve.tokens import KEYS, TokenState, take

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
    # A = tokens 0, 2; B = token 1. cos(t0, t1) = 0.6, cos(t2, t1) = 0.8: token 2 goes. In the
    # released code's order: the B tokens, then the A tokens by ascending similarity, the r last go.
    order = drop_first(TOY_KEYS[None, 0], torch.arange(3)[None], 1, "tome")
    assert order.tolist() == [[1, 0, 2]]


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
    # Strata of raster positions {0,1}, {2,3}, {4,5}, {6,7}; the draws pick places 0, 1, 1, 0 in them
    # (floor(u * 2)): raster positions 0, 3, 5, 6, held by tokens 4, 1, 0, 5.
    draws = torch.tensor([[0.0, 0.99, 0.5, 0.4, 0.7, 0.7, 0.7, 0.7]], dtype=torch.float64)
    order = drop_first(torch.randn(1, 8, 2), pos, 4, "grid", draws)
    assert order.tolist() == [[2, 3, 6, 7, 0, 1, 4, 5]]  # kept ascending, then the dropped ones
    for seed in range(5):  # any draws: one token from each stratum
        draws = torch.rand(1, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        dropped = drop_first(torch.randn(1, 8, 2), pos, 4, "grid", draws)[0, 4:].tolist()
        assert sorted(int(pos[0, d]) // 2 for d in dropped) == [0, 1, 2, 3]


def test_random_drop_removes_the_tokens_with_the_largest_draws() -> None:
    keys, pos = torch.randn(1, 6, 4), torch.arange(6).expand(1, -1)
    draws = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.0]], dtype=torch.float64)
    assert drop_first(keys, pos, 2, "random", draws).tolist() == [[0, 2, 4, 5, 1, 3]]


@pytest.mark.parametrize("first", ["random", "grid"])
def test_random_first_group_drops_are_keyed_by_clip(first: str) -> None:
    model = ts.apply(ts.build("videomae-tiny").eval(), f"sta:r=3,first={first}").model
    video = torch.randn(3, 4, 3, 32, 32)
    with torch.no_grad():
        together = model.forward_features(video).pos
        alone = [model.forward_features(video[i : i + 1]).pos for i in range(3)]
    assert torch.equal(together, torch.cat(alone))  # a clip's drops do not depend on its batch
    assert len({tuple(row) for row in together.tolist()}) == 3


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
        model = ts.apply(ts.build("videomae-b"), f"sta:r={r},balance={balance}").model
    assert ts.flops(model) == pytest.approx(gflops, abs=1.0)


def test_group_balance_prunes_unevenly_between_frames_and_frame_balance_evenly() -> None:
    video = torch.randn(1, 16, 3, 32, 32)  # 8 slices of 4x4 tokens
    counts = {}
    for balance in ("group", "frame"):
        model = ts.apply(
            ts.build("videomae-tiny", frames=16, depth=12).eval(), f"sta:r=4,balance={balance}"
        ).model
        with torch.no_grad():
            state = model.forward_features(video)
        counts[balance] = torch.bincount(state.pos[0] // 16, minlength=8)
        assert state.x.shape[1] == 2 * (4 * (16 - 4) - 3 * 4)  # 72 tokens, the same in both
    assert counts["frame"].tolist() == [9] * 8  # 16 - 4 - 2 - 1 per frame
    assert counts["group"].sum() == 72 and counts["group"].tolist() != [9] * 8


# ------------------------------------------------------------------------------ three stages
def _released_sta(
    keys: list[list[list[float]]], acts: list[list[float]], groups: list[int], rs: list[int], order: str
) -> list[list[int]]:
    """Slow re-statement of the released code's STA (`merge` in Mark12Ding/STA) for one clip.

    Args:
        keys: keys[s][p], the key of the token at grid position p when stage s runs.
        acts: acts[s][p], its activation sum_c |x| then.
        groups, rs: groups and r of each stage.
        order: F/B per stage.

    Returns:
        For each stage, the kept grid positions in the order the released code stores them.
    """
    stored = list(range(len(keys[0])))  # the released code's sequence of tokens, as grid positions
    result = []
    for k, act, num_groups, r, direction in zip(keys, acts, groups, rs, order, strict=True):
        if r == 0:
            result.append(stored)
            continue
        unit = {p: [v / math.sqrt(sum(u * u for u in k[p])) for v in k[p]] for p in stored}

        def cos(p: int, q: int, unit: dict[int, list[float]] = unit) -> float:
            return sum(u * v for u, v in zip(unit[p], unit[q], strict=True))

        m = len(stored) // num_groups
        chunks = [stored[g * m : (g + 1) * m] for g in range(num_groups)]
        visit = list(range(num_groups)) if direction == "F" else list(reversed(range(num_groups)))
        kept: list[list[int]] = [[] for _ in range(num_groups)]
        # First group: even places (in stored order) vs odd ones; the r evens closest to an odd go.
        first = chunks[visit[0]]
        evens, odds = first[0::2], first[1::2]
        closest = {p: max(cos(p, q) for q in odds) for p in evens}
        kept[visit[0]] = odds + sorted(evens, key=lambda p: closest[p])[: len(evens) - r]
        # Every later group: redundancy carried over from the group before, weighted by semantics.
        before, mass = first, {p: 1.0 for p in first}  # all of the first group, mass 1 each
        for g in visit[1:]:
            group = chunks[g]
            carried = dict.fromkeys(group, 0.0)
            for q in before:  # previous token q spreads its mass over this group by softmax
                weight = {p: math.exp(cos(p, q)) for p in group}
                total = sum(weight.values())
                for p in group:
                    carried[p] += weight[p] / total * mass[q]
            low, high = min(act[p] for p in group), max(act[p] for p in group)
            score = {p: carried[p] * (1 - (act[p] - low) / (high - low)) for p in group}
            kept[g] = sorted(group, key=lambda p: score[p])[: m - r]  # ascending score
            total = sum(carried[p] for p in kept[g])
            before, mass = kept[g], {p: carried[p] / total for p in kept[g]}
        stored = [p for g in range(num_groups) for p in kept[g]]
        result.append(stored)
    return result


def _run_stages(
    spec: str, grid: tuple[int, int, int], keys: torch.Tensor, x: torch.Tensor
) -> list[TokenState]:
    """The reducer's three stages on stand-in block outputs: at stage s every token, wherever it is
    stored, has key keys[s, b, p] and tokens x[s, b, p] (p its grid position).

    Args:
        keys: (3, B, P, hd) and x: (3, B, P, C), P = T*H*W.
    """
    reducer = ts.plan(spec)[0]
    places = reducer.positions(12)
    state = TokenState.from_grid(x[0], grid)
    states = []
    for s in range(3):
        state = state.replace(x=take(x[s], state.pos)).with_aux(**{KEYS: take(keys[s], state.pos)})
        state = reducer(state, Site(stage=s, position=places[s], depth=12, grid=grid))
        state.check()
        states.append(state)
    return states


def _released_sequence(state: TokenState) -> torch.Tensor:
    """(B, N) grid positions in the order the released code would store the tokens."""
    return state.pos.gather(1, state.aux[STA_ORDER].argsort(1))


@pytest.mark.parametrize("order", ["FBF", "BFB"])
@pytest.mark.parametrize("balance", ["group", "frame"])
def test_each_stage_keeps_the_tokens_of_the_released_code(balance: str, order: str) -> None:
    """Random keys and tokens at each stage stand in for the block outputs; every stage keeps the
    tokens the released code keeps, and STA_ORDER gives the order it stores them in."""
    T, H, W, r = 8, 4, 4, 4
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 2, T * H * W, 8, generator=generator, dtype=torch.float64)
    x = torch.randn(3, 2, T * H * W, 6, generator=generator, dtype=torch.float64)
    states = _run_stages(f"sta:r={r},balance={balance},order={order}", (T, H, W), keys.float(), x.float())
    groups, rs = ([T, T // 2, T // 4], [r] * 3) if balance == "group" else ([T] * 3, [r, r // 2, r // 4])
    for b in range(2):
        acts = x[:, b].abs().sum(-1).tolist()
        expected = _released_sta(keys[:, b].tolist(), acts, groups, rs, order)
        for stage, (state, want) in enumerate(zip(states, expected, strict=True)):
            assert sorted(state.pos[b].tolist()) == sorted(want), f"kept tokens differ at stage {stage + 1}"
            assert _released_sequence(state)[b].tolist() == want, f"stored order differs at stage {stage + 1}"
            assert bool((state.pos[b].diff() > 0).all())  # the tokens themselves stay in their order
    if balance == "frame":
        assert [s.frames for s in states] == [T, T, T]


def test_stage_two_splits_the_first_frame_in_the_released_order() -> None:
    """Worked by hand. Two frames of six tokens (grid positions 0-5 and 6-11), frame balance, r=2
    (so r = 2, 1, 0 at the three stages), order F-B-F.

    Stage 1, forward. Frame 0 (first): A = 0, 2, 4, B = 1, 3, 5 (all B keys (0, 1)); the closest B
    token is at cosine 0, 0.6, 0.8 for A = 0, 2, 4, so 4 and 2 go; stored [1, 3, 5, 0] (B, then the
    kept A by ascending similarity). Frame 1: identical keys, so every softmax is uniform and every
    token carries A = 6 x 1/6 = 1; activations 0, 5, 1, 4, 2, 3 min-max to F = 0, 1, .2, .8, .4, .6,
    scores 1 - F = 1, 0, .8, .2, .6, .4: 6 and 8 go; stored by ascending score [7, 9, 11, 10].

    Stage 2, backward: frame 1 first, r=1, split in the stored order [7, 9, 11, 10]: A = 7, 11,
    B = 9, 10. Keys 7 (1, 0), 9 (0, 1), 10 and 11 (.6, .8): A 7 is at most .6 from a B token, A 11
    is 1 from 10, so 11 goes; stored [9, 10, 7]. (Split in ascending order [7, 9, 10, 11], A would be
    7, 10 and token 10 would go.) Frame 0 ([1, 3, 5, 0] stored), identical keys again, A = 4 x 1/4
    = 1; activations of 0, 1, 3, 5 are 3, 0, 2, 1: scores 0, 1, 1/3, 2/3, so 1 goes; stored
    [0, 3, 5]. Stage 3 drops 2 >> 2 = 0 tokens.
    """
    unit = {"x": [1.0, 0.0], "y": [0.0, 1.0], "a": [0.8, 0.6], "b": [0.6, 0.8]}
    stage1 = ["x", "y", "a", "y", "b", "y"] + ["x"] * 6
    stage2 = ["y", "y", "x", "y", "x", "y", "x", "x", "x", "y", "b", "b"]  # 2, 4, 6, 8 are gone
    keys = torch.tensor([[unit[k] for k in stage1], [unit[k] for k in stage2], [unit[k] for k in stage2]])
    acts = torch.tensor(
        [[1.0] * 6 + [0, 5, 1, 4, 2, 3], [3, 0, 0, 2, 0, 1] + [0.0] * 6, [0.0] * 12]
    )  # sum |x| of one-channel tokens
    states = _run_stages("sta:r=2,balance=frame,order=FBF", (2, 1, 6), keys[:, None], acts[:, None, :, None])
    assert states[0].pos.tolist() == [[0, 1, 3, 5, 7, 9, 10, 11]]  # what a user sees: grid order
    assert _released_sequence(states[0]).tolist() == [[1, 3, 5, 0, 7, 9, 11, 10]]
    assert states[1].pos.tolist() == [[0, 3, 5, 7, 9, 10]]
    assert _released_sequence(states[1]).tolist() == [[0, 3, 5, 9, 10, 7]]
    assert states[1].aux[STA_ORDER].tolist() == [[0, 1, 2, 5, 3, 4]]
    assert torch.equal(states[2].pos, states[1].pos)  # stage 3 drops nothing
    assert torch.equal(states[2].aux[STA_ORDER], states[1].aux[STA_ORDER])
