"""Video data: decoding, frame sampling, transforms, datasets and the synthetic benchmark."""

from __future__ import annotations

from .datasets import (
    DataFormatError,
    Sample,
    VideoDataset,
    VideoRecord,
    load_records,
    read_folder,
    read_kinetics_csv,
    read_list,
    read_ssv2,
)
from .synthetic import CLASSES, foreground_recall, load_truth, make_synthetic
from .video import DecodeError, Video, VideoInfo, read_frames

__all__ = [
    "CLASSES",
    "DataFormatError",
    "DecodeError",
    "Sample",
    "Video",
    "VideoDataset",
    "VideoInfo",
    "VideoRecord",
    "foreground_recall",
    "load_records",
    "load_truth",
    "make_synthetic",
    "read_folder",
    "read_frames",
    "read_kinetics_csv",
    "read_list",
    "read_ssv2",
]
