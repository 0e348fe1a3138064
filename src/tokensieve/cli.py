"""The `tokensieve` command line: `bench`, `flops` and `info`.

    tokensieve bench  --model videomae-s --plan none --plan random:keep=0.5 --batch-size 1 --batch-size 8
    tokensieve train  --model videomae-s --data train.txt --val val.txt --plan random:keep=0.5 --epochs 3
    tokensieve flops  --model videomae-b --plan sta:r=64
    tokensieve info

`--model` is a preset name (random weights, no download), a local checkpoint directory or a hub id
(through transformers). Tables go to stdout, progress to stderr; `--json` prints one JSON document
on stdout and nothing else. Usage errors (unknown preset, bad plan, bad dtype) print one red line
naming the valid choices and exit with code 2.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import platform
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.status import Status
from rich.table import Column

from . import __version__
from .backbones import PRESETS, VideoBackbone, build
from .bench import (
    BASELINE,
    DTYPES,
    benchmark,
    compact_table,
    format_table,
    main_plans,
    to_json,
    with_baseline,
)
from .flops import FlopCount, flops
from .reducers import REGISTRY, Reducer, apply
from .reducers.plan import spec_parameters

__all__ = ["app", "main"]

log = logging.getLogger(__name__)

app = typer.Typer(
    name="tokensieve",
    help="Fewer tokens, faster video transformers: measure token-reduction plans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # bugs get a plain traceback, without tensors printed as locals
)

# Errors the library raises for bad user input; anything else is a bug and keeps its traceback.
_USAGE_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError)

ModelOption = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Preset name (see `tokensieve info`), local checkpoint directory or hub id."
    ),
]
PlanOption = Annotated[
    list[str] | None,
    typer.Option(
        "--plan", "-p", help="Plan spec, e.g. 'random:keep=0.5' (repeatable). 'none' is always included."
    ),
]
FramesOption = Annotated[int | None, typer.Option(help="Clip length; default the model's.", min=1)]
SizeOption = Annotated[int | None, typer.Option(help="Frame side in pixels; default the model's.", min=1)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")]


class UsageError(Exception):
    """A bad command-line input, reported as one red line (exit code 2)."""


def _message(err: Exception) -> str:
    # KeyError's str() is the repr of its argument; the other errors read as they are.
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """Turn bad input (ours or the library's) into one red line on stderr and exit code 2.

    Each command's body runs inside it, so the line is printed after any spinner has stopped.
    """
    try:
        yield
    except (UsageError, *_USAGE_ERRORS) as err:
        Console(stderr=True).print(
            f"[red]error:[/red] {escape(_message(err))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(code=2) from None


def _resolve(
    name: str, *, frames: int | None, size: int | None, meta: bool = False, num_classes: int | None = None
) -> VideoBackbone:
    """A preset (built on the meta device when `meta`), or a checkpoint loaded through transformers.

    Presets get the random weights of seed 0: the same in every run and in every torchrun process.
    `num_classes` sizes a preset's classifier; a checkpoint keeps its own.
    """
    changes = {k: v for k, v in (("frames", frames), ("size", size)) if v is not None}
    if name in PRESETS:
        torch.manual_seed(0)
        with torch.device("meta") if meta else contextlib.nullcontext():
            return build(name, **changes, **({"num_classes": num_classes} if num_classes else {}))
    if num_classes is not None:
        raise UsageError("--num-classes sets the classifier of a preset; a checkpoint keeps its own")
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name).exists()
    if not (Path(name).is_dir() or looks_like_hub_id):
        raise UsageError(
            f"unknown model {name!r}; valid presets: {', '.join(PRESETS)}; or a local checkpoint directory or hub id"
        )
    from .backbones.hf import load

    try:
        return load(name, **changes)
    except Exception as err:  # offline, missing files, unsupported architecture: all one line
        raise UsageError(f"cannot load {name!r}: {type(err).__name__}: {_message(err)}") from err


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")


def _check_sampling(sampling: str) -> None:
    if sampling not in ("dense", "segments"):
        raise UsageError(f"--sampling must be dense or segments; got {sampling!r}")


def _bar(label: str, *, show: bool) -> Progress:
    """A progress bar on stderr (done/total, ETA, a status text) shown only when `show`."""
    return Progress(
        TextColumn(f"[bold]{label}[/bold]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"), console=Console(stderr=True), disable=not show,
    )  # fmt: skip


@contextlib.contextmanager
def _progress(prefix: str) -> Iterator[None]:
    """A spinner on stderr showing the benchmark's log messages as they come."""
    bench_log = logging.getLogger("tokensieve.bench")
    with Status(f"{prefix}: starting", console=Console(stderr=True)) as status:

        class ToStatus(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                status.update(f"{prefix}: {escape(record.getMessage())}")

        handler, level = ToStatus(logging.INFO), bench_log.level
        bench_log.addHandler(handler)
        bench_log.setLevel(logging.INFO)
        try:
            yield
        finally:
            bench_log.removeHandler(handler)
            bench_log.setLevel(level)


def _echo_json(doc: object) -> None:
    typer.echo(doc if isinstance(doc, str) else json.dumps(doc, indent=2))


# ---------------------------------------------------------------------------------------- bench
@app.command()
def bench(
    model: ModelOption = "videomae-s",
    plan: PlanOption = None,
    batch_size: Annotated[
        list[int] | None,
        typer.Option("--batch-size", "-b", help="Clips per forward pass (repeatable).", min=1),
    ] = None,
    dtype: Annotated[str, typer.Option(help=f"Compute dtype: {' or '.join(DTYPES)} (autocast).")] = "float32",
    threads: Annotated[int | None, typer.Option(help="torch threads; default torch's choice.", min=1)] = None,
    frames: FramesOption = None,
    size: SizeOption = None,
    warmup: Annotated[int, typer.Option(help="Untimed rounds first.", min=0)] = 3,
    repeats: Annotated[int, typer.Option(help="Timed rounds; the median is reported.", min=1)] = 10,
    methods: Annotated[
        bool, typer.Option("--methods", help="Add every method's main fixed-budget setting to the plans.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Clips/s of each plan, next to the unreduced baseline measured in the same run."""
    with _usage_errors():
        _check_dtype(dtype)
        specs = with_baseline([*(plan or []), *(main_plans() if methods else [])] or [BASELINE])
        with _progress(f"benchmarking {model}"):
            net = _resolve(model, frames=frames, size=size)
            results = benchmark(
                net, plans=specs, batch_size=batch_size or [1], dtype=dtype, threads=threads,
                frames=frames, size=size, warmup=warmup, repeats=repeats,
            )  # fmt: skip
    if as_json:
        _echo_json(to_json(results, meta={"model": model}))
        return
    first = results[0]
    title = (
        f"{model}, {first.frames}x{first.size}, {first.dtype}, {first.device}, {first.threads} threads, "
        f"median of {repeats} interleaved rounds"
    )
    table = format_table(results, title=title)
    table.caption = (
        "speed-up: clips/s over 'none' (same batch); efficiency: speed-up / GFLOPs ratio\n"
        "reducer share: time inside the reducers; GFLOPs per clip, multiply-add = 1"
    )
    Console().print(table)


# ---------------------------------------------------------------------------------------- flops
def _count(net: VideoBackbone, spec: str, *, real: Callable[[], VideoBackbone]) -> FlopCount:
    """FLOPs of `net` under a plan. A model on the meta device counts instantly (even ViT-H); a method
    whose shapes depend on the content cannot run there, and is counted on `real()` instead."""
    if next(net.parameters()).device.type == "meta":
        try:
            with torch.device("meta"):  # the plan's own parameters, if any, go to meta too
                return flops(apply(net, spec), detail=True)
        except (NotImplementedError, RuntimeError) as err:
            log.info("plan %r cannot be counted on the meta device (%s); counting on a real model", spec, err)
        net = real()
    return flops(apply(net, spec), detail=True)


@app.command("flops")
def flops_command(
    model: ModelOption,
    plan: PlanOption = None,
    frames: FramesOption = None,
    size: SizeOption = None,
    as_json: JsonOption = False,
) -> None:
    """GFLOPs per clip (multiply-add = 1 FLOP, attention included), in total and per part."""
    counts: dict[str, FlopCount] = {}
    with _usage_errors():
        specs = with_baseline(plan or [BASELINE])
        with Status(f"{escape(model)}: building the model", console=Console(stderr=True)) as status:
            net = _resolve(model, frames=frames, size=size, meta=model in PRESETS)
            real = functools.cache(lambda: _resolve(model, frames=frames, size=size))
            for spec in specs:
                status.update(f"{escape(model)}: counting {escape(spec)}")
                counts[spec] = _count(net, spec, real=real)
    cfg = net.config
    base = counts[BASELINE].gflops
    rows = [
        {
            "plan": spec,
            "gflops": c.gflops,
            "gflops_ratio": base / c.gflops if c.gflops else float("inf"),
            "by_module": {k: v / c.clips / 1e9 for k, v in c.by_module.items()},
            "by_op": {k: v / c.clips / 1e9 for k, v in c.by_op.items()},
        }
        for spec, c in counts.items()
    ]
    if as_json:
        _echo_json({"model": model, "frames": cfg.frames, "size": cfg.size, "results": rows})
        return
    console = Console()
    console.print(
        f"[bold]{escape(model)}, {cfg.frames}x{cfg.size}[/bold]: GFLOPs per clip "
        "(multiply-add = 1 FLOP, attention included)"
    )
    totals = compact_table("plan", _num_column("GFLOPs"), _num_column("ratio"))
    for row in rows:
        totals.add_row(row["plan"], _gflops(row["gflops"]), f"{row['gflops_ratio']:.2f}x")
    console.print(totals)
    parts = list(dict.fromkeys(k for row in rows for k in row["by_module"]))
    console.print("GFLOPs per part of the model")
    by_part = compact_table("part", *(_num_column(row["plan"]) for row in rows))
    for part in parts:
        by_part.add_row(part, *(_gflops(row["by_module"].get(part, 0.0)) for row in rows))
    console.print(by_part)


def _gflops(value: float) -> str:
    """Two decimals, or three significant digits for the tiny test presets."""
    return f"{value:.2f}" if value >= 1 or value == 0 else f"{value:.3g}"


def _num_column(header: str) -> Column:
    return Column(header, justify="right")


# ---------------------------------------------------------------------------------------- info
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _method_params(cls: type[Reducer]) -> list[dict[str, Any]]:
    """The spec parameters of a method, as JSON-ready rows."""
    params = []
    for name, (p, hint) in spec_parameters(cls).items():
        required = p.default is inspect.Parameter.empty
        default = None if required else p.default
        params.append({
            "name": name,
            "type": getattr(hint, "__name__", None) or str(hint),
            "default": default if isinstance(default, (int, float, str, bool, type(None))) else repr(default),
            "required": required,
        })  # fmt: skip
    return params


def _presets() -> list[dict[str, Any]]:
    rows = []
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            net = build(name)
        rows.append({
            "name": name, "arch": cfg.arch, "frames": cfg.frames, "size": cfg.size, "dim": cfg.dim,
            "depth": cfg.depth, "heads": cfg.heads, "params_m": net.num_params / 1e6, "gflops": flops(net),
        })  # fmt: skip
    return rows


@app.command()
def info(as_json: JsonOption = False) -> None:
    """Presets, methods with their parameters, and library versions."""
    versions = {
        "tokensieve": __version__, "torch": torch.__version__, "transformers": _version("transformers"),
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    presets = _presets()
    methods = [
        {"name": name, "summary": (inspect.getdoc(cls) or "").split("\n")[0], "params": _method_params(cls)}
        for name, cls in sorted(REGISTRY.items())
    ]
    if as_json:
        _echo_json({"versions": versions, "presets": presets, "methods": methods})
        return
    console = Console()
    libraries = [f"{k} {v or '(not installed)'}" for k, v in versions.items() if k != "torch_threads"]
    console.print(
        ", ".join([*libraries, f"{versions['torch_threads']} threads"]), highlight=False, soft_wrap=True
    )
    table = compact_table(
        Column("preset", no_wrap=True), "arch", _num_column("input"), _num_column("dim/depth/heads"),
        _num_column("params (M)"), _num_column("GFLOPs"), title="Presets (random weights)",
    )  # fmt: skip
    for p in presets:
        table.add_row(
            p["name"], p["arch"], f"{p['frames']}x{p['size']}", f"{p['dim']}/{p['depth']}/{p['heads']}",
            f"{p['params_m']:.1f}" if p["params_m"] >= 1 else f"{p['params_m']:.3f}",
            _gflops(p["gflops"]),
        )  # fmt: skip
    console.print(table)
    table = compact_table(
        Column("method", no_wrap=True), "parameters (default)", "summary",
        title="Methods (plan spec: method:key=value,...)",
    )  # fmt: skip
    for m in methods:
        params = ", ".join(
            f"{p['name']}" + ("" if p["required"] else f"={p['default']}") for p in m["params"]
        )
        table.add_row(m["name"], params or "-", m["summary"])
    console.print(table)


# ---------------------------------------------------------------------------------------- eval
def _views(text: str) -> tuple[int, int]:
    clips, sep, num_crops = text.lower().partition("x")
    try:
        views = (int(clips), int(num_crops)) if sep else (0, 0)
    except ValueError:
        views = (0, 0)
    if views[0] < 1 or views[1] not in (1, 3):
        raise UsageError(f"--views is CLIPSxCROPS with clips >= 1 and crops 1 or 3, e.g. 5x3; got {text!r}")
    return views


@app.command("eval")
def eval_command(
    model: ModelOption,
    data: Annotated[
        Path, typer.Option("--data", "-d", help="List file, Kinetics CSV, SSv2 videos.json or class folders.")
    ],
    plan: Annotated[str | None, typer.Option("--plan", "-p", help="Reduction plan spec.")] = None,
    views: Annotated[str, typer.Option(help="Temporal clips x spatial crops per video, e.g. 5x3.")] = "1x1",
    out: Annotated[Path | None, typer.Option(help="Per-video JSONL records; rerun to resume.")] = None,
    sampling: Annotated[
        str, typer.Option(help="dense (frames x stride) or segments (one frame each).")
    ] = "dense",
    stride: Annotated[int, typer.Option(help="Frame stride of dense clips.", min=1)] = 4,
    root: Annotated[Path | None, typer.Option(help="Folder the list's paths are relative to.")] = None,
    multilabel: Annotated[bool, typer.Option(help="List labels are comma-separated sets (mAP).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Clips per forward pass.", min=1)] = 8,
    workers: Annotated[int, typer.Option(help="Decoding processes.", min=0)] = 2,
    dtype: Annotated[str, typer.Option(help=f"Compute dtype: {' or '.join(DTYPES)} (autocast).")] = "float32",
    as_json: JsonOption = False,
) -> None:
    """Accuracy of a model (and plan) on a video dataset, with GFLOPs per view and clips/s."""
    from .data.datasets import VideoDataset, load_records
    from .engine.distributed import setup
    from .engine.evaluate import evaluate

    with _usage_errors():
        _check_dtype(dtype)
        _check_sampling(sampling)
        chosen = _views(views)
        records, names = load_records(data, root=root, multilabel=multilabel)
        net = _resolve(model, frames=None, size=None)
        apply(net, plan)
        dataset = VideoDataset(
            records, frames=net.config.frames, size=net.config.size, views=chosen, sampling=sampling,
            stride=stride, num_classes=len(names) if names else None, class_names=names,
        )  # fmt: skip
        world = setup(next(net.parameters()).device)
        bar = _bar("eval", show=world.is_main)
        with bar:
            task = bar.add_task("eval", total=None, status="")

            def progress(done: int, total: int, clips_per_s: float) -> None:
                bar.update(task, completed=done, total=total, status=f"{clips_per_s:.2f} clips/s")

            summary = evaluate(
                net, dataset, batch_size=batch_size, workers=workers, out=out, dtype=DTYPES[dtype],
                progress=progress,
            )  # fmt: skip
    if not world.is_main:
        return
    doc = {"model": model, "data": str(data), **summary.to_dict()}
    if out is not None:
        target = out.with_name(out.name + ".summary.json")
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(target)
    if as_json:
        _echo_json(doc)
        return
    table = compact_table(
        title=f"{model} on {data}, {chosen[0]}x{chosen[1]} views, plan {summary.plan or 'none'}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    rows = [("videos", str(summary.videos)), ("evaluated", str(summary.evaluated)), ("failed", str(summary.failed)),
            ("top-1", pct(summary.top1)), ("top-5", pct(summary.top5)),
            ("mean class accuracy", pct(summary.mean_class_accuracy)), ("mAP", pct(summary.map)),
            ("GFLOPs per view", _gflops(summary.gflops_per_view)),
            ("clips/s (model)", "-" if summary.clips_per_s is None else f"{summary.clips_per_s:.2f}")]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    for line in summary.errors:
        Console(stderr=True).print(f"[yellow]failed:[/yellow] {escape(line)}", highlight=False)


# ---------------------------------------------------------------------------------------- train
def _crop_scale(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(",")
    try:
        scale = (float(low), float(high)) if sep else (0.0, 0.0)
    except ValueError:
        scale = (0.0, 0.0)
    if not 0 < scale[0] <= scale[1] <= 1:
        raise UsageError(f"--scale is LOW,HIGH with 0 < low <= high <= 1, e.g. 0.08,1; got {text!r}")
    return scale


@contextlib.contextmanager
def _warnings_to(console: Console) -> Iterator[None]:
    """Show the library's warnings (unreadable videos, changed settings on resume) above the progress bar."""
    package = logging.getLogger("tokensieve")

    class ToConsole(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            console.print(f"[yellow]warning:[/yellow] {escape(record.getMessage())}", highlight=False)

    handler = ToConsole(logging.WARNING)
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)


@app.command("train")
def train_command(
    model: ModelOption,
    data: Annotated[
        Path,
        typer.Option(
            "--data", "-d", help="Training list file, Kinetics CSV, SSv2 videos.json or class folders."
        ),
    ],
    plan: Annotated[
        str | None, typer.Option("--plan", "-p", help="Reduction plan spec to train with.")
    ] = None,
    val: Annotated[Path | None, typer.Option(help="Validation data, evaluated after every epoch.")] = None,
    out: Annotated[
        Path, typer.Option(help="Folder for checkpoints (last.pt), evaluation records, logs.")
    ] = Path("runs/train"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run checkpointed in --out.")] = False,
    epochs: Annotated[int, typer.Option(help="Passes over the training data.", min=1)] = 1,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Clips per process per step.", min=1)
    ] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the backbone.", min=0)] = 1e-3,
    reducer_lr: Annotated[
        float | None, typer.Option(help="Peak learning rate of the plan's parameters; default --lr.", min=0)
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.", min=0)] = 0.05,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up, in epochs.", min=0)] = 0.0,
    min_lr_ratio: Annotated[
        float, typer.Option(help="Final rate as a fraction of the peak.", min=0, max=1)
    ] = 0.0,
    clip_grad: Annotated[float | None, typer.Option(help="Maximum gradient norm; default none.")] = None,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.", min=0)] = 0.0,
    freeze_backbone: Annotated[bool, typer.Option(help="Train only the plan's parameters.")] = False,
    dtype: Annotated[str, typer.Option(help=f"Compute dtype: {' or '.join(DTYPES)} (autocast).")] = "float32",
    seed: Annotated[int, typer.Option(help="Data order, augmentation and dropout seed.", min=0)] = 0,
    workers: Annotated[int, typer.Option(help="Decoding processes.", min=0)] = 2,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Also checkpoint every N steps (always after each epoch).", min=1)
    ] = None,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep step-numbered checkpoints too.")] = False,
    num_classes: Annotated[
        int | None, typer.Option(help="Classifier size of a preset; default the data's class count.", min=1)
    ] = None,
    sampling: Annotated[
        str, typer.Option(help="dense (frames x stride) or segments (one frame each).")
    ] = "dense",
    stride: Annotated[int, typer.Option(help="Frame stride of dense clips.", min=1)] = 4,
    scale: Annotated[str, typer.Option(help="Random-resized-crop area range LOW,HIGH.")] = "0.08,1.0",
    flip: Annotated[bool, typer.Option(help="Random horizontal flips (off for direction classes).")] = True,
    root: Annotated[Path | None, typer.Option(help="Folder the lists' paths are relative to.")] = None,
    multilabel: Annotated[
        bool, typer.Option(help="List labels are comma-separated sets (BCE, mAP).")
    ] = False,
    val_views: Annotated[str, typer.Option(help="Validation clips x crops per video.")] = "1x1",
    as_json: JsonOption = False,
) -> None:
    """Train a model (and its plan's learned parameters) on videos; resumable, torchrun-aware."""
    from .data.clips import ClipDataset
    from .data.datasets import VideoDataset, load_records
    from .engine.distributed import setup
    from .engine.train import StepInfo, train

    with _usage_errors():
        _check_dtype(dtype)
        _check_sampling(sampling)
        chosen, crop_scale = _views(val_views), _crop_scale(scale)
        records, names = load_records(data, root=root, multilabel=multilabel)
        classes = num_classes or (len(names) if names else None)
        net = _resolve(
            model, frames=None, size=None, num_classes=classes if model in PRESETS else num_classes
        )
        apply(net, plan)
        cfg = net.config
        dataset = ClipDataset(
            records, frames=cfg.frames, size=cfg.size, sampling=sampling, stride=stride, scale=crop_scale,
            flip=flip, seed=seed, num_classes=cfg.num_classes,
        )  # fmt: skip
        validation = None
        if val is not None:
            val_records, val_names = load_records(val, root=root, multilabel=multilabel)
            validation = VideoDataset(
                val_records, frames=cfg.frames, size=cfg.size, views=chosen, sampling=sampling, stride=stride,
                num_classes=cfg.num_classes, class_names=val_names,
            )  # fmt: skip
        world = setup(next(net.parameters()).device)
        bar = _bar("train", show=world.is_main)
        with bar, _warnings_to(bar.console):
            task = bar.add_task("train", total=None, status="")

            def progress(info: StepInfo) -> None:
                lr_text = "/".join(f"{v:.2e}" for v in dict.fromkeys(info.lr.values()))
                status = (
                    f"epoch {info.epoch} loss {info.loss:.4f} lr {lr_text} {info.clips_per_s:.1f} clips/s"
                )
                bar.update(task, completed=info.step, total=info.total_steps, status=status)

            result = train(
                net, dataset, val=validation, out=out, resume=resume, progress=progress, epochs=epochs,
                batch_size=batch_size, lr=lr, reducer_lr=reducer_lr, weight_decay=weight_decay,
                warmup_epochs=warmup_epochs, min_lr_ratio=min_lr_ratio, clip_grad=clip_grad,
                label_smoothing=label_smoothing, freeze_backbone=freeze_backbone, dtype=dtype, seed=seed,
                workers=workers, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                eval_views=chosen,
            )  # fmt: skip
    if not world.is_main:
        return
    doc = {"model": model, "data": str(data), "plan": net.spec, **result.to_dict()}
    target = out / "result.json"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(target)
    if as_json:
        _echo_json(doc)
        return
    table = compact_table(title=f"{model} on {data}, plan {net.spec or 'none'}, {result.steps} steps")
    for header in ("epoch", "loss", "lr", "top-1", "top-5", "mAP"):
        table.add_column(header, justify="left" if header == "epoch" else "right")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    for e in result.epochs:
        summary = e.eval
        table.add_row(
            str(e.epoch), f"{e.loss:.4f}", "/".join(f"{v:.2e}" for v in dict.fromkeys(e.lr.values())),
            pct(summary and summary.top1), pct(summary and summary.top5), pct(summary and summary.map),
        )  # fmt: skip
    Console().print(table)
    Console(stderr=True).print(f"checkpoint: {escape(str(result.checkpoint))}", highlight=False)


# ---------------------------------------------------------------------------------------- synthetic
@app.command("make-synthetic")
def make_synthetic_command(
    out: Annotated[
        Path, typer.Argument(help="Folder to write the videos, list.txt, classes.txt and truth/ into.")
    ],
    videos: Annotated[int, typer.Option(help="Number of videos.", min=1)] = 100,
    classes: Annotated[int, typer.Option(help="Number of classes (at most 10).", min=1, max=10)] = 10,
    frames: Annotated[int, typer.Option(help="Frames per video.", min=1)] = 16,
    size: Annotated[int, typer.Option(help="Frame side in pixels.", min=32)] = 224,
    partial: Annotated[bool, typer.Option(help="The action happens only during part of the clip.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same videos).")] = 0,
) -> None:
    """Write the built-in synthetic benchmark: real .mp4 files, labels and per-token ground truth."""
    from .data.synthetic import make_synthetic

    with _usage_errors():
        with Progress(console=Console(stderr=True)) as bar:
            task = bar.add_task("writing videos", total=videos)
            listing = make_synthetic(
                out, videos=videos, classes=classes, frames=frames, size=size, partial=partial, seed=seed,
                progress=lambda done, total: bar.update(task, completed=done),
            )  # fmt: skip
    typer.echo(f"wrote {videos} videos; list: {listing}")


def main() -> None:
    """Entry point of the `tokensieve` command."""
    app(prog_name="tokensieve")
