"""`tokensieve bench`, `flops` and `info`: speed, GFLOPs and what is installed."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Column

from .. import __version__
from ..backbones import PRESETS, VideoBackbone, build
from ..bench import (
    BASELINE,
    BUSY_SPREAD,
    DTYPES,
    PRECISIONS,
    SDPA_BACKENDS,
    BenchResult,
    benchmark,
    busy_warning,
    compact_table,
    format_table,
    main_plans,
    to_json,
    with_baseline,
)
from ..flops import FlopCount, flops
from ..reducers import REGISTRY, Reducer, apply
from ..reducers.plan import is_adaptive, pattern_label, spec_parameters
from .common import (
    FramesOption,
    JsonOption,
    ModelOption,
    PlanOption,
    SizeOption,
    UsageError,
    app,
    bench_status,
    check_dtype,
    echo_json,
    gflops_text,
    num_column,
    percent_text,
    resolve_model,
    usage_errors,
    write_json,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- bench
# Below the table rather than its caption: a caption wraps at the table's width, these lines fit 80.
_BENCH_LEGEND = (
    "speed-up: clips/s over 'none' (same batch); efficiency: speed-up / GFLOPs ratio\n"
    "reducer share: time inside the reducers; GFLOPs per clip, multiply-add = 1\n"
    "MB / clip: peak memory of a forward above the weights (CPU: live tensors);\n"
    "train MB/clip: of a training step, above the weights and their gradients\n"
    "IQR: how much the timed rounds disagree, interquartile range / median of the\n"
    f"per-round speed-ups ('none': of its seconds); over {BUSY_SPREAD:.0%}: a busy machine"
)


def _precision(result: BenchResult) -> str:
    return {"": "", "autocast": " (autocast)", "weights": f" ({result.dtype} weights)"}[result.precision]


def _device(name: str) -> torch.device:
    """`--device` as a torch device that is here, or a usage error naming what is."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be cpu, cuda, cuda:N or mps; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {name}: this torch has no usable CUDA device (torch.cuda.is_available() is False)"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or mps; got {name!r}")
    return device


@app.command()
def bench(
    model: ModelOption = "videomae-s",
    plan: PlanOption = None,
    batch_size: Annotated[
        list[int] | None,
        typer.Option("--batch-size", "-b", help="Clips per forward pass (repeatable).", min=1),
    ] = None,
    dtype: Annotated[str, typer.Option(help=f"Compute dtype: {' or '.join(DTYPES)}.")] = "float32",
    precision: Annotated[
        str,
        typer.Option(
            help="bfloat16 or float16 as autocast (float32 weights), weights (a converted copy), or auto: the faster."
        ),
    ] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch threads; default torch's choice.", min=1)] = None,
    frames: FramesOption = None,
    size: SizeOption = None,
    warmup: Annotated[int, typer.Option(help="Untimed rounds first.", min=0)] = 3,
    repeats: Annotated[int, typer.Option(help="Timed rounds; the median is reported.", min=1)] = 10,
    methods: Annotated[
        bool, typer.Option("--methods", help="Add every method's main fixed-budget setting to the plans.")
    ] = False,
    device: Annotated[str, typer.Option(help="Where to run: cpu, cuda, cuda:1, mps.")] = "cpu",
    compile: Annotated[
        bool,
        typer.Option(
            "--compile", help="Run each plan as torch.compile of its own copy (compiled in the warm-up)."
        ),
    ] = False,
    sdpa: Annotated[
        str, typer.Option(help=f"Attention kernel: {', '.join(SDPA_BACKENDS)} (auto: PyTorch's choice).")
    ] = "auto",
    memory: Annotated[bool, typer.Option(help="Measure each plan's peak memory per clip.")] = True,
    train_memory: Annotated[
        bool, typer.Option("--train-memory", help="Also the peak memory of one training step per clip.")
    ] = False,
    save: Annotated[
        Path | None, typer.Option(help="Also write the results as JSON (what --json prints) to this file.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Clips/s of each plan, next to the unreduced baseline measured in the same run.

    On a GPU (--device cuda) the runs are timed with CUDA events and the reducers' share by events in
    the stream (nothing synchronises inside a forward).

    Warns (one yellow line on stderr; "busy" in the JSON) when the timed rounds disagree by more
    than 15%: the machine was busy and small differences are noise.
    """
    with usage_errors():
        check_dtype(dtype)
        if precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        if sdpa not in SDPA_BACKENDS:
            raise UsageError(f"--sdpa must be one of {', '.join(SDPA_BACKENDS)}; got {sdpa!r}")
        where = _device(device)
        specs = with_baseline([*(plan or []), *(main_plans() if methods else [])] or [BASELINE])
        with bench_status(f"benchmarking {model}"):
            net = resolve_model(model, frames=frames, size=size).to(where)
            if not plan and net.spec:  # a saved model or run: its own plan, next to the baseline
                specs = with_baseline([net.spec, *specs])
            results = benchmark(
                net, plans=specs, batch_size=batch_size or [1], dtype=dtype, precision=precision,
                threads=threads, frames=frames, size=size, warmup=warmup, repeats=repeats, memory=memory,
                train_memory=train_memory, compile=compile, sdpa=sdpa,
            )  # fmt: skip
    if save is not None:
        write_json(save, json.loads(to_json(results, meta={"model": model})))
    if as_json:
        echo_json(to_json(results, meta={"model": model}))
    else:
        first = results[0]
        console = Console()
        console.print(
            f"[bold]{escape(model)}, {first.frames}x{first.size}, {first.dtype}{_precision(first)}, "
            f"{first.device}{', compiled' if first.compiled else ''}"
            f"{f', {first.sdpa} attention' if first.sdpa != 'auto' else ''}, "
            f"{first.threads} threads[/bold], median of {repeats} interleaved rounds",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
        console.print(format_table(results))
        console.print(_BENCH_LEGEND, highlight=False)
    warning = busy_warning(results)
    if warning is not None:
        Console(stderr=True).print(
            f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True
        )


# ---------------------------------------------------------------------------------------- flops
def _count(
    net: VideoBackbone, spec: str, *, real: Callable[[], VideoBackbone], frames: int | None, size: int | None
) -> FlopCount:
    """FLOPs of `net` under a plan on clips of `frames` x `size` (default its own). A model on the meta
    device counts instantly (even ViT-H); a method whose shapes depend on the content cannot run there,
    and is counted on `real()` instead."""
    grid = net.config.grid_of(frames or net.config.frames, size or net.config.size)
    if next(net.parameters()).device.type == "meta":
        with torch.device("meta"):  # the plan's own parameters, if any, go to meta too
            installed = apply(net, spec, grid=grid)
        try:
            if not installed.adaptive:  # a per-clip cost needs real content
                return flops(installed.model, detail=True, frames=frames, size=size)
        except (NotImplementedError, RuntimeError) as err:
            log.info("plan %r cannot be counted on the meta device (%s); counting on a real model", spec, err)
        net = real()
    return flops(apply(net, spec, grid=grid).model, detail=True, frames=frames, size=size)


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
    with usage_errors():
        specs = with_baseline(plan or [BASELINE])
        with Status(f"{escape(model)}: building the model", console=Console(stderr=True)) as status:
            net = resolve_model(model, frames=frames, size=size, meta=model in PRESETS)
            if not plan and net.spec:  # a saved model or run: its own plan, next to the baseline
                specs = with_baseline([net.spec])
            real = functools.cache(lambda: resolve_model(model, frames=frames, size=size))
            adaptive = []
            for spec in specs:
                status.update(f"{escape(model)}: counting {escape(spec)}")
                counts[spec] = _count(net, spec, real=real, frames=frames, size=size)
                if is_adaptive(net):
                    adaptive.append(spec)
    cfg = net.config
    base = counts[BASELINE].gflops
    rows = [
        {
            "plan": spec,
            "gflops": c.gflops,
            "gflops_ratio": base / c.gflops if c.gflops else float("inf"),
            "by_module": {k: v / c.clips / 1e9 for k, v in c.by_module.items()},
            "by_op": {k: v / c.clips / 1e9 for k, v in c.by_op.items()},
            "adaptive": spec in adaptive,
        }
        for spec, c in counts.items()
    ]
    if as_json:
        echo_json({"model": model, "frames": frames or cfg.frames, "size": size or cfg.size, "results": rows})
        return
    console = Console()
    console.print(
        f"[bold]{escape(model)}, {frames or cfg.frames}x{size or cfg.size}[/bold]: GFLOPs per clip "
        "(multiply-add = 1 FLOP, attention included)"
    )
    totals = compact_table("plan", num_column("GFLOPs"), num_column("ratio"))
    for row in rows:
        totals.add_row(row["plan"], gflops_text(row["gflops"]), f"{row['gflops_ratio']:.2f}x")
    console.print(totals)
    parts = list(dict.fromkeys(k for row in rows for k in row["by_module"]))
    console.print("GFLOPs per part of the model")
    by_part = compact_table("part", *(num_column(row["plan"]) for row in rows))
    for part in parts:
        by_part.add_row(part, *(gflops_text(row["by_module"].get(part, 0.0)) for row in rows))
    console.print(by_part)
    for spec in adaptive:
        Console(stderr=True).print(
            f"[yellow]note:[/yellow] {escape(spec)} keeps a different number of tokens in each clip: counted "
            "on one random clip; `tokensieve eval` reports the mean over your videos",
            highlight=False, soft_wrap=True,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------- info
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _method_params(cls: type[Reducer]) -> list[dict[str, Any]]:
    """The spec parameters of a method, as JSON-ready rows: first those named by a pattern (STTS's
    `T<block>`, any number of them; "pattern" holds the regex a key must match), then the named ones."""
    params = [
        {"name": pattern_label(pattern), "pattern": pattern, "type": kind.__name__, "default": None,
         "required": False}
        for pattern, kind in cls.pattern_parameters.items()
    ]  # fmt: skip
    for name, (p, hint) in spec_parameters(cls).items():
        required = p.default is inspect.Parameter.empty
        default = None if required else p.default
        params.append({
            "name": name,
            "pattern": None,
            "type": getattr(hint, "__name__", None) or str(hint),
            "default": default if isinstance(default, (int, float, str, bool, type(None))) else repr(default),
            "required": required,
        })  # fmt: skip
    return params


def _param_text(param: dict[str, Any]) -> str:
    """`keep=0.5`, `T<block>=<float>` (a pattern), or `r` (required): as the spec parser names them."""
    if param["pattern"] is not None:
        return f"{param['name']}=<{param['type']}>"
    return param["name"] if param["required"] else f"{param['name']}={param['default']}"


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


def _builtins() -> list[dict[str, object]]:
    from .. import assets

    rows = []
    for name in assets.BUILTINS:
        card = assets.card(name)
        rows.append({
            "name": name, "input": f"{card['set']['frames']}x{card['set']['size']}", "classes": card["set"]["classes"],
            "heldout_top1": card["heldout_top1"]["none"], "what": "tokensieve sweep's default",
        })  # fmt: skip
    return rows


@app.command()
def info(as_json: JsonOption = False) -> None:
    """Presets, built-in trained models, methods with their parameters, and library versions."""
    versions = {
        "tokensieve": __version__, "torch": torch.__version__, "transformers": _version("transformers"),
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    presets = _presets()
    methods = [
        {"name": name, "summary": (inspect.getdoc(cls) or "").split("\n")[0], "params": _method_params(cls)}
        for name, cls in sorted(REGISTRY.items())
    ]
    builtins = _builtins()
    if as_json:
        echo_json({"versions": versions, "presets": presets, "builtin_models": builtins, "methods": methods})
        return
    console = Console()
    libraries = [f"{k} {v or '(not installed)'}" for k, v in versions.items() if k != "torch_threads"]
    console.print(
        ", ".join([*libraries, f"{versions['torch_threads']} threads"]), highlight=False, soft_wrap=True
    )
    table = compact_table(
        Column("preset", no_wrap=True), "arch", num_column("input"), num_column("dim/depth/heads"),
        num_column("params (M)"), num_column("GFLOPs"), title="Presets (random weights)",
    )  # fmt: skip
    for p in presets:
        table.add_row(
            p["name"], p["arch"], f"{p['frames']}x{p['size']}", f"{p['dim']}/{p['depth']}/{p['heads']}",
            f"{p['params_m']:.1f}" if p["params_m"] >= 1 else f"{p['params_m']:.3f}",
            gflops_text(p["gflops"]),
        )  # fmt: skip
    console.print(table)
    table = compact_table(
        Column("built-in model", no_wrap=True), num_column("input"), num_column("classes"),
        num_column("held-out top-1"), "what", title="Built-in trained models (--model NAME; no download)",
    )  # fmt: skip
    for b in builtins:
        table.add_row(b["name"], b["input"], str(b["classes"]), percent_text(b["heldout_top1"]), b["what"])
    console.print(table)
    table = compact_table(
        Column("method", no_wrap=True), "parameters (default)", "summary",
        title="Methods (plan spec: method:key=value,...)",
    )  # fmt: skip
    for m in methods:
        table.add_row(m["name"], ", ".join(map(_param_text, m["params"])) or "-", m["summary"])
    console.print(table)
