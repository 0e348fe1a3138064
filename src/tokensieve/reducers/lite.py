"""`lite`: LITE, the LIghtweight Token Elector (Hao et al., "Principles of Visual Tokens for Efficient
Video Understanding", arXiv:2411.13626, Sec. 4). Learned; trained alone, the backbone frozen.

Between the patch embedding and block 0, a small MLP scores every token on its own and the top
`keep` of each clip go on (of each frame on a backbone with divided space-time attention, as the
paper's TimeSformer table needs; `per_frame` overrides); the backbone is unchanged.

    s_i = Selector(e_i)         e_i: token i's patch embedding, with its position embedding (`pos=true`)
                                or without it (`pos=false`); Selector = Linear(C, h) -> GELU ->
                                Linear(h, h/2) -> GELU -> Linear(h/2, 1), "a 3-layer MLP"
    p_i = sigmoid(s_i)          the predicted oracle value
    L   = BCE(p, v)             v: the oracle's values (`tokensieve.oracle`, Grad-CAM of the true label,
                                in [0, 1]) as soft targets, averaged over the clip's tokens
    keep top round(keep * N) tokens by s (the sigmoid keeps the order)

Open choices (no code was released; each is a parameter):
- `hidden` (h): the paper gives no width. Default C // 3 (256 on ViT-B), then h / 2: the selector costs
  0.36 GFLOPs on videomae-b (1568 tokens), which makes LITE's published GFLOPs (159 / 118 / 80 / 46 at
  keep 0.9 / 0.7 / 0.5 / 0.3) come out of the count to the unit.
- `pos`: Eq. 3 defines the patch embedding as the projection plus the position embedding, so the
  default scores tokens with it (the selector can learn where value tends to be); `pos=false` scores the
  projection alone.
- The oracle's own choices (`label`, `block`, `tensor`) are `tokensieve.oracle`'s, with its defaults.

Training (`tokensieve train --plan lite:keep=0.5`): `teach` computes the oracle's values on a frozen copy
of the model for the very clips of the step (the same crops and flips), so targets and tokens always
align; the selector's BCE is the step's only loss with a gradient (`freezes_backbone`: the backbone is
frozen whatever `freeze_backbone` says, so the task loss on the reduced tokens reaches no parameter).
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import VideoBackbone
from ..errors import InputError
from ..oracle import check_oracle, oracle
from ..tokens import INPUTS, Inputs, Layout, TokenState
from .base import Reducer, Site, check_keep, frames_needed, keep_top, register, top_count

__all__ = ["LITE", "Selector"]


class Selector(nn.Module):
    """LITE's scorer: a 3-layer MLP on each token alone; one logit per token."""

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden // 2),
            nn.GELU(),
            nn.Linear(hidden // 2, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) tokens -> (B, N) logits; sigmoid gives the predicted oracle value."""
        return self.net(x).squeeze(-1)


@register("lite")
class LITE(Reducer):
    """Keeps the top `keep` of the tokens by a learned per-token MLP trained on the oracle's values."""

    main_settings = ("lite:keep=0.5",)
    budget = "keep"
    takes_budgets = True
    wants_teacher = True
    freezes_backbone = True
    trained_with = ("hidden", "pos", "label", "block", "tensor", "value")

    def __init__(
        self,
        *,
        keep: float = 0.5,
        hidden: int | None = None,
        pos: bool = True,
        per_frame: bool | None = None,
        label: Literal["true", "pred"] = "true",
        block: int | None = None,
        tensor: Literal["output", "hidden", "embed"] = "output",
        value: Literal["gradcam", "gradxact", "gradnorm"] = "gradcam",
    ) -> None:
        super().__init__()
        check_keep(keep, self.name)
        check_oracle(label, tensor, None, value=value, method=self.name)
        if hidden is not None and hidden < 2:
            raise InputError(f"lite: hidden must be >= 2 (None: the model's width // 3), got {hidden}")
        self.keep, self.hidden, self.pos, self.per_frame = keep, hidden, pos, per_frame
        self.label, self.block, self.tensor, self.value = label, block, tensor, value
        self._per_frame = bool(per_frame)
        self.selector = nn.Module()  # replaced by `setup`, once the model's width is known

    def setup(self, model: VideoBackbone) -> None:
        check_oracle(
            self.label, self.tensor, self.block, len(model.blocks), value=self.value, method=self.name
        )
        dim = model.config.dim
        self.selector = Selector(dim=dim, hidden=self.hidden or max(dim // 3, 2))
        for m in self.selector.modules():  # the backbone's init: trunc-normal(0.02), zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        param = next(model.parameters())
        self.selector.to(device=param.device, dtype=param.dtype)
        self.__dict__["model"] = model  # a reference (its position embedding), not a submodule
        self._per_frame = frames_needed(model) if self.per_frame is None else self.per_frame

    def positions(self, depth: int) -> tuple[int, ...]:
        return (0,)

    def count(self, layout: Layout, site: Site) -> Layout:
        return top_count(self.keep, layout, per_frame=self._per_frame, method=self.name)

    def teach(self, teacher: VideoBackbone, inputs: Inputs) -> Tensor:
        """(B, N) the oracle's values of this step's clips on the frozen teacher: the BCE targets."""
        return oracle(
            teacher, inputs.video, inputs.labels, label=self.label, block=self.block, tensor=self.tensor,
            value=self.value,
        )  # fmt: skip

    def scores(self, state: TokenState) -> Tensor:
        """(B, N) the selector's logit for every token of `state` (right after the patch embedding)."""
        x = state.x
        if not self.pos:
            x = (
                x - self.model.embed.positions(state.grid).to(x.dtype)[state.pos]
            )  # (B, N, C): the projection alone
        return self.selector(x)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        logits = self.scores(state)  # (B, N)
        if self.training:
            state = state.add_loss(self.name, self._loss(logits, state))
        return keep_top(state, logits, self.keep, per_frame=self._per_frame)

    def _loss(self, logits: Tensor, state: TokenState) -> Tensor:
        taught: Any = getattr(state.aux.get(INPUTS), "teacher", {}).get(self.name)
        if taught is None:
            raise InputError(
                "lite in training mode learns from the oracle's values, which the training loop's teacher "
                "pass provides: train it with ts.train or tokensieve train, or call model.eval() to infer"
            )
        targets = taught.to(logits.dtype).gather(1, state.pos)  # (B, N): at position 0 pos is every cell
        return F.binary_cross_entropy_with_logits(logits, targets)

    def extra_repr(self) -> str:
        return (
            f"keep={self.keep}, hidden={self.hidden}, pos={self.pos}, per_frame={self._per_frame}, "
            f"label={self.label}, block={self.block}, tensor={self.tensor}, value={self.value}"
        )
