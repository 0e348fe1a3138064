"""Does the whole learning path work? STTS temporal selection trained on synthetic videos.

1. Write a synthetic set (`make_synthetic`, `partial=True`): an object moves left, right, up or down
   (the 4 motion classes) during only part of each 16-frame clip, on a textured background with
   distractors; the rest of the clip is static. Ground truth says which frames hold the action.
   Sized for a CPU budget: 32x32 frames, a larger object and a softer texture than the defaults
   (with the default 1/6-frame object and full texture a tiny ViT trained from scratch for a few
   minutes stays at chance: its loss sits at ln(classes) and it only memorises small sets).
2. Train a tiny VideoMAE-layout backbone on the full clips (8 temporal slices of tubelet 2).
3. Install `stts:T0=0.5` (keep 4 of the 8 slices before block 0), freeze the backbone and train only
   the scorer, end to end through the perturbed top-K, with sigma decaying to 0.
4. Evaluate, on held-out videos, the frozen backbone with: all slices (`none`), STTS, `uniform` and
   `random_frames` at keep 0.5; and how often each method's kept slices overlap the action,
   against chance.

The scorer must pick action slices far more often than chance and beat both baselines.

Run:  python benchmarks/stts_synthetic.py [--train 1000] [--val 200] [--epochs 40] [--stts-epochs 15]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

import tokensieve as ts
from tokensieve.data import VideoDataset, load_truth, make_synthetic, read_list
from tokensieve.data.clips import ClipDataset
from tokensieve.data.transforms import normalize

SIZE, FRAMES, PATCH, CLASSES = 32, 16, 8, 4


def build_backbone(classes: int) -> ts.VideoBackbone:
    torch.manual_seed(0)
    return ts.build(
        "videomae-tiny", frames=FRAMES, size=SIZE, patch=PATCH, dim=96, depth=4, heads=4, mlp_dim=192,
        num_classes=classes,
    )  # fmt: skip


def action_overlap(model: ts.VideoBackbone, dataset: VideoDataset, root: Path) -> float:
    """Mean fraction of the kept temporal slices that overlap the action interval."""
    T, H, W = model.config.grid
    fractions = []
    model.eval()
    for index, record in enumerate(dataset.records):
        views = normalize(dataset.load(index).float() / 255, model.config.mean, model.config.std)
        with torch.no_grad():
            kept = (model.forward_features(views).pos[0] // (H * W)).unique()  # temporal slices kept
        start, end = load_truth(root, record.id)["action"]
        action = {t for t in range(T) if 2 * t < end and 2 * t + 2 > start}  # slices touching the action
        fractions.append(sum(int(t) in action for t in kept) / len(kept))
    return sum(fractions) / len(fractions)


def chance_overlap(dataset: VideoDataset, root: Path, T: int) -> float:
    """Expected overlap of a uniformly random choice of slices: the action's share of the slices."""
    shares = []
    for record in dataset.records:
        start, end = load_truth(root, record.id)["action"]
        shares.append(sum(2 * t < end and 2 * t + 2 > start for t in range(T)) / T)
    return sum(shares) / len(shares)


def report(info) -> None:  # type: ignore[no-untyped-def]
    """Print the training loss a few times per run."""
    if (info.step + 1) % max(1, info.total_steps // 8) == 0:
        print(f"   step {info.step + 1}/{info.total_steps}  loss {info.loss:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=40, help="backbone training epochs")
    parser.add_argument("--stts-epochs", type=int, default=15, help="scorer training epochs")
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--pool", default="max", choices=["max", "meanmax"], help="frame descriptor pooling")
    parser.add_argument(
        "--returning",
        action="store_true",
        help="the object undoes its action: only action frames tell the class",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        listing = make_synthetic(
            root, videos=args.train + args.val, classes=CLASSES, frames=FRAMES, size=SIZE, patch=PATCH,
            partial=True, object_size=(1 / 3.5, 1 / 3), texture=0.4, returning=args.returning, seed=args.seed,
        )  # fmt: skip
        records = read_list(listing)
        train_records, val_records = records[: args.train], records[args.train :]
        classes = len((root / "classes.txt").read_text().splitlines())
        # The action's direction is the label: no flips, and no crops that could cut the object out.
        clips = ClipDataset(
            train_records, frames=FRAMES, size=SIZE, stride=1, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False,
            num_classes=classes,
        )  # fmt: skip
        val = VideoDataset(val_records, frames=FRAMES, size=SIZE, stride=1, num_classes=classes)

        model = build_backbone(classes)
        print(f"1. backbone: {model.num_params / 1e6:.2f} M parameters, {args.train} clips", flush=True)
        ts.train(model, clips, epochs=args.epochs, batch_size=16, lr=5e-4, workers=2, progress=report)
        results = {}
        results["none (all 8 slices)"] = ts.evaluate(model, val, batch_size=16, workers=2)

        spec = f"stts:T0=0.5,sigma={args.sigma},pool={args.pool}"
        print(f"2. {spec}: the scorer alone (backbone frozen), sigma decayed to 0", flush=True)
        ts.apply(model, spec)
        ts.train(
            model, clips, epochs=args.stts_epochs, batch_size=16, lr=1e-3, reducer_lr=1e-3, freeze_backbone=True,
            workers=2, progress=report,
        )  # fmt: skip
        trained_stts = {k: v.clone() for k, v in model.plan.state_dict().items()}
        overlap = {}
        for spec in ("stts", "uniform:keep=0.5", "random_frames:keep=0.5"):
            if spec == "stts":
                ts.apply(model, f"stts:T0=0.5,sigma={args.sigma},pool={args.pool}")
                model.plan.load_state_dict(trained_stts)
            else:
                ts.apply(model, spec)
            results[spec] = ts.evaluate(model, val, batch_size=16, workers=2)
            overlap[spec] = action_overlap(model, val, root)
        chance = chance_overlap(val, root, model.config.grid[0])

    print(
        f"\nheld-out accuracy ({args.val} videos, {CLASSES} classes, action in part of the clip), frozen backbone"
    )
    print(f"{'plan':28s} {'top-1':>7s} {'GFLOPs':>8s} {'kept slices in the action':>26s}")
    for name, summary in results.items():
        share = overlap.get(name)
        cell = "-" if share is None else f"{100 * share:.1f}%"
        print(f"{name:28s} {100 * summary.top1:6.1f}% {summary.gflops_per_view:8.4f} {cell:>26s}")
    print(f"{'chance (random slices)':28s} {'':7s} {'':8s} {100 * chance:25.1f}%")
    stts, uni, rnd = (results[k].top1 for k in ("stts", "uniform:keep=0.5", "random_frames:keep=0.5"))
    verdict = [
        f"STTS picks action slices {overlap['stts'] / chance:.2f}x as often as chance",
        f"STTS vs uniform {100 * (stts - uni):+.1f} points, vs random_frames {100 * (stts - rnd):+.1f} points",
    ]
    print("\n".join(verdict))
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
