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
"""

from __future__ import annotations

from ..backbones.base import VideoBackbone
from ..tokens import ATTN_RECEIVED, CLS_ATTN, TokenState
from .base import Reducer, Site, check_keep, keep_top, register, require, top_count

__all__ = ["AttentionSelection"]


@register("attention")
class AttentionSelection(Reducer):
    """Keeps the tokens with the most class-token (or received) attention, inside block `at`."""

    main_settings = ("attention:keep=0.5",)
    budget = "keep"

    inside = True

    def __init__(self, *, keep: float = 0.5, at: int = 1, per_frame: bool = False) -> None:
        super().__init__()
        check_keep(keep, self.name)
        self.keep, self.at, self.per_frame = keep, at, per_frame

    def needs_for(self, model: VideoBackbone) -> frozenset[str]:
        return frozenset({CLS_ATTN if model.config.has_cls else ATTN_RECEIVED})

    @property
    def keeps_frames(self) -> bool:
        return self.per_frame

    def positions(self, depth: int) -> tuple[int, ...]:
        return (self.at,)

    def count(self, num: int, frames: int | None, site: Site) -> tuple[int, int | None]:
        return top_count(self.keep, num, frames, per_frame=self.per_frame, method=self.name)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        scores = require(state, CLS_ATTN if state.cls is not None else ATTN_RECEIVED, self.name)  # (B, N)
        return keep_top(state, scores, self.keep, per_frame=self.per_frame)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, at={self.at}, per_frame={self.per_frame}"
