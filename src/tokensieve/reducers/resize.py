"""`resize`: run the model on smaller frames, the baseline a user tries before any token method.

No paper proposes it as a method; studies of token reduction keep finding it hard to beat at the same
cost (VTC-Bench on video LLMs; Pollard & Wray's random drop on video ViTs), so the sweep reads every
method's verdict against it too. `resize:keep=0.5` resizes each frame (antialiased bilinear, in torch)
to the size, in whole patches, whose token count is closest to `keep` of the model's, and runs the model
there with its positions interpolated (docs/design.md, "Input sizes"). Every frame is kept; the
temporal counterpart, fewer frames, is `uniform` (whole slices at equal intervals, which keep their
time positions).

The size: the token grid H x W (patches per side) becomes h x w with each side within one patch of the
aspect-preserving H sqrt(keep) x W sqrt(keep), h in {floor, ceil} of it and w likewise, choosing the
count h w closest to keep H W (ties: the shape closer to the original aspect, then the larger, then the
taller). On 16x224 (14 x 14 patches) keep=0.5 gives 10 x 10 patches, 160 x 160 pixels, 100 tokens per
frame of 196. `keep` counts tokens, as every method's does; the GFLOPs fall faster (attention is
quadratic in the tokens): 0.447 of videomae-b's at keep=0.5 (docs/methods.md).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..tokens import Layout, TokenState
from .base import Reducer, Site, check_keep, register

__all__ = ["Resize", "resized_sides"]


def resized_sides(H: int, W: int, keep: float) -> tuple[int, int]:
    """The token grid (h, w) `resize:keep=keep` runs a grid of H x W patches at (see the module)."""
    check_keep(keep, "resize")
    target = keep * H * W
    root = math.sqrt(keep)
    heights = sorted({max(1, math.floor(H * root)), min(H, math.ceil(H * root))})
    widths = sorted({max(1, math.floor(W * root)), min(W, math.ceil(W * root))})

    best, chosen = None, (H, W)
    for h in heights:
        for w in widths:  # (a plain loop: torch.compile traces it)
            rank = (
                abs(h * w - target),
                abs(math.log(h * W / (w * H))),
                -h * w,
                -h,
            )  # ties: the larger, taller
            if best is None or rank < best:
                best, chosen = rank, (h, w)
    return chosen


@register("resize")
class Resize(Reducer):
    """Resizes the frames so that the model makes about `keep` of its tokens."""

    main_settings = ("resize:keep=0.5",)
    budget = "keep"
    resizes_input = True

    def __init__(self, *, keep: float = 0.5, mode: Literal["bilinear", "bicubic"] = "bilinear") -> None:
        super().__init__()
        check_keep(keep, self.name)
        if mode not in ("bilinear", "bicubic"):
            raise InputError(f"resize: mode must be 'bilinear' or 'bicubic', got {mode!r}")
        self.keep, self.mode = keep, mode

    def positions(self, depth: int) -> tuple[int, ...]:
        return (0,)

    def input_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        T, H, W = grid
        return (T, *resized_sides(H, W, self.keep))

    def count(self, layout: Layout, site: Site) -> Layout:
        return Layout.of_grid(self.input_grid(site.grid))

    def resize_clip(self, video: Tensor, patch: int) -> Tensor:
        """`video` (B, T, C, H, W) with every frame resized to the sides `keep` gives (`patch` pixels per
        token side); the frame count is left alone."""
        B, T, C, H, W = video.shape
        h, w = resized_sides(H // patch, W // patch, self.keep)
        if (h * patch, w * patch) == (H, W):
            return video
        frames = video.flatten(0, 1)  # (B*T, C, H, W)
        if frames.dtype not in (
            torch.float32,
            torch.float64,
        ):  # no antialiased kernel in half precision on CPU
            frames = frames.float()
        frames = F.interpolate(
            frames, size=(h * patch, w * patch), mode=self.mode, antialias=True, align_corners=False
        )
        return frames.to(video.dtype).view(B, T, C, h * patch, w * patch)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        return state  # the work is done on the clip, before the patch embedding (`resize_clip`)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, mode={self.mode}"
