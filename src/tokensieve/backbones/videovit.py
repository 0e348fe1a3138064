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

Every layout runs at any frame count the tubelet divides and any frame size the patch divides: the
embeddings carry their positions to the clip's token grid by the original implementation's rule
(`backbones.positions`, docs/design.md "Input sizes").
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
from .positions import PositionCache, SpaceMode, resize_space, resize_time

__all__ = ["FrameEmbed", "TubeletEmbed", "VideoViT", "make_blocks"]


class TubeletEmbed(PositionCache):
    """Conv3d over (tubelet, patch, patch) cubes plus positions: VideoMAE's fixed sin-cos table, or with
    `has_cls` (ViViT) a class token and learned positions over the whole sequence [cls + T*H*W], slot 0
    the class token's.

    At a token grid other than `grid` (another frame count or frame size) the positions are VideoMAE's
    table made for the new token count, or ViViT's learned ones resized (`positions`)."""

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
        self.grid = tuple(grid)  # the token grid the positions are built for
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
        pos = self.positions(grid)  # (N, C)
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

    def positions(self, grid: tuple[int, int, int]) -> Tensor:
        """(N, C) what the embedding adds to each patch token's projection on token grid `grid`, in
        time-major raster order. At the built grid, the table itself; at another, VideoMAE's table made for
        T*H*W positions, or ViViT's learned positions resized (bicubic per temporal slice, linear over
        time: `positions` module), made once per grid (`PositionCache`)."""
        grid = tuple(grid)
        if grid == self.grid:
            return self.pos_table if self.cls_token is None else self.pos_embed[0, 1:]
        if self.cls_token is None:
            table = self.pos_table
            return self.cached((grid, table.dtype, table.device), (), lambda: self._sinusoid(grid))
        table = self.pos_embed
        return self.cached((grid, table.dtype, table.device), (table,), lambda: self._resized(grid))

    def _sinusoid(self, grid: tuple[int, int, int]) -> Tensor:
        """VideoMAE's table for the T*H*W positions of `grid`, on the built table's device."""
        table = self.pos_table
        return sinusoid_table(math.prod(grid), table.shape[1]).to(device=table.device, dtype=table.dtype)

    def _resized(self, grid: tuple[int, int, int]) -> Tensor:
        """ViViT's learned positions (class slot left out) carried to `grid`: (T'*H'*W', C)."""
        T, H, W = self.grid
        table = self.pos_embed[0, 1:].view(T, H, W, -1)  # (T, H, W, C)
        if (H, W) != grid[1:]:
            table = resize_space(table, grid[1:], "bicubic")  # (T, H', W', C)
        if T != grid[0]:
            table = resize_time(table.flatten(1, 2), grid[0], "linear")  # (T', H'*W', C)
        return table.reshape(math.prod(grid), -1)  # (T'*H'*W', C)


class FrameEmbed(PositionCache):
    """Per-frame Conv2d patches, class token, spatial positions shared by frames (slot 0 for the
    class token, timm layout), learned time embedding.

    Sums in the order of the TimeSformer reference: (patch + spatial position) + time embedding. At a token
    grid other than `grid`, the spatial positions are resized over H x W by `space` ("nearest":
    TimeSformer's; "bicubic": timm's, for image-initialised joint models) and the time embedding with
    "nearest" (TimeSformer's), the class token's slot kept as it is.
    """

    def __init__(
        self, *, channels: int, dim: int, patch: int, grid: tuple[int, int, int], space: SpaceMode
    ) -> None:
        super().__init__()
        T, H, W = grid
        self.grid = tuple(grid)  # the token grid the positions are built for
        self.space = space
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + H * W, dim))
        self.time_embed = nn.Parameter(torch.zeros(1, T, dim))
        with torch.no_grad():
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, video: Tensor, grid: tuple[int, int, int]) -> TokenState:
        B, T = video.shape[:2]
        space, time = self.tables(grid)  # (1, H*W, D), (1, T, D)
        x = patch_tokens(video, self.proj).flatten(0, 1).flatten(1, 2)  # (B*T, HW, D)
        x = x + space
        x = x.view(B, T, -1, x.shape[-1]) + time[:, :, None]  # (B, T, HW, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)  # (B, 1, D)
        return TokenState.from_grid(x.flatten(1, 2), grid, cls_token=cls)

    def tables(self, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """(1, H*W, C) spatial positions (class slot left out) and (1, T, C) time embedding on token grid
        `grid`: the parameters themselves at the built grid, else resized, once per grid (`PositionCache`)."""
        grid = tuple(grid)
        if grid == self.grid:
            return self.pos_embed[:, 1:], self.time_embed
        sources = (self.pos_embed, self.time_embed)
        return self.cached(
            (grid, self.pos_embed.dtype, self.pos_embed.device), sources, lambda: self._resized(grid)
        )

    def _resized(self, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        T, H, W = self.grid
        space = self.pos_embed[:, 1:]  # (1, H*W, C)
        if (H, W) != grid[1:]:
            space = resize_space(space.view(1, H, W, -1), grid[1:], self.space).flatten(1, 2)  # (1, H'*W', C)
        time = self.time_embed  # (1, T, C)
        if T != grid[0]:
            time = resize_time(time.transpose(0, 1), grid[0], "nearest").transpose(0, 1)  # (1, T', C)
        return space, time

    def positions(self, grid: tuple[int, int, int]) -> Tensor:
        """(N, C) what the embedding adds to each patch token's projection on token grid `grid` (spatial
        position plus time embedding), in time-major raster order."""
        space, time = self.tables(grid)
        return (space[0] + time[0, :, None]).flatten(0, 1)  # (T*H*W, C)


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
            FrameEmbed(space="bicubic", **kw)  # timm's rule for image-initialised positions
            if config.arch == "vit-cls"
            else TubeletEmbed(tubelet=config.tubelet, has_cls=config.arch == "vivit", **kw)
        )
        self.blocks = make_blocks(config)
        init_weights(self.blocks)
        init_weights(self.head)
