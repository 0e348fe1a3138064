from __future__ import annotations

import logging
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tokensieve.data.video import DecodeError, Video, VideoInfo, read_frames

NUM, FPS, GOP = 60, 10, 8
BLOCK = 16  # frames are 12 blocks of 16x16: 6 bits of the frame index, then their complements


def pattern(i: int, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 frame whose black/white blocks spell `i`, robust to lossy compression."""
    bits = [(i >> b) & 1 for b in range(6)]
    blocks = np.array(bits + [1 - b for b in bits], np.uint8).reshape(height // BLOCK, width // BLOCK)
    img = np.kron(blocks * 255, np.ones((BLOCK, BLOCK), np.uint8))  # (H, W)
    return np.repeat(img[:, :, None], 3, axis=2)  # (H, W, 3)


def frame_ids(frames: torch.Tensor) -> list[int]:
    """Reads back the index each (H, W, 3) frame of (N, H, W, 3) spells; checks the complements."""
    N, H, W, _ = frames.shape
    gray = frames.float().mean(-1).reshape(N, H // BLOCK, BLOCK, W // BLOCK, BLOCK)  # (N, h, 16, w, 16)
    bits = (gray.mean((2, 4)) > 128).reshape(N, 12).long()  # (N, 12)
    assert bool((bits[:, :6] + bits[:, 6:] == 1).all()), "a frame does not hold a valid pattern"
    return (bits[:, :6] * 2 ** torch.arange(6)).sum(1).tolist()


def encode(
    path: Path,
    *,
    width: int = 64,
    height: int = 48,
    codec: str = "libx264",
    container_options: dict[str, str] | None = None,
) -> Path:
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = GOP
        for i in range(NUM):
            frame = av.VideoFrame.from_ndarray(pattern(i, height, width), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def packets(path: Path) -> list[av.Packet]:
    """Video packets in file (decode) order."""
    with av.open(str(path)) as container:
        return [p for p in container.demux(container.streams.video[0]) if p.size]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "mp4": encode(root / "landscape.mp4"),  # H.264 with B-frames
        "mkv": encode(root / "landscape.mkv", codec="mpeg4"),  # no frame count in the container
        "portrait": encode(root / "portrait.mp4", width=48, height=64),
        "faststart": encode(root / "faststart.mp4", container_options={"movflags": "faststart"}),
    }


def test_pattern_round_trips() -> None:
    frames = torch.from_numpy(np.stack([pattern(i, 48, 64) for i in (0, 5, 63)]))
    assert frame_ids(frames) == [0, 5, 63]


def test_fixture_has_keyframes_every_gop(videos: dict[str, Path]) -> None:
    keyframes = [p.pts for p in packets(videos["mp4"]) if p.is_keyframe]
    assert len(keyframes) >= NUM // GOP  # so reading frame 37 needs a seek and decoding forward


@pytest.mark.parametrize("kind", ["mp4", "mkv", "portrait"])
def test_read_returns_the_frames_asked_in_order(videos: dict[str, Path], kind: str) -> None:
    with Video(videos[kind]) as video:
        assert frame_ids(video.read([45, 37])) == [45, 37]  # first read starts with a seek
        frames = video.read([37, 5, 5, 59, 0])
        H, W = (64, 48) if kind == "portrait" else (48, 64)
        assert frames.shape == (5, H, W, 3) and frames.dtype == torch.uint8
        assert frame_ids(frames) == [37, 5, 5, 59, 0]
        assert frame_ids(video.read(range(NUM))) == list(range(NUM))


def test_reads_after_seeking_far_and_back(videos: dict[str, Path]) -> None:
    with Video(videos["mp4"]) as video:
        assert frame_ids(video.read([50])) == [50]  # first read: seek far into the file
        assert frame_ids(video.read([3, 1])) == [3, 1]  # back to the start
        assert frame_ids(video.read(torch.tensor([58, 33, 17]))) == [58, 33, 17]
        assert frame_ids(video.read([31, 32, 33])) == [31, 32, 33]  # across a keyframe (32)
        assert video.decoded_frames is None  # never decoded to the end


def test_threads_do_not_change_frames(videos: dict[str, Path]) -> None:
    idx = [44, 9, 23]
    single = read_frames(videos["mp4"], idx, threads=False)
    assert torch.equal(single, read_frames(videos["mp4"], idx, threads=True))
    assert frame_ids(single) == idx


def test_info(videos: dict[str, Path]) -> None:
    with Video(videos["mp4"]) as video:
        assert video.info == VideoInfo(frames=NUM, fps=10.0, width=64, height=48, duration=6.0)
    with Video(videos["portrait"]) as video:
        assert (video.info.width, video.info.height) == (48, 64)
    with Video(str(videos["mkv"])) as video:  # Matroska stores no frame count: estimated from duration
        assert video.info.frames == NUM and video.info.fps == 10.0
        assert video.info.duration == pytest.approx(6.0, abs=0.1)


def test_past_the_end_gets_last_frame_and_warns(
    videos: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tokensieve.data.video"), Video(videos["mp4"]) as video:
        frames = video.read([58, 75, 59, 100])
        assert frame_ids(frames) == [58, 59, 59, 59]
        assert video.decoded_frames == NUM
        assert len(caplog.records) == 1
        message = caplog.records[0].getMessage()
        assert str(videos["mp4"]) in message and "60 frames" in message
        # the real end is now known: no second decode to the end, no second warning
        assert frame_ids(video.read([200, 2])) == [59, 2]
        assert len(caplog.records) == 1


def test_truncated_file_ends_before_its_declared_count(
    videos: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The index at the start of the file still claims 60 frames; the data stops at a packet boundary."""
    kept = packets(videos["faststart"])[:30]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(videos["faststart"].read_bytes()[: kept[-1].pos + kept[-1].size])
    last = max(round(p.pts * p.time_base * FPS) for p in kept)
    with caplog.at_level(logging.WARNING), Video(cut, threads=False) as video:
        assert video.info.frames == NUM
        assert frame_ids(video.read([59, 3])) == [last, 3]
        assert video.decoded_frames == last + 1
        assert f"ends at {last + 1} frames" in caplog.text


def test_corrupt_packet_raises(videos: dict[str, Path], tmp_path: Path) -> None:
    """Data cut in the middle of a packet: frames before it read, decoding through it raises."""
    packet = packets(videos["faststart"])[30]
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(videos["faststart"].read_bytes()[: packet.pos + packet.size // 2])
    with Video(bad, threads=False) as video:
        assert frame_ids(video.read([5])) == [5]
        with pytest.raises(DecodeError, match=re.escape(str(bad))):
            video.read([59])


def test_read_arguments(videos: dict[str, Path]) -> None:
    with Video(videos["mp4"]) as video:
        assert video.read([]).shape == (0, 48, 64, 3)
        with pytest.raises(ValueError, match=">= 0"):
            video.read([3, -1])
        with pytest.raises(ValueError, match="1-D"):
            video.read(torch.zeros(2, 3, dtype=torch.long))


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        for k in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("missing.mp4", "not found"),
        ("empty.mp4", "empty"),
        ("random.mp4", "not a readable media file"),
        ("truncated.mp4", "not a readable media file"),
        ("audio.mp4", "no video stream"),
    ],
)
def test_bad_files_raise_decode_error(
    videos: dict[str, Path], tmp_path: Path, name: str, reason: str
) -> None:
    path = tmp_path / name
    if name == "empty.mp4":
        path.touch()
    elif name == "random.mp4":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif name == "truncated.mp4":  # index (moov) at the end: the first half holds none
        data = videos["mp4"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif name == "audio.mp4":
        _audio_only(path)
    with pytest.raises(DecodeError, match=re.escape(str(path)) + ".*" + reason):
        Video(path)
    with pytest.raises(DecodeError, match=re.escape(str(path))):
        read_frames(path, [0])
