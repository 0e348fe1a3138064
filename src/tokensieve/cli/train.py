"""`tokensieve train`: train a model and its plan's selectors on a video list."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..backbones import PRESETS
from ..bench import (
    DTYPES,
    compact_table,
)
from .common import (
    JsonOption,
    ModelOption,
    UsageError,
    app,
    check_dtype,
    check_sampling,
    console_lines,
    echo_json,
    install_plan,
    log_to,
    parse_views,
    percent_text,
    progress_bar,
    resolve_model,
    usage_errors,
    write_json,
)


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


def _warnings_to(console: Console) -> contextlib.AbstractContextManager[None]:
    """Show the library's warnings (unreadable videos, changed settings on resume, clips a partial last
    batch leaves out, flips turned off) above the progress bar."""
    return log_to("tokensieve", logging.WARNING, console_lines(console))


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
        int,
        typer.Option(
            "--batch-size",
            "-b",
            help="Clips per process per step. The global batch is processes x this; an epoch's "
            "last, partial global batch is dropped (with a warning).",
            min=1,
        ),
    ] = 8,
    lr: Annotated[
        float | None,
        typer.Option(help="Peak learning rate of the backbone; default 1e-3 or the plan's recipe.", min=0),
    ] = None,
    reducer_lr: Annotated[
        float | None, typer.Option(help="Peak learning rate of the plan's parameters; default --lr.", min=0)
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="adamw or adam; default adamw or the plan's recipe.")
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="Weight decay; default 0.05 or the plan's recipe.", min=0)
    ] = None,
    warmup_epochs: Annotated[
        float | None, typer.Option(help="Linear warm-up, in epochs; default 0 or the plan's recipe.", min=0)
    ] = None,
    warmup_start: Annotated[
        float | None,
        typer.Option(
            help="Warm-up starts at this fraction of the peak rate; default 0 or the plan's recipe.",
            min=0,
            max=1,
        ),
    ] = None,
    min_lr_ratio: Annotated[
        float, typer.Option(help="Final rate as a fraction of the peak.", min=0, max=1)
    ] = 0.0,
    clip_grad: Annotated[
        float | None, typer.Option(help="Maximum gradient norm; default none or the plan's recipe.")
    ] = None,
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
    from ..data.clips import ClipDataset
    from ..data.datasets import VideoDataset, load_records
    from ..engine.distributed import setup
    from ..engine.train import StepInfo, train

    with usage_errors():
        check_dtype(dtype)
        check_sampling(sampling)
        chosen, crop_scale = parse_views(val_views), _crop_scale(scale)
        records, names = load_records(data, root=root, multilabel=multilabel)
        classes = num_classes or (len(names) if names else None)
        net = resolve_model(
            model, frames=None, size=None, num_classes=classes if model in PRESETS else num_classes
        )
        install_plan(net, plan)
        cfg = net.config
        with _warnings_to(Console(stderr=True)):  # e.g. flips turned off for direction classes
            dataset = ClipDataset(
                records, frames=cfg.frames, size=cfg.size, sampling=sampling, stride=stride,
                scale=crop_scale, flip=flip, seed=seed, num_classes=cfg.num_classes, class_names=names,
            )  # fmt: skip
        validation = None
        if val is not None:
            val_records, val_names = load_records(val, root=root, multilabel=multilabel)
            validation = VideoDataset(
                val_records, frames=cfg.frames, size=cfg.size, views=chosen, sampling=sampling, stride=stride,
                num_classes=cfg.num_classes, class_names=val_names,
            )  # fmt: skip
        world = setup(next(net.parameters()).device)
        bar = progress_bar("train", show=world.is_main)
        with bar, _warnings_to(bar.console):
            task = bar.add_task("train", total=None, status="")

            def progress(info: StepInfo) -> None:
                lr_text = "/".join(f"{v:.2e}" for v in dict.fromkeys(info.lr.values()))
                status = (
                    f"epoch {info.epoch} loss {info.loss:.4f} lr {lr_text} {info.clips_per_s:.1f} clips/s"
                )
                bar.update(task, completed=info.step, total=info.total_steps, status=status)

            recipe = {  # given explicitly, else the defaults with the plan's recipe (`recipe_config`)
                k: v for k, v in dict(lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                                      warmup_epochs=warmup_epochs, warmup_start=warmup_start,
                                      clip_grad=clip_grad).items() if v is not None
            }  # fmt: skip
            result = train(
                net, dataset, val=validation, out=out, resume=resume, progress=progress, epochs=epochs,
                batch_size=batch_size, reducer_lr=reducer_lr, min_lr_ratio=min_lr_ratio,
                label_smoothing=label_smoothing, freeze_backbone=freeze_backbone, dtype=dtype, seed=seed,
                workers=workers, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                eval_views=chosen, **recipe,
            )  # fmt: skip
    if not world.is_main:
        return
    doc = {"model": model, "data": str(data), "plan": net.spec, **result.to_dict()}
    write_json(out / "result.json", doc)
    if as_json:
        echo_json(doc)
        return
    table = compact_table(title=f"{model} on {data}, plan {net.spec or 'none'}, {result.steps} steps")
    for header in ("epoch", "loss", "lr", "top-1", "top-5", "mAP"):
        table.add_column(header, justify="left" if header == "epoch" else "right")

    for e in result.epochs:
        summary = e.eval
        table.add_row(
            str(e.epoch), f"{e.loss:.4f}", "/".join(f"{v:.2e}" for v in dict.fromkeys(e.lr.values())),
            percent_text(summary and summary.top1), percent_text(summary and summary.top5),
            percent_text(summary and summary.map),
        )  # fmt: skip
    Console().print(table)
    console = Console(stderr=True)
    console.print(f"checkpoint: {escape(str(result.checkpoint))}", highlight=False)
    if result.checkpoint is not None:  # the run folder is a model: every --model and ts.load take it
        run = escape(str(out))
        console.print(
            f"model: {run} (tokensieve eval --model {run} --data {escape(str(val or 'LIST'))}, "
            f"tokensieve bench --model {run}, ts.load({escape(repr(str(out)))}))",
            highlight=False,
            soft_wrap=True,
        )
