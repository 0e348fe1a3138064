"""What every `tokensieve` command shares: the Typer app, option types, model resolution,
usage errors as one red line, progress displays and number formatting."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.status import Status
from rich.table import Column
from typer.core import TyperGroup

from ..assets import BUILTINS, is_builtin
from ..backbones import PRESETS, VideoBackbone, build
from ..backbones.hf import load
from ..bench import (
    DTYPES,
)
from ..engine.results import write_atomic
from ..errors import InputError
from ..reducers import apply, parse

__all__ = [
    "FramesOption",
    "JsonOption",
    "ModelOption",
    "PlanOption",
    "SizeOption",
    "UsageError",
    "app",
    "bench_status",
    "check_dtype",
    "check_sampling",
    "console_lines",
    "echo_json",
    "error_line",
    "gflops_text",
    "install_plan",
    "log_to",
    "num_column",
    "parse_views",
    "percent_text",
    "progress_bar",
    "resolve_model",
    "resumable_run",
    "usage_errors",
    "write_json",
]


class _Commands(TyperGroup):
    """The group of commands; `--help` lists each one's whole first sentence, wrapped, where click
    would cut it to the space left at 80 columns ("Accuracy of a model (and plan) on a video...")."""

    # `formatter` is click's HelpFormatter, which newer typer vendors (typer._click): not importable
    # under one public name across the typer versions we support.
    def format_commands(self, ctx: typer.Context, formatter: Any) -> None:
        rows = [
            (name, command.get_short_help_str(limit=sys.maxsize))
            for name in self.list_commands(ctx)
            if (command := self.get_command(ctx, name)) is not None and not command.hidden
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(
    name="tokensieve",
    cls=_Commands,
    help="Fewer tokens, faster video transformers: measure token-reduction plans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # bugs get a plain traceback, without tensors printed as locals
    # Click's plain help, not rich's panels: rich fits its option table to the terminal by cutting
    # long option names ("--freeze-backb…") at 80 columns; click puts a long name on its own line.
    rich_markup_mode=None,
)

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Preset name (see `tokensieve info`), builtin:synthetic (the trained reference model), a saved "
        "model or training run (folder or last.pt), a transformers checkpoint folder or hub id.",
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


class UsageError(InputError):
    """A bad command-line input, reported as one red line (exit code 2)."""


def _os_message(err: OSError) -> str:
    """One line naming the path and the problem: "cannot use out.jsonl: Read-only file system"."""
    where = err.filename if err.filename is not None else ""
    what = err.strerror or str(err)
    return f"cannot use {where}: {what}" if where else what


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn bad input into one red line on stderr and exit code 2.

    Exactly the library's own `InputError` (and this module's `UsageError`, one of them) and
    operating-system errors (a read-only folder, a full disk, a missing file) are reported this way;
    any other exception is a bug and keeps its traceback. Each command's body runs inside it, so the
    line is printed after any spinner has stopped.
    """
    try:
        yield
    except (InputError, OSError) as err:
        error_line(_os_message(err) if isinstance(err, OSError) else str(err))
        raise typer.Exit(code=2) from None


def error_line(text: str) -> None:
    """One red "error: ..." line on stderr."""
    Console(stderr=True).print(f"[red]error:[/red] {escape(text)}", highlight=False, soft_wrap=True)


def resolve_model(
    name: str, *, frames: int | None, size: int | None, meta: bool = False, num_classes: int | None = None
) -> VideoBackbone:
    """A preset (built on the meta device when `meta`), or a model `ts.load` reads: a saved model
    (`ts.save`), a training run's folder or its `last.pt`, a transformers checkpoint folder or hub id.

    Presets get the random weights of seed 0: the same in every run and in every torchrun process, and
    are built for `frames` x `size` when given. A loaded model keeps the size its weights were made for:
    the caller runs it at `frames` x `size` (its positions carried there: docs/design.md, "Input sizes").
    `num_classes` sizes a preset's classifier; a loaded model keeps its own. Loading errors become
    one usage error; anything else is a bug and keeps its traceback.
    """
    changes = {k: v for k, v in (("frames", frames), ("size", size)) if v is not None}
    if name in PRESETS:
        torch.manual_seed(0)
        with torch.device("meta") if meta else contextlib.nullcontext():
            return build(name, **changes, **({"num_classes": num_classes} if num_classes else {}))
    if num_classes is not None:
        raise UsageError("--num-classes sets the classifier of a preset; a loaded model keeps its own")
    path = Path(name)
    if is_builtin(name):
        return load(name)
    if not path.exists() and len(path.parts) > 1 and Path(path.parts[0]).is_dir():
        # "runs/stts2" when runs/ is a folder here: a mistyped local path, not a hub id to look up.
        raise UsageError(f"no such model: {name} (not a file or folder; {path.parts[0]}/ is a local folder)")
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/")) and not path.exists()
    if not (path.exists() or looks_like_hub_id):
        raise UsageError(
            f"unknown model {name!r}; valid presets: {', '.join(PRESETS)}; built-in trained models: "
            f"{', '.join(BUILTINS)}; or a saved model, a training run "
            "(its folder or last.pt), a local checkpoint directory or hub id"
        )
    try:
        return load(name)
    except InputError:
        raise  # names the file and the problem already
    except (OSError, ImportError) as err:  # offline, missing files, no transformers
        raise UsageError(f"cannot load {name!r}: {type(err).__name__}: {err}") from err


def install_plan(net: VideoBackbone, plan: str | None, *, model: str | None = None) -> VideoBackbone:
    """Install `--plan` on a resolved model, keeping the model's own plan when it is the same.

    No `--plan` keeps whatever plan the model came with (a saved model's or a training run's, with
    its trained reducers; none for a preset). A spec equal to the model's own (parsed: "T0=0.5" and
    "T0=.5" are the same) keeps the installed reducers too; installing it afresh would replace
    trained selectors with untrained ones. Any other spec replaces the plan. On a built-in model
    (`model` names it), learned methods get the trained weights it ships (`assets.install_selectors`).
    """
    if plan is None or parse(plan) == parse(net.spec or "none"):
        return net
    apply(net, plan)
    if model is not None and is_builtin(model):
        from ..assets import install_selectors

        install_selectors(net, model)
    return net


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")


def check_sampling(sampling: str) -> None:
    if sampling not in ("dense", "segments"):
        raise UsageError(f"--sampling must be dense or segments; got {sampling!r}")


def progress_bar(label: str, *, show: bool) -> Progress:
    """A progress bar on stderr (done/total, ETA, a status text) shown only when `show`."""
    return Progress(
        TextColumn(f"[bold]{label}[/bold]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"), console=Console(stderr=True), disable=not show,
    )  # fmt: skip


EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C


@contextlib.contextmanager
def resumable_run(
    label: str, *, show: bool, resume_hint: Callable[[], str]
) -> Iterator[tuple[Progress, Callable[[int, int, str], None]]]:
    """The progress display of a resumable run (`eval`, `sweep`): a bar shown from the first
    `update(done, total, status)` (a run refused at its start prints its error alone) and stopped when
    the run ends; Ctrl-C prints one line, "interrupted: <resume_hint()>" (where `show`), and exits with
    `EXIT_INTERRUPTED`."""
    bar = progress_bar(label, show=show)
    task = bar.add_task(label, total=None, status="", start=False)

    def update(done: int, total: int, status: str) -> None:
        if not bar.live.is_started:
            bar.start()
            bar.start_task(task)
        bar.update(task, completed=done, total=total, status=status)

    try:
        try:
            yield bar, update
        finally:
            if bar.live.is_started:
                bar.stop()
    except KeyboardInterrupt:
        if show:
            Console(stderr=True).print(
                f"[yellow]interrupted:[/yellow] {escape(resume_hint())}", highlight=False, soft_wrap=True
            )
        raise typer.Exit(code=EXIT_INTERRUPTED) from None


@contextlib.contextmanager
def log_to(name: str, level: int, show: Callable[[logging.LogRecord], None]) -> Iterator[None]:
    """Pass the library's log records from logger `name` at `level` and above to `show` while inside.

    The library logs and never prints; commands show its messages this way (above a progress bar,
    in a spinner), and stop when the command ends.
    """
    logger = logging.getLogger(name)

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            show(record)

    handler, saved = Forward(level), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def console_lines(console: Console) -> Callable[[logging.LogRecord], None]:
    """`show` for `log_to`: one line per record on `console`, warnings marked in yellow."""

    def show(record: logging.LogRecord) -> None:
        tag = "[yellow]warning:[/yellow] " if record.levelno >= logging.WARNING else ""
        console.print(f"{tag}{escape(record.getMessage())}", highlight=False, soft_wrap=True)

    return show


@contextlib.contextmanager
def bench_status(prefix: str) -> Iterator[None]:
    """A spinner on stderr showing the benchmark's log messages as they come."""
    with Status(f"{prefix}: starting", console=Console(stderr=True)) as status:
        with log_to(
            "tokensieve.bench", logging.INFO, lambda r: status.update(f"{prefix}: {escape(r.getMessage())}")
        ):
            yield


def echo_json(doc: object) -> None:
    typer.echo(doc if isinstance(doc, str) else json.dumps(doc, indent=2))


def write_json(target: Path, doc: object) -> None:
    """Write `doc` as indented JSON atomically (`results.write_atomic`: never a torn file, and no
    temporary file left behind when the write fails)."""
    write_atomic(target, json.dumps(doc, indent=2).encode())


def percent_text(value: float | None) -> str:
    """A fraction as a percentage with two decimals, or "-" when missing."""
    return "-" if value is None else f"{100 * value:.2f}%"


def gflops_text(value: float) -> str:
    """Two decimals, or three significant digits for the tiny test presets."""
    return f"{value:.2f}" if value >= 1 or value == 0 else f"{value:.3g}"


def num_column(header: str) -> Column:
    return Column(header, justify="right")


def parse_views(text: str) -> tuple[int, int]:
    clips, sep, num_crops = text.lower().partition("x")
    try:
        views = (int(clips), int(num_crops)) if sep else (0, 0)
    except ValueError:
        views = (0, 0)
    if views[0] < 1 or views[1] not in (1, 3):
        raise UsageError(f"--views is CLIPSxCROPS with clips >= 1 and crops 1 or 3, e.g. 5x3; got {text!r}")
    return views
