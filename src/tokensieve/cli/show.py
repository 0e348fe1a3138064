"""`tokensieve show`: draw which tokens a plan keeps, drops and merges on one video."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..bench import compact_table
from .common import (
    ModelOption,
    UsageError,
    app,
    console_lines,
    install_plan,
    log_to,
    num_column,
    resolve_model,
    usage_errors,
)


@app.command("show")
def show_command(
    model: ModelOption,
    video: Annotated[
        Path,
        typer.Option("--video", "-v", help="Video file; the model's number of frames is spread over it."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Image to write: .png (a row per stage) or .gif (a frame per clip frame)."
        ),
    ],
    plan: Annotated[str | None, typer.Option("--plan", "-p", help="Reduction plan spec.")] = None,
) -> None:
    """Draw the tokens a plan keeps (dropped ones dimmed, merged ones outlined) on one video.

    The video gives the model's number of frames, one from each of equal segments, resized and
    centre-cropped to its input size as in evaluation. Prints the token count after each stage.
    """
    from ..data.datasets import VideoDataset, VideoRecord
    from ..data.video import DecodeError
    from ..viz import draw, reduction_stages, save

    warnings = log_to("tokensieve", logging.WARNING, console_lines(Console(stderr=True)))  # untrained plans
    with usage_errors(), warnings:
        if out.suffix.lower() not in (".png", ".gif"):
            raise UsageError(f"--out must end in .png or .gif, got {out}")
        if not video.is_file():
            raise UsageError(f"no such video: {video}")
        net = install_plan(resolve_model(model, frames=None, size=None), plan, model=model).eval()
        cfg = net.config
        # The evaluation's single view: `frames` segments, one frame each, short side resized, centre crop.
        clips = VideoDataset(
            [VideoRecord(video.stem, video, ())], frames=cfg.frames, size=cfg.size, sampling="segments"
        )
        try:
            clip = clips.load(0)[0]  # (T, C, size, size) uint8
        except DecodeError as err:
            raise UsageError(str(err)) from None
        stages = reduction_stages(net, clip)
        try:
            image = draw(stages, clip, cfg, animate=out.suffix.lower() == ".gif")
        except ImportError as err:  # Pillow missing
            raise UsageError(str(err)) from None
        save(image, out)
    # Model and plan on a line of their own: a table title would wrap at the table's width.
    console = Console()
    console.print(f"{model}, plan {net.spec or 'none'}, on {video}", highlight=False, soft_wrap=True)
    table = compact_table("stage", num_column("tokens"), num_column("merged"))
    for stage in stages:
        table.add_row(stage.label, str(stage.tokens), str(stage.merged) if stage.merged else "-")
    console.print(table)
    console.print(f"wrote {out}", highlight=False, soft_wrap=True)
