"""ToMe: which pairs merge and with what sizes (hand-checked), a loop oracle, schedules, size
tracking through a model, and proportional attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from conftest import tiny_video
from tokensieve.backbones.layers import Attention, attention_mask
from tokensieve.reducers.tome import bipartite_matching, merge_schedule, merge_tokens
from tokensieve.tokens import KEYS, PROP_ATTN, TokenState

# Six tokens: A = 0, 2, 4 and B = 1, 3, 5 (keys need not be unit: the metric is the cosine).
GOLDEN_KEYS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [1.0, 0.05], [0.1, 1.0], [-1.0, 0.0]])


def _golden_state(size: list[float] | None) -> TokenState:
    x = torch.arange(6.0).repeat_interleave(2).view(1, 6, 2) + 1  # token i = (i + 1, i + 1)
    state = TokenState.from_grid(x, (1, 2, 3)).with_aux(**{KEYS: GOLDEN_KEYS[None]})
    return state if size is None else state.replace(size=torch.tensor([size]))


def test_golden_pairs_and_sizes() -> None:
    """Best B partner (cosine): t0 -> t3 (0.9988), t2 -> t3 (0.829), t4 -> t1 (0.995). With r = 2
    the two most similar edges merge: t0 into t3 and t4 into t1; t2 stays."""
    unm, src, dst = bipartite_matching(GOLDEN_KEYS[None], 2)
    assert src.tolist() == [[0, 2]] and dst.tolist() == [[1, 0]] and unm.tolist() == [[1]]  # A/B indices

    out = merge_tokens(_golden_state([2, 1, 3, 1, 1, 2]), 2, drop=False, prop_attn=True)
    assert out.pos.tolist() == [[2, 1, 3, 5]]  # unmerged A (t2), then B (t1, t3, t5)
    assert out.size.tolist() == [[3, 2, 3, 2]]
    x = torch.arange(1.0, 7.0)  # token values
    expected = [x[2], (1 * x[1] + 1 * x[4]) / 2, (1 * x[3] + 2 * x[0]) / 3, x[5]]  # size-weighted
    torch.testing.assert_close(out.x[0, :, 0], torch.stack(expected))
    assert out.aux[PROP_ATTN] is True and KEYS not in out.aux and out.frames is None

    dropped = merge_tokens(_golden_state(None), 2, drop=True, prop_attn=True)
    assert dropped.pos.tolist() == [[2, 1, 3, 5]] and dropped.size is None
    torch.testing.assert_close(dropped.x[0, :, 0], x[[2, 1, 3, 5]])
    assert PROP_ATTN not in dropped.aux


def test_merge_equals_a_loop_over_pairs() -> None:
    B, N, C, r = 3, 20, 5, 7
    x, keys = torch.randn(B, N, C, dtype=torch.float64), torch.randn(B, N, 4, dtype=torch.float64)
    size = torch.rand(B, N, dtype=torch.float64) + 0.5
    state = TokenState.from_grid(x, (5, 2, 2)).replace(size=size).with_aux(**{KEYS: keys})
    out = merge_tokens(state, r, drop=False, prop_attn=False)
    for b in range(B):
        unit = F.normalize(keys[b], dim=-1)
        sim = unit[::2] @ unit[1::2].T  # (10, 10)
        best, partner = sim.max(1)
        order = best.argsort(descending=True)
        sums = x[b, 1::2] * size[b, 1::2, None]
        sizes = size[b, 1::2].clone()
        for a in order[:r].tolist():  # one pair at a time
            sums[partner[a]] += x[b, 2 * a] * size[b, 2 * a]
            sizes[partner[a]] += size[b, 2 * a]
        unmerged = order[r:]
        torch.testing.assert_close(out.x[b], torch.cat([x[b, 2 * unmerged], sums / sizes[:, None]]))
        torch.testing.assert_close(out.size[b], torch.cat([size[b, 2 * unmerged], sizes]))
        assert out.pos[b].tolist() == (2 * unmerged).tolist() + list(range(1, N, 2))


def test_schedules() -> None:
    assert merge_schedule(16, "constant", 4) == (16, 16, 16, 16)
    assert merge_schedule(8, "decreasing", 5) == (16, 12, 8, 4, 0)  # 2r -> 0, same total as constant
    assert merge_schedule("4/2", "constant", 4) == (4, 2, 0, 0)
    assert ts.plan("tome:r=4/0/2")[0].positions(3) == (0, 2)  # blocks with nothing to merge are skipped


def test_sizes_are_tracked_across_blocks_and_weight_the_readout() -> None:
    model = ts.apply(ts.build("videomae-tiny").eval(), "tome:r=6")
    video = tiny_video()
    with torch.no_grad():
        state = model.forward_features(video)
        logits = model(video)
    assert state.x.shape[1] == 32 - 3 * 6
    torch.testing.assert_close(state.size.sum(1), torch.full((2,), 32.0))  # every patch accounted for once
    assert state.size.max() > 2  # tokens merged in several blocks
    pooled = (state.x * state.size[..., None]).sum(1) / 32  # ToMe's MAE readout
    torch.testing.assert_close(logits, model.head(model.fc_norm(pooled)))


def test_proportional_attention_counts_a_merged_token_as_its_copies() -> None:
    """Attention over [a, a, b] equals attention over [a (size 2), b] with log-size bias."""
    torch.manual_seed(0)
    attn = Attention(dim=8, heads=2).eval()
    a, b = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    copies, _ = attn(torch.cat([a, a, b], 1))
    state = TokenState.from_grid(torch.cat([a, b], 1), (1, 1, 2)).replace(size=torch.tensor([[2.0, 1.0]]))
    assert attention_mask(state) is None  # sizes alone do not switch it on
    bias = attention_mask(state.with_aux(**{PROP_ATTN: True}))
    torch.testing.assert_close(bias, torch.tensor([[[[2.0, 1.0]]]]).log())
    merged, _ = attn(state.x, mask=bias)
    torch.testing.assert_close(merged, copies[:, 1:])


def test_proportional_attention_switch_changes_the_output() -> None:
    video = tiny_video()
    with torch.no_grad():
        on = ts.apply(ts.build("videomae-tiny").eval(), "tome:r=6")(video)
        off = ts.apply(ts.build("videomae-tiny").eval(), "tome:r=6,prop_attn=false")(video)
    assert not torch.allclose(on, off)


@pytest.mark.parametrize("mode", ["merge", "drop"])
def test_class_token_is_never_merged(mode: str) -> None:
    model = ts.apply(ts.build("joint-tiny").eval(), f"tome:r=10,mode={mode}")
    with torch.no_grad():
        state = model.forward_features(tiny_video("joint-tiny"))
    assert state.cls is not None and state.x.shape[1] == 64 - 30
    state.check()
