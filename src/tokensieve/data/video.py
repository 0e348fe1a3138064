"""Frame-accurate video decoding with PyAV.

`Video` opens a file once and reads any set of frame indices from it: it seeks to the keyframe at or
before the first frame needed, decodes forward, converts to RGB only the frames asked for and stops
after the last one. A decoded frame's index comes from its presentation timestamp,

    index = round((pts - start_pts) * time_base * fps),

never from a running count, so the frames returned are the frames asked for after any seek.

Container frame counts are estimates (`VideoInfo.frames`) and are not trusted: when a file ends
before a requested index, every index past the last decoded frame gets the last decoded frame (as
PySlowFast's clamping of indices does) and one warning names the file and its real count.
Every failure to read a file (missing, empty, not media, corrupt, no video stream, no frame decoded)
raises `DecodeError`, whose message names the file and the reason, so an evaluation run can record
the video as failed and go on.

Threads: with `threads=True` FFmpeg's frame threading may drop a corrupt packet (typically the cut
last packet of a truncated download) without reporting it, so such a file reads as a shorter video;
single-threaded decoding raises `DecodeError` for it every time.

Not handled: rotation metadata (frames come out as stored) and streams whose frame size changes
midway (frames are scaled to the size the stream declares).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["DecodeError", "Video", "VideoInfo", "read_frames"]

log = logging.getLogger(__name__)


class DecodeError(RuntimeError):
    """A video file cannot be read; the message names the file and the reason."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video stream (before decoding anything).

    Attributes:
        frames: frame count estimate: the stream's count if the container stores one, else
            round(duration * fps). May be wrong; `Video.read` does not rely on it.
        fps: average frame rate.
        width: frame width in pixels.
        height: frame height in pixels.
        duration: seconds, 0.0 if unknown.
    """

    frames: int
    fps: float
    width: int
    height: int
    duration: float


class Video:
    """An opened video file (context manager).

    Args:
        path: the video file.
        threads: decode with FFmpeg's automatic (frame and slice) threading.

    Attributes:
        path: the file.
        info: what the container says about the first video stream.
        decoded_frames: the real frame count once a read has decoded to the end of the file, else
            None.

    Raises:
        DecodeError: the file is missing, empty (0 bytes), not a media file or corrupt, or has no
            video stream.
    """

    def __init__(self, path: str | Path, *, threads: bool = True) -> None:
        self.path = Path(path)
        self.decoded_frames: int | None = None
        if not self.path.is_file():
            reason = "is a directory" if self.path.is_dir() else "file not found"
            raise DecodeError(f"{self.path}: {reason}")
        if self.path.stat().st_size == 0:
            raise DecodeError(f"{self.path}: empty file (0 bytes)")
        try:
            self._container = av.open(str(self.path))
        except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
            raise DecodeError(f"{self.path}: not a readable media file ({e})") from e
        try:
            self._stream, self._fps, self.info = self._probe()
        except BaseException:
            self._container.close()
            raise
        if threads:
            self._stream.thread_type = "AUTO"
        self._start_pts = self._stream.start_time or 0
        self._at_start = True  # nothing decoded yet: reading from frame 0 needs no seek

    def _probe(self) -> tuple[av.VideoStream, Fraction, VideoInfo]:
        streams = self._container.streams
        if not streams.video:
            found = ", ".join(s.type for s in streams) or "none"
            raise DecodeError(f"{self.path}: no video stream (streams found: {found})")
        stream = streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or stream.time_base is None:
            raise DecodeError(f"{self.path}: the video stream declares no frame rate or time base")
        fps = Fraction(rate)
        if stream.duration:
            duration = float(stream.duration * stream.time_base)
        elif self._container.duration:
            duration = self._container.duration / av.time_base
        else:
            duration = 0.0
        frames = stream.frames if stream.frames > 0 else round(duration * fps)
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise DecodeError(f"{self.path}: the video stream declares no frame size ({width}x{height})")
        return (
            stream,
            fps,
            VideoInfo(frames=frames, fps=float(fps), width=width, height=height, duration=duration),
        )

    # ------------------------------------------------------------------ reading
    def read(self, indices: Sequence[int] | Tensor) -> Tensor:
        """Decodes the frames at `indices`.

        Indices past the end of the file get the last decoded frame (one warning per call names the
        file and its real frame count).

        Args:
            indices: (N,) frame indices >= 0, in any order, repeats allowed.

        Returns:
            (N, H, W, 3) uint8 RGB frames in the order asked.

        Raises:
            DecodeError: decoding fails (corrupt data) or no frame decodes at all.
            ValueError: `indices` is not one-dimensional or holds a negative index.
        """
        wanted = self._as_list(indices)
        H, W = self.info.height, self.info.width
        if not wanted:
            return torch.empty(0, H, W, 3, dtype=torch.uint8)
        if self.decoded_frames is not None:  # the real end is known: do not decode to it again
            wanted = [min(i, self.decoded_frames - 1) for i in wanted]
        needed = sorted(set(wanted))
        got = self._decode(needed, seek=needed[0] > 0)
        if got is None:  # the seek landed past the first frame needed: decode from the start
            got = self._decode(needed, seek=False)
        return torch.from_numpy(np.stack([got[i] for i in wanted]))  # (N, H, W, 3)

    def _as_list(self, indices: Sequence[int] | Tensor) -> list[int]:
        if isinstance(indices, Tensor):
            if indices.dim() != 1 or indices.is_floating_point():
                raise InputError(
                    f"expected a 1-D integer tensor of frame indices, got {indices.dtype} of shape "
                    f"{tuple(indices.shape)} (flatten (views, frames) indices first)"
                )
            wanted = indices.tolist()
        else:
            wanted = [int(i) for i in indices]
        if wanted and min(wanted) < 0:
            raise InputError(f"frame indices must be >= 0, got {min(wanted)} for {self.path}")
        return wanted

    def _index(self, frame: av.VideoFrame) -> int | None:
        if frame.pts is None:
            return None
        return round((frame.pts - self._start_pts) * self._stream.time_base * self._fps)

    def _decode(self, needed: list[int], *, seek: bool) -> dict[int, np.ndarray] | None:
        """Maps each of `needed` (sorted, unique) to its (H, W, 3) frame; None asks to retry from the
        start (after a seek, the first frame decoded lies past the first frame needed or has no pts).

        A needed index that no decoded frame carries (a gap in the timestamps) gets the frame shown
        at that time, the last one before it.
        """
        stream = self._stream
        try:
            if seek:
                target = self._start_pts + math.floor(needed[0] / (self._fps * stream.time_base))
                self._container.seek(target, stream=stream, backward=True, any_frame=False)
            elif not self._at_start:
                self._container.seek(self._start_pts, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError as e:
            raise DecodeError(f"{self.path}: cannot seek to frame {needed[0] if seek else 0} ({e})") from e
        self._at_start = False
        got: dict[int, np.ndarray] = {}
        pending = iter(needed)
        nxt: int | None = next(pending)
        prev: tuple[int, av.VideoFrame] | None = None  # last decoded frame and its index
        prev_rgb: np.ndarray | None = None  # prev converted, if it was needed
        try:
            for frame in self._container.decode(stream):
                idx = self._index(frame)
                if idx is None:  # no timestamp: count frames, which is only right from the start
                    if seek:
                        return None
                    idx = prev[0] + 1 if prev is not None else 0
                if prev is None and seek and idx > needed[0]:
                    return None
                rgb = None
                while nxt is not None and nxt <= idx:
                    # nxt < idx is a gap in the timestamps: the frame on screen then is the previous one
                    # (or, before the first frame, the first).
                    if nxt == idx or prev is None:
                        rgb = self._rgb(frame) if rgb is None else rgb
                        got[nxt] = rgb
                    else:
                        prev_rgb = self._rgb(prev[1]) if prev_rgb is None else prev_rgb
                        got[nxt] = prev_rgb
                    nxt = next(pending, None)
                prev, prev_rgb = (idx, frame), rgb
                if nxt is None:
                    return got
        except av.FFmpegError as e:
            if prev is not None:
                at = f"after frame {prev[0]}"
            else:
                at = f"after seeking towards frame {needed[0]}" if seek else "before the first frame"
            raise DecodeError(f"{self.path}: decoding failed {at} ({e})") from e
        # The file ended before the last frame needed.
        if prev is None and seek:
            return None
        if prev is None:
            raise DecodeError(f"{self.path}: no frame could be decoded")
        self.decoded_frames = prev[0] + 1
        log.warning(
            "%s ends at %d frames (container estimate %d); frames %d..%d requested get the last frame",
            self.path,
            self.decoded_frames,
            self.info.frames,
            nxt,
            needed[-1],
        )
        last = prev_rgb if prev_rgb is not None else self._rgb(prev[1])
        while nxt is not None:
            got[nxt] = last
            nxt = next(pending, None)
        return got

    def _rgb(self, frame: av.VideoFrame) -> np.ndarray:
        return frame.to_ndarray(format="rgb24", width=self.info.width, height=self.info.height)  # (H, W, 3)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Closes the file (idempotent)."""
        self._container.close()

    def __enter__(self) -> Video:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Video({str(self.path)!r}, {self.info})"


def read_frames(path: str | Path, indices: Sequence[int] | Tensor, *, threads: bool = True) -> Tensor:
    """Opens `path`, reads the frames at `indices` (see `Video.read`) and closes it.

    Args:
        path: the video file.
        indices: (N,) frame indices >= 0.
        threads: decode with FFmpeg's automatic threading.

    Returns:
        (N, H, W, 3) uint8 RGB frames in the order asked.
    """
    with Video(path, threads=threads) as video:
        return video.read(indices)
