"""`random_frames`: keep K random whole frames per sample.

STTS's Random-K baseline (Wang et al., arXiv:2111.11591, Sec. 4.3): of the F temporal slices keep
K = round(keep * F) drawn uniformly without replacement, independently per sample, in time order.
Draws are keyed by clip, as in `random` (`tokensieve.rng`).
"""

from __future__ import annotations

from .. import rng
from ..tokens import Layout, TokenState
from .base import Reducer, Site, check_keep, frame_count, keep_count, keep_frames, register, require_frames

__all__ = ["RandomFrames"]


@register("random_frames")
class RandomFrames(Reducer):
    """Keeps round(keep * F) random temporal slices of each sample."""

    main_settings = ("random_frames:keep=0.5",)
    budget = "keep"
    keyed_random = True

    def __init__(self, *, keep: float = 0.5, at: int = 0, seed: int = 0) -> None:
        super().__init__()
        check_keep(keep, self.name)
        self.keep, self.at, self.seed = keep, at, seed

    def positions(self, depth: int) -> tuple[int, ...]:
        return (self.at,)

    def count(self, layout: Layout, site: Site) -> Layout:
        return frame_count(self.keep, layout, self.name)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        F = require_frames(state, self.name)
        keys, stream = self.draw_stream(state, site, self.seed)
        draws = rng.uniform_bits(keys, F, stream=stream)  # (B, F) random int64 ranks
        idx = draws.topk(keep_count(self.keep, F), dim=1).indices.sort(1).values  # (B, K)
        return keep_frames(state, idx)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, at={self.at}, seed={self.seed}"
