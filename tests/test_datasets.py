"""Dataset readers (list, Kinetics CSV, Something-Something JSON, folders) and `VideoDataset` views."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tokensieve.data.datasets import (
    DataFormatError,
    VideoDataset,
    VideoRecord,
    load_records,
    read_folder,
    read_kinetics_csv,
    read_list,
    read_ssv2,
)
from tokensieve.data.transforms import crops, resize_short, to_float
from tokensieve.errors import InputError


def write_video(
    path: Path, *, frames: int = 12, width: int = 48, height: int = 40, seed: int = 0
) -> torch.Tensor:
    """Encode a small random-content mp4 (frame i has brightness tied to i); returns its RGB frames."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(height // 8, width // 8, 3), dtype=np.uint8)
    pictures = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000
        for i in range(frames):
            picture = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8)).astype(np.int32) + 8 * i
            picture = np.clip(picture, 0, 255).astype(np.uint8)
            pictures.append(picture)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    return torch.from_numpy(np.stack(pictures))


# ---------------------------------------------------------------------------------------- readers
def test_list_file_paths_labels_comments_and_spaces(tmp_path: Path) -> None:
    listing = tmp_path / "val.txt"
    listing.write_text("# comment\nvideos/a.mp4 3\n\nvideos/with space.mp4 0\n")
    records = read_list(listing)
    assert records == [
        VideoRecord("videos/a", tmp_path / "videos/a.mp4", (3,)),
        VideoRecord("videos/with space", tmp_path / "videos/with space.mp4", (0,)),
    ]
    assert read_list(listing, root="/data")[0].path == Path("/data/videos/a.mp4")


def test_multilabel_list(tmp_path: Path) -> None:
    listing = tmp_path / "charades.txt"
    listing.write_text("a.mp4 1,4,7\nb.mp4 2\n")
    assert [r.labels for r in read_list(listing, multilabel=True)] == [(1, 4, 7), (2,)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.mp4 1\nb.mp4\n", r"val.txt:2: expected 'path label'"),
        ("a.mp4 one\n", r"val.txt:1: expected 'path label' with integer labels"),
        ("a.mp4 -1\n", r"val.txt:1: labels must be >= 0"),
        ("a.mp4 1\na.mp4 2\n", "listed twice"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    listing = tmp_path / "val.txt"
    listing.write_text(text)
    with pytest.raises(DataFormatError, match=message):
        read_list(listing)


def test_kinetics_csv(tmp_path: Path) -> None:
    csv = tmp_path / "validate.csv"
    csv.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "zumba,abc,10,20,validate\n"
        "abseiling,xyz,0.0,10.0,validate\n"
    )
    (tmp_path / "zumba").mkdir()
    records, names = read_kinetics_csv(csv, root=tmp_path)
    assert names == ["abseiling", "zumba"]
    assert records[0] == VideoRecord("abc_000010_000020", tmp_path / "zumba/abc_000010_000020.mp4", (1,))
    assert records[1].path == tmp_path / "xyz_000000_000010.mp4"  # no class folder: flat layout
    with pytest.raises(
        DataFormatError, match=r"validate.csv:3: label 'abseiling' is not one of the 1 classes"
    ):
        read_kinetics_csv(csv, root=tmp_path, classes=["zumba"])


def test_something_something_json(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps({"Pushing something": "1", "Holding something": "0"}))
    videos = tmp_path / "validation.json"
    videos.write_text(json.dumps([{"id": "42", "template": "Pushing [something]"}, {"id": "7"}]))
    records, names = read_ssv2(videos, tmp_path / "labels.json", root=tmp_path)
    assert names == ["Holding something", "Pushing something"]
    assert records == [
        VideoRecord("42", tmp_path / "42.webm", (1,)),
        VideoRecord("7", tmp_path / "7.webm", ()),
    ]
    assert load_records(videos) == (records, names)  # found by the file name, labels.json next to it
    videos.write_text(json.dumps([{"id": "1", "template": "Juggling [something]"}]))
    with pytest.raises(DataFormatError, match=r"entry 1 \(id 1\): 'Juggling something' is not in"):
        read_ssv2(videos, tmp_path / "labels.json", root=tmp_path)


def test_class_folders(tmp_path: Path) -> None:
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "v1.mp4").touch()
        (tmp_path / name / "notes.txt").touch()
    records, names = read_folder(tmp_path)
    assert names == ["a", "b"] and [(r.id, r.labels) for r in records] == [("a/v1", (0,)), ("b/v1", (1,))]


def test_label_outside_the_label_map_is_refused(tmp_path: Path) -> None:
    records = [VideoRecord("a", tmp_path / "a.mp4", (5,))]
    with pytest.raises(DataFormatError, match="video 'a' has label 5, outside the 3 classes"):
        VideoDataset(records, frames=4, size=32, num_classes=3)


def test_load_records_picks_the_reader(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("a.mp4 1\n")
    (tmp_path / "classes.txt").write_text("x\ny\n")
    records, names = load_records(tmp_path / "list.txt")
    assert names == ["x", "y"] and records[0].labels == (1,)
    with pytest.raises(InputError, match="no such dataset"):
        load_records(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------- views
def test_views_are_the_sampled_frames_resized_and_cropped(tmp_path: Path) -> None:
    write_video(tmp_path / "v.mp4", frames=30, width=48, height=40)
    dataset = VideoDataset(
        [VideoRecord("v", tmp_path / "v.mp4", (0,))], frames=4, size=32, views=(2, 3), stride=3
    )
    views = dataset.load(0)
    assert views.shape == (6, 4, 3, 32, 32) and views.dtype == torch.uint8
    # 2 clips of 4 frames every 3 (span 10) spread over 30 frames: starts 0 and 20
    assert dataset.indices(30).tolist() == [[0, 3, 6, 9], [20, 23, 26, 29]]
    with av.open(str(tmp_path / "v.mp4")) as container:
        decoded = torch.from_numpy(
            np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        )
    for clip, start in enumerate((0, 20)):
        frames = decoded[start : start + 10 : 3]  # (4, 40, 48, 3)
        resized = (
            (resize_short(to_float(frames), 32) * 255).round().clamp(0, 255).to(torch.uint8)
        )  # (4, 3, 32, 38)
        expected = crops(resized, 32, 3)  # left, centre, right
        assert torch.equal(views[clip * 3 : clip * 3 + 3], expected)


def test_segment_sampling(tmp_path: Path) -> None:
    write_video(tmp_path / "v.mp4", frames=16)
    dataset = VideoDataset(
        [VideoRecord("v", tmp_path / "v.mp4", (0,))], frames=4, size=32, sampling="segments", views=(1, 1)
    )
    assert dataset.indices(16).tolist() == [[2, 6, 10, 14]]
    assert dataset.load(0).shape == (1, 4, 3, 32, 32)


def test_a_broken_video_becomes_a_failed_sample(tmp_path: Path) -> None:
    (tmp_path / "junk.mp4").write_bytes(bytes(range(256)) * 10)
    records = [
        VideoRecord("junk", tmp_path / "junk.mp4", (0,)),
        VideoRecord("gone", tmp_path / "gone.mp4", (0,)),
    ]
    dataset = VideoDataset(records, frames=4, size=32)
    for i in range(2):
        sample = dataset[i]
        assert (
            sample.views is None and sample.error.startswith("DecodeError") and records[i].id in repr(sample)
        )
