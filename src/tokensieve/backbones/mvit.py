"""`MViT`: Multiscale Vision Transformer v1 (Fan et al., "Multiscale Vision Transformers",
arXiv:2104.11227), as MViT-B 16x4 and 32x3 run in pySlowFast and in STTS (`MViT/slowfast/models/
{mvit,attention}.py`) and as torchvision's `mvit_v1_b`.

    embed   Conv3d, kernel (2t-1, 2p-1, 2p-1), stride (t, p, p), padding (t-1, p-1, p-1)  -> T x H x W tokens
            + class token; positions: spatial (H*W) repeated over time + temporal (T) + class, added once
    block   x = skip(x) + attn(norm1(x))                  skip: max-pool where the block pools its queries
            x = (proj(xn) if the width grows else x) + mlp(xn),   xn = norm2(x)
    attn    q, k, v = qkv(x), split into heads; each pooled over every frame's grid by a depthwise Conv3d
            (3x3x3, one kernel per channel of a head, shared by the heads) followed by LayerNorm(head dim),
            the class token passed around the convolution; then softmax(q k^T / sqrt(hd)) v, proj
    head    final norm, class token, classifier

Stages (`config.stages`, MViT-B: blocks 1, 3, 14): a stage's first block pools its queries at stride
(1, 2, 2), so it leaves a grid half as high and wide (8x56x56 -> 8x28x28 -> 8x14x14 -> 8x7x7 on
MViT-B 16x4), and its width and heads are twice the previous stage's: the block before it widens the
tokens in its MLP and in the residual projection `proj`, which takes the normed tokens (MViT v1). Keys
and values are pooled at `config.kv_stride` in the first stage (MViT-B: (1, 8, 8)), halved spatially at
every stage. NOTE: whether the blocks whose kv stride is 1 pool keys and values at all depends on the
checkpoint (`config.kv_pool`), as does the pooling norms' epsilon (`config.pool_eps`).

Tokens as a `TokenState`: every frame holds a rectangular grid of tokens (`TokenState.frame_grid`), which
the blocks need (`need`: "grid"). Query pooling is, for the bookkeeping, a merge: pooled token (i, j)
takes the place of the token at (s*i, s*j) of each frame's grid (the centre of its convolution window)
and stands for the s x s cell of tokens there (`size` adds up), so `pos` keeps indexing the patch
embedding's grid and a traced forward knows which patches each pooled token covers. Plans are walked
through the same pooling at `apply` (`layout_after`): only whole frames may be dropped before a block
(frame selection, STTS's temporal and anchor selection); per-token methods are refused there.
Kept frames are convolved as if adjacent (as the released STTS code does after temporal selection).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..tokens import Layout, TokenState
from .base import VideoBackbone, init_weights
from .config import BackboneConfig
from .layers import Act, Linear, Mlp, drop_path, split_cls, with_cls

__all__ = ["MViT", "MViTEmbed", "MultiScaleBlock", "PoolingAttention", "kv_stride", "pooled_side"]

POOL_KERNEL = (3, 3, 3)
"""Kernel of every query, key and value pooling convolution (MViT-B's `POOL_KVQ_KERNEL`)."""
Q_STRIDE = (1, 2, 2)
"""Query pooling stride of a stage's first block."""


def kv_stride(config: BackboneConfig, block: int) -> tuple[int, int, int]:
    """The key/value pooling stride of `block`: `config.kv_stride`, halved spatially (at least 1) at every
    stage started by then (pySlowFast's `POOL_KV_STRIDE_ADAPTIVE`)."""
    halvings = sum(s <= block for s in config.stages)
    t, h, w = config.kv_stride
    return (t, max(h // 2**halvings, 1), max(w // 2**halvings, 1))


def pooled_side(n: int, stride: int) -> int:
    """Tokens along a side of n after pooling with a kernel-3, padding-1 convolution at `stride`."""
    return (n - 1) // stride + 1


def pool_tokens(t: Tensor, conv: nn.Conv3d, norm: nn.LayerNorm, grid: tuple[int, int, int]) -> Tensor:
    """Pool per-head tokens over every frame's grid: the class token goes around the convolution, then
    everything through the norm.

    Args:
        t: (B, nh, 1 + F*h*w, hd), class token first.
        grid: (F, h, w).

    Returns:
        (B, nh, 1 + F'*h'*w', hd).
    """
    B, nh, _, hd = t.shape
    F_, h, w = grid
    cube = t[:, :, 1:].reshape(B * nh, F_, h, w, hd).permute(0, 4, 1, 2, 3)  # (B*nh, hd, F, h, w)
    pooled = conv(cube)  # (B*nh, hd, F', h', w'): one depthwise kernel, shared by the heads
    rest = pooled.flatten(2).transpose(1, 2).reshape(B, nh, -1, hd)  # (B, nh, F'*h'*w', hd)
    return norm(torch.cat([t[:, :, :1], rest], 2))  # (B, nh, 1 + F'*h'*w', hd)


def skip_pool(x: Tensor, grid: tuple[int, int, int], stride: tuple[int, int, int]) -> Tensor:
    """The skip connection of a block that pools its queries: a max-pool of kernel s + 1 (1 where s = 1)
    at stride s, padding kernel // 2, over every frame's grid; the class token passes.

    Args:
        x: (B, 1 + F*h*w, C), class token first.

    Returns:
        (B, 1 + F'*h'*w', C).
    """
    B, _, C = x.shape
    F_, h, w = grid
    kernel = tuple(s + 1 if s > 1 else 1 for s in stride)
    cube = x[:, 1:].reshape(B, F_, h, w, C).permute(0, 4, 1, 2, 3)  # (B, C, F, h, w)
    pooled = F.max_pool3d(cube, kernel, stride, tuple(k // 2 for k in kernel))  # (B, C, F', h', w')
    return torch.cat([x[:, :1], pooled.flatten(2).transpose(1, 2)], 1)  # (B, 1 + F'*h'*w', C)


def pooling_merge(
    frames: int, grid: tuple[int, int], stride: tuple[int, int], device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Query pooling as a merge (`TokenState.merge`): the tokens that become pooled tokens, the others,
    and which pooled token each other one merges into.

    Pooled token (i, j) of a frame sits at input token (s*i, s*j) (the centre of its convolution window,
    kernel 3, padding 1) and stands for the input tokens of its s x s cell [s*i, s*i + s) x [s*j, s*j + s).

    Args:
        frames: F, the frames of equal grids.
        grid: (h, w) of each frame.
        stride: (sh, sw).

    Returns:
        into (F*h'*w',) the centre tokens in raster order of the pooled grid, src (F*(h*w - h'*w'),) the
        other tokens, dst (same) the position in `into` of the pooled token each merges into.
    """
    (h, w), (sh, sw) = grid, stride
    h2, w2 = pooled_side(h, sh), pooled_side(w, sw)
    n, n2 = h * w, h2 * w2
    rows = torch.arange(h, device=device).view(h, 1)
    cols = torch.arange(w, device=device).view(1, w)
    cell = ((rows // sh) * w2 + cols // sw).flatten()  # (n,): the pooled token of each input token
    centre = ((rows % sh == 0) & (cols % sw == 0)).flatten()  # (n,)
    order = centre.to(torch.int8).argsort(stable=True)  # (n,): the others, then the centres, each ascending
    others, centres = order[: n - n2], order[n - n2 :]
    frame = torch.arange(frames, device=device).view(frames, 1)
    into = (frame * n + centres).flatten()  # (F*n2,)
    src = (frame * n + others).flatten()  # (F*(n - n2),)
    dst = (frame * n2 + cell[others]).flatten()  # (F*(n - n2),)
    return into, src, dst


def frame_grid(state: TokenState) -> tuple[int, int, int]:
    """(F, h, w): the state's frames and the grid each holds (`apply` makes sure there is one)."""
    if state.frames is None or state.frame_grid is None or state.mask is not None:
        raise ValueError(
            "MViT's blocks pool over each frame's grid: they need a dense batch whose frames hold grids "
            "(TokenState.frame_grid); install plans with tokensieve.apply, which refuses any other"
        )
    return (state.frames, *state.frame_grid)


class PoolingAttention(nn.Module):
    """Multi-head attention whose queries, keys and values are each pooled over the frames' grids first
    (`pool_q`/`norm_q`, ...: a depthwise Conv3d and a LayerNorm over the head width), through SDPA.

    Names are pySlowFast's (`qkv`, `proj`, `pool_q`, `norm_q`, ...); a pooling that does not happen is
    `nn.Identity()` (no parameters)."""

    def __init__(
        self,
        *,
        dim: int,
        heads: int,
        q_stride: tuple[int, int, int] | None,
        kv_stride: tuple[int, int, int] | None,
        qkv_bias: bool = True,
        eps: float = 1e-5,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise InputError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.attn_drop = attn_drop
        self.q_stride, self.kv_stride = q_stride, kv_stride
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        hd = self.head_dim

        def conv(stride: tuple[int, int, int] | None) -> nn.Module:
            if stride is None:
                return nn.Identity()
            padding = tuple(k // 2 for k in POOL_KERNEL)
            return nn.Conv3d(hd, hd, POOL_KERNEL, stride, padding, groups=hd, bias=False)

        def norm(stride: tuple[int, int, int] | None) -> nn.Module:
            return nn.Identity() if stride is None else nn.LayerNorm(hd, eps=eps)

        self.pool_q, self.norm_q = conv(q_stride), norm(q_stride)
        self.pool_k, self.norm_k = conv(kv_stride), norm(kv_stride)
        self.pool_v, self.norm_v = conv(kv_stride), norm(kv_stride)

    def forward(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """
        Args:
            x: (B, 1 + F*h*w, C) normalised tokens, class token first.
            grid: (F, h, w) of the tokens.

        Returns:
            (B, 1 + F*h'*w', C): one output per pooled query.
        """
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, self.head_dim)  # (B, L, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, nh, L, hd)
        if self.q_stride is not None:
            q = pool_tokens(q, self.pool_q, self.norm_q, grid)  # (B, nh, Lq, hd)
        if self.kv_stride is not None:
            k = pool_tokens(k, self.pool_k, self.norm_k, grid)  # (B, nh, Lk, hd)
            v = pool_tokens(v, self.pool_v, self.norm_v, grid)  # (B, nh, Lk, hd)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # (B, nh, Lq, hd)
        return self.proj(out.transpose(1, 2).reshape(B, -1, C))  # (B, Lq, C)


class MultiScaleBlock(nn.Module):
    """One MViT block: pooling attention with a (max-pooled, where the queries are pooled) skip, then the
    MLP, which widens the tokens to `dim_out` at a stage's end (`proj` then widens the skip too).

    `inner` is a reducer slot between the attention and the MLP, as in `layers.Block`; `record` is always
    empty (`MViT.records` is empty: pooled keys are not one per token)."""

    def __init__(
        self,
        *,
        dim: int,
        dim_out: int,
        heads: int,
        mlp_dim: int,
        q_stride: tuple[int, int, int] | None,
        kv_stride: tuple[int, int, int] | None,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        pool_eps: float = 1e-5,
        act: Act = "gelu",
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.q_stride = q_stride
        self.widens = dim_out != dim
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = PoolingAttention(
            dim=dim, heads=heads, q_stride=q_stride, kv_stride=kv_stride, qkv_bias=qkv_bias, eps=pool_eps,
            attn_drop=attn_drop,
        )  # fmt: skip
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim=dim, hidden=mlp_dim, act=act, drop=drop, out=dim_out)
        self.proj = Linear(dim, dim_out) if self.widens else nn.Identity()
        self.drop_path = drop_path(drop_path_rate)
        self.inner: nn.Module = nn.Identity()
        self.record: frozenset[str] = frozenset()
        self.ragged = "packed"  # `VideoBackbone.ragged` sets it; no ragged batch reaches these blocks

    def forward(self, state: TokenState) -> TokenState:
        grid = frame_grid(state)
        x = with_cls(state)  # (B, 1 + N, C)
        y = self.attn(self.norm1(x), grid)  # (B, 1 + Nq, C)
        if self.q_stride is not None:
            x = skip_pool(x, grid, self.q_stride)  # (B, 1 + Nq, C)
            state = pooled_state(state, self.q_stride[1:])
        state = split_cls(state, x + self.drop_path(y))
        return self.mlp_residual(self.inner(state))

    def mlp_residual(self, state: TokenState) -> TokenState:
        """The second half of the block: skip (widened by `proj` at a stage's end) + MLP(norm2(x))."""
        x = with_cls(state)  # (B, 1 + N, C)
        xn = self.norm2(x)
        skip = self.proj(xn) if self.widens else x  # MViT v1 widens the normed tokens
        return split_cls(state, skip + self.drop_path(self.mlp(xn)))  # (B, 1 + N, C_out)


def pooled_state(state: TokenState, stride: tuple[int, int]) -> TokenState:
    """The state's bookkeeping after query pooling at spatial `stride` (`pooling_merge`): positions, sizes,
    per-token records and the source map follow `TokenState.merge`; `x` is left for the caller to set.

    Only the bookkeeping is merged: `x` goes through the merge as a (B, N, 1) slice, since the pooled
    tokens replace whatever the merge would make of it (a size-weighted mean over every channel would
    cost a pass over all the tokens for nothing).
    """
    F_, h, w = frame_grid(state)
    into, src, dst = pooling_merge(F_, (h, w), stride, state.x.device)
    B = state.x.shape[0]
    keep = into.new_empty(B, 0)
    new_grid = (pooled_side(h, stride[0]), pooled_side(w, stride[1]))
    narrow = state.replace(x=state.x[..., :1])
    return narrow.merge(
        keep, into.expand(B, -1), src.expand(B, -1), dst.expand(B, -1), frames=F_, frame_grid=new_grid
    )


class MViTEmbed(nn.Module):
    """Overlapping Conv3d patches, class token and separable learned positions (pySlowFast's
    `patch_embed.proj`, `cls_token`, `pos_embed_spatial`, `pos_embed_temporal`, `pos_embed_class`)."""

    def __init__(
        self, *, channels: int, dim: int, patch: int, tubelet: int, grid: tuple[int, int, int]
    ) -> None:
        super().__init__()
        T, H, W = grid
        # NOTE: kernel 2s - 1 and padding s - 1 at stride s: MViT-B's (3, 7, 7), (1, 3, 3) at (2, 4, 4).
        stride = (tubelet, patch, patch)
        self.proj = nn.Conv3d(
            channels, dim, tuple(2 * s - 1 for s in stride), stride, tuple(s - 1 for s in stride)
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, H * W, dim))
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, T, dim))
        self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, dim))
        with torch.no_grad():
            for param in (
                self.cls_token,
                self.pos_embed_class,
                self.pos_embed_spatial,
                self.pos_embed_temporal,
            ):
                nn.init.trunc_normal_(param, std=0.02)  # (pySlowFast's init)

    def forward(self, video: Tensor, grid: tuple[int, int, int]) -> TokenState:
        x = self.proj(video.transpose(1, 2))  # (B, C, T, H, W)
        x = x.flatten(2).transpose(1, 2) + self.positions()  # (B, T*H*W, C), time-major
        cls = (self.cls_token + self.pos_embed_class).expand(x.shape[0], -1, -1)  # (B, 1, C)
        return TokenState.from_grid(x, grid, cls_token=cls)

    def positions(self) -> Tensor:
        """(T*H*W, C) what the embedding adds to each patch token: its spatial and its temporal position."""
        spatial, temporal = self.pos_embed_spatial[0], self.pos_embed_temporal[0]  # (H*W, C), (T, C)
        return (spatial.unsqueeze(0) + temporal.unsqueeze(1)).flatten(0, 1)  # (T*H*W, C)


class MViT(VideoBackbone):
    """Multiscale Vision Transformer v1; see the module docstring."""

    block_need = ("grid", "attention pooled over each frame's grid")
    records = frozenset()
    no_records_why = "it pools its keys"
    any_size = False

    def __init__(self, config: BackboneConfig) -> None:
        if config.arch != "mvit":
            raise InputError(f"MViT builds arch 'mvit', got {config.arch!r}")
        super().__init__(config)
        self.embed = MViTEmbed(
            channels=config.channels, dim=config.dim, patch=config.patch, tubelet=config.tubelet,
            grid=config.grid,
        )  # fmt: skip
        depth, ratio = config.depth, config.mlp_dim // config.dim
        self.blocks = nn.ModuleList(
            MultiScaleBlock(
                dim=config.width(p), dim_out=config.width(p + 1), heads=config.heads_at(p),
                mlp_dim=ratio * config.width(p), q_stride=Q_STRIDE if p in config.stages else None,
                kv_stride=self._kv_stride(p), qkv_bias=config.qkv_bias == "qkv", eps=config.eps,
                pool_eps=config.pool_eps, act=config.act, drop=config.drop, attn_drop=config.attn_drop,
                drop_path_rate=config.drop_path * p / max(depth - 1, 1),
            )
            for p in range(depth)
        )  # fmt: skip
        init_weights(self.blocks)
        init_weights(self.head)

    def check_input(self, video: Tensor) -> tuple[int, int, int]:
        """As every backbone's, but only at the grid its positions are built for: neither pySlowFast's nor
        torchvision's MViT carries its separable positions to another clip size, so there is no original
        rule to follow (a plan such as `resize` that changes the clip is refused at the first forward)."""
        grid = super().check_input(video)
        if grid != self.config.grid:
            cfg = self.config
            raise InputError(
                f"MViT runs only at the size its positions are built for, {cfg.frames} frames of "
                f"{cfg.size}x{cfg.size} (token grid {cfg.grid}); got token grid {grid} (the released MViT "
                "does not interpolate its positions)"
            )
        return grid

    def _kv_stride(self, block: int) -> tuple[int, int, int] | None:
        """Block `block`'s key/value pooling stride, or None where it does not pool them."""
        stride = kv_stride(self.config, block)
        if self.config.kv_pool == "strided" and math.prod(stride) == 1:
            return None
        return stride

    def layout_after(self, position: int, layout: Layout) -> Layout:
        stride = self.blocks[position].q_stride
        if stride is None:
            return layout
        h, w = layout.frame_grid  # `apply` checked the block's need: frames holding grids
        grid = (pooled_side(h, stride[1]), pooled_side(w, stride[2]))
        return layout._replace(tokens=layout.frames * grid[0] * grid[1], frame_grid=grid)

    def grids(self) -> list[tuple[int, int, int]]:
        """The (T, h, w) grid of the bare model's tokens before each block and after the last (depth + 1)."""
        layout, grids = Layout.of_grid(self.config.grid), []
        for p in range(len(self.blocks) + 1):
            grids.append((layout.frames, *layout.frame_grid))
            if p < len(self.blocks):
                layout = self.layout_after(p, layout)
        return grids
