"""ToMe: which pairs merge and with what sizes (hand-checked, with and without a class token), a
slow re-statement of the released algorithm as the oracle (one step, and run inside the blocks of
whole models), schedules, size tracking through a model, and proportional attention."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import tokensieve as ts
from conftest import tiny_video
from tokensieve.backbones.layers import Attention, attention_mask, with_cls
from tokensieve.errors import InputError
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


def test_bfloat16_partner_is_the_first_best_in_a_tie() -> None:
    """The partner search runs on the similarities converted (exactly) to float32: the three B tokens
    have one key, so every edge ties three ways and the first B token wins, as with the released argmax,
    in float32 and in bfloat16. A token 2 (key (-1, 0.2), cosine 0.196) has the best edge."""
    keys = torch.tensor([[1.0, 0.1], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.2], [0.0, 1.0]])
    for dtype in (torch.float32, torch.bfloat16):
        unm, src, dst = bipartite_matching(keys[None].to(dtype), 1)
        assert src.tolist() == [[2]] and unm.tolist() == [[0, 1]], dtype  # A by best edge: 0.196, 0.0995, 0
        assert dst.tolist() == [[0]], dtype


def _at(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# Eight patch tokens after a class token. The attention's sequence is [cls, p0, ..., p7], so
# A = sequence positions 0, 2, 4, 6, 8 = cls, p1, p3, p5, p7 and B = p0, p2, p4, p6. Keys are unit
# vectors at these angles (degrees): B at 0, 90, 180, 270; A at 40, 95, 200, 300.
GOLDEN_CLS_KEYS = torch.tensor([_at(d) for d in (0, 40, 90, 95, 180, 200, 270, 300)])


def test_golden_class_token_split_sort_and_sizes() -> None:
    """Best B partner = nearest angle: p1 -> p0 (40 deg, cos .766), p3 -> p2 (5 deg, .996),
    p5 -> p4 (20 deg, .940), p7 -> p6 (30 deg, .866); the class token has no edge. With r = 2 the
    two most similar edges merge: p3 into p2, p5 into p4. Unmerged A: p7 (.866), p1 (.766) by
    similarity, re-sorted by index to p1, p7. Output: p1, p7, then B: p0, p2, p4, p6."""
    unm, src, dst = bipartite_matching(GOLDEN_CLS_KEYS[None], 2, has_cls=True)
    # Indices into A's patch tokens (p1, p3, p5, p7) and into B (p0, p2, p4, p6).
    assert src.tolist() == [[1, 2]] and dst.tolist() == [[1, 2]] and unm.tolist() == [[0, 3]]

    x = torch.arange(8.0).repeat_interleave(2).view(1, 8, 2) + 1  # patch token i = (i + 1, i + 1)
    cls = torch.full((1, 1, 2), -5.0)
    state = TokenState.from_grid(x, (1, 2, 4), cls_token=cls).with_aux(**{KEYS: GOLDEN_CLS_KEYS[None]})
    sized = state.replace(size=torch.tensor([[1.0, 2, 1, 3, 2, 1, 1, 1]]))
    out = merge_tokens(sized, 2, drop=False, prop_attn=True)
    assert out.pos.tolist() == [[1, 7, 0, 2, 4, 6]]
    assert out.size.tolist() == [[2, 1, 1, 4, 3, 1]]
    # p2 <- p3: (1 * 3 + 3 * 4) / 4 = 3.75; p4 <- p5: (2 * 5 + 1 * 6) / 3 = 16 / 3.
    torch.testing.assert_close(out.x[0, :, 0], torch.tensor([2.0, 8.0, 1.0, 3.75, 16 / 3, 7.0]))
    assert out.cls is cls and out.frames is None and KEYS not in out.aux

    dropped = merge_tokens(state, 2, drop=True, prop_attn=True)
    assert dropped.pos.tolist() == [[1, 7, 0, 2, 4, 6]] and dropped.size is None
    torch.testing.assert_close(dropped.x[0, :, 0], torch.tensor([2.0, 8.0, 1.0, 3.0, 5.0, 7.0]))


def released_merge(
    seq_x: Tensor, seq_keys: Tensor, seq_size: Tensor, r: int, *, has_cls: bool
) -> list[tuple[Tensor, float, int]]:
    """ToMe's released merge restated slowly, one sample, over the attention's whole sequence.

    Args:
        seq_x: (n, C) the sequence, class token at 0 when `has_cls`.
        seq_keys: (n, c) head-mean keys (the class token's row is not read).
        seq_size: (n,) sizes (the class token's is 1).

    Returns:
        The output tokens in order, each (value (C,), size, index in the input sequence of the
        token whose place it takes).
    """
    n = len(seq_x)
    a_side, b_side = list(range(0, n, 2)), list(range(1, n, 2))  # A: even positions, B: odd
    edges = []  # (similarity, a, its most similar b)
    for a in a_side:
        if has_cls and a == 0:
            continue  # the class token is protected: it has no edge
        sims = [float(torch.cosine_similarity(seq_keys[a], seq_keys[b], dim=0)) for b in b_side]
        edges.append((max(sims), a, b_side[sims.index(max(sims))]))  # first best b on a tie
    edges.sort(key=lambda e: -e[0])
    merged, unmerged = edges[:r], [a for _, a, _ in edges[r:]]
    if has_cls:
        unmerged = [0, *sorted(unmerged)]  # the released code re-sorts them: class token first
    out = [(seq_x[a], float(seq_size[a]), a) for a in unmerged]
    for b in b_side:
        group = [b] + [a for _, a, partner in merged if partner == b]
        total = sum(float(seq_size[i]) for i in group)
        out.append((sum(float(seq_size[i]) * seq_x[i] for i in group) / total, total, b))
    return out


def reference_merge(state: TokenState, r: int) -> TokenState:
    """`merge_tokens(state, r, drop=False, prop_attn=True)` by `released_merge`, sample by sample."""
    has_cls = state.cls is not None
    B, N, _ = state.x.shape
    size = torch.ones(B, N, dtype=torch.float64) if state.size is None else state.size.double()
    xs, clss, sizes, poss = [], [], [], []
    for i in range(B):
        seq_x = with_cls(state)[i].double()  # (1 + N, C) or (N, C)
        keys, pos = state.aux[KEYS][i].double(), state.pos[i]
        seq_size = size[i]
        if has_cls:  # the class token: size 1, not a grid cell, its key never read
            keys = torch.cat([torch.full_like(keys[:1], math.nan), keys])
            seq_size, pos = (
                torch.cat([seq_size.new_ones(1), seq_size]),
                torch.cat([pos.new_full((1,), -1), pos]),
            )
        out = released_merge(seq_x, keys, seq_size, r, has_cls=has_cls)
        if has_cls:
            assert out[0][2] == 0 and out[0][1] == 1  # the class token stays first, alone
            clss.append(out[0][0][None])
            out = out[1:]
        xs.append(torch.stack([v for v, _, _ in out]))
        sizes.append(torch.tensor([s for _, s, _ in out], dtype=torch.float64))
        poss.append(torch.stack([pos[j] for _, _, j in out]))
    return state.replace(
        x=torch.stack(xs).to(state.x.dtype),
        cls=torch.stack(clss).to(state.x.dtype) if has_cls else None,
        size=torch.stack(sizes).to(state.x.dtype),
        pos=torch.stack(poss),
        frames=None,
        aux={PROP_ATTN: True},
    )


@pytest.mark.parametrize("has_cls", [False, True], ids=["no-cls", "cls"])
@pytest.mark.parametrize(("N", "r"), [(20, 1), (20, 7), (20, 10), (21, 6), (21, 10)])
def test_merge_equals_the_released_algorithm_restated(has_cls: bool, N: int, r: int) -> None:
    B, C = 3, 5
    x, keys = torch.randn(B, N, C, dtype=torch.float64), torch.randn(B, N, 4, dtype=torch.float64)
    size = torch.rand(B, N, dtype=torch.float64) + 0.5
    cls = torch.randn(B, 1, C, dtype=torch.float64) if has_cls else None
    state = TokenState.from_grid(x, (1, 1, N), cls_token=cls).replace(size=size).with_aux(**{KEYS: keys})
    out, ref = merge_tokens(state, r, drop=False, prop_attn=True), reference_merge(state, r)
    assert out.pos.tolist() == ref.pos.tolist()  # the same merges, in the same order
    torch.testing.assert_close(out.x, ref.x)
    torch.testing.assert_close(out.size, ref.size)
    assert out.cls is cls
    out.check()


class ReferenceMerge(nn.Module):
    """A block's inner slot running `reference_merge` instead of the reducer."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r

    def forward(self, state: TokenState) -> TokenState:
        return reference_merge(state, self.r)


@pytest.mark.parametrize(
    ("name", "r", "atol"),
    [
        ("joint-tiny", "4", 1e-5),
        ("joint-tiny", "16", 1e-5),
        ("joint-tiny", "20/10/2", 1e-5),
        ("videomae-tiny", "6", 1e-6),
        ("videomae-tiny", "8/4/2", 1e-6),
    ],
)
def test_a_stack_of_blocks_equals_the_released_algorithm_restated(name: str, r: str, atol: float) -> None:
    """The same weights with the restated merge inside every block: same tokens in the same order,
    same sizes, features and logits within `atol` (1e-5 with a class token, 1e-6 without)."""
    model = ts.apply(ts.build(name).eval(), f"tome:r={r}").model
    reference = copy.deepcopy(model)
    for block, r_l in zip(reference.blocks, merge_schedule(r, "constant", model.config.depth), strict=True):
        if r_l > 0:
            block.inner = ReferenceMerge(r_l)
    video = tiny_video(name)
    with torch.no_grad():
        out, ref = model.forward_features(video), reference.forward_features(video)
        logits, ref_logits = model.forward_head(out), reference.forward_head(ref)
    assert out.pos.tolist() == ref.pos.tolist()
    torch.testing.assert_close(out.size, ref.size, rtol=0, atol=0)
    torch.testing.assert_close(out.x, ref.x, rtol=0, atol=atol)
    if out.cls is not None:
        torch.testing.assert_close(out.cls, ref.cls, rtol=0, atol=atol)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=atol)


def test_r_outside_the_mergeable_range() -> None:
    state = _golden_state(None)
    assert merge_tokens(state, 0, drop=False, prop_attn=True) is state  # nothing to merge: unchanged
    with pytest.raises(InputError, match="half of the 6 tokens"):
        merge_tokens(state, 4, drop=False, prop_attn=True)
    with pytest.raises(InputError, match="r=40 in block 0 is more than half of the 64 tokens"):
        ts.apply(ts.build("joint-tiny"), "tome:r=40")  # not clamped as in the released code: an error


def test_schedules() -> None:
    assert merge_schedule(16, "constant", 4) == (16, 16, 16, 16)
    assert merge_schedule(8, "decreasing", 5) == (16, 12, 8, 4, 0)  # 2r -> 0, same total as constant
    assert merge_schedule("4/2", "constant", 4) == (4, 2, 0, 0)
    assert ts.plan("tome:r=4/0/2")[0].positions(3) == (0, 2)  # blocks with nothing to merge are skipped


def test_sizes_are_tracked_across_blocks_and_weight_the_readout() -> None:
    model = ts.apply(ts.build("videomae-tiny").eval(), "tome:r=6").model
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


def test_proportional_attention_gives_the_class_token_size_one() -> None:
    """[cls, a, a, b] equals [cls, a (size 2), b]: the class token's bias is log 1 = 0."""
    attn = Attention(dim=8, heads=2).eval()
    c, a, b = torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    copies, _ = attn(torch.cat([c, a, a, b], 1))
    state = TokenState.from_grid(torch.cat([a, b], 1), (1, 1, 2), cls_token=c)
    state = state.replace(size=torch.tensor([[2.0, 1.0]])).with_aux(**{PROP_ATTN: True})
    bias = attention_mask(state)
    torch.testing.assert_close(bias, torch.tensor([[[[1.0, 2.0, 1.0]]]]).log())
    merged, _ = attn(with_cls(state), mask=bias)
    torch.testing.assert_close(merged, copies[:, [0, 1, 3]])


def test_proportional_attention_switch_changes_the_output() -> None:
    video = tiny_video()
    with torch.no_grad():
        on = ts.apply(ts.build("videomae-tiny").eval(), "tome:r=6").model(video)
        off = ts.apply(ts.build("videomae-tiny").eval(), "tome:r=6,prop_attn=false").model(video)
    assert not torch.allclose(on, off)


@pytest.mark.parametrize("mode", ["merge", "drop"])
def test_class_token_is_never_merged(mode: str) -> None:
    model = ts.apply(ts.build("joint-tiny").eval(), f"tome:r=10,mode={mode}").model
    with torch.no_grad():
        state = model.forward_features(tiny_video("joint-tiny"))
    assert state.cls is not None and state.x.shape[1] == 64 - 30
    state.check()
