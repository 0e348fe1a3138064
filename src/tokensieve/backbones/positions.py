"""Positions at any input size: how each backbone's position table reaches a token grid other than the
one it was built for, and the cache that keeps the result out of the hot path.

Each rule is the one the backbone's original implementation uses (docs/design.md, "Input sizes"):

- VideoMAE's fixed sin-cos table is made again for the new token count (`sinusoid_table(T*H*W, C)`, over
  the flattened time-major index): what VideoMAE's fine-tuning code does, since it builds the table
  from the input size it is given (`get_sinusoid_encoding_table(num_patches, ...)` in
  MCG-NJU/VideoMAE's modeling_finetune.py). `videovit.TubeletEmbed` does that; nothing is resized here.
- TimeSformer (transformers' `TimesformerEmbeddings`, as the released TimeSformer): the spatial table
  resized over its H x W grid with "nearest", the class token's slot kept apart; the time embedding
  resized with "nearest".
- ViViT (transformers' `VivitEmbeddings.interpolate_pos_encoding`): every temporal slice's spatial table
  bicubic (align_corners=False, no antialiasing), the class token's slot kept apart. Over time, linear
  with the first and last slices kept at the ends: Scenic's rule for ViViT's temporal positions
  (`interpolate_1d_positional_embeddings`, scipy's zoom of order 1).
- Image ViTs and class-token joint models ("vit-cls"): the spatial table as timm's
  `resample_abs_pos_embed` resizes it (bicubic, no antialiasing, computed in float32 at least, the class
  slot apart); their time embedding, TimeSformer's (HaltingVT's backbone is one), with "nearest".

Resizing runs once per grid: `PositionCache.cached` keeps the result until the parameters it came from
change (another tensor, or the same one written in place: its version counter, as `layers.Linear` keeps
its packed weight), never in a state dict, never copied or pickled.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CACHE_SIZE", "PositionCache", "SpaceMode", "TimeMode", "resize_space", "resize_time"]

SpaceMode = Literal["nearest", "bicubic"]
TimeMode = Literal["nearest", "linear"]

CACHE_SIZE = 8
"""Grids whose positions one embedding keeps at a time (the oldest goes first): a run alternates
between a few input sizes at most (the model's own needs no entry)."""

R = TypeVar("R")


def _working(table: Tensor) -> Tensor:
    """`table` in a dtype the interpolation kernels take everywhere: float32 at least (timm's rule)."""
    return table if table.dtype in (torch.float32, torch.float64) else table.float()


def resize_space(table: Tensor, size: tuple[int, int], mode: SpaceMode) -> Tensor:
    """Resize every temporal slice of a position table over its spatial grid.

    Args:
        table: (T, H, W, C) positions.
        size: (H', W') the new grid.
        mode: "nearest" (TimeSformer's) or "bicubic" (ViViT's and timm's: align_corners=False, no
            antialiasing).

    Returns:
        (T, H', W', C) in `table`'s dtype.
    """
    x = _working(table).permute(0, 3, 1, 2)  # (T, C, H, W)
    if mode == "bicubic":
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)
    else:
        x = F.interpolate(x, size=size, mode="nearest")
    return x.permute(0, 2, 3, 1).to(table.dtype)  # (T, H', W', C)


def resize_time(table: Tensor, frames: int, mode: TimeMode) -> Tensor:
    """Resize a position table over time.

    Args:
        table: (T, M, C) positions: M per temporal slice.
        frames: T', the new number of temporal slices.
        mode: "nearest" (TimeSformer's time embedding) or "linear" with the ends aligned (ViViT: Scenic's
            zoom of order 1, which maps the first and last slices onto the first and last).

    Returns:
        (T', M, C) in `table`'s dtype.
    """
    x = _working(table).permute(1, 2, 0)  # (M, C, T)
    if mode == "linear":
        x = F.interpolate(x, size=frames, mode="linear", align_corners=True)
    else:
        x = F.interpolate(x, size=frames, mode="nearest")
    return x.permute(2, 0, 1).to(table.dtype)  # (T', M, C)


class PositionCache(nn.Module):
    """Base of the patch embeddings: positions resized for another grid are made once and kept.

    The memo lives in the module's `__dict__` (not a buffer: never in a state dict), keyed by what the
    caller says (the grid, the table's dtype and device) and stamped with the (identity, data pointer,
    version) of every tensor it was made from: a parameter replaced, moved, converted, loaded into
    (`load_state_dict` copies in place) or stepped by an optimiser makes it again. Not used while
    autograd records a source (training at another size differentiates through the resizing) or while
    `torch.compile` traces (the graph computes it; frozen weights fold it into a constant)."""

    def cached(self, key: Hashable, sources: Sequence[Tensor], make: Callable[[], R]) -> R:
        """`make()`, from the memo when `sources` have not changed since it was stored under `key`."""
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(s.requires_grad for s in sources)
        ):
            return make()
        stamp = tuple((id(s), s.data_ptr(), s._version) for s in sources)
        memo = self.__dict__.setdefault("_positions", {})  # key -> (stamp, value)
        hit = memo.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        # A plain tensor even inside `inference_mode`: the memo may serve a later forward outside it.
        with torch.inference_mode(False), torch.no_grad():
            value = make()
        memo.pop(key, None)
        if len(memo) >= CACHE_SIZE:
            memo.pop(next(iter(memo)))  # the oldest
        memo[key] = (stamp, value)
        return value

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k != "_positions"}  # a copy makes its own
