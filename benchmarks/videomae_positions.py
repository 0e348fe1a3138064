"""VideoMAE's sin-cos positions at other input sizes: the table made again for the new token count (what
VideoMAE's fine-tuning code does, and tokensieve's rule) against the built table interpolated over the
(T, H, W) grid (bicubic per temporal slice, linear over time, as for ViViT's learned positions).

`builtin:synthetic` (VideoMAE layout, 16 frames of 32x32) on its held-out set (400 videos, rendered into the
cache on first use), at other frame counts (frames resampled uniformly) and frame sizes (resized
bilinearly with antialiasing): top-1 under each rule and the exact McNemar p of their difference over the
videos only one of them gets right. docs/design.md ("Input sizes") quotes the table. About 20 s on one core.

Run:  python benchmarks/videomae_positions.py
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

import tokensieve as ts
from tokensieve.assets import heldout
from tokensieve.backbones import videovit
from tokensieve.backbones.positions import resize_space, resize_time
from tokensieve.data.datasets import VideoDataset, load_records
from tokensieve.data.transforms import normalize

SIZES = [(16, 32, 32), (8, 32, 32), (32, 32, 32), (16, 24, 24), (16, 40, 40), (16, 48, 48), (16, 32, 48),
         (8, 24, 24)]  # fmt: skip


def interpolated(embed: videovit.TubeletEmbed, grid: tuple[int, int, int]) -> Tensor:
    """The built table resized to `grid`: bicubic over each slice's H x W, linear over time."""
    T, H, W = embed.grid
    table = embed.pos_table.view(T, H, W, -1)  # (T, H, W, C)
    if (H, W) != grid[1:]:
        table = resize_space(table, grid[1:], "bicubic")  # (T, H', W', C)
    if T != grid[0]:
        table = resize_time(table.flatten(1, 2), grid[0], "linear")  # (T', H'*W', C)
    return table.reshape(math.prod(grid), -1)  # (T'*H'*W', C)


def resized(video: Tensor, frames: int, height: int, width: int) -> Tensor:
    """(V, T, C, H, W) clips with `frames` frames picked uniformly, resized to `height` x `width`."""
    V, T = video.shape[:2]
    if frames != T:
        video = video[:, torch.linspace(0, T - 1, frames).round().long()]
    if (height, width) != tuple(video.shape[-2:]):
        video = F.interpolate(video.flatten(0, 1), size=(height, width), mode="bilinear", antialias=True)
        video = video.unflatten(0, (V, frames))
    return video


def mcnemar(a: Tensor, b: Tensor) -> float:
    """Exact two-sided McNemar p of two paired (V,) bool correctness vectors."""
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def main() -> None:
    torch.set_num_threads(1)
    model = ts.load("builtin:synthetic").eval()
    cfg = model.config
    records, _ = load_records(heldout())
    data = VideoDataset(records, frames=cfg.frames, size=cfg.size, stride=1)
    samples = [data[i] for i in range(len(data))]
    video = torch.stack([s.views[0] for s in samples]).float().div(255)  # (V, T, C, H, W)
    video = normalize(video, cfg.mean, cfg.std)
    labels = torch.tensor([s.record.labels[0] for s in samples])
    made_again = videovit.TubeletEmbed._sinusoid
    print(f"builtin:synthetic, {len(samples)} held-out videos: top-1 made again / interpolated")
    for frames, height, width in SIZES:
        clips = resized(video, frames, height, width)
        right = {}
        for name, rule in (("made again", made_again), ("interpolated", interpolated)):
            videovit.TubeletEmbed._sinusoid = rule
            model.embed.__dict__.pop("_positions", None)  # the other rule's cached table
            with torch.no_grad():
                logits = torch.cat([model(clips[i : i + 50]) for i in range(0, len(clips), 50)])
            right[name] = logits.argmax(1) == labels
        videovit.TubeletEmbed._sinusoid = made_again
        a, b = right["made again"], right["interpolated"]
        print(f"{frames:3d} x {height}x{width}: {100 * a.double().mean():5.1f} / {100 * b.double().mean():5.1f}%"
              f"  McNemar p = {mcnemar(a, b):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
