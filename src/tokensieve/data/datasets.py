"""Video datasets: which videos, with which labels, and how a video becomes its test views.

Sources (each returns `VideoRecord`s and the class names when the source knows them):
- `read_list`: Kinetics-style list files, `path label` per line (VideoMAE's format), or `path l1,l2,l3`
  with `multilabel=True` (Charades / ActivityNet style);
- `read_kinetics_csv`: the official Kinetics CSV (`label,youtube_id,time_start,time_end,split`);
- `read_ssv2`: Something-Something v2 JSON (videos + the label map);
- `read_folder`: one sub-folder per class.
`load_records(path)` picks the reader from the path. Malformed input raises `DataFormatError` naming the
file and line (or entry); a missing or unreadable *video* is not an error here: the evaluation
records it as failed and goes on.

`VideoDataset` turns a record into its test views: decode only the frames the temporal views need
(one pass over the file), resize the short side, take the spatial crops. It returns uint8 views, so
worker processes pass a quarter of the bytes; normalisation happens next to the model.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import InputError
from .sampling import clip_indices, segment_indices
from .transforms import crops, resize_short, to_float
from .video import Video

__all__ = [
    "VIDEO_EXTENSIONS",
    "DataFormatError",
    "Sample",
    "VideoDataset",
    "VideoRecord",
    "load_records",
    "read_folder",
    "read_kinetics_csv",
    "read_list",
    "read_ssv2",
]

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
Sampling = Literal["dense", "segments"]


class DataFormatError(InputError):
    """A malformed list, CSV or JSON file; the message names the file and the line or entry."""


@dataclass(frozen=True)
class VideoRecord:
    """One video of a dataset.

    Attributes:
        id: the key of its result record (unique in the dataset).
        path: the video file.
        labels: class indices: one for single-label data, several for multi-label, none when unknown.
    """

    id: str
    path: Path
    labels: tuple[int, ...]


# ---------------------------------------------------------------------------------------- readers
def _record_id(path: str) -> str:
    return str(Path(path).with_suffix(""))


def _check_unique(records: list[VideoRecord], source: Path) -> list[VideoRecord]:
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.id in seen:
            raise DataFormatError(
                f"{source}: video {r.id!r} is listed twice (entries {seen[r.id] + 1} and {i + 1})"
            )
        seen[r.id] = i
    return records


def read_list(
    path: str | Path, *, root: str | Path | None = None, multilabel: bool = False
) -> list[VideoRecord]:
    """A list file: one video per line, `path label` (or `path l1,l2,...` with `multilabel`).

    Blank lines and lines starting with '#' are skipped. Paths may contain spaces (the label is the
    last field); relative paths are resolved against `root` (default: the list file's folder).

    Raises:
        DataFormatError: a line without a label or with a non-integer or negative label, naming
            `file:line`; a video listed twice.
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(maxsplit=1)
        expected = "'path l1,l2,...'" if multilabel else "'path label'"
        if len(parts) != 2:
            raise DataFormatError(f"{path}:{number}: expected {expected}, got {text!r}")
        video, label_text = parts
        try:
            labels = tuple(int(v) for v in label_text.split(",")) if multilabel else (int(label_text),)
        except ValueError:
            raise DataFormatError(
                f"{path}:{number}: expected {expected} with integer labels, got {text!r}"
            ) from None
        if any(label < 0 for label in labels):
            raise DataFormatError(f"{path}:{number}: labels must be >= 0, got {label_text!r}")
        records.append(VideoRecord(id=_record_id(video), path=base / video, labels=labels))
    return _check_unique(records, path)


def read_kinetics_csv(
    path: str | Path, *, root: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[VideoRecord], list[str]]:
    """The official Kinetics CSV: columns `label,youtube_id,time_start,time_end,split[,is_cc]`.

    Files are looked up as `root/label/{youtube_id}_{start:06d}_{end:06d}.mp4` when `root/label` is
    a folder (the official downloader's layout), else directly in `root`. Classes default to the
    sorted label names (the standard Kinetics order).

    Raises:
        DataFormatError: missing columns, bad times, or a label outside `classes`, naming `file:line`.
    """
    path, root = Path(path), Path(root)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    needed = {"label", "youtube_id", "time_start", "time_end"}
    if not rows or not needed <= set(rows[0]):
        raise DataFormatError(f"{path}: expected a CSV with columns {', '.join(sorted(needed))}")
    names = list(classes) if classes is not None else sorted({row["label"] for row in rows})
    index = {name: i for i, name in enumerate(names)}
    records = []
    for number, row in enumerate(rows, 2):  # line 1 is the header
        try:
            start, end = int(float(row["time_start"])), int(float(row["time_end"]))
        except (TypeError, ValueError):
            raise DataFormatError(
                f"{path}:{number}: time_start/time_end must be numbers, got {row}"
            ) from None
        label = row["label"]
        if label not in index:
            raise DataFormatError(f"{path}:{number}: label {label!r} is not one of the {len(names)} classes")
        name = f"{row['youtube_id']}_{start:06d}_{end:06d}"
        folder = root / label if (root / label).is_dir() else root
        records.append(VideoRecord(id=name, path=folder / f"{name}.mp4", labels=(index[label],)))
    return _check_unique(records, path), names


def read_ssv2(
    videos: str | Path, labels: str | Path, *, root: str | Path, extension: str = ".webm"
) -> tuple[list[VideoRecord], list[str]]:
    """Something-Something v2: a videos JSON (`[{"id", "template", ...}]`) and the label map
    (`{"Approaching something with your camera": "0", ...}`). The class of a video is its template
    with the brackets removed; a test JSON without templates gives unlabelled records.

    Raises:
        DataFormatError: unreadable JSON, an entry without an id, or a template not in the label map
            (naming the entry).
    """
    videos, labels = Path(videos), Path(labels)
    try:
        entries = json.loads(videos.read_text())
        label_map = {name: int(i) for name, i in json.loads(labels.read_text()).items()}
    except (json.JSONDecodeError, ValueError, AttributeError) as err:
        raise DataFormatError(f"{videos} / {labels}: not Something-Something v2 JSON ({err})") from None
    names = [name for name, _ in sorted(label_map.items(), key=lambda item: item[1])]
    records = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or "id" not in entry:
            raise DataFormatError(f"{videos}: entry {number} has no 'id': {entry!r}")
        template = entry.get("template")
        found: tuple[int, ...] = ()
        if template is not None:
            name = template.replace("[", "").replace("]", "")
            if name not in label_map:
                raise DataFormatError(
                    f"{videos}: entry {number} (id {entry['id']}): {name!r} is not in {labels}"
                )
            found = (label_map[name],)
        vid = str(entry["id"])
        records.append(VideoRecord(id=vid, path=Path(root) / f"{vid}{extension}", labels=found))
    return _check_unique(records, videos), names


def read_folder(root: str | Path) -> tuple[list[VideoRecord], list[str]]:
    """One sub-folder per class (sorted names = class indices), videos inside by extension."""
    root = Path(root)
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise DataFormatError(f"{root}: expected one sub-folder per class, found none")
    records = [
        VideoRecord(id=f"{name}/{video.stem}", path=video, labels=(label,))
        for label, name in enumerate(names)
        for video in sorted((root / name).iterdir())
        if video.suffix.lower() in VIDEO_EXTENSIONS
    ]
    return records, names


def load_records(
    path: str | Path, *, root: str | Path | None = None, multilabel: bool = False
) -> tuple[list[VideoRecord], list[str] | None]:
    """Records from a list file (.txt and anything else), a Kinetics CSV (.csv), a folder of class
    folders, or Something-Something JSON (`videos.json`, with `labels.json` next to it). Class names
    come from `classes.txt` next to a list file when present.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such dataset: {path}")
    if path.is_dir():
        return read_folder(path)
    if path.suffix == ".csv":
        return read_kinetics_csv(path, root=root or path.parent)
    if path.suffix == ".json":
        labels = path.parent / "labels.json"
        if not labels.exists():
            raise DataFormatError(f"{path}: Something-Something JSON needs the label map {labels}")
        return read_ssv2(path, labels, root=root or path.parent)
    records = read_list(path, root=root, multilabel=multilabel)
    names_file = path.parent / "classes.txt"
    names = names_file.read_text().splitlines() if names_file.exists() else None
    return records, names


# ---------------------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class Sample:
    """What loading one video gives: its test views, or why there are none.

    Attributes:
        index: position of the record in the dataset.
        record: the video.
        views: uint8 (clips * crops, T, C, size, size), clip-major (view = clip * crops + crop),
            or None when loading failed.
        error: "<ExceptionType>: message" when loading failed, else None.
    """

    index: int
    record: VideoRecord
    views: Tensor | None
    error: str | None = None


class VideoDataset(Dataset):
    """Videos with the test-time sampling of the papers: `views = (clips, crops)`.

    `sampling="dense"`: clips of `frames` frames every `stride` (VideoMAE, STA on Kinetics: 16 x 4),
    `clips` of them spread uniformly over the video; `"segments"`: `frames` uniform segments, one frame
    each (Something-Something, HaltingVT). Then the short side is resized to `resize` (default `size`)
    and `crops` crops of `size` are taken (1: centre, 3: along the long side).

    Args:
        records: the videos.
        frames, size: clip length and crop side the model expects.
        views: (temporal clips, spatial crops) per video.
        sampling, stride: as above.
        short: clips longer than the video "loop" back to its start or "repeat" its last frame.
        num_classes: when given, every label must be below it.
        class_names: optional, for readable outputs.
        threads: threaded decoding (PyAV's frame/slice threads).
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        *,
        frames: int,
        size: int,
        views: tuple[int, int] = (1, 1),
        sampling: Sampling = "dense",
        stride: int = 4,
        resize: int | None = None,
        short: Literal["loop", "repeat"] = "loop",
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        threads: bool = True,
    ) -> None:
        if sampling not in ("dense", "segments"):
            raise InputError(f"sampling must be 'dense' or 'segments', got {sampling!r}")
        clips, num_crops = views
        if clips < 1 or num_crops not in (1, 3):
            raise InputError(f"views must be (clips >= 1, crops in 1 or 3), got {views}")
        self.records = list(records)
        self.frames, self.size, self.views = frames, size, (clips, num_crops)
        self.sampling, self.stride, self.short = sampling, stride, short
        self.resize = resize or size
        self.class_names = list(class_names) if class_names is not None else None
        self.num_classes = num_classes or (len(class_names) if class_names is not None else None)
        self.threads = threads
        if self.num_classes is not None:
            for r in self.records:
                bad = [label for label in r.labels if label >= self.num_classes]
                if bad:
                    raise DataFormatError(
                        f"video {r.id!r} has label {bad[0]}, outside the {self.num_classes} classes (0..{self.num_classes - 1})"
                    )

    def with_views(self, views: tuple[int, int]) -> VideoDataset:
        """The same videos with another number of (clips, crops)."""
        return VideoDataset(
            self.records, frames=self.frames, size=self.size, views=views, sampling=self.sampling,
            stride=self.stride, resize=self.resize, short=self.short, num_classes=self.num_classes,
            class_names=self.class_names, threads=self.threads,
        )  # fmt: skip

    @property
    def multilabel(self) -> bool:
        return any(len(r.labels) > 1 for r in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def indices(self, num_frames: int) -> Tensor:
        """(clips, frames) frame indices of the temporal views of a video of `num_frames` frames."""
        clips = self.views[0]
        if self.sampling == "dense":
            return clip_indices(
                num_frames, frames=self.frames, stride=self.stride, views=clips, short=self.short
            )
        return segment_indices(num_frames, segments=self.frames, views=clips)

    def load(self, index: int) -> Tensor:
        """uint8 (clips * crops, T, C, size, size) views of video `index`; raises on failure."""
        record = self.records[index]
        with Video(record.path, threads=self.threads) as video:
            idx = self.indices(video.info.frames)  # (clips, T)
            wanted, inverse = idx.flatten().unique(return_inverse=True)  # decode each frame once
            decoded = video.read(wanted)  # (U, H, W, 3) uint8
        clips = decoded[inverse.view(idx.shape)]  # (clips, T, H, W, 3)
        out = []
        for clip in clips:
            resized = resize_short(to_float(clip), self.resize)  # (T, C, h, w) float in [0, 1]
            as_bytes = (resized * 255).round_().clamp_(0, 255).to(torch.uint8)
            out.append(crops(as_bytes, self.size, self.views[1]))  # (crops, T, C, size, size)
        return torch.cat(out)  # (clips * crops, T, C, size, size)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        try:
            return Sample(index, record, self.load(index))
        except Exception as err:
            log.warning("video %s (%s) failed: %s", record.id, record.path, err)
            return Sample(index, record, None, f"{type(err).__name__}: {err}")
