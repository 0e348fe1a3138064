"""Spatial processing of clips in plain torch: layout, resizing, crops, normalisation, flips.

Clips are (T, C, H, W) float tensors in [0, 1] after `to_float`; every frame of a clip gets the same
geometry (one crop box, one flip), so the tokens of a clip stay aligned over time. The test-time
pipeline of VideoMAE and STA is

    to_float -> resize_short(size) -> crops(size, num=1 or 3) -> normalize(mean, std),

and training uses `random_resized_crop` and `hflip` with an explicit `torch.Generator`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError

__all__ = ["crops", "hflip", "normalize", "random_resized_crop", "resize_short", "to_float"]


def _check_clip(video: Tensor, what: str) -> None:
    if video.dim() != 4:
        raise InputError(f"{what} expects a (T, C, H, W) clip, got shape {tuple(video.shape)}")


def _as_float(video: Tensor) -> Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; floating tensors pass unchanged."""
    if video.dtype == torch.uint8:
        return video.float() / 255
    if not video.is_floating_point():
        raise InputError(f"expected a uint8 or floating clip, got {video.dtype}")
    return video


def to_float(frames: Tensor) -> Tensor:
    """Decoded frames to the clip layout.

    Args:
        frames: (T, H, W, 3) uint8, as `Video.read` returns them.

    Returns:
        (T, 3, H, W) float32 in [0, 1].
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise InputError(
            f"to_float expects (T, H, W, 3) uint8 frames, got {frames.dtype} of shape {tuple(frames.shape)}"
        )
    return frames.permute(0, 3, 1, 2).float() / 255  # (T, 3, H, W)


def _resize(video: Tensor, size: tuple[int, int]) -> Tensor:
    """(T, C, H, W) -> (T, C, *size), bilinear with antialiasing (like PIL and torchvision v2)."""
    if tuple(video.shape[-2:]) == size:
        return video
    return F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)


def resize_short(video: Tensor, size: int) -> Tensor:
    """Resizes every frame so that its short side is `size`, keeping the aspect ratio.

    The long side becomes round(long * size / short). Bilinear with antialiasing.

    Args:
        video: (T, C, H, W) float, or uint8 (converted to float in [0, 1] first, as `to_float`).
        size: the short side after resizing.

    Returns:
        (T, C, H', W') float, min(H', W') = size.
    """
    _check_clip(video, "resize_short")
    if size < 1:
        raise InputError(f"size must be >= 1, got {size}")
    video = _as_float(video)
    H, W = video.shape[-2:]
    short, long = min(H, W), max(H, W)
    long = round(long * size / short)
    return _resize(video, (size, long) if H <= W else (long, size))  # (T, C, H', W')


def _crop(video: Tensor, top: int, left: int, height: int, width: int) -> Tensor:
    return video[..., top : top + height, left : left + width]  # (T, C, height, width)


def crops(video: Tensor, size: int, num: int = 1) -> Tensor:
    """Square crops for testing: the centre crop, or three crops along the long side.

    num=1 takes offsets ((H - size) // 2, (W - size) // 2). num=3 (VideoMAE's 3-crop test) takes
    the start, centre and end of the long side (left, centre, right for landscape and square frames;
    top, centre, bottom for portrait), centred on the short side, so the three cover the long side.

    Args:
        video: (T, C, H, W).
        size: crop side.
        num: 1 or 3.

    Returns:
        (num, T, C, size, size).
    """
    _check_clip(video, "crops")
    H, W = video.shape[-2:]
    if H < size or W < size:
        raise InputError(f"frames of {H}x{W} (HxW) are smaller than the crop size {size}")
    top, left = (H - size) // 2, (W - size) // 2
    if num == 1:
        return _crop(video, top, left, size, size).unsqueeze(0)  # (1, T, C, size, size)
    if num != 3:
        raise InputError(f"num must be 1 (centre crop) or 3 (three crops along the long side), got {num}")
    if H > W:
        boxes = [(t, left) for t in (0, top, H - size)]
    else:
        boxes = [(top, x) for x in (0, left, W - size)]
    return torch.stack([_crop(video, t, x, size, size) for t, x in boxes])  # (3, T, C, size, size)


def normalize(video: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel.

    Args:
        video: (..., C, H, W) float, channels at dim -3.
        mean: C means.
        std: C standard deviations (non-zero).

    Returns:
        (..., C, H, W) normalised, same dtype.
    """
    if video.dim() < 3 or not video.is_floating_point():
        raise InputError(
            f"normalize expects a floating (..., C, H, W) tensor, got {video.dtype} of shape "
            f"{tuple(video.shape)}"
        )
    C = video.shape[-3]
    if len(mean) != C or len(std) != C:
        raise InputError(f"expected {C} means and stds (channels at dim -3), got {len(mean)} and {len(std)}")
    if any(s == 0 for s in std):
        raise InputError(f"std must be non-zero, got {list(std)}")
    m = torch.tensor(mean, dtype=video.dtype, device=video.device).view(C, 1, 1)  # (C, 1, 1)
    s = torch.tensor(std, dtype=video.dtype, device=video.device).view(C, 1, 1)  # (C, 1, 1)
    return (video - m) / s


def _random_box(
    H: int,
    W: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """Inception-style box (top, left, height, width): area fraction in `scale`, log-uniform aspect
    ratio (w / h) in `ratio`; 10 attempts, then the centre crop clamped to `ratio`."""
    area = H * W
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + u[1] * (log_hi - log_lo))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(H - h + 1, (1,), generator=generator))
            left = int(torch.randint(W - w + 1, (1,), generator=generator))
            return top, left, h, w
    if W / H < ratio[0]:
        w, h = W, round(W / ratio[0])
    elif W / H > ratio[1]:
        h, w = H, round(H * ratio[1])
    else:
        h, w = H, W
    return (H - h) // 2, (W - w) // 2, h, w


def random_resized_crop(
    video: Tensor,
    size: int,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator,
) -> Tensor:
    """One random box for the whole clip (Inception / torchvision `RandomResizedCrop`), resized to
    `size` x `size` with bilinear antialiasing.

    Args:
        video: (T, C, H, W) float, or uint8 (converted to float in [0, 1] first).
        size: output side.
        scale: range of the box area as a fraction of the frame area.
        ratio: range of the box aspect ratio (width / height), sampled log-uniformly.
        generator: source of the box.

    Returns:
        (T, C, size, size) float.
    """
    _check_clip(video, "random_resized_crop")
    if not 0 < scale[0] <= scale[1]:
        raise InputError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise InputError(f"ratio must be (low, high) with 0 < low <= high, got {ratio}")
    video = _as_float(video)
    H, W = video.shape[-2:]
    top, left, h, w = _random_box(H, W, scale=scale, ratio=ratio, generator=generator)
    return _resize(_crop(video, top, left, h, w), (size, size))  # (T, C, size, size)


def hflip(video: Tensor) -> Tensor:
    """Mirrors every frame left to right.

    Args:
        video: (..., H, W).

    Returns:
        (..., H, W) flipped along W.
    """
    return video.flip(-1)
