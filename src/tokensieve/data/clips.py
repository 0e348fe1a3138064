"""Training clips: one randomly sampled and augmented clip per video, a pure function of
(seed, epoch, index).

    data = ClipDataset(records, frames=16, size=224, sampling="dense", stride=4, num_classes=400)
    data.set_epoch(epoch)
    clip = data[i]          # Clip(video=(T, C, size, size) float in [0, 1], label, failed)

For video `index` in epoch `epoch`, one `torch.Generator` seeded from (seed, epoch, index) draws, in
order: the temporal positions (`random_clip_indices` for dense clips, `random_segment_indices` for
segments), the random-resized-crop box (one box for every frame of the clip) and the horizontal
flip (probability 0.5). Nothing else is random, so the same clip comes out in any process, any
DataLoader worker and any run: the training loop can resume in the middle of an epoch by skipping
the batches already done, and N processes see exactly the clips one process would.

Defaults follow VideoMAE's released fine-tuning code (`kinetics.py`/`ssv2.py`, `_aug_frame`),
which most token-reduction papers fine-tune with: Inception-style crop with area `scale=(0.08, 1.0)`
and aspect ratio (3/4, 4/3) on the decoded frames, then resized to `size`. That code turns the flip
off for Something-Something, whose classes name directions ("pushing something from left to
right"): pass `flip=False` for such data.

Clips are float in [0, 1] and NOT normalised: the training loop normalises next to the model with
the model's own mean/std (as the evaluation does).

Unreadable videos: training must not die on one bad file among millions. When video `index` cannot
be loaded, a warning is logged and a substitute is drawn: attempt a (1, 2, ...) takes the video at
a random index drawn from a generator seeded from (seed, epoch, index, a), augmented with that same
generator. So the substitute, too, is a pure function of (seed, epoch, index). The `failed` field
of the result names the videos that failed on the way; the training loop counts them and stops when
more than `max_failed` of the dataset is unreadable. After `MAX_ATTEMPTS` failures in a row the
dataset raises (the data is almost certainly not readable at all).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import InputError
from .datasets import DataFormatError, Sampling, VideoRecord
from .sampling import Short, random_clip_indices, random_segment_indices
from .transforms import hflip, random_resized_crop, to_float
from .video import Video

__all__ = [
    "MAX_ATTEMPTS",
    "Clip",
    "ClipBatch",
    "ClipDataset",
    "collate_clips",
    "direction_class",
    "sample_generator",
]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 10
"""Videos tried for one sample (the asked-for one and its substitutes) before giving up."""


class Clip(NamedTuple):
    """One training sample.

    Attributes:
        video: (T, C, size, size) float32 in [0, 1], not normalised.
        label: class index (single-label data), or a (num_classes,) float multi-hot vector.
        failed: "id: error" of each video that could not be loaded for this sample (a substitute
            was used); empty when the asked-for video loaded.
    """

    video: Tensor
    label: int | Tensor
    failed: tuple[str, ...] = ()


class ClipBatch(NamedTuple):
    """Clips stacked by `collate_clips`: videos (B, T, C, S, S), labels (B,) long or (B, K) float,
    and the failures of all of them."""

    videos: Tensor
    labels: Tensor
    failed: tuple[str, ...]


def collate_clips(clips: Sequence[Clip]) -> ClipBatch:
    """Stack clips into a batch (the DataLoader's `collate_fn`)."""
    videos = torch.stack([c.video for c in clips])  # (B, T, C, S, S)
    if isinstance(clips[0].label, Tensor):
        labels = torch.stack([c.label for c in clips])  # (B, K)
    else:
        labels = torch.tensor([c.label for c in clips], dtype=torch.long)  # (B,)
    return ClipBatch(videos, labels, tuple(f for c in clips for f in c.failed))


def sample_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative integers, e.g. (seed, epoch, index).

    The tuple goes through numpy's `SeedSequence` (a hash designed for this), so neighbouring keys
    give unrelated streams (unlike seeding with seed + epoch + index, where (0, 1, 0) == (0, 0, 1)).
    """
    if any(k < 0 for k in key):
        raise InputError(f"seed, epoch and index must be >= 0, got {key}")
    state = np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def direction_class(class_names: Sequence[str]) -> str | None:
    """The first class whose name gives a horizontal direction (the word left or right), or None.

    A horizontal flip turns such a class into another ("moving left" into "moving right", or
    Something-Something's "pushing something from left to right"), so training must not flip.
    """
    return next((name for name in class_names if re.search(r"\b(left|right)", name, re.IGNORECASE)), None)


class ClipDataset(Dataset):
    """Labelled videos as random training clips (see the module docstring).

    Args:
        records: the videos; every one must have at least one label.
        frames: frames per clip.
        size: side of the square output frames.
        sampling: "dense" (`frames` frames every `stride`, at a random start) or "segments" (one
            random frame from each of `frames` equal segments).
        stride: frame stride of dense clips.
        scale: range of the crop area as a fraction of the frame (VideoMAE fine-tuning: (0.08, 1)).
        ratio: range of the crop aspect ratio, width / height.
        flip: horizontal flip with probability 0.5. Turned off (with a warning) when a class name
            gives a left/right direction (`direction_class`): flipping would change the label.
        seed: seed of every random draw, with the epoch and the index.
        num_classes: number of classes; required for multi-label data (multi-hot labels), and when
            given every label must be below it.
        short: dense clips longer than a video "loop" back to its start or "repeat" its last frame.
        threads: threaded decoding (PyAV's frame/slice threads).
        max_failed: fraction of the dataset that may be unreadable before training stops (read by
            the training loop, which counts failures).
        class_names: the classes' names, if known (`load_records` returns them); they tell whether
            flipping changes labels.

    Raises:
        ValueError: an unlabelled record, bad sampling, or multi-label data without `num_classes`.
        DataFormatError: a label outside `num_classes`.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        *,
        frames: int,
        size: int,
        sampling: Sampling = "dense",
        stride: int = 4,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        seed: int = 0,
        num_classes: int | None = None,
        short: Short = "loop",
        threads: bool = True,
        max_failed: float = 0.1,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if sampling not in ("dense", "segments"):
            raise InputError(f"sampling must be 'dense' or 'segments', got {sampling!r}")
        if frames < 1 or size < 1 or stride < 1:
            raise InputError(f"frames, size and stride must be >= 1, got {frames}, {size}, {stride}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise InputError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale}")
        if not 0 <= max_failed < 1:
            raise InputError(f"max_failed must be in [0, 1), got {max_failed}")
        if seed < 0:
            raise InputError(f"seed must be >= 0, got {seed}")
        self.records = list(records)
        if not self.records:
            raise InputError("a training dataset needs at least one video")
        unlabelled = [r.id for r in self.records if not r.labels]
        if unlabelled:
            raise InputError(
                f"training needs labelled videos; {len(unlabelled)} have no label (first: {unlabelled[0]!r})"
            )
        self.multilabel = any(len(r.labels) > 1 for r in self.records)
        if self.multilabel and num_classes is None:
            raise InputError("multi-label data needs num_classes (the length of the multi-hot labels)")
        if num_classes is not None:
            for r in self.records:
                bad = [label for label in r.labels if label >= num_classes]
                if bad:
                    raise DataFormatError(
                        f"video {r.id!r} has label {bad[0]}, outside the {num_classes} classes (0..{num_classes - 1})"
                    )
        turned = direction_class(class_names or ()) if flip else None
        if turned is not None:
            log.warning(
                "random horizontal flips are off: the classes name directions (%r), and a flipped clip "
                "would show another class; pass flip=False (--no-flip) to say so",
                turned,
            )
            flip = False
        self.frames, self.size, self.sampling, self.stride = frames, size, sampling, stride
        self.scale, self.ratio, self.flip, self.seed = scale, ratio, flip, seed
        self.num_classes, self.short, self.threads, self.max_failed = num_classes, short, threads, max_failed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the clips of `epoch` from now on (call before creating the epoch's DataLoader
        iterator: worker processes get a copy of the dataset when the iterator starts)."""
        if epoch < 0:
            raise InputError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def label(self, index: int) -> int | Tensor:
        """The training target of video `index`: its class, or its multi-hot (num_classes,) vector."""
        labels = self.records[index].labels
        if not self.multilabel:
            return labels[0]
        target = torch.zeros(self.num_classes)  # (K,)
        target[list(labels)] = 1.0
        return target

    def load(self, index: int, generator: torch.Generator) -> Tensor:
        """(T, C, size, size) float clip of video `index`, every random choice drawn from `generator`;
        raises when the video cannot be read."""
        record = self.records[index]
        with Video(record.path, threads=self.threads) as video:
            num_frames = video.info.frames
            if self.sampling == "dense":
                idx = random_clip_indices(
                    num_frames, frames=self.frames, stride=self.stride, generator=generator, short=self.short
                )  # (T,)
            else:
                idx = random_segment_indices(num_frames, segments=self.frames, generator=generator)  # (T,)
            wanted, inverse = idx.unique(return_inverse=True)  # decode each frame once
            decoded = video.read(wanted)  # (U, H, W, 3) uint8
        clip = to_float(decoded[inverse])  # (T, 3, H, W) in [0, 1]
        clip = random_resized_crop(clip, self.size, scale=self.scale, ratio=self.ratio, generator=generator)
        if self.flip and float(torch.rand((), generator=generator)) < 0.5:
            clip = hflip(clip)
        return clip.contiguous()  # (T, C, size, size)

    def __getitem__(self, index: int) -> Clip:
        failed: list[str] = []
        target = index
        for attempt in range(MAX_ATTEMPTS):
            key = (self.seed, self.epoch, index) if attempt == 0 else (self.seed, self.epoch, index, attempt)
            generator = sample_generator(*key)
            if attempt > 0:
                target = int(torch.randint(len(self.records), (), generator=generator))
            try:
                return Clip(self.load(target, generator), self.label(target), tuple(failed))
            except Exception as err:  # any failure to read one file; the sample is replaced
                record = self.records[target]
                log.warning(
                    "training video %s (%s) failed, substituting another: %s", record.id, record.path, err
                )
                failed.append(f"{record.id}: {type(err).__name__}: {err}")
        raise InputError(
            f"{MAX_ATTEMPTS} videos in a row could not be loaded for sample {index} (epoch {self.epoch}); "
            f"is the dataset readable? Last: {failed[-1]}"
        )
