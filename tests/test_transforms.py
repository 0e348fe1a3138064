from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokensieve.data.transforms import crops, hflip, normalize, random_resized_crop, resize_short, to_float


def grid(H: int, W: int, *, T: int = 1, C: int = 1) -> torch.Tensor:
    """(T, C, H, W) float arange: each value is its flat index, so a crop's top-left value gives its
    offset (h * W + w in the first plane)."""
    return torch.arange(T * C * H * W, dtype=torch.float32).view(T, C, H, W)  # (T, C, H, W)


def test_to_float_layout_and_range() -> None:
    frames = torch.randint(0, 256, (2, 3, 4, 3), dtype=torch.uint8)  # (T, H, W, 3)
    x = to_float(frames)
    assert x.shape == (2, 3, 3, 4) and x.dtype == torch.float32
    assert x[1, 2, 0, 3] == frames[1, 0, 3, 2] / 255
    assert torch.equal(x, frames.permute(0, 3, 1, 2).float() / 255)
    assert to_float(torch.full((1, 1, 1, 3), 255, dtype=torch.uint8)).eq(1).all()
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\) uint8"):
        to_float(frames.float())


def test_centre_crop_offsets_and_values() -> None:
    video = grid(6, 8, T=2)
    out = crops(video, 4)
    assert out.shape == (1, 2, 1, 4, 4)
    # offsets (6 - 4) // 2 = 1, (8 - 4) // 2 = 2: rows 1..4, columns 2..5 of a width-8 arange
    assert out[0, 0, 0].tolist() == [
        [10, 11, 12, 13],
        [18, 19, 20, 21],
        [26, 27, 28, 29],
        [34, 35, 36, 37],
    ]
    assert torch.equal(out[0, 1], video[1, :, 1:5, 2:6])
    odd = crops(grid(7, 9), 4)  # offsets floor(1.5) = 1, floor(2.5) = 2
    assert odd[0, 0, 0, 0, 0] == 1 * 9 + 2


def test_three_crops_landscape_portrait_square() -> None:
    land = crops(grid(6, 10), 4, num=3)  # along W at 0, 3, 6; rows from (6 - 4) // 2 = 1
    assert land.shape == (3, 1, 1, 4, 4)
    assert land[:, 0, 0, 0, 0].tolist() == [10 + 0, 10 + 3, 10 + 6]
    port = crops(grid(10, 6), 4, num=3)  # along H at 0, 3, 6; columns from 1
    assert port[:, 0, 0, 0, 0].tolist() == [0 * 6 + 1, 3 * 6 + 1, 6 * 6 + 1]
    square = crops(grid(5, 5), 4, num=3)  # square goes along W: columns 0, 0, 1, row 0
    assert square[:, 0, 0, 0, 0].tolist() == [0, 0, 1]
    # the three crops cover the long side
    assert torch.equal(land[0, ..., :3], grid(6, 10)[..., 1:5, 0:3])
    assert torch.equal(land[2, ..., -1], grid(6, 10)[..., 1:5, 9])


def test_crops_errors() -> None:
    with pytest.raises(ValueError, match=r"6x3 \(HxW\) are smaller than the crop size 4"):
        crops(grid(6, 3), 4)
    with pytest.raises(ValueError, match=r"num must be 1 .* or 3"):
        crops(grid(6, 6), 4, num=2)


def test_normalize_matches_manual() -> None:
    video = torch.rand(2, 4, 3, 5, 5)  # (B, T, C, H, W): channels at dim -3
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalize(video, mean, std)
    for c in range(3):
        assert torch.allclose(out[:, :, c], (video[:, :, c] - mean[c]) / std[c])
    with pytest.raises(ValueError, match="expected 3 means and stds"):
        normalize(video, (0.5, 0.5), (0.5, 0.5))


@pytest.mark.parametrize(
    ("hw", "size", "expected"),
    [((48, 64), 24, (24, 32)), ((64, 48), 24, (32, 24)), ((7, 10), 3, (3, 4)), ((30, 30), 20, (20, 20))],
)
def test_resize_short_shape(hw: tuple[int, int], size: int, expected: tuple[int, int]) -> None:
    out = resize_short(torch.rand(2, 3, *hw), size)
    assert out.shape == (2, 3, *expected)


def test_resize_short_keeps_constants_and_converts_uint8() -> None:
    const = torch.full((2, 3, 48, 64), 0.3)
    out = resize_short(const, 20)
    assert out.shape == (2, 3, 20, 27)  # round(64 * 20 / 48) = round(26.67)
    assert torch.allclose(out, torch.full_like(out, 0.3))
    as_uint8 = resize_short(torch.full((1, 3, 8, 8), 51, dtype=torch.uint8), 4)
    assert as_uint8.dtype == torch.float32 and torch.allclose(as_uint8, torch.full((1, 3, 4, 4), 0.2))
    # antialiasing: a pixel checkerboard shrunk 3x blurs to its mean (plain bilinear would sample
    # single pixels and keep a 0/1 checkerboard)
    checker = (torch.arange(12)[:, None] + torch.arange(12)[None, :]).remainder(2).float()[None, None]
    assert torch.allclose(resize_short(checker, 4), torch.full((1, 1, 4, 4), 0.5), atol=0.01)


def test_hflip() -> None:
    video = grid(2, 3, T=2, C=3)
    assert hflip(video)[1, 2, 0].tolist() == video[1, 2, 0].flip(0).tolist()
    assert hflip(video)[0, 0, 1].tolist() == [5, 4, 3]
    assert torch.equal(hflip(hflip(video)), video)


def test_random_resized_crop_reproducible_and_shaped() -> None:
    video = torch.rand(1, 3, 48, 64) + torch.arange(4.0).view(
        4, 1, 1, 1
    )  # (T, C, H, W), frame t = frame 0 + t

    def draw(seed: int) -> torch.Tensor:
        return random_resized_crop(video, 16, generator=torch.Generator().manual_seed(seed))

    out = draw(0)
    assert out.shape == (4, 3, 16, 16)
    assert torch.equal(out, draw(0))
    assert not torch.equal(out, draw(1))
    # one box for every frame: the resize is linear, so frame t still equals frame 0 + t
    assert torch.allclose(out - out[:1], torch.arange(4.0).view(4, 1, 1, 1).expand_as(out), atol=1e-5)


def test_random_resized_crop_boxes() -> None:
    video = torch.rand(2, 3, 48, 64)
    g = torch.Generator().manual_seed(0)
    # the whole frame is the only box of full area and ratio 4/3
    full = random_resized_crop(video, 24, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), generator=g)
    expected = F.interpolate(video, size=(24, 24), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(full, expected)
    # no square box of full area fits: after 10 attempts, the centre crop clamped to ratio 1
    fallback = random_resized_crop(video, 24, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=g)
    centre = crops(video, 48)[0]  # (T, C, 48, 48) at column 8
    expected = F.interpolate(centre, size=(24, 24), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(fallback, expected)
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop(video, 24, scale=(0.5, 0.1), generator=g)
