"""Which frames of a video make a clip: dense (stride) clips and uniform segments.

Two conventions cover the backbones we evaluate:

- Dense clips (VideoMAE, STA on Kinetics: 16 frames every 4): `frames` indices `stride` apart, a
  clip spanning S = (frames - 1) * stride + 1 frames. Testing takes K temporal views whose starts
  spread uniformly over the video, round(linspace(0, num_frames - S, K)); one view takes the centre
  start (num_frames - S) // 2. Training takes a uniform random start.
  A video with fewer than K distinct starts (num_frames < S + K - 1; 16-frame videos for 16 x 4
  clips) spreads the K starts over the frames it has, round(linspace(0, num_frames - 1, K)).
- Uniform segments (TSN; Something-Something, HaltingVT): [0, num_frames) split into `segments`
  equal segments and one frame taken from each. Testing takes, for view v of K, the frame at
  fraction (v + 0.5) / K of every segment (K = 1: segment centres); training a random frame in each.

Indices past the end of a video (a clip longer than the video, or a late start of a short video)
are mapped with `short`: "loop" wraps around (i % num_frames), "repeat" repeats the last frame.
A segment shorter than a frame (num_frames < segments * K) repeats frames. So any video of at
least one frame gives any number of views: a short video is never an error.
All samplers return long tensors of indices in [0, num_frames).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["Short", "clip_indices", "random_clip_indices", "random_segment_indices", "segment_indices"]

Short = Literal["loop", "repeat"]
"""What a clip longer than its video takes past the end: wrap around, or repeat the last frame."""


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")


def _check_short(short: str) -> None:
    if short not in get_args(Short):
        raise InputError(f"short must be one of {get_args(Short)}, got {short!r}")


def _clip(starts: Tensor, num_frames: int, *, frames: int, stride: int, short: Short) -> Tensor:
    """(K,) starts -> (K, frames) indices, those past the end mapped by `short`."""
    idx = starts[:, None] + torch.arange(frames) * stride  # (K, frames)
    if short == "loop":
        return idx % num_frames
    return idx.clamp(max=num_frames - 1)


def clip_indices(
    num_frames: int, *, frames: int, stride: int, views: int = 1, short: Short = "loop"
) -> Tensor:
    """Dense clips of `frames` frames every `stride`, for `views` temporal views (testing).

    Args:
        num_frames: frames in the video.
        frames: frames per clip.
        stride: distance between consecutive frames of a clip.
        views: temporal views; their starts spread uniformly (rounded half to even) from the first
            to the last possible start, or over all the frames when the video has fewer than
            `views` possible starts; one view takes the centre start (0 for a short video).
        short: what indices past the end take: "loop" (wrap around) or "repeat" (the last frame).

    Returns:
        (views, frames) long indices.

    Raises:
        InputError: a count is < 1, or an unknown `short`.
    """
    _check_positive(num_frames=num_frames, frames=frames, stride=stride, views=views)
    _check_short(short)
    span = (frames - 1) * stride + 1
    if views == 1:
        starts = torch.tensor([max(num_frames - span, 0) // 2])
    else:
        # The last start is the last one that keeps a clip inside the video, unless that leaves
        # fewer than `views` distinct starts: then the starts spread over every frame and the
        # clips run past the end (mapped by `short`), rather than repeating one view or failing.
        last = num_frames - span if num_frames - span + 1 >= views else num_frames - 1
        # float64 is exact on these integers; torch.round rounds half to even, like Python's round.
        starts = torch.linspace(0, last, views, dtype=torch.float64).round().long()  # (K,)
    return _clip(starts, num_frames, frames=frames, stride=stride, short=short)


def segment_indices(num_frames: int, *, segments: int, views: int = 1) -> Tensor:
    """One frame from each of `segments` equal segments, for `views` views (testing).

    View v takes, in segment k, floor((k + (v + 0.5) / views) * num_frames / segments), computed in
    integers. A video with fewer frames than segments * views repeats frames (views may then
    share frames).

    Args:
        num_frames: frames in the video.
        segments: segments, i.e. frames per clip.
        views: views, each shifted within every segment.

    Returns:
        (views, segments) long indices.

    Raises:
        InputError: a count is < 1.
    """
    _check_positive(num_frames=num_frames, segments=segments, views=views)
    k = torch.arange(segments)
    v = torch.arange(views)
    # (k + (v + 0.5) / views) * N / S = (2 * (k * views + v) + 1) * N / (2 * views * S)
    num = (2 * (k[None, :] * views + v[:, None]) + 1) * num_frames  # (views, segments)
    return num // (2 * views * segments)


def random_clip_indices(
    num_frames: int, *, frames: int, stride: int, generator: torch.Generator, short: Short = "loop"
) -> Tensor:
    """A dense clip at a uniform random start (training).

    Args:
        num_frames: frames in the video.
        frames: frames per clip.
        stride: distance between consecutive frames of a clip.
        generator: source of the random start.
        short: for a video shorter than the clip span (start 0): "loop" or "repeat".

    Returns:
        (frames,) long indices.
    """
    _check_positive(num_frames=num_frames, frames=frames, stride=stride)
    _check_short(short)
    span = (frames - 1) * stride + 1
    starts = torch.randint(max(num_frames - span, 0) + 1, (1,), generator=generator)  # (1,)
    return _clip(starts, num_frames, frames=frames, stride=stride, short=short)[0]


def random_segment_indices(num_frames: int, *, segments: int, generator: torch.Generator) -> Tensor:
    """A uniform random frame in each of `segments` equal segments (TSN training).

    Segment k covers [floor(k * N / S), floor((k + 1) * N / S)); an empty segment (N < S) takes its
    start frame.

    Args:
        num_frames: frames in the video.
        segments: segments, i.e. frames per clip.
        generator: source of the random offsets.

    Returns:
        (segments,) long indices.
    """
    _check_positive(num_frames=num_frames, segments=segments)
    k = torch.arange(segments + 1)
    bounds = k * num_frames // segments  # (S + 1,)
    lo, length = bounds[:-1], (bounds[1:] - bounds[:-1]).clamp(min=1)  # (S,), (S,)
    offset = (torch.rand(segments, generator=generator, dtype=torch.float64) * length).long()  # (S,)
    return lo + offset.clamp(max=length - 1)
