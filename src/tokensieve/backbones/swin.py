"""`Swin3D`: Video Swin Transformer (Liu et al., "Video Swin Transformer", arXiv:2106.13230), as released
(`SwinTransformer/Video-Swin-Transformer`, `mmaction/models/backbones/swin_transformer.py`; STTS's fork of
it) and as torchvision's `swin3d_t/s/b`.

    embed   Conv3d, kernel = stride = (t, p, p) (2x4x4), then LayerNorm      -> T x H x W tokens, no class
            token, no absolute positions
    block   x = x + attn(norm1(x)),  x = x + mlp(norm2(x))
    attn    norm1's output zero-padded to a multiple of the window, cyclically shifted by -window // 2 on odd
            blocks, cut into windows; softmax(q k^T / sqrt(hd) + B + M) v in each window, where B is the
            learned relative position bias and M is -100 between tokens of different regions of a shifted
            window (0 elsewhere; padded tokens are never masked); shifted back, cropped, proj
    merge   between stages: each frame's 2x2 tokens (odd sides zero-padded) concatenated in the order
            (0,0), (1,0), (0,1), (1,1) -> LayerNorm(4C) -> Linear(4C, 2C, no bias)
    head    LayerNorm on every token, mean over the tokens, classifier

Windows adapt to the grid (`window_and_shift`): along an axis no longer than the window, the window is the
axis and the shift 0 (Swin-B's last stage, 16x7x7: windows 8x7x7, shift (4, 0, 0)). The relative position
bias of a smaller window is the top-left corner of the full window's table, as released (exact for a
window shortened in time, the first axis; the released arrangement for one shortened in space).

Stages (`config.stages`, Swin-B: blocks 2, 4, 22): the patch merging opens a stage's first block (the
released code closes the previous stage with it: `layers.{s}.downsample`), so the reducer slot before
that block sees the previous stage's grid and width, and `layout_after` declares the merge. The blocks
need every frame's full (or cropped) grid of tokens (`need`: "grid"): whole-frame selection runs (the kept
slices are windowed as if adjacent, as STTS's released temporal selection does), per-token methods are
refused at `apply`. The merge is, for the bookkeeping, MViT's query pooling at stride 2 (`pooled_state`):
merged token (i, j) takes the place of token (2i, 2j) and stands for its 2x2 cell.

Input sizes (`any_size`): any clip whose frame count the tubelet and frame sides the patch divide, as the
released model takes them: there are no absolute positions to carry, and the windows pad.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..tokens import Layout, TokenState
from .base import VideoBackbone, _mean_tokens, init_weights
from .config import BackboneConfig
from .layers import Linear, Mlp, drop_path
from .mvit import frame_grid, pooled_side, pooled_state

__all__ = [
    "MASK_VALUE",
    "PatchMerging",
    "Swin3D",
    "SwinBlock",
    "SwinEmbed",
    "WindowAttention",
    "merge_patches",
    "relative_position_index",
    "shift_mask",
    "window_and_shift",
    "window_partition",
    "window_reverse",
]

MASK_VALUE = -100.0
"""What the released code adds between tokens of different regions of a shifted window (not -inf)."""
MERGE = (2, 2)
"""The patch merging's spatial stride."""

Grid = tuple[int, int, int]


def window_and_shift(grid: Grid, window: Grid, shift: Grid) -> tuple[Grid, Grid]:
    """The window and shift used on `grid`: along an axis no longer than the window, the axis itself and
    no shift (the released `get_window_size`)."""
    sizes = [(n, 0) if n <= w else (w, s) for n, w, s in zip(grid, window, shift, strict=True)]
    return tuple(w for w, _ in sizes), tuple(s for _, s in sizes)  # type: ignore[return-value]


def window_partition(x: Tensor, window: Grid) -> Tensor:
    """Cut a padded grid into windows.

    Args:
        x: (B, T, H, W, C), each side a multiple of the window's.

    Returns:
        (B, nW, wt*wh*ww, C), windows in raster order of the window grid, tokens in raster order inside.
    """
    B, T, H, W, C = x.shape
    wt, wh, ww = window
    x = x.view(B, T // wt, wt, H // wh, wh, W // ww, ww, C)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # (B, T/wt, H/wh, W/ww, wt, wh, ww, C)
    return x.reshape(B, -1, wt * wh * ww, C)  # (B, nW, V, C)


def window_reverse(windows: Tensor, window: Grid, grid: Grid) -> Tensor:
    """The inverse of `window_partition`: (B, nW, V, C) -> (B, T, H, W, C) on the padded `grid`."""
    B, _, _, C = windows.shape
    (wt, wh, ww), (T, H, W) = window, grid
    x = windows.view(B, T // wt, H // wh, W // ww, wt, wh, ww, C)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, T, H, W, C)  # (B, T, H, W, C)


def relative_position_index(window: Grid) -> Tensor:
    """(V, V) row of the bias table for each pair of tokens (i, j) of a window of V = wt*wh*ww tokens: their
    offset along each axis, shifted to start at 0, in mixed radix (2wt-1, 2wh-1, 2ww-1)."""
    axes = torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")
    coords = torch.stack(axes).flatten(1)  # (3, V)
    offset = coords[:, :, None] - coords[:, None, :]  # (3, V, V)
    (wt, wh, ww) = window
    offset = offset + torch.tensor([wt - 1, wh - 1, ww - 1]).view(3, 1, 1)
    return offset[0] * (2 * wh - 1) * (2 * ww - 1) + offset[1] * (2 * ww - 1) + offset[2]  # (V, V)


@functools.lru_cache(maxsize=32)
def _shift_mask(padded: Grid, window: Grid, shift: Grid, device: torch.device) -> Tensor:
    # Region of each position along an axis: the window's worth before the last, the part of the last
    # window that stays, the part that wrapped round from the start (one region where there is no shift).
    labels = []
    for n, w, s in zip(padded, window, shift, strict=True):
        label = torch.zeros(n, dtype=torch.long, device=device)
        if s > 0:
            label[n - w : n - s], label[n - s :] = 1, 2
        labels.append(label)
    region = labels[0].view(-1, 1, 1) * 9 + labels[1].view(1, -1, 1) * 3 + labels[2].view(1, 1, -1)
    windows = window_partition(region[None, ..., None], window)[0, ..., 0]  # (nW, V)
    differ = windows[:, None, :] != windows[:, :, None]  # (nW, V, V)
    return torch.zeros(differ.shape, device=device).masked_fill(differ, MASK_VALUE)


def shift_mask(padded: Grid, window: Grid, shift: Grid, device: torch.device) -> Tensor:
    """(nW, V, V) the additive mask of shifted windows on a padded grid: `MASK_VALUE` between tokens that
    come from different regions of the cyclically shifted grid, 0 elsewhere (padding is not masked).
    Cached per grid; made outside inference mode so that a training forward may use it too (a compiled
    forward makes it in its graph: dynamo does not keep Python caches)."""
    if torch.compiler.is_compiling():
        return _shift_mask.__wrapped__(padded, window, shift, device)
    with torch.inference_mode(False), torch.no_grad():
        return _shift_mask(padded, window, shift, device)


def merge_patches(x: Tensor) -> Tensor:
    """Each frame's 2x2 tokens side by side: (B, T, H, W, C) -> (B, T, ceil(H/2), ceil(W/2), 4C), an odd
    side zero-padded first, in the released order (0,0), (1,0), (0,1), (1,1)."""
    H, W = x.shape[2:4]
    x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # (B, T, H', W', C), even sides
    parts = [x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]]
    return torch.cat(parts, -1)  # (B, T, H'/2, W'/2, 4C)


class WindowAttention(nn.Module):
    """Multi-head attention inside (shifted) 3D windows with a learned relative position bias, through SDPA
    (bias and shift mask as one additive mask). Names are the released ones (`qkv`, `proj`,
    `relative_position_bias_table`); the index is rebuilt, not loaded (`relative_position_index`)."""

    def __init__(
        self,
        *,
        dim: int,
        heads: int,
        window: Grid,
        shift: Grid,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise InputError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.window, self.shift = window, shift
        self.attn_drop = attn_drop
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        rows = math.prod(2 * w - 1 for w in window)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def bias(self, volume: int) -> Tensor:
        """(nh, V, V) the bias of a window of `volume` tokens: the top-left corner of the full window's (as
        released: a window shrunk along time is exactly the first slices of the full one)."""
        index = self.relative_position_index[:volume, :volume]  # (V, V)
        return self.relative_position_bias_table[index.reshape(-1)].view(volume, volume, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, grid: Grid) -> Tensor:
        """
        Args:
            x: (B, T*h*w, C) normalised tokens, time-major.
            grid: (T, h, w) of the tokens.

        Returns:
            (B, T*h*w, C).
        """
        B, N, C = x.shape
        window, shift = window_and_shift(grid, self.window, self.shift)
        pad = [-n % w for n, w in zip(grid, window, strict=True)]
        cube = F.pad(x.view(B, *grid, C), (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))  # (B, Tp, Hp, Wp, C)
        padded: Grid = tuple(cube.shape[1:4])  # type: ignore[assignment]
        shifted = any(shift)
        if shifted:
            cube = torch.roll(cube, tuple(-s for s in shift), (1, 2, 3))
        windows = window_partition(cube, window)  # (B, nW, V, C)
        nW, V = windows.shape[1:3]
        qkv = self.qkv(windows).view(B, nW, V, 3, self.heads, self.head_dim)  # (B, nW, V, 3, nh, hd)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)  # 3 x (B, nW, nh, V, hd)
        mask = self.bias(V).to(q.dtype)  # (nh, V, V)
        drop = self.attn_drop if self.training else 0.0
        if shifted:  # one mask per window: SDPA clip by clip over (nW, nh) as batch dimensions
            mask = mask + shift_mask(padded, window, shift, x.device).to(q.dtype)[:, None]  # (nW, nh, V, V)
            # Why a loop over the clips: with 5-D inputs (B, nW, ...) SDPA takes its math path on CPU, 5x
            # slower than its fused kernel on the 4-D (nW, nh, V, hd) of each clip (Swin-T stage 0, 2 clips:
            # 600 against 122 ms); the mask is shared, so nothing is expanded over the batch.
            out = torch.stack(
                [
                    F.scaled_dot_product_attention(q[b], k[b], v[b], attn_mask=mask, dropout_p=drop)
                    for b in range(B)
                ]
            )  # (B, nW, nh, V, hd)
        else:  # the same mask in every window: one batch of B*nW windows
            q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # (B*nW, nh, V, hd)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)  # (B*nW, nh, V, hd)
        out = self.proj(out.view(B, nW, self.heads, V, self.head_dim).transpose(2, 3).reshape(B, nW, V, C))
        cube = window_reverse(out, window, padded)  # (B, Tp, Hp, Wp, C)
        if shifted:
            cube = torch.roll(cube, shift, (1, 2, 3))
        T, h, w = grid
        return cube[:, :T, :h, :w].reshape(B, N, C)  # (B, T*h*w, C)


class PatchMerging(nn.Module):
    """2x2 tokens of each frame -> one of twice the width (`merge_patches`, LayerNorm(4C), Linear(4C, 2C)
    without bias: the released `downsample.norm` and `downsample.reduction`)."""

    def __init__(self, *, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, state: TokenState) -> TokenState:
        T, h, w = frame_grid(state)
        B, _, C = state.x.shape
        merged = merge_patches(state.x.view(B, T, h, w, C))  # (B, T, h', w', 4C)
        x = self.reduction(self.norm(merged)).flatten(1, 3)  # (B, T*h'*w', 2C)
        return pooled_state(state, MERGE).replace(x=x)


class SwinBlock(nn.Module):
    """One Video Swin block: (patch merging, at a stage's start), window attention, MLP.

    `inner` is a reducer slot between the attention and the MLP, as in `layers.Block`; `record` is always
    empty (`Swin3D.can_record` is False)."""

    def __init__(
        self,
        *,
        dim: int,
        heads: int,
        mlp_dim: int,
        window: Grid,
        shift: Grid,
        merge_from: int | None,
        qkv_bias: bool = True,
        eps: float = 1e-5,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.downsample = nn.Identity() if merge_from is None else PatchMerging(dim=merge_from, eps=eps)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention(
            dim=dim, heads=heads, window=window, shift=shift, qkv_bias=qkv_bias, attn_drop=attn_drop
        )
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim=dim, hidden=mlp_dim, drop=drop)
        self.drop_path = drop_path(drop_path_rate)
        self.inner: nn.Module = nn.Identity()
        self.record: frozenset[str] = frozenset()
        self.ragged = "packed"  # `VideoBackbone.ragged` sets it; no ragged batch reaches these blocks

    @property
    def merges(self) -> bool:
        return not isinstance(self.downsample, nn.Identity)

    def forward(self, state: TokenState) -> TokenState:
        state = self.downsample(state)
        x = state.x  # (B, N, C)
        y = self.attn(self.norm1(x), frame_grid(state))
        state = self.inner(state.replace(x=x + self.drop_path(y)))
        x = state.x
        return state.replace(x=x + self.drop_path(self.mlp(self.norm2(x))))


class SwinEmbed(nn.Module):
    """Non-overlapping Conv3d patches and a LayerNorm (the released `patch_embed.proj`, `patch_embed.norm`)."""

    def __init__(self, *, channels: int, dim: int, patch: int, tubelet: int, eps: float = 1e-5) -> None:
        super().__init__()
        stride = (tubelet, patch, patch)
        self.proj = nn.Conv3d(channels, dim, stride, stride)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, video: Tensor, grid: Grid) -> TokenState:
        x = self.proj(video.transpose(1, 2))  # (B, C, T, H, W)
        x = self.norm(x.flatten(2).transpose(1, 2))  # (B, T*H*W, C), time-major
        return TokenState.from_grid(x, grid)


class Swin3D(VideoBackbone):
    """Video Swin Transformer; see the module docstring."""

    block_need = ("grid", "shifted-window attention over each frame's grid")
    can_record = False
    no_records_why = "it attends within windows and has no class token"

    def __init__(self, config: BackboneConfig) -> None:
        if config.arch != "swin":
            raise InputError(f"Swin3D builds arch 'swin', got {config.arch!r}")
        super().__init__(config)
        self.embed = SwinEmbed(
            channels=config.channels, dim=config.dim, patch=config.patch, tubelet=config.tubelet,
            eps=config.eps,
        )  # fmt: skip
        depth, ratio = config.depth, config.mlp_dim // config.dim
        window = config.window
        half: Grid = tuple(w // 2 for w in window)  # type: ignore[assignment]
        starts = (0, *config.stages)
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim=config.width(p + 1), heads=config.heads_at(p), mlp_dim=ratio * config.width(p + 1),
                window=window, shift=half if (p - max(s for s in starts if s <= p)) % 2 else (0, 0, 0),
                merge_from=config.width(p) if p in config.stages else None, qkv_bias=config.qkv_bias == "qkv",
                eps=config.eps, drop=config.drop, attn_drop=config.attn_drop,
                drop_path_rate=config.drop_path * p / max(depth - 1, 1),
            )
            for p in range(depth)
        )  # fmt: skip
        # The readout: the final norm on every token, then their mean (not the mean, then a norm).
        self.norm = nn.LayerNorm(config.width(depth), eps=config.eps)
        self.fc_norm = nn.Identity()
        init_weights(self.embed)
        init_weights(self.blocks)
        init_weights(self.head)

    def forward_head(self, state: TokenState) -> Tensor:
        if self.readout_by is not None:
            return super().forward_head(state)
        # NOTE: a plain mean, as released: `size` counts the patches a merged token covers, fewer at an odd
        # side's edge, and weighting by it would move the logits. (No reducer that merges runs on Swin.)
        feat = _mean_tokens(state.replace(x=self.norm(state.x), size=None))  # (B, C)
        return self.head(self.head_drop(feat))

    def layout_after(self, position: int, layout: Layout) -> Layout:
        if not self.blocks[position].merges:
            return layout
        h, w = layout.frame_grid  # `apply` checked the block's need: frames holding grids
        grid = (pooled_side(h, MERGE[0]), pooled_side(w, MERGE[1]))
        return layout._replace(tokens=layout.frames * grid[0] * grid[1], frame_grid=grid)

    def grids(self, grid: Grid | None = None) -> list[Grid]:
        """The (T, h, w) grid of the bare model's tokens before each block and after the last (depth + 1), for
        clips of token grid `grid` (default `config.grid`)."""
        layout, grids = Layout.of_grid(grid or self.config.grid), []
        for p in range(len(self.blocks) + 1):
            grids.append((layout.frames, *layout.frame_grid))
            if p < len(self.blocks):
                layout = self.layout_after(p, layout)
        return grids
