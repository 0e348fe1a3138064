"""`tokensieve eval` and `make-synthetic`: evaluate on a video list, write the synthetic benchmark."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from ..bench import (
    DTYPES,
    compact_table,
)
from ..engine.results import read_done
from ..errors import InputError
from .common import (
    FramesOption,
    JsonOption,
    ModelOption,
    SizeOption,
    UsageError,
    app,
    check_dtype,
    check_sampling,
    console_lines,
    echo_json,
    error_line,
    gflops_text,
    install_plan,
    log_to,
    parse_views,
    percent_text,
    resolve_model,
    resumable_run,
    usage_errors,
    write_json,
)

if TYPE_CHECKING:
    from ..data.datasets import VideoRecord
    from ..engine.evaluate import EvalSummary

EXIT_FAILED = 1  # nothing evaluated, or --strict and a video failed; 2 is bad input (usage_errors)


def _engine_log_to(console: Console) -> contextlib.AbstractContextManager[None]:
    """Show the evaluation's messages (resuming, a stale lock taken over, a torn record cut off)
    above the progress bar."""
    return log_to("tokensieve.engine", logging.INFO, console_lines(console))


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
    strict: Annotated[bool, typer.Option(help="Exit with code 1 if any video fails to load.")] = False,
    frames: FramesOption = None,
    size: SizeOption = None,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile", help="torch.compile with frozen weights (faster on CPU; fixed-budget plans)."
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Accuracy of a model (and plan) on a video dataset, with GFLOPs per view and clips/s.

    Exit code 0 when videos were evaluated (unreadable ones are reported), 1 when none was (or, with
    --strict, when any failed), 2 for bad input (including an --out that belongs to another run),
    130 when interrupted: rerun the same command to resume.
    """
    from ..data.datasets import VideoDataset, load_records
    from ..engine.distributed import setup
    from ..engine.evaluate import check_fits, evaluate

    with usage_errors():
        check_dtype(dtype)
        check_sampling(sampling)
        chosen = parse_views(views)
        records, names = load_records(data, root=root, multilabel=multilabel)
        net = resolve_model(model, frames=None, size=None)
        install_plan(net, plan, model=model)
        if not records:
            raise UsageError(f"{data} lists no videos: nothing to evaluate")
        dataset = VideoDataset(
            records, frames=frames or net.config.frames, size=size or net.config.size, views=chosen,
            sampling=sampling, stride=stride, num_classes=len(names) if names else None, class_names=names,
        )  # fmt: skip
        check_fits(net, dataset)
        world = setup(next(net.parameters()).device)
        hint = lambda: _resume_hint(out, records)  # noqa: E731
        with resumable_run("eval", show=world.is_main, resume_hint=hint) as (bar, update):
            with _engine_log_to(bar.console) if world.is_main else contextlib.nullcontext():
                summary = evaluate(
                    net, dataset, batch_size=batch_size, workers=workers, out=out, dtype=DTYPES[dtype],
                    progress=lambda done, total, rate: update(done, total, f"{rate:.2f} clips/s"),
                    model_name=model, compile=compile,
                )  # fmt: skip
        if not world.is_main:
            return
        doc = {"model": model, "data": str(data), **summary.to_dict()}
        if out is not None:
            write_json(out.with_name(out.name + ".summary.json"), doc)
    if as_json:
        echo_json(doc)
        _exit_status(summary, strict=strict)
        return
    table = compact_table(
        title=f"{model} on {data}, {chosen[0]}x{chosen[1]} views, plan {summary.plan or 'none'}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")

    rows = [
        ("videos", str(summary.videos)),
        ("evaluated", str(summary.evaluated)),
        ("failed", str(summary.failed)),
        ("top-1", percent_text(summary.top1)),
        ("top-5", percent_text(summary.top5)),
        ("mean class accuracy", percent_text(summary.mean_class_accuracy)),
        ("mAP", percent_text(summary.map)),
        (
            "GFLOPs per view" + (f" (mean of {summary.gflops_views} views)" if summary.gflops_views else ""),
            gflops_text(summary.gflops_per_view),
        ),
        ("clips/s (model)", "-" if summary.clips_per_s is None else f"{summary.clips_per_s:.2f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    for line in summary.errors:
        Console(stderr=True).print(f"[yellow]failed:[/yellow] {escape(line)}", highlight=False)
    _exit_status(summary, strict=strict)


def _resume_hint(out: Path | None, records: list[VideoRecord]) -> str:
    """What an interrupted run kept, and how to go on."""
    if out is None:
        return "nothing was kept (--out makes a run resumable)"
    ids = {r.id for r in records}
    try:
        kept = sum(vid in ids for vid in read_done(out))
    except (InputError, OSError):  # interrupted before `out` was checked
        return "rerun the same command to resume"
    return f"{kept} of {len(records)} videos are recorded in {out}; rerun the same command to resume"


def _exit_status(summary: EvalSummary, *, strict: bool) -> None:
    """Exit with code 1 when no video was evaluated, or (`strict`) when any failed."""
    if summary.evaluated == 0:
        error_line(f"no video could be evaluated: all {summary.failed} failed")
        raise typer.Exit(code=EXIT_FAILED)
    if strict and summary.failed:
        error_line(f"{summary.failed} of {summary.videos} videos failed (--strict)")
        raise typer.Exit(code=EXIT_FAILED)


# ---------------------------------------------------------------------------------------- synthetic
@app.command("make-synthetic")
def make_synthetic_command(
    out: Annotated[
        Path,
        typer.Argument(
            help="Folder to write the set into: videos/, truth/, list.txt, classes.txt, synthetic.json. "
            "It must be empty, new, or hold a set written with the same options (then rewritten).",
        ),
    ],
    videos: Annotated[int, typer.Option(help="Number of videos.", min=1)] = 100,
    classes: Annotated[int, typer.Option(help="Number of classes (at most 10).", min=1, max=10)] = 10,
    frames: Annotated[int, typer.Option(help="Frames per video.", min=1)] = 16,
    size: Annotated[int, typer.Option(help="Frame side in pixels.", min=32)] = 224,
    partial: Annotated[bool, typer.Option(help="The action happens only during part of the clip.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same videos).")] = 0,
) -> None:
    """Write the built-in synthetic benchmark: real .mp4 files, labels and per-token ground truth."""
    from ..data.synthetic import make_synthetic

    with usage_errors():
        stderr = Console(stderr=True)
        # Cleared when done, and not drawn at all into a file: an error stays one line.
        with Progress(console=stderr, transient=True, disable=not stderr.is_terminal) as bar:
            task = bar.add_task("writing videos", total=videos)
            listing = make_synthetic(
                out, videos=videos, classes=classes, frames=frames, size=size, partial=partial, seed=seed,
                progress=lambda done, total: bar.update(task, completed=done),
            )  # fmt: skip
    typer.echo(f"wrote {videos} videos; list: {listing}")
