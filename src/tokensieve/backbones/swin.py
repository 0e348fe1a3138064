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

Stages (`config.stages`, Swin-B: blocks 2, 4, 22 start stages 1-3): the patch merging ends a stage's last
block, as the released code ends the stage with it (`layers.{s}.downsample`), so the reducer slot before a
stage's first block holds the merged tokens (where STTS's released "before stage s" selects) and
`layout_leaving` declares the merge. The merge is, for the bookkeeping, MViT's query pooling at stride 2
(`pooled_state`): merged token (i, j) takes the place of token (2i, 2j) and stands for its 2x2 cell.

Plans (need "windows"): every frame's full (or cropped) grid of tokens, so whole-frame selection runs (the kept
slices are windowed as if adjacent, as STTS's released temporal selection does); or such a grid with holes,
which only STA and `random` per frame (its baseline) leave (`Reducer.leaves_holes`; STA's paper, §4.1: "we
compensate for the discarded token with the nearest kept tokens when computing the window attention and
speed up the rest of the process, such as the linear projection"). A slot that leaves holes gets `aux[HOLES]` (`make_holes`): each kept token's cell and,
for every cell, the token standing there (itself, or the nearest kept token of its temporal slice,
`nearest_fill`). The attention runs qkv on the kept tokens, fills every window place from them (the copies'
queries, keys and values are their sources'), attends over whole windows as usual and keeps the kept
tokens' outputs; the projection, the norms and the MLP run on the kept tokens; the merging at the stage's
end fills the holes for good (`fill_holes`) and merges the full grid; a final stage with holes is read out
as the mean of its kept tokens. Other per-token methods are refused at `apply`. What a slot's reducers need
is recorded ahead (`records_ahead`: the merged tokens have met no attention yet): STA's keys are the next
block's key projection of the tokens it is given (`AheadKeys`, named `keys` in GFLOPs).

Input sizes (`any_size`): any clip whose frame count the tubelet and frame sides the patch divide, as the
released model takes them: there are no absolute positions to carry, and the windows pad.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..tokens import KEYS, SOURCE_MAP, TOKEN_AUX, Layout, TokenState
from .base import VideoBackbone, _mean_tokens, init_weights
from .config import BackboneConfig
from .layers import Linear, Mlp, drop_path
from .mvit import frame_grid, pooled_side, pooled_state

__all__ = [
    "HOLES",
    "MASK_VALUE",
    "AheadKeys",
    "Holes",
    "PatchMerging",
    "Swin3D",
    "SwinBlock",
    "SwinEmbed",
    "WindowAttention",
    "fill_holes",
    "make_holes",
    "merge_patches",
    "nearest_fill",
    "relative_position_index",
    "shift_groups",
    "shift_mask",
    "window_and_shift",
    "window_cells",
    "window_partition",
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


class ShiftGroups(NamedTuple):
    """The windows of a shifted grid grouped by their shift mask (`shift_groups`)."""

    order: Tensor
    """(nW,) long: the windows, group after group, each group in raster order."""
    restore: Tensor
    """(nW,) long: the inverse of `order`."""
    bounds: tuple[tuple[int, int], ...]
    """(start, end) of each group in `order`."""
    masks: Tensor
    """(G, V, V) each group's shift mask (`shift_mask` of its windows)."""


def _shift_groups(padded: Grid, window: Grid, shift: Grid, device: torch.device) -> ShiftGroups:
    counts = [n // w for n, w in zip(padded, window, strict=True)]
    cells = list(itertools.product(*(range(n) for n in counts)))  # raster order: the window index
    # A window's mask depends only on whether it is the last along each shifted axis (the regions wrap there).
    kind = [
        tuple(s > 0 and c == n - 1 for c, n, s in zip(cell, counts, shift, strict=True)) for cell in cells
    ]
    order = sorted(range(len(cells)), key=kind.__getitem__)  # stable: raster order inside a group
    starts = [i for i in range(len(order)) if i == 0 or kind[order[i]] != kind[order[i - 1]]]
    bounds = tuple(zip(starts, [*starts[1:], len(order)], strict=True))
    masks = shift_mask(padded, window, shift, device)[[order[a] for a, _ in bounds]]  # (G, V, V)
    index = torch.tensor(order, device=device)
    return ShiftGroups(index, index.argsort(), bounds, masks)


_cached_shift_groups = functools.lru_cache(maxsize=32)(_shift_groups)


def shift_groups(padded: Grid, window: Grid, shift: Grid, device: torch.device) -> ShiftGroups:
    """The windows of a shifted grid in groups that share one shift mask: at most 2^3, by whether a window is
    the last along each shifted axis (Swin-T's stage 0: 8 groups of 1 to 49 windows). Attending group by group,
    each with its own (1, nh, V, V) mask, spares the (nW, nh, V, V) mask of bias plus shift that one call would
    need (236 MB per clip for Swin-T's stage 0). Cached per grid, as `shift_mask`."""
    if torch.compiler.is_compiling():
        return _shift_groups(padded, window, shift, device)
    with torch.inference_mode(False), torch.no_grad():
        return _cached_shift_groups(padded, window, shift, device)


def merge_patches(x: Tensor) -> Tensor:
    """Each frame's 2x2 tokens side by side: (B, T, H, W, C) -> (B, T, ceil(H/2), ceil(W/2), 4C), an odd
    side zero-padded first, in the released order (0,0), (1,0), (0,1), (1,1)."""
    H, W = x.shape[2:4]
    x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # (B, T, H', W', C), even sides
    parts = [x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]]
    return torch.cat(parts, -1)  # (B, T, H'/2, W'/2, 4C)


HOLES = "swin_holes"
"""`aux[HOLES]`: the `Holes` of a state whose frames hold only some cells of their grid (STA on Swin)."""


class Holes(NamedTuple):
    """What Video Swin's blocks need to run on a state with holes: the cells of the full grid each token
    holds and, for every cell, the token standing there (itself, or the nearest kept one), made once when a
    reducer leaves the holes (`make_holes`) and valid until the stage's patch merging fills them for good
    (`fill_holes`); no reducer runs in between (`apply`: only blocks take a layout with holes).

    Attributes:
        grid: (F, h, w), the full grid.
        slot: (B, N) long, each token's cell, f*h*w + i*w + j.
        fill: (B, F*h*w) long, each cell's token: itself if kept, else the kept token of the same frame
            nearest to it (`nearest_fill`).
        full: the state before the holes were made, for its bookkeeping (positions, sizes, source map); its
            `x` is stale.
    """

    grid: Grid
    slot: Tensor
    fill: Tensor
    full: TokenState


def nearest_fill(slot: Tensor, grid: Grid) -> Tensor:
    """For every cell of `grid`, the token standing there: the token holding it, or else the token of the
    same frame nearest to it (Euclidean distance over (row, column); among equally near ones the first in
    raster order). STA on Video Swin's "dropped positions are filled with the nearest kept tokens".

    Args:
        slot: (B, N) long cells of the tokens, the same number in each of the F frames, frame by frame.
        grid: (F, h, w).

    Returns:
        (B, F*h*w) long indices into the tokens.
    """
    B, N = slot.shape
    F_, h, w = grid
    m, cells = N // F_, h * w
    local, order = (slot.view(B, F_, m) % cells).sort(-1)  # (B, F, m) each frame's cells in raster order
    token = order + torch.arange(F_, device=slot.device).view(1, F_, 1) * m  # (B, F, m) their tokens
    filled = torch.zeros(B, F_, cells, dtype=slot.dtype, device=slot.device)
    held = filled.scatter(2, local, 1).bool()  # (B, F, hw)
    holes = held.to(torch.int8).argsort(dim=-1, stable=True)[
        ..., : cells - m
    ]  # (B, F, hw - m) the empty cells
    row, col = local // w, local % w  # (B, F, m)
    # Clip by clip: the (holes x kept) distances of one clip are small (Swin-B at r=320: 16 x 320 x 464).
    nearest = torch.stack(
        [
            (
                (holes[b, ..., None] // w - row[b, :, None]) ** 2
                + (holes[b, ..., None] % w - col[b, :, None]) ** 2
            ).argmin(-1)  # (F, hw - m): the first of the nearest, kept cells being in raster order
            for b in range(B)
        ]
    )  # (B, F, hw - m)
    filled = filled.scatter(2, local, token).scatter(2, holes, token.gather(2, nearest))
    return filled.view(B, F_ * cells)


def make_holes(full: TokenState, state: TokenState) -> Holes:
    """The `Holes` of `state`, which kept some cells of every frame of `full` (a full grid: its tokens in
    raster order, so their positions ascend and each kept token's cell is where its position falls)."""
    F_, h, w = frame_grid(full)
    slot = torch.searchsorted(full.pos.contiguous(), state.pos.contiguous())  # (B, N)
    bookkeeping = full.without_records().replace(x=full.x.new_empty(*full.x.shape[:2], 0))  # x is not kept
    return Holes((F_, h, w), slot, nearest_fill(slot, (F_, h, w)), bookkeeping)


def fill_holes(state: TokenState) -> TokenState:
    """The full grid again, each hole holding a copy of its nearest kept token (`Holes.fill`); positions and
    every per-token entry as before the holes were made, other `aux` entries (losses, statistics) as now."""
    holes: Holes = state.aux[HOLES]
    C = state.x.shape[-1]
    x = state.x.gather(1, holes.fill.unsqueeze(-1).expand(-1, -1, C))  # (B, F*h*w, C)
    per_token = {k for k in state.aux if k in TOKEN_AUX or k in (SOURCE_MAP, HOLES)}
    aux = {k: v for k, v in state.aux.items() if k not in per_token}
    aux.update({k: v for k, v in holes.full.aux.items() if k in TOKEN_AUX or k == SOURCE_MAP})
    return holes.full.replace(x=x, aux=aux)


def window_cells(
    padded: Grid, window: Grid, shift: Grid, grid: Grid, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Where windows take their tokens from, for the path with holes: ((nW*V,) the cell of `grid` each window
    place holds, F*h*w (one past the last cell) for padding; (F*h*w,) the window place of each cell). The
    windows of a shifted grid come in `shift_groups` order. Cached per grid, as `shift_mask`."""
    if torch.compiler.is_compiling():
        return _window_cells(padded, window, shift, grid, device)
    with torch.inference_mode(False), torch.no_grad():
        return _cached_window_cells(padded, window, shift, grid, device)


def _window_cells(
    padded: Grid, window: Grid, shift: Grid, grid: Grid, device: torch.device
) -> tuple[Tensor, Tensor]:
    cells = torch.arange(math.prod(padded), device=device).view(1, *padded, 1)
    if any(shift):
        cells = torch.roll(cells, tuple(-s for s in shift), (1, 2, 3))
    placed = window_partition(cells, window)[0, ..., 0]  # (nW, V) padded cells in window order
    if any(shift):  # the windows group after group, as the attention takes them (`shift_groups`)
        placed = placed[_shift_groups(padded, window, shift, device).order]
    placed = placed.flatten()  # (nW*V,)
    T, h, w = grid
    t, i, j = placed // (padded[1] * padded[2]), placed // padded[2] % padded[1], placed % padded[2]
    real = (t < T) & (i < h) & (j < w)
    source = torch.where(real, t * h * w + i * w + j, T * h * w)  # (nW*V,)
    # Every padding place writes to one spare entry past the cells (which one wins does not matter).
    place = torch.empty(T * h * w + 1, dtype=torch.long, device=device)
    place = place.scatter(0, source, torch.arange(placed.numel(), device=device))[: T * h * w]
    return source, place


_cached_window_cells = functools.lru_cache(maxsize=32)(_window_cells)


class WindowAttention(nn.Module):
    """Multi-head attention inside (shifted) 3D windows with a learned relative position bias, through SDPA
    (the bias, plus a group of windows' shift mask, as one additive mask). Names are the released ones
    (`qkv`, `proj`, `relative_position_bias_table`); the index is rebuilt, not loaded
    (`relative_position_index`)."""

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

    def keys(self, x: Tensor) -> Tensor:
        """(B, N, hd) the keys of normalised tokens `x` (B, N, C), averaged over the heads (`tokens.KEYS`)."""
        B, N, C = x.shape
        k = F.linear(
            x, self.qkv.weight[C : 2 * C], None if self.qkv.bias is None else self.qkv.bias[C : 2 * C]
        )
        return k.view(B, N, self.heads, self.head_dim).mean(2)

    def forward(self, x: Tensor, grid: Grid, holes: Holes | None = None) -> Tensor:
        """
        Args:
            x: (B, N, C) normalised tokens, time-major: every cell of `grid`, or (with `holes`) some of them.
            grid: (T, h, w) of the tokens (with `holes`, `holes.grid`).
            holes: None, or the cells the tokens hold and the token standing at each cell (`Holes`): the
                windows hold that token there (its query, key and value), and only the tokens' own places
                are read back; qkv and the projection run on the N tokens, the attention on whole windows
                (STA on Video Swin, its paper's §4.1).

        Returns:
            (B, N, C).
        """
        B, N, C = x.shape
        window, shift = window_and_shift(grid, self.window, self.shift)
        padded: Grid = tuple(n + -n % w for n, w in zip(grid, window, strict=True))  # type: ignore[assignment]
        shifted = any(shift)
        # Every window place's row, by index (`window_cells`): the zero-padding, the cyclic shift, the cut into
        # windows and their grouping (`shift_groups`) in one copy; N stands for a padding token.
        source, place = window_cells(padded, window, shift, grid, x.device)
        V = math.prod(window)
        nW = source.numel() // V
        if holes is None:
            # As released: the padded windows of the normalised tokens, then qkv (padding included).
            rows = torch.cat([x, x.new_zeros(B, 1, C)], 1) if padded != grid else x  # (B, N [+ 1], C)
            windows = self.qkv(rows.index_select(1, source).view(B, nW, V, C))  # (B, nW, V, 3C)
        else:
            # qkv of the tokens and of one zero (padding) token, then each place's (its filler's) by index.
            qkv = self.qkv(torch.cat([x, x.new_zeros(B, 1, C)], 1)).flatten(0, 1)  # (B*(N + 1), 3C)
            index = torch.cat([holes.fill, holes.fill.new_full((B, 1), N)], 1)[:, source]  # (B, nW*V)
            index = index + torch.arange(B, device=x.device).unsqueeze(1) * (N + 1)  # rows of qkv
            windows = qkv.index_select(0, index.flatten()).view(B, nW, V, 3 * C)
        q, k, v = windows.view(B, nW, V, 3, self.heads, self.head_dim).permute(
            3, 0, 1, 4, 2, 5
        )  # (B, nW, nh, V, hd)
        mask = self.bias(V).to(q.dtype)[None]  # (1, nh, V, V): a 3-D mask sends SDPA to its math path on CPU
        drop = self.attn_drop if self.training else 0.0
        if shifted:  # windows in groups sharing a shift mask: SDPA clip by clip, group by group
            groups = shift_groups(padded, window, shift, x.device)
            masks = mask + groups.masks.to(q.dtype)[:, None]  # (G, nh, V, V)
            # Why a loop over the clips: with 5-D inputs (B, nW, ...) SDPA takes its math path on CPU, 5x
            # slower than its fused kernel on 4-D ones (Swin-T stage 0, 2 clips: 600 against 122 ms).
            out = q.new_empty(B, nW, V, self.heads, self.head_dim)  # each result written once, in place
            for b in range(B):
                for g, (a, e) in enumerate(groups.bounds):
                    part = F.scaled_dot_product_attention(
                        q[b, a:e], k[b, a:e], v[b, a:e], attn_mask=masks[g : g + 1], dropout_p=drop
                    )  # (n, nh, V, hd)
                    out[b, a:e] = part.transpose(1, 2)
            out = out.view(B, nW, V, C)  # windows in group order
        else:  # the same mask in every window: one batch of B*nW windows
            q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # (B*nW, nh, V, hd)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)  # (B*nW, nh, V, hd)
            out = out.view(B, nW, self.heads, V, self.head_dim).transpose(2, 3).reshape(B, nW, V, C)
        out = out.view(B, nW * V, C)
        if holes is not None:  # each token's own place (the copies' outputs are dropped), then proj
            own = place[holes.slot] + torch.arange(B, device=x.device).unsqueeze(1) * (nW * V)  # (B, N)
            return self.proj(out.flatten(0, 1).index_select(0, own.flatten()).view(B, N, C))
        if padded != grid:
            # The padding places' outputs are cropped after the projection; zero them first. (They are made
            # of keys and values that are the qkv bias: with zero biases, as in a model not yet trained,
            # they come out denormal, e^-100 weights of the real tokens, which slows the projection's GEMM
            # 14x on CPU: Swin-T's stage 2 at 10 of 16 slices.)
            out = out.masked_fill((source == N).view(1, -1, 1), 0.0)
        # proj on every place, padding included, as released; then each cell's own place (cropped, unshifted)
        return self.proj(out).index_select(1, place)  # (B, N, C)


class PatchMerging(nn.Module):
    """2x2 tokens of each frame -> one of twice the width (`merge_patches`, LayerNorm(4C), Linear(4C, 2C)
    without bias: the released `downsample.norm` and `downsample.reduction`)."""

    def __init__(self, *, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, state: TokenState) -> TokenState:
        if HOLES in state.aux:  # STA's holes: each filled with its nearest kept token, then merged as usual
            state = fill_holes(state)
        T, h, w = frame_grid(state)
        B, _, C = state.x.shape
        merged = merge_patches(state.x.view(B, T, h, w, C))  # (B, T, h', w', 4C)
        x = self.reduction(self.norm(merged)).flatten(1, 3)  # (B, T*h'*w', 2C)
        return pooled_state(state, MERGE).replace(x=x)


class SwinBlock(nn.Module):
    """One Video Swin block: window attention, MLP, (patch merging, at a stage's end: the released
    `layers.{s}.downsample`).

    `inner` is a reducer slot between the attention and the MLP, as in `layers.Block`. `record` holds what
    the reducers of the slot before this block need (`Swin3D.records_ahead`): `Swin3D._slot` records it with
    this block's key projection before they run. On a state with holes (`aux[HOLES]`: STA) the attention
    fills them (`WindowAttention`), the rest runs on the kept tokens, and the merging fills them for good."""

    def __init__(
        self,
        *,
        dim: int,
        heads: int,
        mlp_dim: int,
        window: Grid,
        shift: Grid,
        merge_to: int | None,
        qkv_bias: bool = True,
        eps: float = 1e-5,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.downsample = nn.Identity() if merge_to is None else PatchMerging(dim=dim, eps=eps)
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
        x = state.x  # (B, N, C)
        holes: Holes | None = state.aux.get(HOLES)
        grid = frame_grid(state) if holes is None else holes.grid
        y = self.attn(self.norm1(x), grid, holes)
        state = self.inner(state.replace(x=x + self.drop_path(y)))
        x = state.x
        state = state.replace(x=x + self.drop_path(self.mlp(self.norm2(x))))
        return self.downsample(state)


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


class AheadKeys(nn.Module):
    """Keys recorded ahead (`Swin3D.records_ahead`): block `p`'s key projection of the tokens its slot is
    given, averaged over the heads. A module of its own (no parameters) so that GFLOPs name it (`keys`)."""

    def forward(self, block: SwinBlock, x: Tensor) -> Tensor:
        return block.attn.keys(block.norm1(x))


class Swin3D(VideoBackbone):
    """Video Swin Transformer; see the module docstring."""

    block_need = ("windows", "shifted-window attention over each frame's grid")
    records = frozenset({KEYS})
    no_records_why = "it attends within windows and has no class token"
    records_ahead = True

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
                dim=config.width(p), heads=config.heads_at(p), mlp_dim=ratio * config.width(p),
                window=window, shift=half if (p - max(s for s in starts if s <= p)) % 2 else (0, 0, 0),
                merge_to=config.width(p + 1) if p + 1 in config.stages else None, qkv_bias=config.qkv_bias == "qkv",
                eps=config.eps, drop=config.drop, attn_drop=config.attn_drop,
                drop_path_rate=config.drop_path * p / max(depth - 1, 1),
            )
            for p in range(depth)
        )  # fmt: skip
        self.keys = AheadKeys()
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
        # Under STA's holes, the mean of the kept tokens (the copies are discarded).
        feat = _mean_tokens(state.replace(x=self.norm(state.x), size=None))  # (B, C)
        return self.head(self.head_drop(feat))

    def layout_leaving(self, position: int, layout: Layout) -> Layout:
        grid = layout.frame_grid or layout.holes
        if (
            not self.blocks[position].merges or grid is None
        ):  # (a reducer inside left none: the next block says)
            return layout
        h, w = grid
        grid = (pooled_side(h, MERGE[0]), pooled_side(w, MERGE[1]))
        return layout._replace(tokens=layout.frames * grid[0] * grid[1], frame_grid=grid, holes=None)

    def _slot(self, p: int, state: TokenState) -> TokenState:
        """Records ahead what the slot's reducers need (STA's keys: this block's key projection of the tokens
        it is about to take), runs them, and makes the holes they leave (`make_holes`)."""
        given = state
        if p < len(self.blocks) and KEYS in self.blocks[p].record:
            state = state.with_aux(**{KEYS: self.keys(self.blocks[p], state.x)})
        state = self.reducers[p](state)
        if state.frame_grid is not None or given.frame_grid is None:  # a full grid, or holes made before
            return state
        # `apply` let only cells of every frame go (STA, random per frame): holes.
        return state.with_aux(**{HOLES: make_holes(given, state)})

    def grids(self, grid: Grid | None = None) -> list[Grid]:
        """The (T, h, w) grid of the bare model's tokens before each block and after the last (depth + 1), for
        clips of token grid `grid` (default `config.grid`)."""
        layout, grids = Layout.of_grid(grid or self.config.grid), []
        for p in range(len(self.blocks) + 1):
            grids.append((layout.frames, *layout.frame_grid))
            if p < len(self.blocks):
                layout = self.layout_leaving(p, layout)
        return grids
