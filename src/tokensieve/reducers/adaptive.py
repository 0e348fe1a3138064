"""`adaptive`: LITE++'s per-video budget (Hao et al., arXiv:2411.13626, Sec. 4.3 and Table 4), for any
keep-based method: `lite++:keep=0.5` is `adaptive+lite:keep=0.5`, and `random++`, `attention++`,
`oracle++` work the same way.

Easy videos need fewer tokens (the paper's Principle 5). Right after the patch embedding, a cheap
estimate of the model's confidence c in each clip picks that clip's budget; the keep-based method that
follows keeps the top `keep` of the clip's tokens or the top `small_keep(keep)`:

    c > high            easy: the small budget
    low <= c <= high    the method's own budget P (`keep`)
    c < low             "very hard, do not invest extra tokens": the small budget (`hard=small`), or
                        the base budget (`hard=base`)
    small_keep(P) = min(small, max(P - 0.1, P / 2))     with small = 0.3: 0.3 for P in {0.5, 0.7, 0.9}
                                                        and 0.2 for P = 0.3, as the paper states

The paper's sentence on hard videos can be read as "they get no extra tokens beyond the small budget"
or "they get the base budget, no extra"; we read it as the former (`hard=small`), since the base budget
is what the middle band already gets, and say so. Its threshold values did not survive in our copy of
the paper: `low` and `high` are parameters (defaults 0.1 and 0.9), and `ts.calibrate` picks them on a
calibration split for a target mean GFLOPs.

Confidence: the paper's MoViNet is not available here. The default is a glance of the same model, bare,
on a random `glance` share of each clip's tokens (keyed by clip: the same tokens in any batch), c = the
top softmax probability; its cost is part of the plan's GFLOPs (it runs inside this reducer).
`set_judge(callable)` replaces it with any model mapping the clips (B, T, C, H, W) to logits (B, K).

Clips of a batch then keep different counts: the batch goes on ragged (packed execution), each clip
costing what it keeps, and GFLOPs are measured per clip (`ts.flops(model, video=batch)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor

from .. import rng
from ..backbones.base import VideoBackbone
from ..errors import InputError
from ..tokens import INPUTS, Layout, TokenState
from .base import BUDGETS, Budgets, Reducer, Site, check_keep, frames_needed, keep_top, register

__all__ = ["AdaptiveBudget"]


@register("adaptive")
class AdaptiveBudget(Reducer):
    """Sets a per-clip budget (small or base) from a confidence estimate, for the selection after it."""

    keyed_random = True
    standalone = False

    def __init__(
        self,
        *,
        low: float = 0.1,
        high: float = 0.9,
        small: float = 0.3,
        hard: Literal["small", "base"] = "small",
        glance: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= low <= high <= 1.0:
            raise InputError(f"adaptive: need 0 <= low <= high <= 1, got low={low}, high={high}")
        check_keep(small, "adaptive (small)")
        check_keep(glance, "adaptive (glance)")
        if hard not in ("small", "base"):
            raise InputError(f"adaptive: hard must be small or base, got {hard!r}")
        self.low, self.high, self.small, self.hard, self.glance, self.seed = (
            low,
            high,
            small,
            hard,
            glance,
            seed,
        )
        self.__dict__["judge"] = None

    def setup(self, model: VideoBackbone) -> None:
        self.__dict__["model"] = model  # a reference (the glance runs it bare), not a submodule

    def set_judge(self, judge: Callable[[Tensor], Tensor] | None) -> None:
        """Estimate confidence with `judge` (clips (B, T, C, H, W) -> logits (B, K)) instead of the glance;
        None puts the glance back. Kept as a reference: its weights are not part of the plan's."""
        self.__dict__["judge"] = judge

    def positions(self, depth: int) -> tuple[int, ...]:
        return (0,)

    def count(self, layout: Layout, site: Site) -> Layout:
        return layout._replace(budgets=True)

    def confidence(self, state: TokenState, site: Site) -> Tensor:
        """(B,) the top softmax probability of each clip, by the judge or the glance."""
        if self.judge is not None:
            logits = self.judge(state.aux[INPUTS].video)
        else:
            logits = self._glance(state, site)
        return logits.float().softmax(-1).amax(-1)

    def _glance(self, state: TokenState, site: Site) -> Tensor:
        """(B, K) logits of the bare model on a random `glance` share of each clip's tokens."""
        from .plan import without_plan  # plan imports the reducers

        keys, stream = self.draw_stream(state, site, self.seed)
        scores = rng.uniform_bits(keys, state.x.shape[1], stream=stream)  # (B, N) random ranks
        glance = keep_top(state, scores, self.glance, per_frame=frames_needed(self.model))  # divided blocks
        with without_plan(self.model) as model:
            for block in model.blocks:
                # Past the module hooks: the glance is this reducer's work (an enclosing FLOP count
                # books it under this reducer's slot), not a pass of the model's blocks.
                glance = block.forward(glance)
            return model.forward_head(glance)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        c = self.confidence(state, site)  # (B,)
        small = c > self.high
        if self.hard == "small":
            small = small | (c < self.low)
        return state.with_aux(**{BUDGETS: Budgets(small, self.small, c)})

    def extra_repr(self) -> str:
        judge = "glance" if self.judge is None else type(self.judge).__name__
        return (
            f"low={self.low}, high={self.high}, small={self.small}, hard={self.hard}, glance={self.glance}, "
            f"seed={self.seed}, confidence={judge}"
        )
