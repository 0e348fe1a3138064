"""`tome`: Token Merging by bipartite soft matching (Bolya et al., "Token Merging: Your ViT But
Faster", ICLR 2023, arXiv:2210.09461), applied to all space-time tokens of a clip.

Written from the paper (Sec. 3). In every block with r_l > 0, between attention and MLP:
1. metric: the block's keys averaged over heads, L2-normalised (`KEYS`);
2. split the tokens alternately into A (even positions) and B (odd positions);
3. for each a in A its most similar b in B (cosine) — the edge (a, b*);
4. keep the r_l most similar edges; each such a is merged into its b*;
5. merge size-weighted: x_b <- (s_b x_b + sum_a s_a x_a) / (s_b + sum_a s_a), s_b <- s_b + sum_a s_a,
   with sizes s carried across layers in `TokenState.size` (1 per patch at the start);
6. proportional attention (`prop_attn`): later attention adds log s of each key to its logits
   (`PROP_ATTN`, an additive SDPA mask), so a merged token counts as the patches it stands for.
The output holds the unmerged A tokens, then all B tokens. `mode=drop` removes the r_l matched A
tokens instead of merging them (the pruning ablation of the paper, Table 1).

Schedules: `r=16` merges 16 tokens in every block; `schedule=decreasing` goes linearly from 2r in
the first block to 0 in the last (the paper's decreasing schedule, same total); `r=32/32/16/8`
lists r per block explicitly (missing blocks merge nothing).

NOTE(paper): the class token is not a member of A or B here (it lives outside the token sequence in
`TokenState` and is never merged), where the released code puts it first in A and masks it out; for
class-token models the even/odd alternation of patch tokens is therefore shifted by one position.
The readout averages tokens weighted by size (as the released MAE adapter does).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor

from ..errors import InputError
from ..tokens import KEYS, PROP_ATTN, TOKEN_AUX, TokenState, take
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


@functools.lru_cache(maxsize=64)
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


def bipartite_matching(metric: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Which A tokens merge into which B tokens.

    Args:
        metric: (B, N, c) token features to compare (head-mean keys).
        r: number of A tokens to merge, at most N // 2.

    Returns:
        `unm_idx` (B, nA - r) indices into A of the tokens left alone, `src_idx` (B, r) indices into
        A of the merged tokens, most similar first, and `dst_idx` (B, r) the index into B each is
        merged into. A holds tokens 0, 2, 4, ..., B tokens 1, 3, 5, ....
    """
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]  # (B, nA, c), (B, nB, c)
        scores = a @ b.transpose(1, 2)  # (B, nA, nB) cosine similarities
        order = scores.amax(-1).argsort(-1, descending=True)  # (B, nA): most similar edges first
        src_idx, unm_idx = order[:, :r], order[:, r:]  # (B, r), (B, nA - r)
        # The partner only for the r merged tokens (`max` with indices over all rows is much slower).
        dst_idx = take(scores, src_idx).argmax(-1)  # (B, r)
    return unm_idx, src_idx, dst_idx


def merge_tokens(state: TokenState, r: int, *, drop: bool, prop_attn: bool) -> TokenState:
    """Apply one bipartite merge (or drop) of `r` tokens to every per-token field of `state`.

    The output holds the unmerged A tokens, then all B tokens (A token i is token 2i, B token j is
    token 2j + 1). Written with few, large tensor ops: the reducer's own time is part of what the
    benchmark holds against its FLOP savings.
    """
    metric = require(state, KEYS, "tome")
    unm_idx, src_idx, dst_idx = bipartite_matching(metric, r)
    B, N, C = state.x.shape
    num_unm = unm_idx.shape[1]
    keep_idx = torch.cat(
        [unm_idx * 2, torch.arange(1, N, 2, device=unm_idx.device).expand(B, -1)], 1
    )  # (B, N-r)
    x = take(state.x, keep_idx)  # (B, N - r, C), a new contiguous tensor
    size = state.size
    if not drop:
        if size is None:
            size = torch.ones(B, N, dtype=x.dtype, device=x.device)
        src_s = size.gather(1, src_idx * 2)  # (B, r)
        b_s = size[:, 1::2]  # (B, nB)
        merged_s = b_s.scatter_add(1, dst_idx, src_s)  # (B, nB)
        # Size-weighted mean into B, in place on the B rows of `x`:
        # x_b <- (s_b x_b + sum of s_a x_a merged into b) / (s_b + sum of s_a).
        rows = num_unm + dst_idx + torch.arange(0, B * (N - r), N - r, device=x.device).unsqueeze(1)  # (B, r)
        b_x = x[:, num_unm:]  # (B, nB, C) view
        b_x.mul_(b_s.unsqueeze(-1))
        x.view(-1, C).index_add_(
            0, rows.view(-1), (take(state.x, src_idx * 2) * src_s.unsqueeze(-1)).view(-1, C)
        )
        b_x.div_(merged_s.unsqueeze(-1))
        size = torch.cat([size.gather(1, unm_idx * 2), merged_s], 1)  # (B, N - r)
    elif size is not None:
        size = size.gather(1, keep_idx)
    aux = {k: v for k, v in state.aux.items() if k not in TOKEN_AUX}  # per-token records are stale now
    if not drop and prop_attn:
        aux[PROP_ATTN] = True
    return state.replace(
        x=x,
        pos=state.pos.gather(1, keep_idx),
        size=size,
        mask=None if state.mask is None else state.mask.gather(1, keep_idx),
        frames=None,
        aux=aux,
    )


@register("tome")
class TokenMerging(Reducer):
    """Merges r_l tokens in block l by bipartite soft matching on its keys."""

    main_settings = ("tome:r=100",)

    needs = frozenset({KEYS})
    inside = True

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

    def count(self, num: int, frames: int | None, site: Site) -> tuple[int, int | None]:
        r = merge_schedule(self.r, self.schedule, site.depth)[site.position]
        if r > num // 2:
            raise InputError(
                f"tome: r={r} in block {site.position} is more than half of the {num} tokens there "
                f"(at most {num // 2} can merge); lower r or use schedule=decreasing"
            )
        return num - r, None

    def forward(self, state: TokenState, site: Site) -> TokenState:
        r = merge_schedule(self.r, self.schedule, site.depth)[site.position]
        return merge_tokens(state, r, drop=self.mode == "drop", prop_attn=self.prop_attn)

    def extra_repr(self) -> str:
        return f"r={self.r}, schedule={self.schedule}, mode={self.mode}, prop_attn={self.prop_attn}"
