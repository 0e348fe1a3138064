from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensieve.errors import InputError
from tokensieve.tokens import (
    CLS_ATTN,
    KEYS,
    SOURCE_MAP,
    TokenState,
    covered,
    owners,
    register_token_aux,
    track_sources,
)  # fmt: skip


def make_state(
    B: int = 2, grid: tuple[int, int, int] = (2, 2, 3), C: int = 4, with_cls: bool = True
) -> TokenState:
    T, H, W = grid
    N = T * H * W
    state = TokenState.from_grid(
        torch.randn(B, N, C), grid, cls_token=torch.randn(B, 1, C) if with_cls else None
    )
    return state.replace(
        size=torch.rand(B, N) + 0.5,
        mask=torch.rand(B, N) > 0.2,
        aux={KEYS: torch.randn(B, N, 3), CLS_ATTN: torch.rand(B, N), "halting_step": 7},
    )


def test_from_grid_lays_out_time_major_positions() -> None:
    state = TokenState.from_grid(torch.zeros(3, 12, 4), (2, 2, 3))
    assert state.pos.tolist() == [list(range(12))] * 3
    assert state.frames == 2 and state.tokens_per_frame == 6
    assert state.cls is None and state.size is None and state.mask is None
    state.check()


def test_from_grid_rejects_wrong_count() -> None:
    with pytest.raises(ValueError, match=r"expected 2\*2\*3=12 tokens"):
        TokenState.from_grid(torch.zeros(1, 11, 4), (2, 2, 3))


def test_gather_moves_every_per_token_field() -> None:
    state = make_state()
    idx = torch.tensor([[5, 0, 11], [2, 3, 4]])
    out = state.gather(idx)
    for b in range(2):
        i = idx[b]
        torch.testing.assert_close(out.x[b], state.x[b, i], rtol=0, atol=0)
        assert out.pos[b].tolist() == state.pos[b, i].tolist()
        torch.testing.assert_close(out.size[b], state.size[b, i], rtol=0, atol=0)
        assert out.mask[b].tolist() == state.mask[b, i].tolist()
        torch.testing.assert_close(out.aux[KEYS][b], state.aux[KEYS][b, i], rtol=0, atol=0)
        torch.testing.assert_close(out.aux[CLS_ATTN][b], state.aux[CLS_ATTN][b, i], rtol=0, atol=0)
    assert out.aux["halting_step"] == 7  # not per token: untouched
    assert out.cls is state.cls and out.grid == state.grid
    assert out.frames is None  # the caller did not vouch for a per-frame layout
    assert state.x.shape[1] == 12  # the input state is unchanged


def test_gather_keeps_declared_frame_layout() -> None:
    state = make_state(with_cls=False).replace(mask=None)
    idx = torch.tensor([[0, 2, 6, 8]] * 2)  # two tokens of each of the 2 frames
    out = state.gather(idx, frames=2)
    assert out.per_frame().shape == (2, 2, 2, 4)
    out.check()


def test_gather_rejects_bad_index_shape() -> None:
    with pytest.raises(ValueError, match=r"\(B=2, K\)"):
        make_state().gather(torch.tensor([0, 1]))


def test_state_is_frozen_and_replace_copies() -> None:
    state = make_state()
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.x = torch.zeros(1)  # type: ignore[misc]
    other = state.with_aux(extra=1)
    assert "extra" in other.aux and "extra" not in state.aux


def test_per_frame_view_and_errors() -> None:
    state = make_state(with_cls=False)
    view = state.per_frame()
    assert view.shape == (2, 2, 6, 4)
    torch.testing.assert_close(view[:, 1, 2], state.x[:, 8], rtol=0, atol=0)
    with pytest.raises(ValueError, match="same number of tokens in every frame"):
        state.replace(frames=None).per_frame()


def test_num_tokens_counts_real_tokens() -> None:
    state = make_state()
    assert state.num_tokens.tolist() == state.mask.sum(1).tolist()
    assert state.replace(mask=None).num_tokens.tolist() == [12, 12]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.replace(pos=s.pos.clone().index_fill_(1, torch.tensor([1]), 0)), "held by two tokens"),
        (lambda s: s.replace(pos=s.pos + 1), "outside the grid"),
        (lambda s: s.replace(pos=s.pos.float()), "must be long"),
        (lambda s: s.replace(size=-s.size), "positive"),
        (lambda s: s.replace(cls=torch.zeros(2, 2, 4)), "cls must be"),
        (lambda s: s.with_aux(**{KEYS: torch.zeros(2, 5, 3)}), "per token"),
        (
            lambda s: s.replace(pos=s.pos[:, [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]]),
            "mixes tokens of several frames",
        ),
    ],
)
def test_check_catches_broken_invariants(change, message) -> None:  # type: ignore[no-untyped-def]
    state = make_state().replace(mask=None)
    state.check()
    with pytest.raises(AssertionError, match=message):
        change(state).check()


def test_check_allows_learned_tokens_and_padding_duplicates() -> None:
    state = make_state().replace(mask=None, frames=None)
    pos = state.pos.clone()
    pos[:, :3] = -1  # learned tokens: no grid cell, may repeat
    state.replace(pos=pos).check()
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 1] = False  # a padding slot may repeat a real token's position
    pos = state.pos.clone()
    pos[:, 1] = pos[:, 0]
    state.replace(pos=pos, mask=mask).check()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 30), st.randoms(use_true_random=False))
def test_gather_inverse_permutation_roundtrips(B, N, rnd) -> None:  # type: ignore[no-untyped-def]
    state = TokenState.from_grid(torch.randn(B, N, 3), (1, 1, N)).replace(size=torch.rand(B, N) + 1)
    perm = torch.stack([torch.tensor(rnd.sample(range(N), N)) for _ in range(B)])
    back = state.gather(perm).gather(perm.argsort(1))
    torch.testing.assert_close(back.x, state.x, rtol=0, atol=0)
    torch.testing.assert_close(back.size, state.size, rtol=0, atol=0)
    assert torch.equal(back.pos, state.pos)


# ------------------------------------------------------------------------------------------ merging
def _six(size: list[float] | None = None) -> TokenState:
    """Six tokens on a (1, 2, 3) grid: token i is (i + 1, i + 1), at cell i."""
    x = torch.arange(1.0, 7.0).repeat_interleave(2).view(1, 6, 2)
    state = TokenState.from_grid(x, (1, 2, 3)).with_aux(**{KEYS: torch.arange(6.0).view(1, 6, 1)})
    return state if size is None else state.replace(size=torch.tensor([size]))


def test_merge_by_hand() -> None:
    """Keep t0; t1 and t3 take merges: t2 and t5 into t1, t4 into t3."""
    state = _six([1, 2, 1, 3, 1, 2])
    out = state.merge(
        torch.tensor([[0]]), torch.tensor([[1, 3]]), torch.tensor([[2, 4, 5]]), torch.tensor([[0, 1, 0]])
    )
    x = torch.arange(1.0, 7.0)
    expected = [x[0], (2 * x[1] + 1 * x[2] + 2 * x[5]) / 5, (3 * x[3] + 1 * x[4]) / 4]  # size-weighted
    torch.testing.assert_close(out.x[0, :, 0], torch.stack(expected))
    torch.testing.assert_close(out.x[0, :, 1], torch.stack(expected))
    assert out.size.tolist() == [[1, 5, 4]]
    assert out.pos.tolist() == [[0, 1, 3]]  # a destination keeps its place
    assert KEYS not in out.aux  # the attention's records describe the tokens before the merge
    assert out.frames is None and out.grid == state.grid
    out.check()


KEPT, MEAN, SUMMED = (register_token_aux(f"test_{rule}", merge=rule) for rule in ("keep", "mean", "sum"))


def test_registered_per_token_entries_follow_their_merge_rule() -> None:
    """A method's own per-token state (registered with its rule) survives gathers and merges; values
    of token i are 10 * (i + 1) so every sum and mean is checked by hand."""
    value = torch.arange(10.0, 70.0, 10.0).view(1, 6)
    state = _six([1, 2, 1, 3, 1, 2]).with_aux(**{KEPT: value, MEAN: value, SUMMED: value.unsqueeze(-1)})
    out = state.merge(
        torch.tensor([[0]]), torch.tensor([[1, 3]]), torch.tensor([[2, 4, 5]]), torch.tensor([[0, 1, 0]])
    )
    assert out.aux[KEPT].tolist() == [[10, 20, 40]]
    torch.testing.assert_close(
        out.aux[MEAN], torch.tensor([[10, (2 * 20 + 30 + 2 * 60) / 5, (3 * 40 + 50) / 4]])
    )
    assert out.aux[SUMMED].squeeze(-1).tolist() == [[10, 20 + 30 + 60, 40 + 50]]
    gathered = state.gather(torch.tensor([[5, 0]]))
    assert gathered.aux[KEPT].tolist() == [[60, 10]] and gathered.aux[SUMMED].shape == (1, 2, 1)
    out.check()
    gathered.check()


def test_a_per_token_entry_cannot_change_its_rule() -> None:
    assert register_token_aux(KEPT, merge="keep") == KEPT  # registering again with the same rule is fine
    with pytest.raises(ValueError, match="already a per-token entry with merge rule 'keep'"):
        register_token_aux(KEPT, merge="sum")
    with pytest.raises(ValueError, match="merge rule"):
        register_token_aux("test_bad", merge="max")  # type: ignore[arg-type]


def test_merge_without_sizes_counts_one_patch_per_token() -> None:
    out = _six().merge(
        torch.tensor([[0, 2]]), torch.tensor([[5]]), torch.tensor([[1, 4]]), torch.tensor([[0, 0]])
    )
    assert out.pos.tolist() == [[0, 2, 5]]  # t3 is in no index set: dropped
    assert out.size.tolist() == [[1, 1, 3]]
    torch.testing.assert_close(out.x[0, :, 0], torch.tensor([1.0, 3.0, (2 + 5 + 6) / 3]))


def test_merge_with_nothing_to_merge_is_a_gather() -> None:
    state = _six([1, 2, 1, 3, 1, 2])
    none = torch.zeros(1, 0, dtype=torch.long)
    out = state.merge(torch.tensor([[4, 0]]), torch.tensor([[2]]), none, none)
    ref = state.gather(torch.tensor([[4, 0, 2]]))
    torch.testing.assert_close(out.x, ref.x, rtol=0, atol=0)
    assert torch.equal(out.pos, ref.pos) and torch.equal(out.size, ref.size)


def test_source_map_follows_gather_by_hand() -> None:
    state = track_sources(_six())
    assert state.aux[SOURCE_MAP].tolist() == [[0, 1, 2, 3, 4, 5]]
    once = state.gather(torch.tensor([[4, 1, 2]]))
    assert once.aux[SOURCE_MAP].tolist() == [[-1, 1, 2, -1, 0, -1]]  # dropped -> -1, kept renumbered
    twice = once.gather(torch.tensor([[2, 0]]))
    assert twice.aux[SOURCE_MAP].tolist() == [[-1, -1, 0, -1, 1, -1]]
    assert covered(twice).tolist() == [[False, False, True, False, True, False]]
    once.check()
    twice.check()


def test_source_map_follows_merge_by_hand() -> None:
    state = track_sources(_six())
    out = state.merge(
        torch.tensor([[0]]), torch.tensor([[1, 3]]), torch.tensor([[2, 4, 5]]), torch.tensor([[0, 1, 0]])
    )
    # t0 -> 0; t1 (with t2, t5) -> 1; t3 (with t4) -> 2
    assert out.aux[SOURCE_MAP].tolist() == [[0, 1, 1, 2, 2, 1]]
    assert owners(out).tolist() == [[0, 1, 1, 2, 2, 1]]
    out.check()
    # A second merge moves a whole group: token 2 (cells 3, 4) into token 0; token 1 is dropped.
    again = out.merge(
        torch.zeros(1, 0, dtype=torch.long), torch.tensor([[0]]), torch.tensor([[2]]), torch.tensor([[0]])
    )
    assert again.aux[SOURCE_MAP].tolist() == [[0, -1, -1, 0, 0, -1]]
    assert again.size.tolist() == [[3]]
    # and a gather after it
    assert out.gather(torch.tensor([[2]])).aux[SOURCE_MAP].tolist() == [[-1, -1, -1, 0, 0, -1]]


def test_owners_and_covered_without_a_source_map_come_from_pos() -> None:
    state = _six().gather(torch.tensor([[5, 1, 3]]))
    assert owners(state).tolist() == [[-1, 1, -1, 2, -1, 0]]
    pos = state.pos.clone()
    pos[0, 1] = -1  # a learned token stands for no cell
    mask = torch.tensor([[True, True, False]])  # padding stands for none either
    assert owners(state.replace(pos=pos, mask=mask)).tolist() == [[-1, -1, -1, -1, -1, 0]]
    assert covered(state).tolist() == [[False, True, False, True, False, True]]
    # With a source map, padding tokens own nothing either.
    traced = track_sources(_six()).gather(torch.tensor([[5, 1, 3]])).replace(mask=mask)
    assert owners(traced).tolist() == [[-1, 1, -1, -1, -1, 0]]


def test_covered_refuses_merged_tokens_without_a_source_map() -> None:
    merged = _six().merge(torch.tensor([[0]]), torch.tensor([[1]]), torch.tensor([[2]]), torch.tensor([[0]]))
    with pytest.raises(InputError, match="trace=True"):
        covered(merged)


def test_tracking_is_off_by_default() -> None:
    state = _six()
    assert SOURCE_MAP not in state.gather(torch.tensor([[0, 1]])).aux
    assert (
        SOURCE_MAP
        not in state.merge(
            torch.tensor([[0]]), torch.tensor([[1]]), torch.tensor([[2]]), torch.tensor([[0]])
        ).aux
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.float(), "long"),
        (lambda m: m[:, :5], "long"),
        (lambda m: m.masked_fill(m == 2, 7), "not there"),
        (lambda m: m.masked_fill(m == 2, 0), "its own cell"),
    ],
)
def test_check_catches_a_broken_source_map(change, message) -> None:  # type: ignore[no-untyped-def]
    state = track_sources(_six())
    state.check()
    with pytest.raises(AssertionError, match=message):
        state.with_aux(**{SOURCE_MAP: change(state.aux[SOURCE_MAP])}).check()
