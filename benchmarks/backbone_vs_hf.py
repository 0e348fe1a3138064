"""Our VideoMAE ViT-B forward against transformers' `VideoMAEForVideoClassification`.

Same function on both sides: a full ViT-B 16x224 config (400 labels) with random weights, copied
into ours with `ts.from_hf`, and the logits checked to agree before anything is timed. Float32 and
bfloat16 (both models converted with `.to(torch.bfloat16)`, the faster of bfloat16's two ways for ours:
docs/design.md), same torch threads, one process; the models run in interleaved rounds (order rotating
every round) after warm-up, and the median per model is reported. The target is ratio = HF time / our
time >= 1.

HF runs with its default attention (SDPA) and, unless --no-eager, also with eager attention.

    python benchmarks/backbone_vs_hf.py                      # float32 and bfloat16, batch 1 and 4
    python benchmarks/backbone_vs_hf.py --dtypes float32 --batches 1 --repeats 8 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from collections.abc import Callable

import torch
import transformers
from transformers import VideoMAEConfig, VideoMAEForVideoClassification

import tokensieve as ts


def interleaved(
    runs: dict[str, Callable[[], object]], *, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per run of each callable over `repeats` rounds, after `warmup` rounds; the order
    rotates every round so no model always runs right after the same one."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            start = time.perf_counter()
            runs[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes (default 1 4)")
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds per batch size (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-eager", dest="eager", action="store_false", help="skip HF with eager attention")
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"]
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = VideoMAEConfig(num_labels=400)  # ViT-B, 16 frames of 224x224, tubelet 2, mean pooling
    hf = VideoMAEForVideoClassification(config).eval()
    ours = ts.from_hf(hf).eval()
    float32: dict[str, torch.nn.Module] = {f"HF {hf.config._attn_implementation}": hf}
    if args.eager:
        hf_eager = copy.deepcopy(hf)
        hf_eager.set_attn_implementation("eager")
        float32["HF eager"] = hf_eager
    float32["ours"] = ours

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"ViT-B 16x224, {ts.flops(ours):.1f} GFLOPs/clip, median of {args.repeats} rounds after "
        f"{args.warmup} warm-up"
    )
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        models = {
            name: m if dtype == torch.float32 else copy.deepcopy(m).to(dtype) for name, m in float32.items()
        }
        compare(models, dtype, args)


def compare(models: dict[str, torch.nn.Module], dtype: torch.dtype, args: argparse.Namespace) -> None:
    """The logits agree, then the interleaved timing table of `models` (converted to `dtype`)."""
    ours = models["ours"]
    tolerance = 1e-4 if dtype == torch.float32 else 0.1  # bfloat16 keeps 8 bits of mantissa
    with torch.inference_mode():
        video = torch.randn(1, 16, 3, 224, 224, dtype=dtype)
        reference = ours(video)
        for name, model in models.items():
            if model is not ours:
                out = model(pixel_values=video).logits
                torch.testing.assert_close(
                    out, reference, atol=tolerance, rtol=tolerance, msg=f"{name} vs ours"
                )
        print(f"{dtype}: logits agree (atol {tolerance:g})")

        names = list(models)
        hf_names = [n for n in names if n != "ours"]
        header = [
            "dtype",
            "batch",
            *(f"{n} ms" for n in names),
            *(f"{n.removeprefix('HF ')}/ours" for n in hf_names),
        ]
        rows, details = [], []
        for batch in args.batches:
            video = torch.randn(batch, 16, 3, 224, 224, dtype=dtype)
            runs: dict[str, Callable[[], object]] = {
                name: functools.partial(model, video) if model is ours else functools.partial(model, pixel_values=video)
                for name, model in models.items()
            }  # fmt: skip
            times = interleaved(runs, warmup=args.warmup, repeats=args.repeats)
            median = {name: statistics.median(t) for name, t in times.items()}
            # Rounds interleave, so per-round ratios are paired samples: their median resists drift.
            paired = {
                n: statistics.median(h / o for h, o in zip(times[n], times["ours"], strict=True))
                for n in hf_names
            }
            rows.append([
                str(dtype).removeprefix("torch."), str(batch), *(f"{1e3 * median[n]:.1f}" for n in names),
                *(f"{median[n] / median['ours']:.3f} ({paired[n]:.3f})" for n in hf_names),
            ])  # fmt: skip
            details += [
                f"{dtype}, batch {batch}, {n}: " + ", ".join(f"{1e3 * t:.0f}" for t in times[n]) + " ms"
                for n in names
            ]
            print(f"{dtype}, batch {batch} done", file=sys.stderr, flush=True)

    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    print(
        "ratio = HF time / our time (>= 1: ours is as fast or faster); in brackets the median of per-round ratios"
    )
    print("runs:", *details, sep="\n  ")


if __name__ == "__main__":
    main()
