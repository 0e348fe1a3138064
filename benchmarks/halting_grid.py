"""HaltingVT's grid on the built-in model, in the sweep: beta x Glimpser R x Motion Loss, each fine-tuned
and evaluated against random tokens at its mean GFLOPs, with both ways of treating halted tokens.

    python benchmarks/halting_grid.py                       # the issue's grid, into halting-grid/
    python benchmarks/halting_grid.py --betas 10 --keeps 0.5 --motions 1 --epochs 3

Each setting `halting:beta=B,glimpser=R,motion=M` is fine-tuned as `benchmarks/train_builtin.py` fine-tunes
the shipped one (`HALTING`: the whole model, three epochs on the selectors' 1000 videos, from the same seed),
in `--jobs` processes of one thread each; the weights are kept in `--work` (a rerun skips what is there).
Then one `ts.sweep` runs every setting twice, halted tokens removed (ours) and zeroed but attended
(`halted=zero`, the released code's) with the same weights, each against random tokens on the
built-in model at the setting's mean GFLOPs (3 seeds), and writes its report into `--out`.
About 2 minutes per setting and job on one thread, then a few minutes for the sweep.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import tokensieve as ts
from tokensieve.assets import DEFAULT, heldout
from tokensieve.data import VideoDataset, read_list
from tokensieve.engine.report import Setting
from tokensieve.reducers.plan import parse, weights_key

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the built-in model's sets and fine-tuning
from train_builtin import HALTING, SELECTOR_SET, SET, _by_key, finetune, render


def spec(beta: float, keep: float, motion: float) -> str:
    return f"halting:beta={beta:g},glimpser={keep:g},motion={motion:g}"


def key(text: str) -> str:
    return weights_key(*parse(text)[-1])


def tune(job: tuple[str, Path, int, Path]) -> str:
    """Fine-tune one setting into `<work>/<weights key>.safetensors` (a process of its own, one thread)."""
    text, work, epochs, records_dir = job
    torch.set_num_threads(1)
    target = work / f"{key(text)}.safetensors"
    if target.is_file():
        return f"{text}: kept from {target}"
    began = time.perf_counter()
    records = render(records_dir, "selector", SELECTOR_SET)
    weights = finetune(ts.load(DEFAULT), records, {**HALTING, "spec": text, "epochs": epochs})
    partial = target.with_suffix(".part")
    save_file(weights, str(partial))
    partial.replace(target)  # never a half-written file under the final name
    return f"{text}: fine-tuned in {time.perf_counter() - began:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", default="5,10,20", help="comma-separated beta values")
    parser.add_argument("--keeps", default="0.3,0.5,1", help="comma-separated Glimpser R values")
    parser.add_argument("--motions", default="0,1", help="comma-separated Motion Loss weights")
    parser.add_argument("--epochs", type=int, default=HALTING["epochs"], help="fine-tuning epochs")
    parser.add_argument("--jobs", type=int, default=2, help="fine-tuning processes (one thread each)")
    parser.add_argument("--work", type=Path, default=Path("halting-grid-work"), help="rendered set, weights")
    parser.add_argument("--out", type=Path, default=Path("halting-grid"), help="the sweep's folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    floats = [[float(v) for v in text.split(",")] for text in (args.betas, args.keeps, args.motions)]
    specs = [spec(b, r, m) for b in floats[0] for r in floats[1] for m in floats[2]]
    work = args.work / f"epochs-{args.epochs}"
    work.mkdir(parents=True, exist_ok=True)
    render(args.work, "selector", SELECTOR_SET)  # once, before the jobs read it
    jobs = [(text, work, args.epochs, args.work) for text in specs]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for line in pool.imap(tune, jobs):
            print(line, flush=True)

    selectors: dict[str, dict[str, torch.Tensor]] = {}
    for text in specs:
        weights = _by_key(load_file(work / f"{key(text)}.safetensors"))  # {key: the whole model's}
        selectors.update(weights)
        selectors[key(text + ",halted=zero")] = weights[key(text)]  # the same weights, zeroed halting
    methods = [s for text in specs for s in (text, text + ",halted=zero")]
    torch.set_num_threads(args.jobs)
    listed = heldout(DEFAULT)
    data = VideoDataset(read_list(listed), frames=SET["frames"], size=SET["size"], stride=1,
                        num_classes=SET["classes"])  # fmt: skip
    report = ts.sweep(ts.load(DEFAULT), data, out=args.out, methods=methods, selectors=selectors, speed=False,
                      batch_size=64, workers=0, truth=listed.parent, model_name=DEFAULT)  # fmt: skip
    rows = {s.method: s for s in report.settings}
    print(table(specs, rows))
    draw(specs, rows, report.settings, args.out / "grid.png")
    print(f"the sweep's report: {args.out / 'report.md'}; the grid drawn: {args.out / 'grid.png'}")


def _cell(s: Setting) -> tuple[str, str, str, str]:
    if s.refused is not None or s.top1 is None or s.delta is None:
        return ("refused", "", "", s.refused or "")
    lo, hi = s.top1_ci or (s.top1, s.top1)
    dlo, dhi = s.delta_ci or (s.delta, s.delta)
    return (f"{100 * s.top1:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]", f"{s.gflops:.4f}",
            f"{100 * (s.random_top1 or 0):.1f}", f"{100 * s.delta:+.1f} [{100 * dlo:+.1f}, {100 * dhi:+.1f}] {s.verdict}")  # fmt: skip


def table(specs: list[str], rows: dict[str, Setting]) -> str:
    """Markdown: one line per setting, halted tokens removed, then zeroed (the same weights)."""
    head = ("| beta | R | motion | top-1 % | GFLOPs | random % | Δ points, verdict | zero: top-1 % | GFLOPs | "
            "random % | Δ points, verdict |")  # fmt: skip
    lines = [head, "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for text in specs:
        given = parse(text)[-1][1]
        cells = [f"{given['beta']:g}", f"{given.get('glimpser', 1.0):g}", f"{given['motion']:g}"]
        cells += [*_cell(rows[text]), *_cell(rows[text + ",halted=zero"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw(specs: list[str], rows: dict[str, Setting], settings: list[Setting], path: Path) -> None:
    """Top-1 against GFLOPs, one panel per Glimpser R: colour = beta, filled = Motion Loss, circle =
    halted tokens removed, square = zeroed; a grey line joins each to its matched random (grey dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keeps = sorted({parse(t)[-1][1].get("glimpser", 1.0) for t in specs})
    betas = sorted({parse(t)[-1][1]["beta"] for t in specs})
    colours = dict(zip(betas, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"), strict=False))
    fig, axes = plt.subplots(
        1, len(keeps), figsize=(5 * len(keeps), 4.2), sharex=True, sharey=True, squeeze=False
    )
    ref = next((s for s in settings if s.method == "none"), None)
    for ax, keep in zip(axes[0], keeps, strict=True):
        for text in specs:
            given = parse(text)[-1][1]
            if given.get("glimpser", 1.0) != keep:
                continue
            for variant, marker in ((text, "o"), (text + ",halted=zero", "s")):
                s = rows[variant]
                if s.top1 is None or s.gflops is None or s.random_gflops is None or s.random_top1 is None:
                    continue
                ax.plot(
                    [s.gflops, s.random_gflops], [100 * s.top1, 100 * s.random_top1], color="0.75", lw=0.8
                )
                ax.plot(s.random_gflops, 100 * s.random_top1, ".", color="0.5")
                c = colours[given["beta"]]
                ax.plot(s.gflops, 100 * s.top1, marker, color=c, mfc=c if given["motion"] else "white", ms=7)
        if ref is not None and ref.top1 is not None:
            ax.plot(ref.gflops, 100 * ref.top1, "*", color="black", ms=12)
        ax.set_title(f"Glimpser R = {keep:g}" + (" (no Glimpser)" if keep == 1 else ""))
        ax.set_xlabel("GFLOPs per clip (mean)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out top-1 (%)")
    handles = [
        plt.Line2D([], [], ls="", marker="o", color=c, label=f"beta {b:g}") for b, c in colours.items()
    ]
    handles += [
        plt.Line2D([], [], ls="", marker="o", color="k", mfc="white", label="no Motion Loss (hollow)"),
        plt.Line2D([], [], ls="", marker="s", color="k", label="halted=zero (released)"),
        plt.Line2D([], [], ls="", marker=".", color="0.5", label="random at the same GFLOPs"),
        plt.Line2D([], [], ls="", marker="*", color="k", ms=10, label="unreduced"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
