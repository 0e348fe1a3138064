from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensieve.tokens import CLS_ATTN, KEYS, TokenState


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
