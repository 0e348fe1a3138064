"""Does the whole learning path work? STTS temporal selection trained on synthetic videos.

1. Write a synthetic set (`make_synthetic`, `partial=True`): an object moves left, right, up or down
   (the 4 motion classes) during only part of each 16-frame clip, on a textured background with
   distractors. By default the object is in the scene only while it acts (`visible="action"`), so the
   frames outside the action show the same static scene and carry nothing of the label. Ground truth
   says which frames hold the action. Sized for a CPU budget: 32x32 frames, a larger object and a
   softer texture than the defaults (with the default 1/6-frame object and full texture a tiny ViT
   trained from scratch for a few minutes stays at chance: its loss sits at ln(classes) and it only
   memorises small sets).
2. Train a tiny VideoMAE-layout backbone on the full clips (8 temporal slices of tubelet 2).
3. Install `stts:T0=0.5` (keep 4 of the 8 slices before block 0), freeze the backbone and train only
   the scorer, end to end through the perturbed top-K, with sigma decaying to 0, on other videos
   (seeded apart): a tiny backbone memorises its own training clips, so on them it is right
   whichever slices it gets and the loss tells the scorer little.
4. Evaluate, on held-out videos, the frozen backbone with: all slices (`none`), STTS, `uniform` and
   `random_frames` at keep 0.5; and, for each method, the share of its kept slices that hold the
   action and the share of the action's slices it kept (out of what the budget allows), against
   random slices and a perfect selector.

The scorer must pick action slices far more often than chance and beat both baselines.

`--visible always` keeps the object in the scene before and after the action. The action is one-way
(the object ends elsewhere than it started), so the slices on either side of the action tell the
class as well as the action does, and a selector trained on the class alone has no reason to prefer
the action itself: there STTS still beats both baselines but overlaps the action only a little more
than chance. `--returning` makes the object undo its action instead (much harder for a tiny backbone).

The backbone is the fragile part. A ViT this small trained from scratch sits at the loss of chance,
ln 4, for about a thousand steps before it finds the motion, and on some sets of videos it does not
find it within 40 epochs at all. With this recipe it learned on 2 of the 3 sets of videos tried; on
the third, neither tubelet 4, nor 32 frames, nor a class-token ViT, nor the object visible all along
helped, and 1500 clips for 30 epochs did not learn on a fourth set. Training is deterministic (same
seed, same weights), and the default `--seed` gives a set where it learns. If it stays near chance
the script says so and stops, since the scorer cannot be judged through a backbone that ignores its
input.

The scorer varies with its initialisation too: on one backbone, seven inits kept 57-88% of the
action and one of them did no better than the baselines. So `--scorer-seeds` (3) scorers are
trained, each from its own seed, and reported one by one and on average.

`--jacobian diagonal full` trains the scorers once per backward estimator of the perturbed top-K
(`diagonal`, the released code's and the default; `full`, the paper's Eq. 11), on the same backbone,
from the same initialisations and the same random state, so only the estimator differs.

Run:  python benchmarks/stts_synthetic.py [--train 1000] [--scorer-train 500] [--val 200] [--epochs 40]
                                           [--stts-epochs 20] [--scorer-seeds 3] [--jacobian diagonal full]
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

SIZE, FRAMES, PATCH, TUBELET, CLASSES = 32, 16, 8, 2, 4


def build_backbone(classes: int) -> ts.VideoBackbone:
    torch.manual_seed(0)
    return ts.build(
        "videomae-tiny", frames=FRAMES, size=SIZE, patch=PATCH, tubelet=TUBELET, dim=96, depth=4, heads=4,
        mlp_dim=192, num_classes=classes,
    )  # fmt: skip


def action_slices(root: Path, dataset: VideoDataset, T: int) -> list[set[int]]:
    """Per video: the temporal slices (tubelets of TUBELET frames) holding a frame of the action."""
    intervals = (load_truth(root, record.id)["action"] for record in dataset.records)
    return [
        {t for t in range(T) if TUBELET * t < end and TUBELET * (t + 1) > start} for start, end in intervals
    ]


def mean_pairs(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return sum(a for a, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs)


def action_overlap(
    model: ts.VideoBackbone, dataset: VideoDataset, actions: list[set[int]]
) -> tuple[float, float]:
    """Mean share of the kept slices that hold the action, and of the action slices kept.

    The second is capped by the budget: with K kept slices and an action over A slices, a perfect
    selector keeps min(A, K) of them, so that is what it is divided by.
    """
    _, H, W = model.config.grid
    shares = []
    model.eval()
    for index, action in enumerate(actions):
        views = normalize(dataset.load(index).float() / 255, model.config.mean, model.config.std)
        with torch.no_grad():
            kept = {int(t) for t in (model.forward_features(views).pos[0] // (H * W)).unique()}
        shares.append((len(kept & action) / len(kept), len(kept & action) / min(len(action), len(kept))))
    return mean_pairs(shares)


def reference_overlap(actions: list[set[int]], T: int, K: int) -> dict[str, tuple[float, float]]:
    """The same two shares for slices drawn at random (in expectation) and for a perfect selector."""
    sizes = [len(action) for action in actions]
    return {
        "chance (random slices)": mean_pairs([(A / T, K * A / T / min(A, K)) for A in sizes]),
        "perfect selector": mean_pairs([(min(A, K) / K, 1.0) for A in sizes]),
    }


def report(info) -> None:  # type: ignore[no-untyped-def]
    """Print the training loss a few times per run."""
    if info.step % max(1, info.total_steps // 8) == 0:
        print(f"   step {info.step}/{info.total_steps}  loss {info.loss:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000, help="clips the backbone is trained on")
    parser.add_argument(
        "--scorer-train", type=int, default=500, help="other clips, the scorer is trained on (see step 3)"
    )
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=40, help="backbone training epochs")
    parser.add_argument("--stts-epochs", type=int, default=20, help="scorer training epochs")
    parser.add_argument(
        "--scorer-seeds", type=int, default=3, help="scorers trained, each from its own initialisation"
    )
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--pool", default="max", choices=["max", "meanmax"], help="frame descriptor pooling")
    parser.add_argument(
        "--jacobian",
        nargs="+",
        default=["diagonal"],
        choices=["diagonal", "full"],
        help="backward estimator(s) of the perturbed top-K; each gets its own --scorer-seeds scorers",
    )
    parser.add_argument(
        "--visible",
        default="action",
        choices=["action", "always"],
        help="the object is in the scene only during the action (default), or all along: then the frames"
        " before and after a one-way action tell the class too",
    )
    parser.add_argument(
        "--returning",
        action="store_true",
        help="the object undoes its action: only action frames tell the class",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the backbone's videos (the scorer's: +1)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()

    # One thread: the backbone's result depends on its exact trajectory (see the module docstring), and the
    # trajectory on the thread count. The data-loading workers use the other cores.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        # Two sets of separately seeded videos: the backbone's (train + held-out) and the scorer's.
        root, scorer_root = Path(tmp) / "backbone", Path(tmp) / "scorer"
        settings = dict(
            classes=CLASSES, frames=FRAMES, size=SIZE, patch=PATCH, tubelet=TUBELET, partial=True,
            object_size=(1 / 3.5, 1 / 3), texture=0.4, returning=args.returning, visible=args.visible,
        )  # fmt: skip
        records = read_list(make_synthetic(root, videos=args.train + args.val, seed=args.seed, **settings))
        train_records, val_records = records[: args.train], records[args.train :]
        scorer_records = read_list(
            make_synthetic(scorer_root, videos=args.scorer_train, seed=args.seed + 1, **settings)
        )
        classes = len((root / "classes.txt").read_text().splitlines())
        # The action's direction is the label: no flips, and no crops that could cut the object out.
        fixed = dict(frames=FRAMES, size=SIZE, stride=1, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
        clips = ClipDataset(train_records, **fixed, num_classes=classes)
        scorer_clips = ClipDataset(scorer_records, **fixed, num_classes=classes)
        val = VideoDataset(val_records, frames=FRAMES, size=SIZE, stride=1, num_classes=classes)

        model = build_backbone(classes)
        print(f"1. backbone: {model.num_params / 1e6:.2f} M parameters, {args.train} clips", flush=True)
        ts.train(model, clips, epochs=args.epochs, batch_size=16, lr=5e-4, workers=2, progress=report)
        results = {}
        results["none (all 8 slices)"] = ts.evaluate(model, val, batch_size=16, workers=2)
        if results["none (all 8 slices)"].top1 < 1.5 / classes:
            raise SystemExit(
                f"the backbone stayed near chance ({100 * results['none (all 8 slices)'].top1:.1f}% held-out with"
                f" all slices), so nothing can be said about the scorer; rerun with another --seed or more --epochs"
            )

        T = model.config.grid[0]
        actions = action_slices(root, val, T)
        overlap = {}
        for jacobian in args.jacobian:
            stts = f"stts:T0=0.5,sigma={args.sigma},pool={args.pool},jacobian={jacobian}"
            for seed in range(args.scorer_seeds):
                print(
                    f"2.{seed} {stts}: the scorer alone (backbone frozen, initialised from seed {seed}), sigma"
                    f" decayed to 0, {args.scorer_train} other clips",
                    flush=True,
                )
                torch.manual_seed(seed)
                ts.apply(model, stts)
                ts.train(
                    model, scorer_clips, epochs=args.stts_epochs, batch_size=16, lr=1e-3, reducer_lr=1e-3,
                    freeze_backbone=True, workers=2, progress=report,
                )  # fmt: skip
                name = f"stts {jacobian}, seed {seed}"
                results[name] = ts.evaluate(model, val, batch_size=16, workers=2)
                overlap[name] = action_overlap(model, val, actions)
        for spec in ("uniform:keep=0.5", "random_frames:keep=0.5"):
            ts.apply(model, spec)
            results[spec] = ts.evaluate(model, val, batch_size=16, workers=2)
            overlap[spec] = action_overlap(model, val, actions)
        overlap.update(reference_overlap(actions, T, K=T // 2))

    rows = {name: (summary.top1, summary.gflops_per_view) for name, summary in results.items()}
    uni, rnd = rows["uniform:keep=0.5"][0], rows["random_frames:keep=0.5"][0]
    chance = overlap["chance (random slices)"]
    order, summaries = ["none (all 8 slices)"], []
    for jacobian in args.jacobian:
        seeds = [f"stts {jacobian}, seed {seed}" for seed in range(args.scorer_seeds)]
        mean = f"stts {jacobian}, mean of {len(seeds)}"
        rows[mean] = (sum(rows[k][0] for k in seeds) / len(seeds), rows[seeds[0]][1])
        overlap[mean] = mean_pairs([overlap[k] for k in seeds])
        order += [*seeds, mean]
        kept = [overlap[k][1] for k in seeds]
        summaries.append(
            f"STTS {jacobian} (mean of {len(seeds)} scorers) keeps action slices"
            f" {overlap[mean][0] / chance[0]:.2f}x as often as chance and {100 * overlap[mean][1]:.0f}% of the"
            f" action (each scorer {100 * min(kept):.0f}-{100 * max(kept):.0f}%; chance {100 * chance[1]:.0f}%);"
            f" vs uniform {100 * (rows[mean][0] - uni):+.1f} points, vs random_frames"
            f" {100 * (rows[mean][0] - rnd):+.1f} points; {sum(rows[k][0] > max(uni, rnd) for k in seeds)} of"
            f" {len(seeds)} scorers beat both"
        )
    order += ["uniform:keep=0.5", "random_frames:keep=0.5"]
    print(
        f"\nheld-out accuracy ({args.val} videos, {CLASSES} classes, action in part of the clip,"
        f" object visible: {args.visible}{', returning' if args.returning else ''}), frozen backbone"
    )
    print(
        f"{'plan':24s} {'top-1':>6s} {'GFLOPs':>7s} {'kept slices in action':>22s} {'action slices kept':>19s}"
    )
    for name in [*order, *(k for k in overlap if k not in rows)]:
        top1, gflops = rows.get(name, (None, None))
        cells = ["", ""] if top1 is None else [f"{100 * top1:.1f}%", f"{gflops:.4f}"]
        share = overlap.get(name)
        cells += ["-", "-"] if share is None else [f"{100 * x:.1f}%" for x in share]
        print(f"{name:24s} {cells[0]:>6s} {cells[1]:>7s} {cells[2]:>22s} {cells[3]:>19s}")
    print("\n".join(summaries))
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
