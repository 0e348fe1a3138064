"""`sta`: Semantic-aware Temporal Accumulation (Ding et al., "Prune Spatio-temporal Tokens by
Semantic-aware Temporal Accumulation", ICCV 2023). Training-free; drops r tokens per frame (group)
at three stages.

At a stage, with the tokens split into G temporal groups of m tokens (frames, or groups of frames):
- first group (the first in processing order): an image method drops r tokens (`first`):
  `tome` drops the r even-position tokens most similar (cosine of keys) to some odd-position token,
  bipartite matching without merging; `random` drops r random tokens; `grid` cuts the group's tokens,
  in raster order, into r strata of near-equal size and drops one random token of each.
- every following group t, given the kept tokens X'_{t-1} of the group before (Eq. 3):
      P_t = softmax over the tokens i of group t of  k_i . k'_j     (k: unit head-mean keys, no scale)
      A_t = P_t A'_{t-1}                                            (accumulated redundancy, (m,))
      F_t = minmax(sum_c |x_tc|)                                    (semantic score, Eq. 4)
      score_t = A_t * (1 - F_t)                                     (Eq. 5)
  keep the m - r tokens with the lowest score; A'_t = A_t[kept] / sum(A_t[kept]).
  As in the released code, the first transition compares against *all* m keys of the first group
  with unit mass on each (A'_0 = 1), not only the kept ones.

Stages run before blocks 1, 1 + L//3 and 1 + 2L//3 (after blocks 0, L//3, 2L//3 counted from 0, as
the released code does), in the order given by `order` (F: first frame first, B: last frame first;
F-B-F by default, Table 6b). `balance`:
- `group` (default; what produced the published numbers): r per group of 1, 2 and 4 consecutive
  temporal slices at stages 1, 2 and 3, the chain running between groups; per-frame counts become
  unequal from stage 2 on.
- `frame` (the paper's text): r, r/2 and r/4 per frame at the three stages; every frame keeps the
  same count, so it also runs on divided space-time attention (TimeSformer).
Both leave the same totals, e.g. 1568 -> 1056 -> 800 -> 672 tokens for r=64 on 16x224 VideoMAE.

NOTE(paper): kept tokens are stored in their original order within each group (the released code
stores them in score order); attention, the mean readout and later STA stages do not depend on it,
and it keeps per-frame slots aligned for divided attention. The semantic min-max guards against a
zero range (the released code divides by it unguarded).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones.base import VideoBackbone
from ..errors import InputError
from ..tokens import KEYS, TokenState
from .base import Reducer, Site, register, require

__all__ = ["SemanticTemporalAccumulation", "accumulate", "drop_first", "semantic_score"]


def semantic_score(x: Tensor) -> Tensor:
    """Eq. 4, min-max normalised over the tokens of each group: (B, G, m, C) -> (B, G, m) in [0, 1]."""
    act = x.abs().sum(-1)  # (B, G, m)
    low, high = act.amin(-1, keepdim=True), act.amax(-1, keepdim=True)
    return (act - low) / (high - low).clamp_min(torch.finfo(act.dtype).tiny)


def drop_first(
    keys: Tensor, pos: Tensor, r: int, how: str, generator: torch.Generator | None = None
) -> Tensor:
    """Kept token indices of the first group, (B, m - r) ascending.

    Args:
        keys: (B, m, hd) unit keys of the group.
        pos: (B, m) grid positions of its tokens (raster order for `grid`).
        r: tokens to drop.
        how: "tome", "random" or "grid".
    """
    B, m, _ = keys.shape
    if how == "tome":
        a, b = keys[:, ::2], keys[:, 1::2]  # (B, nA, hd), (B, nB, hd)
        best = (a @ b.transpose(1, 2)).amax(-1)  # (B, nA): each A token's closest B token
        drop = best.topk(r, dim=1).indices * 2  # (B, r): the most redundant A tokens, as group indices
    elif how == "random":
        drop = torch.rand(B, m, generator=generator).to(keys.device).topk(r, dim=1).indices  # (B, r)
    else:  # grid: one random token in each of r raster-order strata
        raster = pos.argsort(1)  # (B, m): group indices in raster order
        start = torch.arange(r, device=keys.device) * m // r  # (r,)
        length = (torch.arange(1, r + 1, device=keys.device) * m // r) - start  # (r,) >= 1 as r <= m
        offset = (torch.rand(B, r, generator=generator).to(keys.device) * length).long()  # (B, r)
        drop = raster.gather(1, start + offset)  # (B, r)
    kept = torch.ones(B, m, dtype=torch.bool, device=keys.device).scatter(1, drop, False)  # (B, m)
    return (~kept).to(torch.int8).argsort(dim=1, stable=True)[:, : m - r]  # (B, m - r) kept, ascending


def accumulate(
    keys: Tensor, semantic: Tensor, first_kept: Tensor, r: int
) -> tuple[list[Tensor], list[Tensor]]:
    """The Markov chain of Eq. 3-5 over groups, in the given (processing) order.

    Args:
        keys: (B, G, m, hd) unit keys, groups in processing order.
        semantic: (B, G, m) normalised semantic scores.
        first_kept: (B, m - r) kept indices of group 0.
        r: tokens dropped per group.

    Returns:
        Kept indices of every group, each (B, m - r), in the same order (unsorted after group 0), and
        the accumulated redundancy A_t (B, m) of groups 1..G-1 (before the semantic weighting).
    """
    B, G, m, _ = keys.shape
    kept, accumulated = [first_kept], []
    prev = keys[:, 0]  # (B, m, hd): all keys of the first group (the released code's first transition)
    mass = keys.new_ones(B, m, 1)  # (B, m, 1)
    for g in range(1, G):  # sequential by definition: each group conditions on the one before
        cur = keys[:, g]  # (B, m, hd)
        transition = (cur @ prev.transpose(1, 2)).softmax(1)  # (B, m, m'): each column sums to 1
        acc = (transition @ mass).squeeze(-1)  # (B, m): redundancy accumulated from the group before
        keep = (acc * (1 - semantic[:, g])).topk(m - r, dim=1, largest=False).indices  # (B, m - r)
        mass = acc.gather(1, keep).unsqueeze(-1)  # (B, m - r, 1)
        mass = mass / mass.sum(1, keepdim=True)
        prev = cur.gather(1, keep.unsqueeze(-1).expand(-1, -1, cur.shape[-1]))  # (B, m - r, hd)
        kept.append(keep)
        accumulated.append(acc)
    return kept, accumulated


@register("sta")
class SemanticTemporalAccumulation(Reducer):
    """Drops r tokens per frame (group) in three stages by semantic-aware temporal accumulation."""

    main_settings = ("sta:r=64", "sta:r=64,balance=frame")

    needs = frozenset({KEYS})

    def __init__(
        self,
        *,
        r: int = 64,
        balance: Literal["group", "frame"] = "group",
        first: Literal["tome", "random", "grid"] = "tome",
        order: str = "FBF",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if r < 0:
            raise InputError(f"sta: r must be >= 0, got {r}")
        if balance not in ("group", "frame"):
            raise InputError(f"sta: balance must be 'group' or 'frame', got {balance!r}")
        if first not in ("tome", "random", "grid"):
            raise InputError(f"sta: first must be 'tome', 'random' or 'grid', got {first!r}")
        directions = order.replace("-", "").upper()
        if len(directions) != 3 or set(directions) - {"F", "B"}:
            raise InputError(
                f"sta: order gives the direction of the three stages with F (forward) and B (backward), "
                f"such as FBF, BFB, FFF or BBB; got {order!r}"
            )
        self.r, self.balance, self.first, self.order, self.seed = r, balance, first, directions, seed
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def keeps_frames(self) -> bool:
        return self.balance == "frame"

    def check(self, model: VideoBackbone) -> None:
        if model.divided and self.balance == "group":
            raise InputError(
                "sta with balance=group drops r per group of 2 and 4 frames, unevenly between its frames; "
                f"{type(model).__name__}'s divided attention needs equal per-frame counts: use balance=frame"
            )

    def positions(self, depth: int) -> tuple[int, ...]:
        places = (1, 1 + depth // 3, 1 + 2 * depth // 3)
        return tuple(dict.fromkeys(p for p in places if p < depth))  # short models run fewer stages

    def _groups(self, frames: int | None, T: int, stage: int) -> tuple[int, int]:
        """(groups, r per group) at `stage`; `frames` is the input's frame layout, T the grid's."""
        if self.balance == "frame":
            if frames is None:
                raise InputError(
                    "sta with balance=frame needs the same number of tokens in every frame; the reduction "
                    "before it leaves unequal counts"
                )
            return frames, self.r >> stage
        if stage == 0 and frames != T:
            raise InputError(
                f"sta with balance=group needs all {T} temporal slices at its first stage, laid out frame "
                f"by frame (got {frames if frames is not None else 'unequal frames'}); use balance=frame "
                "after a frame selection"
            )
        groups = max(1, T >> stage)
        if T % groups:
            raise InputError(f"sta: {T} temporal slices cannot form {groups} equal groups; use balance=frame")
        return groups, self.r

    def count(self, num: int, frames: int | None, site: Site) -> tuple[int, int | None]:
        groups, r = self._groups(frames, site.grid[0], site.stage)
        m = num // groups
        if r >= m:
            raise InputError(
                f"sta: r={r} is not smaller than the {m} tokens of a frame (group) at stage {site.stage + 1}"
            )
        if self.first == "tome" and r > m // 2:
            raise InputError(
                f"sta: first=tome drops at most half of a frame's (group's) {m} tokens; r={r} at stage "
                f"{site.stage + 1} is more"
            )
        keeps_layout = self.balance == "frame" or groups == site.grid[0]
        return groups * (m - r), frames if keeps_layout else None

    def forward(self, state: TokenState, site: Site) -> TokenState:
        groups, r = self._groups(state.frames, state.grid[0], site.stage)
        if r == 0:
            return state
        B, N, C = state.x.shape
        m = N // groups
        backward = self.order[site.stage] == "B"
        with torch.no_grad():
            keys = F.normalize(require(state, KEYS, self.name), dim=-1).view(
                B, groups, m, -1
            )  # (B, G, m, hd)
            semantic = semantic_score(state.x.view(B, groups, m, C))  # (B, G, m)
            if backward:
                keys, semantic = keys.flip(1), semantic.flip(1)
            first_pos = state.pos.view(B, groups, m)[:, -1 if backward else 0]  # (B, m)
            first_kept = drop_first(keys[:, 0], first_pos, r, self.first, self.generator)
            kept, _ = accumulate(keys, semantic, first_kept, r)  # G x (B, m - r), processing order
            if backward:
                kept.reverse()
            idx = torch.stack(kept, 1).sort(2).values  # (B, G, m - r), time order, ascending in group
            idx = (idx + torch.arange(groups, device=idx.device).view(1, groups, 1) * m).view(
                B, -1
            )  # (B, G*(m-r))
        keeps_layout = self.balance == "frame" or groups == state.grid[0]
        return state.gather(idx, frames=state.frames if keeps_layout else None)

    def extra_repr(self) -> str:
        return f"r={self.r}, balance={self.balance}, first={self.first}, order={self.order}"
