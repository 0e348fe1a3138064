from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tokensieve.data import synthetic
from tokensieve.data.datasets import read_list as read_records
from tokensieve.data.synthetic import CLASSES, MANIFEST, foreground_recall, load_truth, make_synthetic
from tokensieve.errors import InputError

SMALL = {"frames": 8, "size": 64, "patch": 16, "tubelet": 2}


def decode(path: Path) -> np.ndarray:
    """(F, S, S, 3) uint8 RGB frames of an mp4."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def read_list(out: Path) -> list[tuple[str, int]]:
    lines = (out / "list.txt").read_text().splitlines()
    return [(path, int(label)) for path, label in (line.split(" ") for line in lines)]


def truths(out: Path) -> dict[str, dict]:
    """Truth of every listed video, keyed by class name (one video per class)."""
    items = {}
    for path, label in read_list(out):
        truth = load_truth(out, path)
        assert truth["label"] == label
        items[CLASSES[label]] = truth
    return items


def centroid(mask: torch.Tensor) -> torch.Tensor:
    """(T, 2) mask-weighted (x, y) centre per token frame, in token units."""
    _, H, W = mask.shape
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij"
    )
    total = mask.sum((1, 2))
    return torch.stack([(mask * xs).sum((1, 2)) / total, (mask * ys).sum((1, 2)) / total], 1)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    make_synthetic(out, videos=20, seed=1, **SMALL)
    return out


@pytest.fixture(scope="module")
def fine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One video per class, full-clip actions, one-frame tubelets and 8-pixel patches."""
    out = tmp_path_factory.mktemp("fine")
    make_synthetic(out, videos=10, frames=8, size=64, patch=8, tubelet=1, seed=2)
    return truths(out)


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("partial")
    make_synthetic(out, videos=20, frames=16, size=64, patch=8, tubelet=2, partial=True, seed=3)
    return out


# ---------------------------------------------------------------------------------------------- files
def test_files_and_formats(small: Path) -> None:
    listed = read_list(small)
    assert [p for p, _ in listed] == [f"videos/{i:06d}.mp4" for i in range(20)]
    assert sorted(label for _, label in listed) == sorted(list(range(10)) * 2)  # balanced
    assert [label for _, label in listed] != [i % 10 for i in range(20)]  # shuffled
    assert (small / "classes.txt").read_text() == "".join(f"{c}\n" for c in CLASSES)
    assert not list(small.rglob(".*partial"))
    for path, label in listed:
        video = decode(small / path)
        assert video.shape == (8, 64, 64, 3)
        truth = load_truth(small, Path(path).stem)
        assert set(truth) == {"label", "action", "mask", "patch", "tubelet"}
        assert truth["label"] == label and truth["action"] == (0, 8)
        assert (truth["patch"], truth["tubelet"]) == (16, 2)
        mask = truth["mask"]
        assert mask.dtype == torch.float32 and mask.shape == (4, 4, 4)
        assert mask.min() >= 0 and mask.max() <= 1
        assert mask.sum() > 0 or CLASSES[label] in ("appearing", "disappearing")


def test_h264_at_fps(small: Path) -> None:
    with av.open(str(small / "videos" / "000000.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == 8
        assert stream.codec_context.pix_fmt == "yuv420p"


def test_fewer_classes_and_progress(tmp_path: Path) -> None:
    calls = []
    listing = make_synthetic(
        tmp_path / "new", videos=7, classes=3, distractors=0, progress=lambda *a: calls.append(a), **SMALL
    )
    assert listing == tmp_path / "new" / "list.txt"
    assert (tmp_path / "new" / "classes.txt").read_text().splitlines() == list(CLASSES[:3])
    assert sorted(label for _, label in read_list(tmp_path / "new")) == [0, 0, 0, 1, 1, 2, 2]
    assert calls == [(i, 7) for i in range(1, 8)]


def test_interrupted_encode_leaves_no_video(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(synthetic.av.VideoFrame, "from_ndarray", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        make_synthetic(tmp_path, videos=2, **SMALL)
    assert not list((tmp_path / "videos").iterdir())
    assert not (tmp_path / "list.txt").exists()


def test_mpeg4_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_x264(name: str, mode: str = "r") -> object:
        raise av.codec.codec.UnknownCodecError(name)

    monkeypatch.setattr(synthetic.av, "Codec", no_x264)
    make_synthetic(tmp_path, videos=1, **SMALL)
    with av.open(str(tmp_path / "videos" / "000000.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    assert decode(tmp_path / "videos" / "000000.mp4").shape == (8, 64, 64, 3)


# ---------------------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize(
    ("name", "axis", "sign"),
    [("moving left", 0, -1), ("moving right", 0, 1), ("moving up", 1, -1), ("moving down", 1, 1)],
)
def test_moving_centroid(fine: dict[str, dict], name: str, axis: int, sign: int) -> None:
    mask = fine[name]["mask"]
    c = centroid(mask)  # (T, 2)
    step = sign * c[:, axis].diff()
    assert (step > 0).all()  # moves every frame
    assert sign * (c[-1, axis] - c[0, axis]) > 0.25 * 8  # about a third of the 8-token side
    # Only along its axis (up to pixel sampling of the anti-aliased edges), at constant size.
    assert (c[:, 1 - axis] - c[0, 1 - axis]).abs().max() < 0.05
    total = mask.sum((1, 2))
    assert torch.allclose(total, total[0], rtol=0.02)


def test_size_and_presence(fine: dict[str, dict]) -> None:
    total = {name: truth["mask"].sum((1, 2)) for name, truth in fine.items()}  # (T,) object area per frame
    assert (total["growing"].diff() > 0).all() and 3 < total["growing"][-1] / total["growing"][0] < 5
    assert (total["shrinking"].diff() < 0).all() and 3 < total["shrinking"][0] / total["shrinking"][-1] < 5
    assert (
        total["appearing"][0] == 0 and total["appearing"][-1] > 0.3 and (total["appearing"].diff() > 0).all()
    )
    assert total["disappearing"][0] > 0.3 and total["disappearing"][-1] == 0
    staying = fine["staying"]["mask"]
    assert staying.sum() > 0 and (staying == staying[0]).all()
    rotating = fine["rotating"]["mask"]
    assert torch.allclose(total["rotating"], total["rotating"][0], rtol=0.05)
    assert (rotating[-1] - rotating[0]).abs().sum() > 0.5 * total["rotating"][0]  # the shape turned


def test_partial_action_is_strict_and_alone(partial: Path) -> None:
    for path, label in read_list(partial):
        truth = load_truth(partial, path)
        start, end = truth["action"]
        assert 0 <= start < end <= 16 and 4 <= end - start <= 8  # a quarter to a half of the clip
        mask = truth["mask"]  # (8, 8, 8), token frame k holds frames 2k, 2k + 1
        before = [k for k in range(8) if 2 * k + 1 <= start]  # frames before the action show its first state
        after = [k for k in range(8) if 2 * k >= end - 1]
        for ks in (before, after):
            for k in ks:
                assert torch.equal(mask[k], mask[ks[0]])
        assert before or after
        changed = not torch.equal(mask[0], mask[-1])
        assert changed == (CLASSES[label] != "staying")


def test_decoded_background_static_object_changes(partial: Path) -> None:
    for path, label in read_list(partial):
        truth = load_truth(partial, path)
        video = torch.from_numpy(decode(partial / path)).float()  # (F, S, S, 3)
        mask = truth["mask"]  # (T, H, W)
        ever = (mask > 0).any(0).repeat_interleave(8, 0).repeat_interleave(8, 1)  # (S, S) object pixels
        diff = (video[1:] - video[:-1]).abs().mean(-1)  # (F - 1, S, S)
        assert diff[:, ~ever].mean() < 0.5  # of 255: the scene is static
        start, end = truth["action"]
        change = (video[end - 1] - video[start]).abs().mean(-1)[ever].mean()
        if CLASSES[label] == "staying":
            assert change < 2
        else:
            assert change > 10  # the object region changes during the action


# ---------------------------------------------------------------------------------------------- determinism
def test_deterministic(tmp_path: Path) -> None:
    kwargs = {"videos": 3, "partial": True, **SMALL}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        make_synthetic(tmp_path / name, seed=seed, **kwargs)

    def content(name: str) -> tuple[list, list]:
        ids = [f"{i:06d}" for i in range(3)]
        return (
            [load_truth(tmp_path / name, i) for i in ids],
            [decode(tmp_path / name / "videos" / f"{i}.mp4") for i in ids],
        )

    (ta, va), (tb, vb), (tc, vc) = content("a"), content("b"), content("c")
    assert (tmp_path / "a" / "list.txt").read_text() == (tmp_path / "b" / "list.txt").read_text()
    for x, y in zip(ta, tb, strict=True):
        assert {k: v for k, v in x.items() if k != "mask"} == {k: v for k, v in y.items() if k != "mask"}
        assert torch.equal(x["mask"], y["mask"])
    assert all(np.array_equal(x, y) for x, y in zip(va, vb, strict=True))
    assert not any(torch.equal(x["mask"], y["mask"]) for x, y in zip(ta, tc, strict=True))
    assert not any(x.shape == y.shape and np.allclose(x, y, atol=5) for x, y in zip(va, vc, strict=True))


# ---------------------------------------------------------------------------------------------- recall
MASK = torch.tensor([0.9, 0.0, 0.5, 0.2, 0.0, 1.0, 0.0, 0.7]).view(2, 2, 2)  # foreground: 0, 2, 5, 7


@pytest.mark.parametrize(
    ("pos", "expected"),
    [
        (list(range(8)), 1.0),
        ([1, 3, 4, 6], 0.0),
        ([0, 5, 1, -1], 0.5),
        ([0, 0, 0, 0], 0.25),  # a position counts once
        ([-1, -1, 2, 7], 0.5),
        ([-1], 0.0),  # not Python's last element
        ([], 0.0),
    ],
)
def test_recall_hand_checked(pos: list[int], expected: float) -> None:
    recall = foreground_recall(torch.tensor(pos, dtype=torch.long), MASK)
    assert recall.shape == () and recall.dtype == torch.float32
    assert recall.item() == expected


def test_recall_threshold_batch_and_nan() -> None:
    pos = torch.tensor([[0, 2, 3, -1], [5, 7, 0, 1]])
    mask = torch.stack([MASK, MASK.flip(0)])  # second video: foreground at 1, 3, 4, 6
    assert foreground_recall(pos, mask).tolist() == [0.5, 0.25]
    assert foreground_recall(pos[0], MASK, threshold=0.8).item() == 0.5  # foreground 0, 5
    empty = foreground_recall(pos, torch.stack([MASK, torch.zeros(2, 2, 2)]))
    assert empty[0] == 0.5 and math.isnan(empty[1])


def test_recall_on_generated_truth(small: Path) -> None:
    mask = torch.stack([load_truth(small, f"{i:06d}")["mask"] for i in range(20)])  # (20, 4, 4, 4)
    every = torch.arange(64).expand(20, 64)
    recall = foreground_recall(every, mask, threshold=0.1)
    has_fg = (mask >= 0.1).flatten(1).any(1)
    assert has_fg.sum() >= 10
    assert (recall[has_fg] == 1).all() and recall[~has_fg].isnan().all()


@pytest.mark.parametrize(
    ("pos", "mask", "match"),
    [
        (torch.zeros(4, dtype=torch.long), torch.zeros(1, 2, 2, 2), "pos"),
        (torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, 2, 2, 2), "batch"),
        (torch.tensor([8]), MASK, "outside"),
        (torch.tensor([0.0]), MASK, "integer"),
    ],
)
def test_recall_bad_input(pos: torch.Tensor, mask: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        foreground_recall(pos, mask)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"videos": 0}, r"videos must be an int >= 1"),
        ({"classes": 0}, r"classes must be an int in 1\.\.10"),
        ({"classes": 11}, r"classes must be an int in 1\.\.10"),
        ({"frames": 0}, r"frames must be an int >= 1 divisible by tubelet=2"),
        ({"frames": 7}, r"frames must be an int >= 1 divisible by tubelet=2"),
        ({"frames": 2, "partial": True}, r"frames must be an int >= 3 with partial=True"),
        ({"size": 72}, r"size must be an even int >= 32 divisible by patch=16"),
        ({"size": 16}, r"size must be an even int >= 32 divisible by patch=16"),
        ({"size": 35, "patch": 5}, r"size must be an even int"),
        ({"patch": 0}, r"patch must be an int >= 1"),
        ({"tubelet": 0}, r"tubelet must be an int >= 1"),
        ({"distractors": -1}, r"distractors must be an int >= 0"),
        ({"fps": 0}, r"fps must be an int >= 1"),
    ],
)
def test_bad_input(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"videos": 2, "frames": 8, "size": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_synthetic(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_load_truth_missing(small: Path) -> None:
    with pytest.raises(InputError, match="999999"):
        load_truth(small, "999999")


def test_object_size_and_texture_set_the_difficulty(tmp_path: Path) -> None:
    small = make_synthetic(tmp_path / "small", videos=4, classes=1, frames=4, size=64, seed=1)
    big = make_synthetic(
        tmp_path / "big", videos=4, classes=1, frames=4, size=64, seed=1, object_size=(0.3, 0.33), texture=0.0,
        distractors=0,
    )  # fmt: skip
    area = {
        name: sum(float(load_truth(listing.parent, r.id)["mask"].sum()) for r in read_records(listing))
        for name, listing in (("small", small), ("big", big))
    }
    assert area["big"] > 2 * area["small"]
    with av.open(str(read_records(big)[0].path)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(float).reshape(-1, 3)
    # a flat background (no texture, no distractors): most pixels sit at one colour
    assert (np.abs(frame - np.median(frame, 0)).max(1) < 4).mean() > 0.8
    with pytest.raises(ValueError, match="object_size must be"):
        make_synthetic(tmp_path / "bad", videos=1, object_size=(0.3, 0.5))
    with pytest.raises(ValueError, match="texture must be"):
        make_synthetic(tmp_path / "bad", videos=1, texture=-1.0)


def test_returning_actions_end_where_they_started(tmp_path: Path) -> None:
    listing = make_synthetic(
        tmp_path, videos=8, classes=4, frames=16, size=64, tubelet=1, partial=True, returning=True, seed=2
    )
    for line in listing.read_text().splitlines():
        vid = Path(line.split()[0]).stem
        truth = load_truth(tmp_path, vid)
        mask, (start, end) = truth["mask"], truth["action"]
        torch.testing.assert_close(mask[0], mask[-1])  # back where it started
        assert not torch.allclose(mask[start], mask[(start + end - 1) // 2 + 1])  # away in between


def test_visible_only_during_the_action(tmp_path: Path) -> None:
    listing = make_synthetic(
        tmp_path, videos=6, classes=4, frames=16, size=64, tubelet=1, partial=True, visible="action", seed=3
    )
    for record in read_records(listing):
        truth = load_truth(tmp_path, record.id)
        mask, (start, end) = truth["mask"], truth["action"]
        outside = [t for t in range(16) if not start <= t < end]
        assert outside and float(mask[outside].sum()) == 0.0  # nothing of the object outside the action
        assert bool((mask[start:end].flatten(1).sum(1) > 0).all())  # present in every action frame
        with av.open(str(record.path)) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(float)
        scene = frames[outside]  # the static scene alone: alike up to the codec's noise
        assert np.abs(scene - scene[0]).mean() < 3.0
        assert np.abs(frames[start:end] - scene[0]).max() > 100  # the saturated object shows up
    with pytest.raises(ValueError, match="visible must be"):
        make_synthetic(tmp_path / "bad", videos=1, visible="sometimes")


def test_tiny_videos_encode_to_the_same_bytes_every_time(tmp_path: Path) -> None:
    # x264's lookahead (macroblock tree) reads memory it never wrote on frames this small, so the
    # bitstream depended on what the allocator held before: the same arguments gave other videos.
    digests = set()
    for k in range(16):
        torch.randn(12345 + k)  # leave different contents in freed memory before each run
        listing = make_synthetic(
            tmp_path / str(k), videos=2, classes=4, frames=16, size=32, patch=8, partial=True,
            object_size=(1 / 3.5, 1 / 3), texture=0.4,
        )  # fmt: skip
        digests.add(tuple(hashlib.md5(r.path.read_bytes()).hexdigest() for r in read_records(listing)))
    assert len(digests) == 1


# ---------------------------------------------------------------------------------------------- one set per folder
def test_a_folder_holds_one_set(tmp_path: Path) -> None:
    out = tmp_path / "set"
    tiny = {"videos": 2, "classes": 2, "frames": 4, "size": 32}
    make_synthetic(out, seed=1, **tiny)
    manifest = json.loads((out / MANIFEST).read_text())["arguments"]
    assert {k: manifest[k] for k in (*tiny, "seed")} == {**tiny, "seed": 1}
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    make_synthetic(out, seed=1, **tiny)  # the same arguments again: the same set, rewritten
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    for change, named in (({"seed": 2}, "seed=1 there, 2 here"), ({"videos": 3}, "videos=2 there, 3 here")):
        with pytest.raises(InputError, match=f"holds another synthetic set \\({named}\\)"):
            make_synthetic(out, **{**tiny, "seed": 1, **change})
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_folder_of_other_files_is_refused_and_an_empty_one_used(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty and holds no synthetic set"):
        make_synthetic(tmp_path / "other", videos=1, frames=4, size=32)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert make_synthetic(tmp_path / "empty", videos=1, frames=4, size=32).is_file()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / MANIFEST).write_text("[1, 2]")
    with pytest.raises(InputError, match="not a synthetic set's manifest"):
        make_synthetic(tmp_path / "broken", videos=1, frames=4, size=32)
