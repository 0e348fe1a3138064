"""Is decoding the bottleneck? Decoding + preprocessing clips/s against the model's, on real files.

Writes a synthetic set (`tokensieve make-synthetic`: 64 frames of 256x256 per video, so dense 16x4
clips and a resize are needed, as on Kinetics), then measures in one process:
1. decode: views/s of `VideoDataset` through a DataLoader with the default worker count, no model;
2. model: views/s of videomae-s forward passes alone (random weights, batch 8, as evaluation runs);
3. end to end: `ts.evaluate` with the default workers, the model's clips/s while decoding runs.
Decoding is not the bottleneck when (1) is well above (2) and (3) stays close to (2).

Run:  python benchmarks/decode.py [--videos 24] [--views 1x1] [--workers 2] [--video-frames 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import tokensieve as ts
from tokensieve.data.datasets import VideoDataset, read_list
from tokensieve.data.synthetic import make_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--views", default="1x1")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--video-frames", type=int, default=64, help="frames per synthetic video")
    args = parser.parse_args()
    clips, num_crops = (int(v) for v in args.views.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        listing = make_synthetic(Path(tmp), videos=args.videos, frames=args.video_frames, size=256, seed=0)
        print(
            f"wrote {args.videos} videos of {args.video_frames}x256x256 in {time.perf_counter() - start:.1f} s"
        )
        model = ts.build("videomae-s", num_classes=10).eval()
        dataset = VideoDataset(
            read_list(listing), frames=16, size=224, views=(clips, num_crops), stride=4, num_classes=10
        )
        views_per_video = clips * num_crops

        loader = DataLoader(dataset, batch_size=None, num_workers=args.workers)
        start = time.perf_counter()
        samples = list(loader)
        failed = [s.error for s in samples if s.views is None]
        if failed:
            raise SystemExit(f"{len(failed)} videos failed, e.g. {failed[0]}")
        count = sum(len(s.views) for s in samples)
        decode = count / (time.perf_counter() - start)

        batch = torch.randn(args.batch_size, 16, 3, 224, 224)
        with torch.inference_mode():
            model(batch)  # warm-up
            start = time.perf_counter()
            rounds = max(1, (args.videos * views_per_video) // (2 * args.batch_size))
            for _ in range(rounds):
                model(batch)
        forward = rounds * args.batch_size / (time.perf_counter() - start)

        start = time.perf_counter()
        summary = ts.evaluate(model, dataset, batch_size=args.batch_size, workers=args.workers)
        wall = args.videos * views_per_video / (time.perf_counter() - start)

    print(
        f"views {clips}x{num_crops}, {args.workers} decoding workers, batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    print(f"  decode + preprocess alone : {decode:8.2f} views/s")
    print(f"  model forward alone       : {forward:8.2f} views/s")
    print(
        f"  evaluate, model clips/s   : {summary.clips_per_s:8.2f} views/s  ({summary.clips_per_s / forward:.2f} of the model alone)"
    )
    print(f"  evaluate, wall clock      : {wall:8.2f} views/s  ({wall / forward:.2f} of the model alone)")
    verdict = "decoding is not the bottleneck" if decode > 2 * forward else "DECODING IS THE BOTTLENECK"
    print(f"  decode / model = {decode / forward:.1f}x: {verdict}")


if __name__ == "__main__":
    main()
