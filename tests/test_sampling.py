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


def test_clip_too_many_views() -> None:
    with pytest.raises(ValueError, match=r"8 frames; 3 views of a clip spanning 7 frames .* need 9"):
        clip_indices(8, frames=4, stride=2, views=3)
    with pytest.raises(ValueError, match=r"5 frames; 2 views .* need 8"):
        clip_indices(5, frames=4, stride=2, views=2)


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


def test_segment_too_many_views() -> None:
    with pytest.raises(ValueError, match=r"7 frames; 2 views of 4 segments need 8"):
        segment_indices(7, segments=4, views=2)


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
