"""`tokensieve sweep`: every method across budgets against random at matched GFLOPs, with a report."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..assets import DEFAULT, is_builtin
from ..errors import InputError
from .common import (
    FramesOption,
    JsonOption,
    SizeOption,
    UsageError,
    app,
    check_sampling,
    console_lines,
    echo_json,
    log_to,
    parse_views,
    resolve_model,
    resumable_run,
    usage_errors,
    write_json,
)


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{what} takes comma-separated numbers, e.g. 0.3,0.5,0.7; got {text!r}") from None
    if not values:
        raise UsageError(f"--{what} is empty; give comma-separated numbers, e.g. 0.3,0.5,0.7")
    return values


def _methods(text: str | None) -> list[str] | None:
    """ "sta,tome" -> ["sta", "tome"]; a method's fixed parameters follow it after ':' and are joined
    with ';' ("attention:at=2;per_frame=true,tome")."""
    if text is None:
        return None
    methods = [m.strip().replace(";", ",") for m in text.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods is empty; give comma-separated method names, e.g. sta,tome,attention")
    return methods


def _recorded(out: Path) -> str:
    from ..engine.results import read_done

    try:
        return f"{len(read_done(out / 'results.jsonl'))} (video, setting) results are recorded in {out}"
    except (InputError, OSError):
        return "nothing was recorded yet"


@app.command("sweep")
def sweep_command(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="A model as for every command (see --help of eval); default the "
            "built-in reference model trained on the synthetic benchmark.",
        ),
    ] = DEFAULT,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            "-d",
            help="Video list (as eval takes); default the built-in model's held-out "
            "set, rendered into the cache on first use.",
        ),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated methods (default every method; X++ adds LITE++'s budgets); fixed parameters after "
            "':' joined with ';', e.g. attention:at=2;per_frame=true."
        ),
    ] = None,
    budgets: Annotated[
        str | None, typer.Option(help="Comma-separated target token ratios in (0, 1), e.g. 0.3,0.5,0.7.")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Seeds of the random baseline at matched GFLOPs.", min=1)] = 3,
    views: Annotated[str, typer.Option(help="Temporal clips x spatial crops per video, e.g. 2x3.")] = "1x1",
    out: Annotated[
        Path, typer.Option(help="Folder for results.jsonl, report.md, pareto.png; rerun to resume.")
    ] = Path("sweep"),
    sampling: Annotated[str, typer.Option(help="dense (frames x stride) or segments.")] = "dense",
    stride: Annotated[
        int | None,
        typer.Option(help="Frame stride of dense clips; default 4 (1 on a synthetic set).", min=1),
    ] = None,
    root: Annotated[Path | None, typer.Option(help="Folder the list's paths are relative to.")] = None,
    truth: Annotated[
        Path | None,
        typer.Option(
            help="A synthetic set's folder, for the foreground recall; default the list's folder when "
            "it holds a synthetic set."
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Views per forward pass.", min=1)
    ] = 32,
    workers: Annotated[int, typer.Option(help="Decoding processes.", min=0)] = 2,
    speed: Annotated[
        bool, typer.Option(help="Measure each plan's speed-up over the unreduced model.")
    ] = True,
    examples: Annotated[bool, typer.Option(help="Draw one example of each method's kept tokens.")] = True,
    frames: FramesOption = None,
    size: SizeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Every method at every budget on a model and dataset, each against random tokens at the same
    GFLOPs: accuracy with 95% intervals, GFLOPs, measured speed-up, a verdict; report.md and
    pareto.png in --out.

    Without arguments it runs on the built-in reference model and its held-out synthetic set (a few
    minutes on 2 CPU cores). Exit code 0 when done, 2 for bad input, 130 when interrupted: rerun the
    same command to resume.
    """
    from .. import assets
    from ..data.datasets import VideoDataset, load_records
    from ..data.synthetic import MANIFEST
    from ..engine.distributed import on_main, setup
    from ..engine.report import refused_lines, terminal_table
    from ..engine.sweep import BUDGETS, sweep

    console = Console(stderr=True)
    with usage_errors():
        check_sampling(sampling)
        chosen = parse_views(views)
        wanted = _floats(budgets, "budgets") if budgets is not None else list(BUDGETS)
        method_list = _methods(methods)
        net = resolve_model(model, frames=None, size=None)
        world = setup(next(net.parameters()).device)
        selectors = assets.selectors(model) if is_builtin(model) else None
        if data is None:
            if not is_builtin(model):
                raise UsageError("--data is needed for a model other than a built-in one")
            on_main(world, lambda: assets.heldout(model))  # rendered once, by rank 0; the others wait
            data = assets.heldout(model)
            stride = stride or 1
        records, names = load_records(data, root=root)
        if not records:
            raise UsageError(f"{data} lists no videos: nothing to sweep")
        if truth is None and (data.parent / MANIFEST).is_file():
            truth = data.parent
        dataset = VideoDataset(
            records, frames=frames or net.config.frames, size=size or net.config.size, views=chosen, sampling=sampling,
            stride=stride or (1 if truth is not None else 4), num_classes=len(names) if names else None,
            class_names=names,
        )  # fmt: skip
        command = shlex.join(["tokensieve", *sys.argv[1:]])
        hint = lambda: f"{_recorded(out)}; rerun the same command to resume"  # noqa: E731
        with resumable_run("sweep", show=world.is_main, resume_hint=hint) as (bar, update):
            lines = console_lines(bar.console)

            def steps_and_warnings(record: logging.LogRecord) -> None:
                if record.levelno >= logging.WARNING or record.name.startswith("tokensieve.engine"):
                    lines(record)

            with (
                log_to("tokensieve", logging.INFO, steps_and_warnings)
                if world.is_main
                else contextlib.nullcontext()
            ):
                report = sweep(
                    net, dataset, out=out, methods=method_list, budgets=wanted, selectors=selectors, seeds=seeds,
                    batch_size=batch_size, workers=workers, truth=truth, speed=speed,
                    progress=lambda done, total: update(done, total, "(video, setting) results"), model_name=model,
                    header={"command": command}, examples=examples,
                )  # fmt: skip
        if not world.is_main:
            return
        doc = {"model": model, "data": str(data), "out": str(out),
               "settings": [dataclasses.asdict(s) for s in report.settings]}  # fmt: skip
        write_json(out / "summary.json", doc)
    if as_json:
        echo_json(doc)
        return
    screen = Console()
    wide = screen.width >= 120
    screen.print(terminal_table(report, title=f"{model} on {data}", wide=wide))
    if not wide:
        console.print("verdict: the 95% interval of Δ, against the stronger of random tokens and resize (\"rs\": the "
                      "model on smaller frames) at the same GFLOPs, is above 0 (beats), holds 0 (n.s.: not "
                      "significant) or is below 0 (worse)", highlight=False, soft_wrap=True)  # fmt: skip
    if any(s.views is not None for s in report.settings):
        console.print("‡ adaptive: each clip keeps its own number of tokens; the budget and GFLOPs are the "
                      "means measured over the views it ran, and random is matched to them", highlight=False,
                      soft_wrap=True)  # fmt: skip
    for line in refused_lines(report.settings):
        console.print(f"[dim]refused: {escape(line)}[/dim]", highlight=False, soft_wrap=True)
    console.print(f"report: {out / 'report.md'}\nplot:   {out / 'pareto.png'}", highlight=False)
