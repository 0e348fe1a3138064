"""`tokensieve oracle`: the oracle's value of every token of a video list, and how it is spread."""

from __future__ import annotations

import contextlib
import datetime
import logging
import platform
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import InputError
from .common import (
    FramesOption,
    JsonOption,
    ModelOption,
    SizeOption,
    UsageError,
    app,
    check_sampling,
    console_lines,
    echo_json,
    error_line,
    log_to,
    parse_views,
    resolve_model,
    resumable_run,
    usage_errors,
)

if TYPE_CHECKING:
    from ..data.datasets import VideoDataset
    from ..engine.oracle_maps import MapsSummary

EXIT_FAILED = 1  # no video mapped, or --strict and a video failed; 2 is bad input (usage_errors)
MAPS = "maps.jsonl"
"""The records' file in --out."""


def _recorded(maps: Path, ids: set[str]) -> str:
    """What an interrupted run kept, and how to go on."""
    from ..engine.results import read_done

    try:
        kept = sum(vid in ids for vid in read_done(maps))
    except (InputError, OSError):  # interrupted before the file was checked
        return "rerun the same command to resume"
    return f"{kept} of {len(ids)} videos are recorded in {maps}; rerun the same command to resume"


def _header(
    model: str, data: Path, dataset: VideoDataset, summary: MapsSummary, maps: Path
) -> dict[str, str]:
    """The "what: value" lines at the top of report.md."""
    import torch

    from .. import __version__
    from ..engine.results import read_results

    provenance, _ = read_results(maps)
    clips, crops = dataset.views
    sampling = f"dense, stride {dataset.stride}" if dataset.sampling == "dense" else "segments"
    return {
        "command": shlex.join(["tokensieve", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "versions": f"tokensieve {__version__}, torch {torch.__version__}, python {platform.python_version()}",
        "model": f"{model} ({provenance.checksum[:19]})",
        "data": f"{data}: {summary.mapped} videos mapped, {summary.failed} failed",
        "clips": f"{clips}x{crops} views of {dataset.frames}x{dataset.size} ({sampling})",
        "oracle": summary.setting,
        "maps": str(maps),
    }


@app.command("oracle")
def oracle_command(
    model: ModelOption,
    data: Annotated[
        Path, typer.Option("--data", "-d", help="List file, Kinetics CSV, SSv2 videos.json or class folders.")
    ],
    out: Annotated[
        Path, typer.Option(help="Folder for maps.jsonl, report.md, report.json, oracle.png; rerun to resume.")
    ] = Path("oracle"),
    label: Annotated[
        str, typer.Option(help="Class the oracle explains: true (the label) or pred (the model's top class).")
    ] = "true",
    block: Annotated[
        int | None,
        typer.Option(
            help="Block whose activations the oracle reads (negative: from the end); default the "
            "last whose patch tokens reach the head."
        ),
    ] = None,
    tensor: Annotated[
        str,
        typer.Option(
            help="output (the block's output tokens), hidden (its MLP's hidden activation) or embed (the "
            "patch embedding's tokens)."
        ),
    ] = "output",
    value: Annotated[
        str,
        typer.Option(
            help="gradcam (the paper), gradxact (gradient x activation per token) or gradnorm (the "
            "gradient's norm per token)."
        ),
    ] = "gradcam",
    views: Annotated[str, typer.Option(help="Temporal clips x spatial crops per video, e.g. 2x3.")] = "1x1",
    frames: FramesOption = None,
    size: SizeOption = None,
    sampling: Annotated[str, typer.Option(help="dense (frames x stride) or segments.")] = "dense",
    stride: Annotated[
        int | None,
        typer.Option(
            help="Frame stride of dense clips; default 4 (1 on a synthetic set, so that a clip is "
            "its whole video and the ground truth lines up).",
            min=1,
        ),
    ] = None,
    root: Annotated[Path | None, typer.Option(help="Folder the list's paths are relative to.")] = None,
    multilabel: Annotated[bool, typer.Option(help="List labels are comma-separated sets.")] = False,
    truth: Annotated[
        Path | None,
        typer.Option(
            help="A synthetic set's folder, for the foreground recall of the oracle's top tokens; "
            "default the list's folder when it holds a synthetic set."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Views per oracle pass.", min=1)] = 8,
    workers: Annotated[int, typer.Option(help="Decoding processes.", min=0)] = 2,
    strict: Annotated[bool, typer.Option(help="Exit with code 1 if any video fails to load.")] = False,
    as_json: JsonOption = False,
) -> None:
    """The oracle's value of every token (LITE's Grad-CAM of the true label) on a video list, and how
    it is spread: Pareto shares, histogram, power law, foreground recall on a synthetic set.

    Writes each video's value maps to OUT/maps.jsonl (float16, read back with
    tokensieve.engine.oracle_maps.read_value_maps) and report.md, report.json and oracle.png. Exit code
    0 when videos were mapped (unreadable ones are reported), 1 when none was (or, with --strict, when
    any failed), 2 for bad input (including an --out holding maps of other settings), 130 when
    interrupted: rerun the same command to resume.
    """
    from ..data.datasets import VideoDataset, load_records
    from ..data.synthetic import MANIFEST
    from ..engine.distributed import setup
    from ..engine.oracle_maps import read_value_maps, truth_masks, value_maps
    from ..engine.oracle_report import fit_text, oracle_report, pareto_table, write_oracle_report
    from ..oracle import LABELS, TENSORS, VALUES

    stderr = Console(stderr=True)
    with usage_errors():
        check_sampling(sampling)
        if label not in LABELS:
            raise UsageError(f"--label must be one of {', '.join(LABELS)}; got {label!r}")
        if tensor not in TENSORS:
            raise UsageError(f"--tensor must be one of {', '.join(TENSORS)}; got {tensor!r}")
        if value not in VALUES:
            raise UsageError(f"--value must be one of {', '.join(VALUES)}; got {value!r}")
        chosen = parse_views(views)
        records, names = load_records(data, root=root, multilabel=multilabel)
        if not records:
            raise UsageError(f"{data} lists no videos: nothing to map")
        net = resolve_model(model, frames=frames, size=size)
        depth = len(net.blocks)
        if block is not None and not -depth <= block < depth:
            raise UsageError(
                f"--block must be in [{-depth}, {depth - 1}] for this model of {depth} blocks; got {block}"
            )
        if truth is None and (data.parent / MANIFEST).is_file():
            truth = data.parent
        dataset = VideoDataset(
            records, frames=frames or net.config.frames, size=size or net.config.size, views=chosen,
            sampling=sampling, stride=stride or (1 if truth is not None else 4), num_classes=len(names) if names else None,
            class_names=names,
        )  # fmt: skip
        world = setup(next(net.parameters()).device)
        maps = out / MAPS
        ids = {r.id for r in records}
        hint = lambda: _recorded(maps, ids)  # noqa: E731
        with resumable_run("oracle", show=world.is_main, resume_hint=hint) as (bar, update):
            with (
                log_to("tokensieve.engine", logging.INFO, console_lines(bar.console))
                if world.is_main
                else contextlib.nullcontext()
            ):
                summary = value_maps(
                    net, dataset, out=maps, label=label, block=block, tensor=tensor, value=value, batch_size=batch_size,
                    workers=workers, progress=lambda done, total, rate: update(done, total, f"{rate:.2f} clips/s"),
                    model_name=model,
                )  # fmt: skip
        if not world.is_main:
            return
        for line in summary.errors:
            stderr.print(f"[yellow]failed:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
        if summary.mapped == 0:
            error_line(f"no video could be mapped: all {summary.failed} failed")
            raise typer.Exit(code=EXIT_FAILED)
        found = {vid: m for vid, m in read_value_maps(maps).items() if vid in ids}
        masks = None
        if truth is not None:
            with log_to("tokensieve.engine", logging.INFO, console_lines(stderr)):  # why truth does not fit
                masks = truth_masks(net, dataset, truth, ids=found)
        report = oracle_report(found, masks=masks, header=_header(model, data, dataset, summary, maps))
        write_oracle_report(report, out)
    if as_json:
        echo_json({"model": model, "data": str(data), "out": str(out), **summary.to_dict(),
                   "report": report.to_dict()})  # fmt: skip
    else:
        Console().print(pareto_table(report, title=f"oracle on {data}: the value in the top tokens"))
        Console().print(fit_text(report.fit), highlight=False, soft_wrap=True)
        stderr.print(
            f"report: {out / 'report.md'}\nplot:   {out / 'oracle.png'}\nmaps:   {maps}", highlight=False
        )
    if strict and summary.failed:
        error_line(f"{summary.failed} of {summary.videos} videos failed (--strict)")
        raise typer.Exit(code=EXIT_FAILED)
