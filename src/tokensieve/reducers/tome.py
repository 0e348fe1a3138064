"""`tome`: Token Merging by bipartite soft matching (Bolya et al., "Token Merging: Your ViT But
Faster", ICLR 2023, arXiv:2210.09461), applied to all space-time tokens of a clip.

Written from the paper (Sec. 3); where the paper leaves a choice open, as the released code makes it
(checked side by side on the same tensors). In every block with r_l > 0, between attention and MLP:
1. metric: the block's keys averaged over heads, L2-normalised (`KEYS`);
2. split the token sequence alternately into A (even positions) and B (odd positions). The
   sequence is the one the attention sees: with a class token it is position 0, so A = the class
   token and patches 1, 3, 5, ... and B = patches 0, 2, 4, ... (patches counted from 0); without
   one, A = patches 0, 2, 4, ... and B = patches 1, 3, 5, ...;
3. for each a in A its most similar b in B (cosine) — the edge (a, b*); the class token has no
   edge (it is never merged and, sitting in A, never receives a merge);
4. keep the r_l most similar edges; each such a is merged into its b*;
5. merge size-weighted: x_b <- (s_b x_b + sum_a s_a x_a) / (s_b + sum_a s_a), s_b <- s_b + sum_a s_a,
   with sizes s carried across layers in `TokenState.size` (1 per patch at the start);
6. proportional attention (`prop_attn`): later attention adds log s of each key to its logits
   (`PROP_ATTN`, an additive SDPA mask; the class token has size 1, bias 0), so a merged token
   counts as the patches it stands for.

Output order (`pos` follows the tokens): the unmerged A tokens, then all B tokens in their order (a
merged token keeps its B token's place and `pos`). The unmerged A tokens come in ascending order
of their current index when the model has a class token, and in descending order of their best
edge's similarity without one — the orders the released code leaves, so the next block splits the
same sequence. Ties and near-ties between similarities fall as in the released code too: with a
class token we score and sort the same (1 + N)-token layout it does. `mode=drop` removes the r_l
matched A tokens instead of merging them (the pruning ablation of the paper, Table 1).

Schedules: `r=16` merges 16 tokens in every block; `schedule=decreasing` goes linearly from 2r in
the first block to 0 in the last (the paper's decreasing schedule, same total); `r=32/32/16/8`
lists r per block explicitly (missing blocks merge nothing).

The class token lives outside the patch tokens in `TokenState` (`state.cls`) and is never merged
or moved; the split above still counts it, so the merges are the released code's.

NOTE(paper): an r larger than half of a block's patch tokens (N // 2, with or without a class
token) is an error at `apply` time (and in `merge_tokens`), where the released code silently
lowers r. The readout averages tokens weighted by size (as the released MAE adapter does).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..tokens import KEYS, PROP_ATTN, Layout, TokenState, take
from .base import Reducer, Site, register, require

__all__ = ["TokenMerging", "bipartite_matching", "merge_schedule", "merge_tokens", "parse_r"]


def parse_r(r: int | str) -> int | tuple[int, ...]:
    """A constant r, or the per-block list of an 'a/b/c' spec value."""
    try:
        values = tuple(int(v) for v in str(r).split("/"))
    except ValueError:
        raise InputError(f"tome: r must be an integer or a per-block list like 16/16/8, got {r!r}") from None
    if any(v < 0 for v in values):
        raise InputError(f"tome: r must be >= 0 in every block, got {r!r}")
    return values if "/" in str(r) else values[0]


def merge_schedule(r: int | str, schedule: str, depth: int) -> tuple[int, ...]:
    """r for every block: constant, decreasing (2r -> 0 linearly), or an explicit 'a/b/c' list."""
    parsed = parse_r(r)
    if isinstance(parsed, tuple):
        if len(parsed) > depth:
            raise InputError(f"tome: r lists {len(parsed)} blocks but the model has {depth}")
        return parsed + (0,) * (depth - len(parsed))
    if schedule == "constant":
        return (parsed,) * depth
    if depth == 1:
        return (2 * parsed,)
    return tuple(int(2 * parsed - 2 * parsed * i / (depth - 1)) for i in range(depth))


def bipartite_matching(metric: Tensor, r: int, *, has_cls: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Which A tokens merge into which B tokens.

    Args:
        metric: (B, N, c) features of the patch tokens to compare (head-mean keys).
        r: number of A tokens to merge, at most N // 2.
        has_cls: whether a class token precedes the patches in the attention's sequence. It is not
            in `metric`: it takes A's first place, never merges and receives no merge.

    Returns:
        `unm_idx` (B, nA - r) indices into A of the tokens left alone, `src_idx` (B, r) indices into
        A of the merged tokens, most similar first, and `dst_idx` (B, r) the index into B each is
        merged into; nA counts the patch tokens of A. A holds patch tokens 1, 3, 5, ... with a class
        token and 0, 2, 4, ... without; B the others. `unm_idx` is ascending with a class token,
        most similar edge first without one.
    """
    with torch.no_grad():
        if has_cls:
            # A placeholder row where the class token stands in the attention's sequence (masked
            # below), so scores and sort run on the same (1 + N)-token layout as the released code.
            # Why not just the patch rows: matmul rounding can depend on where a row sits, and the
            # order torch's default (unstable) sort gives equal values depends on the whole vector;
            # with the same layout even ties and near-ties fall the same way.
            metric = F.pad(metric, (0, 0, 1, 0), value=1.0)  # (B, 1 + N, c)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]  # (B, [1 +] nA, c), (B, nB, c): A opens with the class token
        scores = a @ b.transpose(1, 2)  # (B, [1 +] nA, nB) cosine similarities
        if has_cls:
            scores[:, 0] = float("-inf")  # the class token has no edge: it sorts last, never merges
        order = scores.amax(-1).argsort(-1, descending=True)  # (B, [1 +] nA): most similar edges first
        src_idx, unm_idx = order[:, :r], order[:, r:]  # (B, r), (B, [1 +] nA - r)
        # The partner only for the r merged tokens (`max` with indices over all rows is much slower),
        # searched in float32: the same values (exact), the same first maximum, and torch's CPU argmax
        # runs bfloat16 at half the speed of the conversion and float32 argmax together.
        dst_idx = take(scores, src_idx).float().argmax(-1)  # (B, r)
        if has_cls:
            # Unmerged A tokens in sequence order; the class token (0) comes first and is dropped,
            # and indices move from the sequence's A to the patch tokens of A.
            unm_idx = unm_idx.sort(-1).values[:, 1:] - 1  # (B, nA - r)
            src_idx = src_idx - 1  # (B, r)
    return unm_idx, src_idx, dst_idx


def merge_tokens(state: TokenState, r: int, *, drop: bool, prop_attn: bool) -> TokenState:
    """Apply one bipartite merge (or drop) of `r` tokens to every per-token field of `state`.

    The output holds the unmerged A tokens, then all B tokens (see `bipartite_matching` for which
    patch tokens are A and B and the order of the unmerged ones); the class token stays in
    `state.cls`, untouched. Merging goes through `TokenState.merge` (size-weighted, the source map
    follows when tracked), dropping through `TokenState.gather`. `r=0` returns `state` as it is.

    Raises:
        InputError: if `r` is negative or more than half of the patch tokens.
    """
    B, N, _ = state.x.shape
    if not 0 <= r <= N // 2:
        raise InputError(f"tome: r={r} must be between 0 and half of the {N} tokens ({N // 2})")
    if r == 0:
        return state
    metric = require(state, KEYS, "tome")
    has_cls = state.cls is not None
    unm_idx, src_idx, dst_idx = bipartite_matching(metric, r, has_cls=has_cls)
    first = int(has_cls)  # A token i is patch token 2i + first, B token j is patch token 2j + 1 - first
    b_idx = torch.arange(1 - first, N, 2, device=unm_idx.device).expand(B, -1)  # (B, nB)
    if drop:  # the attention's records describe the tokens before this step: the next block records afresh
        return state.without_records().gather(torch.cat([unm_idx * 2 + first, b_idx], 1))  # (B, N - r)
    merged = state.merge(unm_idx * 2 + first, b_idx, src_idx * 2 + first, dst_idx)  # (B, N - r)
    return merged.with_aux(**{PROP_ATTN: True}) if prop_attn else merged


@register("tome")
class TokenMerging(Reducer):
    """Merges r_l tokens in block l by bipartite soft matching on its keys."""

    main_settings = ("tome:r=100",)
    budget = "r"
    budget_removes = True

    needs = frozenset({KEYS})
    inside = True
    keeps_records = False  # the records describe the tokens before the merge

    def __init__(
        self,
        *,
        r: int | str = 16,
        schedule: Literal["constant", "decreasing"] = "constant",
        mode: Literal["merge", "drop"] = "merge",
        prop_attn: bool = True,
    ) -> None:
        super().__init__()
        if schedule not in ("constant", "decreasing"):
            raise InputError(f"tome: schedule must be 'constant' or 'decreasing', got {schedule!r}")
        if mode not in ("merge", "drop"):
            raise InputError(f"tome: mode must be 'merge' or 'drop', got {mode!r}")
        parse_r(r)  # fails now on a malformed r, not at apply time
        self.r, self.schedule, self.mode, self.prop_attn = r, schedule, mode, prop_attn

    def positions(self, depth: int) -> tuple[int, ...]:
        return tuple(p for p, r in enumerate(merge_schedule(self.r, self.schedule, depth)) if r > 0)

    def count(self, layout: Layout, site: Site) -> Layout:
        r = merge_schedule(self.r, self.schedule, site.depth)[site.position]
        num = layout.tokens
        if r > num // 2:
            raise InputError(
                f"tome: r={r} in block {site.position} is more than half of the {num} tokens there "
                f"(at most {num // 2} can merge); lower r or use schedule=decreasing"
            )
        return Layout(num - r) if r else layout

    def forward(self, state: TokenState, site: Site) -> TokenState:
        r = merge_schedule(self.r, self.schedule, site.depth)[site.position]
        return merge_tokens(state, r, drop=self.mode == "drop", prop_attn=self.prop_attn)

    def extra_repr(self) -> str:
        return f"r={self.r}, schedule={self.schedule}, mode={self.mode}, prop_attn={self.prop_attn}"
