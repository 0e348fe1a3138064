"""`sta`: Semantic-aware Temporal Accumulation (Ding et al., "Prune Spatio-temporal Tokens by
Semantic-aware Temporal Accumulation", ICCV 2023). Training-free; drops r tokens per frame (group)
at three stages.

At a stage, with the tokens split into G temporal groups of m tokens (frames, or groups of frames):
- first group (the first in processing order): an image method drops r tokens (`first`):
  `tome` drops the r even-position tokens most similar (cosine of keys) to some odd-position token,
  bipartite matching without merging, even and odd counted in the order the released code stores the
  group (below); `random` drops r random tokens; `grid` cuts the group's tokens, in raster order,
  into r strata of near-equal size and drops one random token of each.
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

Order. The released code stores a stage's kept tokens in the order its selection produced them,
groups in time order: the first group's odd-position tokens (in stored order), then its kept even
ones by ascending similarity; every other group's kept tokens by ascending score (top-k order). The
next stage opens with the even/odd split of its first group in that stored order, so the order
decides what stages 2 and 3 drop. Here the tokens keep their current order (for STA on the full
clip: grid order, `pos` ascending), so divided attention keeps pairing slot j of every frame roughly
by place. Instead every token carries its place in the released code's sequence (`STA_ORDER`, per
token); a stage processes each group in that order and records the new places. Kept sets therefore
equal the released code's at every stage, in both balance modes, and ties go as there (the same sort
and top-k calls over the same sequence).

On Video Swin (paper §4.1; its authors never released this part) STA runs at the end of the first three
stages, after their patch merging, on the merged tokens (before the next stage's first block: positions
`config.stages`), dropping r, 3r/8 and r/8 cells of every temporal slice's full grid (the paper's
{r, 1.5r/4, 2r/16}; 256, 96, 32 for r=256), each stage from the full grid its merging restores. The keys
are the next block's key projection of those tokens (`Swin3D.records_ahead`), the semantic score theirs;
`balance` does not apply (the drops are per slice). The windows fill each dropped cell with its nearest kept
token (`backbones.swin`), and the merging at the stage's end does too.

NOTE(paper): the semantic min-max guards against a zero range (the released code divides by it
unguarded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import rng
from ..errors import InputError
from ..tokens import KEYS, Layout, TokenState, register_token_aux
from .base import Reducer, Site, register, require

if TYPE_CHECKING:
    from ..backbones.base import VideoBackbone

__all__ = ["STA_ORDER", "SemanticTemporalAccumulation", "accumulate", "drop_first", "semantic_score"]

STA_ORDER = register_token_aux("sta_order", merge="keep")
"""STA's running state: (B, N) long, each token's place in the sequence the released STA code would
store after the last STA stage (tokens themselves stay in their current order). The next stage
processes each group in this order, which decides its first group's even/odd split."""


def semantic_score(x: Tensor) -> Tensor:
    """Eq. 4, min-max normalised over the tokens of each group: (B, G, m, C) -> (B, G, m) in [0, 1]."""
    act = x.abs().sum(-1)  # (B, G, m)
    low, high = act.amin(-1, keepdim=True), act.amax(-1, keepdim=True)
    return (act - low) / (high - low).clamp_min(torch.finfo(act.dtype).tiny)


def drop_first(keys: Tensor, pos: Tensor, r: int, how: str, draws: Tensor | None = None) -> Tensor:
    """The first group's tokens in the order the released code sorts them, (B, m): the m - r kept
    ones first, in the order it stores them, then the r dropped ones. For `tome`: the odd positions,
    then all even ones by ascending similarity to their closest odd token (the last r go); more than
    m // 2 (only on Video Swin, where the paper's schedule asks for it) in rounds, each on the tokens the
    one before kept, in that order, dropping as many as it can; for `random` and `grid`: the kept ones
    ascending, then the dropped ones.

    Args:
        keys: (B, m, hd) unit keys of the group, in the order the released code stores it.
        pos: (B, m) grid positions of its tokens (raster order for `grid`).
        r: tokens to drop.
        how: "tome", "random" or "grid".
        draws: (B, m) uniform numbers in [0, 1) for `random` and `grid` (one per token; `grid` uses the
            first r); None for `tome`.
    """
    B, m, hd = keys.shape
    if how == "tome" and r > m // 2:  # (Video Swin's last stages) bipartite rounds, each on what is left
        order, dropped = torch.arange(m, device=keys.device).expand(B, m), []
        while r > 0:  # r < m: at least one token is left, and every round drops one or more
            n = order.shape[1]
            step = min(r, n // 2)
            sub = drop_first(
                keys.gather(1, order.unsqueeze(-1).expand(-1, -1, hd)), pos.gather(1, order), step, how
            )
            order = order.gather(1, sub)  # (B, n): this round's kept ones first, in stored order
            dropped.insert(0, order[:, n - step :])
            order, r = order[:, : n - step], r - step
        return torch.cat([order, *dropped], 1)
    if how == "tome":
        a, b = keys[:, ::2], keys[:, 1::2]  # (B, nA, hd), (B, nB, hd)
        best = (a @ b.transpose(1, 2)).amax(-1)  # (B, nA): each A token's closest B token
        by_similarity = best.argsort(dim=1)  # (B, nA) ascending; the released code's sort, ties included
        odd = torch.arange(1, m, 2, device=keys.device).expand(B, -1)  # (B, nB)
        return torch.cat([odd, by_similarity * 2], 1)  # (B, m): the r most similar A tokens last
    if how == "random":
        drop = draws.topk(r, dim=1).indices  # (B, r): r random tokens
    else:  # grid: one random token in each of r raster-order strata
        raster = pos.argsort(1)  # (B, m): group indices in raster order
        start = torch.arange(r, device=keys.device) * m // r  # (r,)
        length = (torch.arange(1, r + 1, device=keys.device) * m // r) - start  # (r,) >= 1 as r <= m
        offset = (draws[:, :r] * length).long()  # (B, r): a random place in each stratum
        drop = raster.gather(1, start + offset)  # (B, r)
    kept = torch.ones(B, m, dtype=torch.bool, device=keys.device).scatter(1, drop, False)  # (B, m)
    return (~kept).to(torch.int8).argsort(dim=1, stable=True)  # (B, m): kept ascending, then dropped


def accumulate(keys: Tensor, semantic: Tensor, first: Tensor, r: int) -> tuple[list[Tensor], list[Tensor]]:
    """The Markov chain of Eq. 3-5 over groups, in the given (processing) order.

    Args:
        keys: (B, G, m, hd) unit keys, groups in processing order.
        semantic: (B, G, m) normalised semantic scores.
        first: (B, m) group 0 in the order `drop_first` returns, its m - r kept tokens first.
        r: tokens dropped per group.

    Returns:
        Kept indices of every group, each (B, m - r), groups in the same order: group 0's as `first`
        orders them, the others by ascending score (the released code's top-k order); and the
        accumulated redundancy A_t (B, m) of groups 1..G-1 (before the semantic weighting).
    """
    _, G, m, hd = keys.shape
    kept, accumulated = [first[:, : m - r]], []
    # The first transition compares against all m keys of the first group (the released code's),
    # taken in the order the released code holds them and summed as it does (unit mass on each), so
    # that the scores agree with it to the bit on the same input.
    prev = keys[:, 0].gather(1, first.unsqueeze(-1).expand(-1, -1, hd))  # (B, m, hd)
    mass: Tensor | None = None  # (B, m', 1): normalised A'_{t-1}, from the second transition on
    for g in range(1, G):  # sequential by definition: each group conditions on the one before
        cur = keys[:, g]  # (B, m, hd)
        transition = (cur @ prev.transpose(1, 2)).softmax(1)  # (B, m, m'): each column sums to 1
        acc = transition.sum(2) if mass is None else (transition @ mass).squeeze(-1)  # (B, m)
        keep = (acc * (1 - semantic[:, g])).topk(m - r, dim=1, largest=False).indices  # (B, m - r)
        mass = acc.gather(1, keep).unsqueeze(-1)  # (B, m - r, 1)
        mass = mass / mass.sum(1, keepdim=True)
        prev = cur.gather(1, keep.unsqueeze(-1).expand(-1, -1, hd))  # (B, m - r, hd)
        kept.append(keep)
        accumulated.append(acc)
    return kept, accumulated


@register("sta")
class SemanticTemporalAccumulation(Reducer):
    """Drops r tokens per frame (group) in three stages by semantic-aware temporal accumulation."""

    main_settings = ("sta:r=64", "sta:r=64,balance=frame")
    budget = "r"
    budget_removes = True
    leaves_holes = True  # on Video Swin: the cells it drops, which the windows fill

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
        self.swin_stages: tuple[int, ...] | None = None  # `setup`: the stages it ends on Video Swin

    @property
    def keyed_random(self) -> bool:
        """Random first-group drops draw keyed by clip (`tokensieve.rng`); `tome` draws nothing."""
        return self.first != "tome"

    def setup(self, model: VideoBackbone) -> None:
        cfg = model.config
        self.swin_stages = cfg.stages[:3] if cfg.arch == "swin" else None

    @property
    def swin_drops(self) -> tuple[int, int, int]:
        """Cells dropped per temporal slice at the three Swin stages: the paper's {r, 1.5r/4, 2r/16}."""
        return self.r, self.r * 3 // 8, self.r // 8

    def positions(self, depth: int) -> tuple[int, ...]:
        if self.swin_stages is not None:  # after the first three stages' merging
            return self.swin_stages
        places = (1, 1 + depth // 3, 1 + 2 * depth // 3)
        return tuple(dict.fromkeys(p for p in places if p < depth))  # short models run fewer stages

    def _groups(self, frames: int | None, T: int, stage: int) -> tuple[int, int]:
        """(groups, r per group) at `stage`; `frames` is the input's frame layout, T the grid's."""
        if self.swin_stages is not None:  # per temporal slice: r, 1.5r/4, 2r/16 of each stage's grid
            if frames is None:
                raise InputError("sta on Video Swin needs the same number of tokens in every temporal slice")
            return frames, self.swin_drops[stage]
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

    def count(self, layout: Layout, site: Site) -> Layout:
        groups, r = self._groups(layout.frames, site.grid[0], site.stage)
        m = layout.tokens // groups
        if r >= m and self.swin_stages is not None:
            drops = ", ".join(map(str, self.swin_drops[: len(self.swin_stages)]))
            raise InputError(
                f"sta on Video Swin drops r, 3r/8, r/8 = {drops} cells of each temporal slice at its stages, but "
                f"stage {site.stage + 1} has {m}; use a smaller r"
            )
        if r >= m:
            raise InputError(
                f"sta: r={r} is not smaller than the {m} tokens of a frame (group) at stage {site.stage + 1}"
            )
        if self.first == "tome" and r > m // 2 and self.swin_stages is None:
            raise InputError(
                f"sta: first=tome drops at most half of a frame's (group's) {m} tokens; r={r} at stage "
                f"{site.stage + 1} is more"
            )
        if self.swin_stages is not None:
            if layout.frame_grid is None:
                raise InputError(
                    f"sta on Video Swin drops cells of every temporal slice's full grid, which the windows fill; "
                    f"at stage {site.stage + 1} it is given {layout.describe()}"
                )
            return layout if r == 0 else Layout(groups * (m - r), groups)  # `schedule` marks the holes
        if r == 0:
            return layout
        keeps_layout = self.balance == "frame" or groups == site.grid[0]
        return Layout(groups * (m - r), layout.frames if keeps_layout else None)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        groups, r = self._groups(state.frames, state.grid[0], site.stage)
        if r == 0:
            return state
        B, N, C = state.x.shape
        m = N // groups
        backward = self.order[site.stage] == "B"
        with torch.no_grad():
            # Each group in the order the released code would store it: it decides the first group's
            # even/odd split. Before any STA stage that is the current order.
            order = state.aux.get(STA_ORDER)
            if order is None:
                order = torch.arange(N, device=state.x.device).expand(B, N)  # (B, N)
            slots = order.view(B, groups, m).argsort(2)  # (B, G, m): current slots, in released order
            keys = F.normalize(require(state, KEYS, self.name), dim=-1).view(B, groups, m, -1)
            keys = keys.gather(2, slots.unsqueeze(-1).expand_as(keys))  # (B, G, m, hd)
            semantic = semantic_score(state.x.view(B, groups, m, C)).gather(2, slots)  # (B, G, m)
            pos = state.pos.view(B, groups, m).gather(2, slots)  # (B, G, m)
            if backward:
                keys, semantic, pos = keys.flip(1), semantic.flip(1), pos.flip(1)
            draws = None
            if self.keyed_random:
                clip_keys, stream = self.draw_stream(state, site, self.seed)
                draws = rng.uniform(clip_keys, m, stream=stream, dtype=torch.float64)  # (B, m)
            first_order = drop_first(keys[:, 0], pos[:, 0], r, self.first, draws)  # (B, m)
            kept, _ = accumulate(keys, semantic, first_order, r)  # G x (B, m - r), processing order
            if backward:
                kept.reverse()
            kept_slots = slots.gather(2, torch.stack(kept, 1))  # (B, G, m - r): released order
            idx, place = kept_slots.sort(2)  # (B, G, m - r): slots in current order; their released places
            start = torch.arange(groups, device=idx.device).view(1, groups, 1)  # (1, G, 1)
            idx = (idx + start * m).view(B, -1)  # (B, G*(m-r))
            place = (place + start * (m - r)).view(B, -1)  # (B, G*(m-r)): place in the released sequence
        keeps_layout = self.swin_stages is not None or self.balance == "frame" or groups == state.grid[0]
        return state.gather(idx, frames=state.frames if keeps_layout else None).with_aux(**{STA_ORDER: place})

    def extra_repr(self) -> str:
        return f"r={self.r}, balance={self.balance}, first={self.first}, order={self.order}"
