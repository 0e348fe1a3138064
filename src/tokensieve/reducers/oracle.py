"""`oracle`: keep the tokens the Grad-CAM oracle values most (LITE, Hao et al., arXiv:2411.13626, Sec. 3).

The upper bound of LITE's tables ("Oracle (true label)", 78.5% against the unreduced 70.5% on SS-V2 at
half the tokens): right after the patch embedding, compute every token's value with
`tokensieve.oracle` (Grad-CAM of the true label's score on the unreduced model) and keep the top
`keep` of each clip (of each frame on a backbone with divided space-time attention, or with
`per_frame=true`). It reads the labels, so it is an analysis tool, never a deployable method:
`ts.evaluate` and `tokensieve sweep` pass the labels to it; `label=pred` uses the model's own top class
instead (the paper: 8.5 points lower). Its gradient pass is not counted in its GFLOPs (the paper's
80 GFLOPs at 0.5 are the backbone's on the kept tokens).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .. import rng
from ..backbones.base import VideoBackbone
from ..errors import InputError
from ..oracle import check_oracle, oracle
from ..tokens import INPUTS, Layout, TokenState
from .base import Reducer, Site, check_keep, frames_needed, keep_top, register, top_count

__all__ = ["OracleSelection", "rank_with_ties"]


def rank_with_ties(values: Tensor, ties: Tensor) -> Tensor:
    """(B, N) int64 scores ordering each row's tokens by `values`, equal values by `ties` (keep_top keeps
    the highest). The oracle's values hold many exact zeros (its ReLU): a plain top-k would break
    those ties by position, keeping the first frames' tokens; the random order keeps any of them alike,
    as random selection would."""
    B, N = values.shape
    shuffled = ties.argsort(1)  # (B, N) a random order of the tokens
    order = shuffled.gather(
        1, values.gather(1, shuffled).argsort(dim=1, descending=True, stable=True)
    )  # best first
    best_first = torch.arange(N, 0, -1, device=values.device).expand(B, N)
    return torch.empty_like(order).scatter_(1, order, best_first)


@register("oracle")
class OracleSelection(Reducer):
    """Keeps the top `keep` of the tokens by their Grad-CAM value before block 0."""

    budget = "keep"
    takes_budgets = True
    wants_labels = True
    keyed_random = True  # ties broken at random, keyed by clip

    def __init__(
        self,
        *,
        keep: float = 0.5,
        label: Literal["true", "pred"] = "true",
        block: int | None = None,
        tensor: Literal["output", "hidden", "embed"] = "output",
        value: Literal["gradcam", "gradxact", "gradnorm"] = "gradcam",
        per_frame: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_keep(keep, self.name)
        check_oracle(label, tensor, None, value=value, method=self.name)
        self.keep, self.label, self.block, self.tensor, self.value = keep, label, block, tensor, value
        self.per_frame, self.seed = per_frame, seed
        self._per_frame = bool(per_frame)

    def setup(self, model: VideoBackbone) -> None:
        check_oracle(
            self.label, self.tensor, self.block, len(model.blocks), value=self.value, method=self.name
        )
        self.__dict__["model"] = model  # a reference (the oracle runs it bare), not a submodule
        self._per_frame = frames_needed(model) if self.per_frame is None else self.per_frame

    def positions(self, depth: int) -> tuple[int, ...]:
        return (0,)

    def count(self, layout: Layout, site: Site) -> Layout:
        return top_count(self.keep, layout, per_frame=self._per_frame, method=self.name)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        inputs = state.aux.get(INPUTS)
        if inputs is None:
            raise InputError(
                "oracle reads the clips and labels the backbone puts in aux[INPUTS]; install it with ts.apply"
            )
        values = oracle(
            self.model, inputs.video, inputs.labels, label=self.label, block=self.block, tensor=self.tensor,
            value=self.value,
        )  # fmt: skip
        keys, stream = self.draw_stream(state, site, self.seed)
        ties = rng.uniform_bits(keys, values.shape[1], stream=stream)  # (B, N)
        return keep_top(
            state, rank_with_ties(values.to(state.x.device), ties), self.keep, per_frame=self._per_frame
        )

    def extra_repr(self) -> str:
        return (
            f"keep={self.keep}, label={self.label}, block={self.block}, tensor={self.tensor}, value={self.value}, "
            f"per_frame={self._per_frame}, seed={self.seed}"
        )
