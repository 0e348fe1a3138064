"""`random`: keep a uniformly random subset of tokens, independently per sample.

The baseline that LITE (Hao et al., "Principles of Visual Tokens for Efficient Video
Understanding", arXiv:2411.13626, Sec. 3) found most token-reduction methods fail to beat: keep a
fraction `keep` of the tokens, drawn uniformly without replacement, right after the patch embedding
(`at=0`), and run the unchanged backbone on them. With `per_frame=true` every frame keeps the same
count (needed by divided space-time attention); on Video Swin the cells it drops are then holes that the
windows fill with their nearest kept token, as for STA's Swin variant (`backbones.swin`), which makes it
STA's random baseline there (one `random:...,per_frame=true,at=<stage>` per STA stage).

Draws are keyed by clip (`tokensieve.rng`): a pure function of the clip's content, `seed` and, in
training, the step. A clip keeps the same tokens in a batch of any size or composition, under
`torchrun` on any number of processes, whatever ran before (a FLOP count, another evaluation); the
global RNG is never touched.
"""

from __future__ import annotations

from .. import rng
from ..tokens import Layout, TokenState
from .base import Reducer, Site, check_keep, keep_top, register, top_count

__all__ = ["RandomSelection"]


@register("random")
class RandomSelection(Reducer):
    """Keeps round(keep * N) random tokens of each sample (of each frame with `per_frame`)."""

    main_settings = ("random:keep=0.5",)
    budget = "keep"
    takes_budgets = True
    keyed_random = True
    takes_ragged = True

    def __init__(self, *, keep: float = 0.5, at: int = 0, per_frame: bool = False, seed: int = 0) -> None:
        super().__init__()
        check_keep(keep, self.name)
        self.keep, self.at, self.per_frame, self.seed = keep, at, per_frame, seed

    @property
    def leaves_holes(self) -> bool:  # type: ignore[override]
        """Per frame, on Video Swin: the cells it drops are holes the windows fill, as STA's (its baseline)."""
        return self.per_frame

    def positions(self, depth: int) -> tuple[int, ...]:
        return (self.at,)

    def count(self, layout: Layout, site: Site) -> Layout:
        return top_count(self.keep, layout, per_frame=self.per_frame, method=self.name)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        keys, stream = self.draw_stream(state, site, self.seed)
        scores = rng.uniform_bits(keys, state.x.shape[1], stream=stream)  # (B, N) random int64 ranks
        return keep_top(state, scores, self.keep, per_frame=self.per_frame)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, at={self.at}, per_frame={self.per_frame}, seed={self.seed}"
