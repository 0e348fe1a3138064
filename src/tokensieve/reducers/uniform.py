"""`uniform`: keep K whole frames at equal intervals.

STTS's Uniform-K baseline (Wang et al., "Efficient Video Transformers with Spatial-Temporal Token
Selection", arXiv:2111.11591, Sec. 4.3): of the F temporal slices, keep K = round(keep * F) "at equal
intervals". We take the centre of each of K equal segments, frame floor((i + 1/2) F / K) for
i = 0..K-1 (the paper does not say which offset; segment centres are the TSN test convention), the
same frames for every sample. Runs right after the patch embedding by default (`at=0`), where whole
slices cost nothing to drop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..tokens import Layout, TokenState
from .base import Reducer, Site, check_keep, frame_count, keep_count, keep_frames, register, require_frames

__all__ = ["UniformFrames", "uniform_frames"]


def uniform_frames(frames: int, k: int, device: torch.device | None = None) -> Tensor:
    """(k,) indices of `k` of `frames` slices at equal intervals (segment centres), ascending."""
    return ((torch.arange(k, device=device) * 2 + 1) * frames) // (2 * k)


@register("uniform")
class UniformFrames(Reducer):
    """Keeps round(keep * F) temporal slices at equal intervals."""

    main_settings = ("uniform:keep=0.5",)
    budget = "keep"

    def __init__(self, *, keep: float = 0.5, at: int = 0) -> None:
        super().__init__()
        check_keep(keep, self.name)
        self.keep, self.at = keep, at

    def positions(self, depth: int) -> tuple[int, ...]:
        return (self.at,)

    def count(self, layout: Layout, site: Site) -> Layout:
        return frame_count(self.keep, layout, self.name)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        B, F = state.x.shape[0], require_frames(state, self.name)
        idx = uniform_frames(F, keep_count(self.keep, F), state.x.device)  # (K,)
        return keep_frames(state, idx.expand(B, -1))

    def extra_repr(self) -> str:
        return f"keep={self.keep}, at={self.at}"
