"""`random`: keep a uniformly random subset of tokens, independently per sample.

The baseline that LITE (Hao et al., "Principles of Visual Tokens for Efficient Video
Understanding", arXiv:2411.13626, Sec. 3) found most token-reduction methods fail to beat: keep a
fraction `keep` of the tokens, drawn uniformly without replacement, right after the patch embedding
(`at=0`), and run the unchanged backbone on them. With `per_frame=true` every frame keeps the same
count (needed by divided space-time attention).

Draws come from the reducer's own `torch.Generator` seeded with `seed`, so a plan built from the
same spec selects the same tokens for the same sequence of batches, independently of the global RNG.
"""

from __future__ import annotations

import torch

from ..tokens import TokenState
from .base import Reducer, Site, check_keep, keep_top, register, top_count

__all__ = ["RandomSelection"]


@register("random")
class RandomSelection(Reducer):
    """Keeps round(keep * N) random tokens of each sample (of each frame with `per_frame`)."""

    main_settings = ("random:keep=0.5",)

    def __init__(self, *, keep: float = 0.5, at: int = 0, per_frame: bool = False, seed: int = 0) -> None:
        super().__init__()
        check_keep(keep, self.name)
        self.keep, self.at, self.per_frame, self.seed = keep, at, per_frame, seed
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def keeps_frames(self) -> bool:
        return self.per_frame

    def positions(self, depth: int) -> tuple[int, ...]:
        return (self.at,)

    def count(self, num: int, frames: int | None, site: Site) -> tuple[int, int | None]:
        return top_count(self.keep, num, frames, per_frame=self.per_frame, method=self.name)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        B, N, _ = state.x.shape
        # Drawn on the CPU generator, then moved: identical selections on every device.
        scores = torch.rand(B, N, generator=self.generator).to(state.x.device)  # (B, N)
        return keep_top(state, scores, self.keep, per_frame=self.per_frame)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, at={self.at}, per_frame={self.per_frame}, seed={self.seed}"
