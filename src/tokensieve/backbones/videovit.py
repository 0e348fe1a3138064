"""`VideoViT`: a plain ViT with joint space-time attention over all tokens of a clip.

Three layouts, chosen by `BackboneConfig.arch`:

- "videomae" (Tong et al., VideoMAE, arXiv:2203.12602): Conv3d tubelet embedding, fixed sin-cos
  positions over the flattened (T, H, W) grid, no class token, key without bias; mean pooling +
  `fc_norm` + classifier, or (`pool="first"`) final norm and token 0.
- "vit-cls": an image ViT (DeiT) inflated to video, as HaltingVT's backbone: per-frame Conv2d
  patches, class token, learned spatial positions shared by all frames plus a learned time
  embedding; classifier on the class token after the final norm.
- "vivit" (Arnab et al., ViViT, arXiv:2103.15691, model 1 "spatio-temporal attention"): Conv3d tubelet
  embedding, class token, learned positions over the whole sequence [cls + T*H*W]; tanh-approximated
  GELU (`config.act`); classifier on the class token after the final norm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..tokens import TokenState
from .base import VideoBackbone, init_weights
from .config import BackboneConfig
from .layers import TILE_ROWS, Block, patch_tokens, sinusoid_table

__all__ = ["FrameEmbed", "TubeletEmbed", "VideoViT", "make_blocks"]


class TubeletEmbed(nn.Module):
    """Conv3d over (tubelet, patch, patch) cubes plus positions: VideoMAE's fixed sin-cos table, or with
    `has_cls` (ViViT) a class token and learned positions over the whole sequence [cls + T*H*W], slot 0
    the class token's."""

    def __init__(
        self,
        *,
        channels: int,
        dim: int,
        patch: int,
        tubelet: int,
        grid: tuple[int, int, int],
        has_cls: bool = False,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv3d(
            channels, dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch)
        )
        N = math.prod(grid)
        if has_cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + N, dim))
            with torch.no_grad():
                nn.init.trunc_normal_(self.cls_token, std=0.02)
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_parameter("cls_token", None)
            # Not a parameter and not saved: VideoMAE checkpoints do not carry it.
            self.register_buffer("pos_table", sinusoid_table(N, dim), persistent=False)

    def forward(self, video: Tensor, grid: tuple[int, int, int]) -> TokenState:
        B = video.shape[0]
        pos = self.positions()  # (N, C)
        # On CPU, a few clips at a time (`TILE_ROWS` tokens): the projection's output and the position
        # add of a whole batch fall out of cache; each clip's tokens are the same either way. Not when
        # autograd records the embedding: the chunks are written in place (`out=`), which it does not take.
        records = torch.is_grad_enabled() and (
            video.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        step = max(1, TILE_ROWS // math.prod(grid)) if video.device.type == "cpu" and not records else B
        if step >= B:
            x = patch_tokens(video, self.proj).flatten(1, 3)  # (B, N, C), time-major raster order
            x = x + pos.to(device=x.device, dtype=x.dtype)
        else:
            x = None
            for start in range(0, B, step):
                part = patch_tokens(video[start : start + step], self.proj).flatten(1, 3)  # (b, N, C)
                if x is None:
                    x = part.new_empty(B, *part.shape[1:])  # (B, N, C), contiguous
                torch.add(part, pos.to(device=part.device, dtype=part.dtype), out=x[start : start + step])
        cls = None
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(B, -1, -1)  # (B, 1, C)
        return TokenState.from_grid(x, grid, cls_token=cls)

    def positions(self) -> Tensor:
        """(N, C) what the embedding adds to each patch token's projection, in time-major raster order."""
        return self.pos_table if self.cls_token is None else self.pos_embed[0, 1:]


class FrameEmbed(nn.Module):
    """Per-frame Conv2d patches, class token, spatial positions shared by frames (slot 0 for the
    class token, timm layout), learned time embedding.

    Sums in the order of the TimeSformer reference: (patch + spatial position) + time embedding.
    """

    def __init__(self, *, channels: int, dim: int, patch: int, grid: tuple[int, int, int]) -> None:
        super().__init__()
        T, H, W = grid
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + H * W, dim))
        self.time_embed = nn.Parameter(torch.zeros(1, T, dim))
        with torch.no_grad():
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, video: Tensor, grid: tuple[int, int, int]) -> TokenState:
        B, T = video.shape[:2]
        x = patch_tokens(video, self.proj).flatten(0, 1).flatten(1, 2)  # (B*T, HW, D)
        x = x + self.pos_embed[:, 1:]
        x = x.view(B, T, -1, x.shape[-1]) + self.time_embed[:, :, None]  # (B, T, HW, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)  # (B, 1, D)
        return TokenState.from_grid(x.flatten(1, 2), grid, cls_token=cls)

    def positions(self) -> Tensor:
        """(N, C) what the embedding adds to each patch token's projection (spatial position plus time
        embedding), in time-major raster order."""
        return (self.pos_embed[0, 1:] + self.time_embed[0, :, None]).flatten(0, 1)  # (T*H*W, C)


def make_blocks(
    config: BackboneConfig, block: type[nn.Module] = Block, *, count: int | None = None
) -> nn.ModuleList:
    """`config.depth` blocks with stochastic depth increasing linearly to `config.drop_path`: the first
    `count` (None: all) of kind `block`, the others joint (`Block`)."""
    rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
    count = config.depth if count is None else count
    return nn.ModuleList(
        (block if i < count else Block)(
            dim=config.dim, heads=config.heads, mlp_dim=config.mlp_dim, qkv_bias=config.qkv_bias,
            eps=config.eps, act=config.act, drop=config.drop, attn_drop=config.attn_drop,
            drop_path_rate=rate,
        )
        for i, rate in enumerate(rates)
    )  # fmt: skip


class VideoViT(VideoBackbone):
    """Joint space-time ViT; see the module docstring for the three layouts."""

    def __init__(self, config: BackboneConfig) -> None:
        if config.arch not in ("videomae", "vit-cls", "vivit"):
            raise InputError(f"VideoViT builds arch 'videomae', 'vit-cls' or 'vivit', got {config.arch!r}")
        super().__init__(config)
        kw = {"channels": config.channels, "dim": config.dim, "patch": config.patch, "grid": config.grid}
        self.embed = (
            FrameEmbed(**kw)
            if config.arch == "vit-cls"
            else TubeletEmbed(tubelet=config.tubelet, has_cls=config.arch == "vivit", **kw)
        )
        self.blocks = make_blocks(config)
        init_weights(self.blocks)
        init_weights(self.head)
