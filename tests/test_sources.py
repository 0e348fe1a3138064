"""Source tracking through whole models: for every registered method (the contract settings of
test_reducers) on every tiny backbone it runs on, a traced forward gives the same logits as an untraced
one, and after every reducer call the source map is consistent: each real token stands for its own
patch and for as many patches as its size says (one without merging), and nothing else owns any."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import reducer_outputs, tiny_video
from test_reducers import RUNNABLE
from tokensieve.tokens import SOURCE_MAP, TokenState, covered, owners


def _model(name: str, spec: str) -> ts.VideoBackbone:
    torch.manual_seed(0)
    return ts.apply(ts.build(name).eval(), spec).model


def check_sources(state: TokenState) -> None:
    """The source map of `state` against its tokens (see the module docstring)."""
    state.check()  # includes: the map names tokens that exist, each real grid token holds its own cell
    own = owners(state)  # (B, T*H*W)
    B, N = state.pos.shape
    slot = torch.where(own >= 0, own, N)  # (B, T*H*W), N = the uncovered slot
    patches = torch.zeros(B, N + 1, dtype=torch.long).scatter_add(1, slot, torch.ones_like(slot))[:, :N]
    real = torch.ones(B, N, dtype=torch.bool) if state.mask is None else state.mask
    expected = torch.ones(B, N) if state.size is None else state.size.float()
    grid = real & (state.pos >= 0)  # a learned token (pos -1, TokenLearner) owns the cells it weighs most
    assert torch.equal(patches[grid].float(), expected[grid]), "a token's patches do not match its size"
    if state.frames is not None and not bool(grid.all()):  # learned tokens share out their frame's cells
        T, H, W = state.grid
        learned = own.clamp_min(0).div(N // state.frames, rounding_mode="floor")  # (B, T*H*W) frame slot
        frame = torch.arange(T * H * W).div(H * W, rounding_mode="floor").expand(B, -1)
        assert bool(((learned == frame) | (own < 0)).all()), "a learned token owns a cell of another frame"
    assert not bool(patches[~real].any()), "a padding token stands for patches"
    assert int(covered(state).sum()) == int(patches.sum())  # owners partition the covered patches


@pytest.mark.parametrize(("spec", "name"), RUNNABLE)
def test_traced_forward_equals_untraced_and_tracks_every_patch(spec: str, name: str) -> None:
    model = _model(name, spec)
    video = tiny_video(name)
    with torch.inference_mode():
        plain = model.forward_features(video)
        outputs = reducer_outputs(model)
        traced = model.forward_features(video, trace=True)
        assert torch.equal(model.forward_head(plain), model.forward_head(traced))
    assert SOURCE_MAP not in plain.aux  # off by default
    # (resize runs on the clip, in no reducer slot: the tokens it leaves are the bare model's at its grid)
    assert outputs or spec == "none" or all(r.resizes_input for r in model.plan), "the plan ran no reducer"
    for state in [*outputs, traced]:
        check_sources(state)


def test_tracking_in_training_keeps_logits_and_gradients() -> None:
    """STTS's soft (perturbed) selection in training and ToMe's merges, with autograd on."""
    for name, spec in [("videomae-tiny", "stts:T1=0.5,S2=0.6"), ("joint-tiny", "tome:r=6")]:
        model = _model(name, spec).train()
        video = tiny_video(name)
        plain = model.forward_head(model.forward_features(video))
        state = model.forward_features(video, trace=True)
        traced = model.forward_head(state)
        torch.testing.assert_close(traced, plain, rtol=0, atol=0)
        check_sources(state)
        traced.sum().backward()
        assert all(p.grad is not None for p in model.blocks[0].parameters() if p.requires_grad)


def test_tome_sources_by_hand_on_a_whole_model() -> None:
    """Patches owned by ToMe's tokens add up to the clip, and the covered patches are all of them."""
    model = _model("videomae-tiny", "tome:r=6")
    with torch.inference_mode():
        state = model.forward_features(tiny_video(), trace=True)
    assert state.x.shape[1] == 32 - 3 * 6
    assert bool(covered(state).all())  # merging drops nothing
    assert state.size.sum(1).tolist() == [32.0, 32.0]
