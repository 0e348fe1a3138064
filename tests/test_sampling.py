from __future__ import annotations

import pytest
import torch

from tokensieve.data.sampling import (
    clip_indices,
    random_clip_indices,
    random_segment_indices,
    segment_indices,
)


def test_clip_one_view_takes_the_centre() -> None:
    # span (4 - 1) * 2 + 1 = 7, start (100 - 7) // 2 = 46
    assert clip_indices(100, frames=4, stride=2).tolist() == [[46, 48, 50, 52]]
    assert clip_indices(7, frames=4, stride=2).tolist() == [[0, 2, 4, 6]]  # exactly one span
    assert clip_indices(100, frames=16, stride=4).dtype == torch.long


def test_clip_views_spread_from_first_to_last_start() -> None:
    # starts round(linspace(0, 93, 3)) = round(0, 46.5, 93) = 0, 46, 93 (half to even)
    assert clip_indices(100, frames=4, stride=2, views=3).tolist() == [
        [0, 2, 4, 6],
        [46, 48, 50, 52],
        [93, 95, 97, 99],
    ]
    # the smallest video for 3 views: 7 + 3 - 1 = 9 frames, starts 0, 1, 2
    assert clip_indices(9, frames=4, stride=2, views=3)[:, 0].tolist() == [0, 1, 2]
    assert clip_indices(300, frames=16, stride=4, views=5).max() == 299


def test_clip_shorter_than_span_follows_policy() -> None:
    # span 7 > 5 frames: start 0, indices 0 2 4 6 -> 6 is past the end
    assert clip_indices(5, frames=4, stride=2).tolist() == [[0, 2, 4, 1]]
    assert clip_indices(5, frames=4, stride=2, short="loop").tolist() == [[0, 2, 4, 1]]
    assert clip_indices(5, frames=4, stride=2, short="repeat").tolist() == [[0, 2, 4, 4]]
    assert clip_indices(1, frames=3, stride=4, short="repeat").tolist() == [[0, 0, 0]]


def test_clip_views_of_a_short_video_spread_over_its_frames() -> None:
    # 8 frames hold 2 starts of a 7-frame span, not 3: starts spread over all frames,
    # round(linspace(0, 7, 3)) = 0, 4 (3.5 half to even), 7, and clips loop past the end
    assert clip_indices(8, frames=4, stride=2, views=3).tolist() == [[0, 2, 4, 6], [4, 6, 0, 2], [7, 1, 3, 5]]
    # a clip longer than the video: starts 0 and 4 of 5 frames
    assert clip_indices(5, frames=4, stride=2, views=2).tolist() == [[0, 2, 4, 1], [4, 1, 3, 0]]
    assert clip_indices(5, frames=4, stride=2, views=2, short="repeat").tolist() == [
        [0, 2, 4, 4],
        [4, 4, 4, 4],
    ]
    # the README's case: 16-frame videos, 16 x 4 clips (a 61-frame span), 2 views start at 0 and 15
    assert clip_indices(16, frames=16, stride=4, views=2)[:, :5].tolist() == [
        [0, 4, 8, 12, 0],
        [15, 3, 7, 11, 15],
    ]


@pytest.mark.parametrize("short", ["loop", "repeat"])
def test_clip_any_number_of_views_of_any_video(short: str) -> None:
    for num_frames in (1, 2, 7, 16, 60, 61, 62, 64, 300):
        for views in (1, 2, 3, 5, 10, 20):
            idx = clip_indices(num_frames, frames=16, stride=4, views=views, short=short)  # type: ignore[arg-type]
            assert idx.shape == (views, 16) and idx.dtype == torch.long
            assert 0 <= idx.min() and idx.max() < num_frames
            starts = idx[:, 0]
            assert starts[0] == 0 or views == 1
            assert bool((starts.diff() >= 0).all())  # views in temporal order


def test_segment_one_view_takes_centres() -> None:
    # floor((k + 0.5) * 10 / 4) = floor(1.25, 3.75, 6.25, 8.75)
    assert segment_indices(10, segments=4).tolist() == [[1, 3, 6, 8]]
    assert segment_indices(8, segments=8).tolist() == [list(range(8))]


def test_segment_views_shift_within_segments() -> None:
    # v=0: floor((k + 0.25) * 2.5) = 0 3 5 8; v=1: floor((k + 0.75) * 2.5) = 1 4 6 9
    assert segment_indices(10, segments=4, views=2).tolist() == [[0, 3, 5, 8], [1, 4, 6, 9]]
    # enough frames for every view to differ: (views, segments) covers each frame once
    idx = segment_indices(12, segments=4, views=3)
    assert sorted(idx.flatten().tolist()) == list(range(12))


def test_segment_short_video_repeats_frames() -> None:
    # floor((2k + 1) * 3 / 16)
    assert segment_indices(3, segments=8).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    assert segment_indices(1, segments=4).tolist() == [[0, 0, 0, 0]]


def test_segment_views_of_a_short_video_repeat_frames() -> None:
    # floor((2 * (k * views + v) + 1) * N / (2 * views * S)) needs no minimum length
    assert segment_indices(7, segments=4, views=2).tolist() == [[0, 2, 3, 5], [1, 3, 4, 6]]
    assert segment_indices(3, segments=4, views=3).tolist() == [[0, 0, 1, 2], [0, 1, 1, 2], [0, 1, 2, 2]]
    for num_frames in (1, 2, 5, 16):
        idx = segment_indices(num_frames, segments=8, views=5)
        assert idx.shape == (5, 8) and 0 <= idx.min() and idx.max() < num_frames


def test_random_clip_is_reproducible_and_in_range() -> None:
    def draw(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.stack([random_clip_indices(50, frames=4, stride=3, generator=g) for _ in range(200)])

    clips = draw(0)  # (200, 4)
    assert clips.shape == (200, 4) and clips.dtype == torch.long
    assert torch.equal(clips, draw(0))
    assert not torch.equal(clips, draw(1))
    assert bool((clips.diff(dim=1) == 3).all())
    starts = clips[:, 0]
    assert starts.min() == 0 and starts.max() == 50 - 10  # every start reachable, none past the last
    assert clips.max() == 49


def test_random_clip_short_video() -> None:
    g = torch.Generator().manual_seed(0)
    assert random_clip_indices(5, frames=4, stride=2, generator=g).tolist() == [0, 2, 4, 1]
    assert random_clip_indices(5, frames=4, stride=2, generator=g, short="repeat").tolist() == [0, 2, 4, 4]


def test_random_segment_is_reproducible_and_within_segments() -> None:
    def draw(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.stack([random_segment_indices(10, segments=4, generator=g) for _ in range(200)])

    idx = draw(0)  # (200, 4); segments [0, 2) [2, 5) [5, 7) [7, 10)
    assert torch.equal(idx, draw(0))
    assert not torch.equal(idx, draw(1))
    assert idx.min(0).values.tolist() == [0, 2, 5, 7]
    assert idx.max(0).values.tolist() == [1, 4, 6, 9]


def test_random_segment_short_video() -> None:
    # bounds floor(k * 3 / 8) = 0 0 0 1 1 1 2 2 3: segments of length 0 or 1, so no randomness left
    # (an empty segment takes its start)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert random_segment_indices(3, segments=8, generator=g).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: clip_indices(0, frames=4, stride=2), "num_frames"),
        (lambda: clip_indices(10, frames=0, stride=2), "frames"),
        (lambda: clip_indices(10, frames=4, stride=0), "stride"),
        (lambda: clip_indices(10, frames=4, stride=2, views=0), "views"),
        (lambda: clip_indices(10, frames=4, stride=2, short="pad"), "short"),  # type: ignore[arg-type]
        (lambda: segment_indices(0, segments=4), "num_frames"),
        (lambda: segment_indices(10, segments=0), "segments"),
        (lambda: segment_indices(10, segments=4, views=0), "views"),
        (lambda: random_clip_indices(-1, frames=4, stride=2, generator=torch.Generator()), "num_frames"),
        (lambda: random_segment_indices(10, segments=0, generator=torch.Generator()), "segments"),
    ],
)
def test_bad_arguments_name_the_parameter(call, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        call()
