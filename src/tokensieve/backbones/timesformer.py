"""`TimeSformer` (Bertasius et al., "Is Space-Time Attention All You Need for Video Understanding?",
arXiv:2102.05095): divided space-time attention.

Each block runs, on the patch tokens laid out frame by frame,
1. temporal attention among the tokens of the same slot in every frame (class token excluded),
   followed by the extra projection `temporal_fc`, as a residual;
2. spatial attention within each frame, with the class token replicated into every frame and its
   per-frame outputs averaged, as a residual;
3. the MLP.

NOTE: the reference implementations reshape with the configured frame count and grid side, which
breaks as soon as a reducer removes tokens. This block reshapes with the state's actual layout
(`TokenState.frames` frames of equal token counts), so any reduction that keeps per-frame counts
equal (frame selection, per-frame pruning) runs on it. Token slot j of every frame attends
temporally to slot j of the other frames; with the full grid that is the same spatial position.

Other input sizes: any frame count and frame size the patch divides, the spatial positions and the time
embedding resized with "nearest" as transformers' TimeSformer (and the released code) resizes them
(`FrameEmbed`, `backbones.positions`). NOTE: those resize only when the token count differs; a grid of the
same count in another shape (7 x 28 patches for 14 x 14) is resized here too, where they would add the
table in the wrong raster.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..tokens import CLS_UPDATE, Need, TokenState
from .base import VideoBackbone, init_weights
from .config import BackboneConfig
from .layers import Act, Attention, Block, Linear, QkvBias
from .videovit import FrameEmbed, make_blocks

__all__ = ["DividedBlock", "TimeSformer"]


class DividedBlock(Block):
    """Divided space-time block: the joint block's spatial attention and MLP (`norm1`, `attn`,
    `norm2`, `mlp`), preceded by temporal attention (`temporal_norm1`, `temporal_attn`,
    `temporal_fc`)."""

    def __init__(
        self,
        *,
        dim: int,
        heads: int,
        mlp_dim: int,
        qkv_bias: QkvBias = "qkv",
        eps: float = 1e-6,
        act: Act = "gelu",
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__(
            dim=dim, heads=heads, mlp_dim=mlp_dim, qkv_bias=qkv_bias, eps=eps, act=act, drop=drop,
            attn_drop=attn_drop, drop_path_rate=drop_path_rate,
        )  # fmt: skip
        self.temporal_norm1 = nn.LayerNorm(dim, eps=eps)
        self.temporal_attn = Attention(dim=dim, heads=heads, qkv_bias=qkv_bias, attn_drop=attn_drop)
        self.temporal_fc = Linear(dim, dim)

    def forward(self, state: TokenState) -> TokenState:
        if state.mask is not None:
            raise ValueError(
                "divided space-time attention needs a dense batch (mask=None): every sample and frame must "
                "hold the same number of tokens"
            )
        if state.cls is None:
            raise ValueError("TimeSformer blocks need a class token")
        x = state.per_frame()  # (B, F, n, C); raises when per-frame counts differ
        B, F_, n, C = x.shape

        # 1. Temporal attention: slot j of every frame attends to slot j of the others.
        xt = x.transpose(1, 2).reshape(B * n, F_, C)  # (B*n, F, C)
        yt, _ = self.temporal_attn(self.temporal_norm1(xt))
        yt = yt.view(B, n, F_, C).transpose(1, 2)  # (B, F, n, C)
        x = x + self.temporal_fc(self.drop_path(yt))

        # 2. Spatial attention per frame, the class token replicated into every frame.
        cls = state.cls  # (B, 1, C)
        xs = torch.cat(
            [cls.expand(B, F_, C).reshape(B * F_, 1, C), x.reshape(B * F_, n, C)], 1
        )  # (B*F, 1+n, C)
        ys, recorded = self.attn(self.norm1(xs), record=self.record, has_cls=True)
        ys = self.drop_path(ys)
        update = ys[:, :1].view(B, F_, C).mean(1, keepdim=True)  # (B, 1, C): averaged over frames
        x = x.reshape(B, F_ * n, C) + ys[:, 1:].reshape(B, F_ * n, C)  # (B, N, C)

        state = state.replace(x=x, cls=cls + update)
        if recorded:
            # Spatial attention's side results are per frame: (B*F, n, ...) -> (B, N, ...).
            state = state.with_aux(**{k: v.reshape(B, F_ * n, *v.shape[2:]) for k, v in recorded.items()})
        if CLS_UPDATE in self.record:
            state = state.with_aux(**{CLS_UPDATE: update})

        # 3. The reducer slot between attention and MLP, then the MLP on every token.
        return self.mlp_residual(self.inner(state))


class TimeSformer(VideoBackbone):
    """Divided space-time transformer with per-frame patches and a class token. With
    `config.divided` set, only the first `divided` blocks are divided and the later ones joint
    (HaltingVT's backbone: its Glimpser stage, then joint blocks over every token)."""

    block_need = ("frames", "divided space-time attention")

    def need(self, position: int) -> tuple[Need, str]:
        if position < self.config.divided_blocks:
            return self.block_need
        return VideoBackbone.block_need

    def __init__(self, config: BackboneConfig) -> None:
        if config.arch != "timesformer":
            raise InputError(f"TimeSformer builds arch 'timesformer', got {config.arch!r}")
        super().__init__(config)
        self.embed = FrameEmbed(  # transformers' (and the released) rule at other sizes: nearest
            channels=config.channels, dim=config.dim, patch=config.patch, grid=config.grid, space="nearest"
        )
        self.blocks = make_blocks(config, DividedBlock, count=config.divided_blocks)
        init_weights(self.blocks)
        init_weights(self.head)
