"""`attention`: keep the tokens the model attends to most.

The EViT (Liang et al., arXiv:2202.07800) / HaltingVT Glimpser (Wu et al., "HaltingVT", Sec. 3.2)
criterion: inside block `at`, between its attention and its MLP, rank the patch tokens by the
attention the class token pays them, averaged over heads, and keep the top `keep` fraction (of the
clip, or of every frame with `per_frame=true`, as the Glimpser does); the MLP then runs on the kept
tokens only. The scores come from the same attention that just ran, recorded as one (1, N) row per
head, so no (N, N) map is built.

Models without a class token (VideoMAE) have no class-token row. There we rank by the attention
each token *receives*, averaged over heads and over all queries (`ATTN_RECEIVED`), the "magnitude
of attention" cue LITE compares against random (Sec. 3). It costs one more query-key product
(computed in chunks, never stored whole), which the GFLOPs count includes.

Defaults: keep 0.5 at block 1, the Glimpser's G05 setting (its selection layer is the second block).

Adaptive budget (`mass=0.9`): instead of a fixed share of the tokens, each clip keeps the fewest tokens
holding that share of the attention: tokens by descending score, kept while the attention of the
tokens before them is below `mass` of the clip's total (so the token that crosses the line is kept).
A clip whose attention is concentrated keeps few tokens, a diffuse one many: the batch becomes
ragged, and later blocks cost what each clip keeps (packed execution, docs/design.md). The known
"top-p" variant of attention top-k; training-free. On a ragged input every clip selects among its
own real tokens, in both modes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backbones.base import VideoBackbone
from ..errors import InputError
from ..tokens import ATTN_RECEIVED, CLS_ATTN, Layout, TokenState, compact
from .base import Reducer, Site, check_keep, keep_top, ragged_count, register, require, top_count

__all__ = ["AttentionSelection", "mass_chosen"]


def mass_chosen(scores: Tensor, mass: float, mask: Tensor | None = None) -> Tensor:
    """(B, N) bool: per clip, the fewest tokens holding `mass` of its total score: by descending score,
    every token whose predecessors hold less than `mass` of the total (ties: current order first).

    Args:
        scores: (B, N) non-negative scores (attention).
        mass: the share to hold, in (0, 1].
        mask: (B, N) True for real tokens; padding holds no score and is never chosen.
    """
    with torch.no_grad():
        if mask is not None:
            scores = scores.masked_fill(~mask, 0.0)
        ordered, order = scores.double().sort(dim=1, descending=True, stable=True)  # (B, N)
        before = ordered.cumsum(1) - ordered  # (B, N): score of the tokens ranked above each
        inside = before < mass * ordered.sum(1, keepdim=True)  # (B, N), in rank order; rank 0 always
        chosen = torch.zeros_like(inside).scatter(1, order, inside)  # (B, N), in token order
    return chosen if mask is None else chosen & mask


@register("attention")
class AttentionSelection(Reducer):
    """Keeps the tokens with the most class-token (or received) attention, inside block `at`."""

    main_settings = ("attention:keep=0.5",)
    budget = "keep"
    takes_budgets = True  # with a fixed share; `mass` has its own adaptive rule (set per instance)

    inside = True
    takes_ragged = True

    def __init__(
        self, *, keep: float = 0.5, at: int = 1, per_frame: bool = False, mass: float | None = None
    ) -> None:
        super().__init__()
        check_keep(keep, self.name)
        if mass is not None:
            if not 0.0 < mass <= 1.0:
                raise InputError(f"attention: mass must be a share in (0, 1], got {mass}")
            if keep != 0.5:
                raise InputError(
                    "attention: give keep (a fixed share of tokens) or mass (adaptive), not both"
                )
            if per_frame:
                raise InputError(
                    "attention: mass selects within each clip; per_frame is not available with it"
                )
        self.keep, self.at, self.per_frame, self.mass = keep, at, per_frame, mass
        self.takes_budgets = mass is None

    def needs_for(self, model: VideoBackbone) -> frozenset[str]:
        return frozenset({CLS_ATTN if model.config.has_cls else ATTN_RECEIVED})

    def positions(self, depth: int) -> tuple[int, ...]:
        return (self.at,)

    def count(self, layout: Layout, site: Site) -> Layout:
        if self.mass is not None:
            return ragged_count(layout, per_frame=False, method=self.name)
        return top_count(self.keep, layout, per_frame=self.per_frame, method=self.name)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        scores = require(state, CLS_ATTN if state.cls is not None else ATTN_RECEIVED, self.name)  # (B, N)
        if self.mass is not None:
            return compact(state, mass_chosen(scores, self.mass, state.mask))
        return keep_top(state, scores, self.keep, per_frame=self.per_frame)

    def extra_repr(self) -> str:
        if self.mass is not None:
            return f"mass={self.mass}, at={self.at}"
        return f"keep={self.keep}, at={self.at}, per_frame={self.per_frame}"
