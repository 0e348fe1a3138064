"""The oracle's value of every token of every video, written as compact resumable records.

    summary = value_maps(model, dataset, out="oracle/maps.jsonl", label="true", batch_size=8, workers=2)
    maps = read_value_maps("oracle/maps.jsonl")       # {video id: (views, N) float32 in [0, 1]}

For every video: decode its views in a worker process (`VideoDataset`), normalise them as the model
expects, and run `ts.oracle` (Grad-CAM of the target class's score on the model without its plan) on
batches of views that may mix videos; when a video's last view is done, write its record. A video that
cannot be read is recorded as failed and the run goes on.

Records are those of evaluation (`engine/results.py`): a provenance header, then one JSON line per
video, written by each process into its part file and merged by rank 0 in dataset order. A rerun with
the same `out` skips the videos already recorded (resume) and is refused when anything that produced
them differs. The header's `plan` names the oracle's settings instead of a reduction plan,

    "oracle-maps:label=true,block=3,tensor=output,value=gradcam"

(the block as a non-negative index, so `block=None` and the default block's number are one setting),
so maps of another label, block or tensor are never mixed into a file, and neither `tokensieve eval`
nor a sweep can take the file for one of theirs ("oracle-maps" is no reduction method). The checksum is
the backbone's without its plan: the oracle runs the model bare, so an installed plan changes nothing.

A record holds a video's maps as float16 bytes:

    {"id": "000001", "labels": [3], "status": "ok",
     "values": {"shape": [views, N], "dtype": "float16", "data": "<base64 of the little-endian bytes>"}}

float16 rather than 8-bit levels: the value distribution is studied down to its smallest values (the
power-law fit of `engine/oracle_report.py` works on log values), and float16 keeps a relative error
of at most 2^-11 from 1 down to 6e-5 (and represents smaller values coarsely, never as 0 unless
they are below 3e-8), where 255 levels would turn every value below 0.002 into 0. It costs 8/3 bytes
per token in the file (a 2x3-view ViT-B video: 9408 tokens, 25 kB).

Ground truth: `truth_masks` loads a synthetic set's per-token foreground (`data.synthetic`) on the
model's token grid when the clips the oracle saw are exactly the set's videos (one view, the whole
clip, a grid the set's truth divides into), for `oracle_report`'s recall of the oracle's top tokens.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data.datasets import Sample, VideoDataset
from ..data.synthetic import load_truth
from ..data.transforms import normalize
from ..errors import InputError
from ..oracle import check_oracle, default_block, oracle
from ..reducers.plan import without_plan
from .distributed import World, barrier, gather, on_main, setup
from .evaluate import _Todo, check_fits, label_tensor, model_checksum
from .results import Provenance, Record, RecordWriter, merge, read_done, read_results, start_run

__all__ = [
    "PLAN_PREFIX",
    "MapsSummary",
    "decode_values",
    "encode_values",
    "oracle_setting",
    "read_value_maps",
    "truth_masks",
    "value_maps",
]

log = logging.getLogger(__name__)

PLAN_PREFIX = "oracle-maps:"
"""How the `plan` of a maps file's header starts (no reduction method has this name)."""
STORED = "float16"
"""The dtype of the stored maps."""

Progress = Callable[[int, int, float], None]
"""progress(videos done, videos to do in this process, clips per second so far): once `out` is
checked and locked (0 done), then after each video."""


@dataclass(frozen=True)
class MapsSummary:
    """What a `value_maps` run did.

    Attributes:
        videos: videos in the dataset.
        mapped: videos with maps in `out`; `failed`: videos that could not be read (first in `errors`).
        setting: the oracle's settings (`oracle_setting`), as the file's header names them.
        views: (clips, crops) per video.
        clips_per_s: views per second through the oracle in this run (all processes together); None
            when every video was done before.
        done_before: videos already recorded when the run started (resumed).
        errors: first failures, "id: error".
    """

    videos: int
    mapped: int
    failed: int
    setting: str
    views: tuple[int, int]
    clips_per_s: float | None
    done_before: int = 0
    errors: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------- records
def oracle_setting(
    model: nn.Module, *, label: str, block: int | None, tensor: str, value: str = "gradcam"
) -> str:
    """The header's `plan` for maps of these oracle settings:
    "oracle-maps:label=true,block=3,tensor=output,value=gradcam"."""
    depth = len(model.blocks)
    check_oracle(label, tensor, block, depth, value=value)
    index = (default_block(model) if block is None else block) % depth
    return f"{PLAN_PREFIX}label={label},block={index},tensor={tensor},value={value}"


def encode_values(values: Tensor) -> dict[str, Any]:
    """A record's "values" entry: (views, N) values as base64 float16 bytes with their shape."""
    array = values.detach().to("cpu", torch.float16).contiguous().numpy().astype("<f2")  # little-endian
    return {"shape": list(array.shape), "dtype": STORED, "data": base64.b64encode(array.tobytes()).decode()}


def decode_values(entry: dict[str, Any], *, where: str = "record") -> Tensor:
    """(views, N) float32 values of a record's "values" entry (`encode_values`).

    Raises:
        InputError: an entry of another dtype, or whose bytes do not fill its shape (naming `where`).
    """
    try:
        shape, dtype, data = [int(n) for n in entry["shape"]], entry["dtype"], base64.b64decode(entry["data"])
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{where}: a damaged value map ({type(err).__name__}: {err})") from None
    if dtype != STORED or len(data) != 2 * int(np.prod(shape)):
        raise InputError(
            f"{where}: a value map of dtype {dtype!r} with {len(data)} bytes does not fill shape {shape} "
            f"of {STORED}"
        )
    return torch.from_numpy(np.frombuffer(data, dtype="<f2").reshape(shape).astype(np.float32))


def read_value_maps(path: str | Path) -> dict[str, Tensor]:
    """The maps of a finished (merged) `value_maps` file: {video id: (views, N) float32}, in file
    order; failed videos are left out (their records say why, `results.read_results`).

    Raises:
        InputError: not a results file, or one of evaluation results rather than value maps.
    """
    path = Path(path)
    provenance, records = read_results(path)
    if not (provenance.plan or "").startswith(PLAN_PREFIX):
        raise InputError(
            f"{path} holds evaluation results (plan {provenance.plan or 'none'}), not oracle value maps"
        )
    return {
        r["id"]: decode_values(r["values"], where=f"{path}: video {r['id']}")
        for r in records
        if r.get("status") == "ok"
    }


# ---------------------------------------------------------------------------------------- running
def _check_labels(model: nn.Module, dataset: VideoDataset, label: str) -> None:
    """Refuse, before any work, videos the true-label oracle cannot explain."""
    if label != "true":
        return
    unlabelled = sum(not r.labels for r in dataset.records)
    if unlabelled:
        raise InputError(
            f"{unlabelled} of {len(dataset)} videos have no label, and the oracle explains the true "
            "label's score; label the videos, or use label=pred (the model's own top class)"
        )
    classes = model.config.num_classes
    top = max(max(r.labels) for r in dataset.records)
    if top >= classes:
        raise InputError(
            f"a video has label {top} but the model predicts {classes} classes (0..{classes - 1})"
        )


def value_maps(
    model: nn.Module,
    dataset: VideoDataset,
    *,
    out: str | Path,
    label: str = "true",
    block: int | None = None,
    tensor: str = "output",
    value: str = "gradcam",
    views: tuple[int, int] | None = None,
    batch_size: int = 8,
    workers: int = 2,
    progress: Progress | None = None,
    model_name: str | None = None,
) -> MapsSummary:
    """Run `ts.oracle` on every view of every video of `dataset` and record each video's maps in `out`.

    Args:
        model: a tokensieve backbone (the oracle runs it without its plan, in eval mode; both are
            restored).
        dataset: the videos and their sampling.
        out: the JSONL file of records (module docstring); rerun with it to resume.
        label, block, tensor, value: the oracle's settings (`ts.oracle`).
        views: (temporal clips, spatial crops) per video; default the dataset's.
        batch_size: views per oracle pass (views of several videos share a batch).
        workers: decoding processes (0 decodes in this process).
        progress: see `Progress`.
        model_name: the model's name or path, kept in the header for readers.

    Returns:
        The `MapsSummary` (the same on every process).

    Raises:
        InputError: bad settings; a dataset that does not fit the model, or unlabelled videos with
            label="true"; an `out` that is not a results file, holds maps of other settings, another
            model or other data (naming what differs), or is being written by a live run.
        OSError: `out` cannot be written, naming the file.
    """
    if batch_size < 1 or workers < 0:
        raise InputError(f"need batch_size >= 1 and workers >= 0, got {batch_size} and {workers}")
    setting = oracle_setting(model, label=label, block=block, tensor=tensor, value=value)
    if views is not None:
        dataset = dataset.with_views(views)
    check_fits(model, dataset)
    _check_labels(model, dataset, label)
    world = setup(next(model.parameters()).device)
    with without_plan(model):
        checksum = model_checksum(model)
    if len(set(gather(world, checksum))) > 1:
        raise InputError(
            "the torchrun processes hold different weights (load the same model in every process)"
        )
    dense = dataset.sampling == "dense"
    provenance = Provenance(
        model=model_name, checksum=checksum, plan=setting, views=dataset.views, frames=dataset.frames,
        size=dataset.size, resize=dataset.resize, sampling=dataset.sampling,
        stride=dataset.stride if dense else None, short=dataset.short if dense else None, dtype="float32",
    )  # fmt: skip
    out = Path(out)
    lock = on_main(world, lambda: start_run(out, provenance))  # refuses before any work
    try:
        return _value_maps(model, dataset, out=out, provenance=provenance, label=label, block=block,
                           tensor=tensor, value=value, batch_size=batch_size, workers=workers, progress=progress,
                           world=world)  # fmt: skip
    finally:
        if lock is not None:
            lock.release()


def _value_maps(
    model: nn.Module, dataset: VideoDataset, *, out: Path, provenance: Provenance, label: str,
    block: int | None, tensor: str, value: str, batch_size: int, workers: int, progress: Progress | None,
    world: World,
) -> MapsSummary:  # fmt: skip
    """`value_maps` once `out` is locked and checked: map the videos not done yet, merge, summarise."""
    done = read_done(out)
    todo = [i for i, r in enumerate(dataset.records) if r.id not in done]
    done_before = len(dataset) - len(todo)
    mine = todo[world.rank :: world.size]  # unpadded: no video is done twice
    barrier(world)  # every process has read the same records before any of them writes one
    if done_before and world.is_main:
        log.info(
            "%s: resuming: %d of %d videos already done, %d to do", out, done_before, len(dataset), len(todo)
        )
    oracle_args = {"label": label, "block": block, "tensor": tensor, "value": value}
    with RecordWriter(out, world.rank, provenance) as writer:
        seconds, clips = _run(model, dataset, mine, oracle_args=oracle_args, batch_size=batch_size,
                              workers=workers, write=writer.write, progress=progress)  # fmt: skip
    barrier(world)
    stats = gather(world, (clips, seconds))
    clips, seconds = sum(c for c, _ in stats), max(s for _, s in stats)
    merged = on_main(world, lambda: merge(out, [r.id for r in dataset.records], provenance))
    records = merged if merged is not None else list(read_done(out).values())
    ids = {r.id for r in dataset.records}
    records = [r for r in records if r["id"] in ids]  # an `out` reused with a shorter list keeps its rows
    return MapsSummary(
        videos=len(dataset), mapped=sum(r["status"] == "ok" for r in records),
        failed=sum(r["status"] == "failed" for r in records), setting=provenance.plan or "",
        views=dataset.views, clips_per_s=clips / seconds if seconds > 0 else None, done_before=done_before,
        errors=tuple(f"{r['id']}: {r['error']}" for r in records if r["status"] == "failed")[:20],
    )  # fmt: skip


@dataclass(eq=False)  # compared by identity: a video in flight
class _Mapping:
    """A video whose views are partly through the oracle."""

    sample: Sample
    values: Tensor  # (views, N) filled in as its views run
    done: int = 0


def _run(
    model: nn.Module, dataset: VideoDataset, indices: Sequence[int], *, oracle_args: dict[str, Any],
    batch_size: int, workers: int, write: Callable[[Record], None], progress: Progress | None,
) -> tuple[float, int]:  # fmt: skip
    """Map the videos at `indices`, writing each one's record when its last view is done; returns
    (seconds in the oracle, views through it)."""
    cfg, device = model.config, next(model.parameters()).device
    T, H, W = cfg.grid_of(dataset.frames, dataset.size)  # the clips' token grid
    loader = DataLoader(_Todo(dataset, indices), batch_size=None, num_workers=workers,
                        prefetch_factor=2 if workers else None)  # fmt: skip
    queue: list[tuple[_Mapping, int]] = []  # (video, view) not yet through the oracle
    seconds, clips, finished = 0.0, 0, 0

    def emit(record: Record) -> None:
        nonlocal finished
        write(record)
        finished += 1
        if progress is not None:
            progress(finished, len(indices), clips / seconds if seconds else 0.0)

    def run_batch(limit: int) -> None:
        nonlocal seconds, clips
        batch = queue[:limit]
        del queue[:limit]
        views = torch.stack([video.sample.views[view] for video, view in batch])  # (b, T, C, S, S) uint8
        x = normalize(views.to(device).float().div_(255), cfg.mean, cfg.std)
        labels = None
        if oracle_args["label"] == "true":
            labels = label_tensor([v.sample.record.labels for v, _ in batch], cfg.num_classes,
                                  multilabel=dataset.multilabel).to(device)  # fmt: skip
        start = time.perf_counter()
        values = oracle(model, x, labels, **oracle_args).cpu()  # (b, N)
        seconds += time.perf_counter() - start
        clips += len(batch)
        for (video, view), row in zip(batch, values, strict=True):
            video.values[view] = row
            video.done += 1
        for video in dict.fromkeys(v for v, _ in batch):  # each video of the batch once, in order
            if video.done == len(video.values):
                record = video.sample.record
                emit({"id": record.id, "labels": list(record.labels), "status": "ok",
                      "values": encode_values(video.values)})  # fmt: skip

    if progress is not None:
        progress(0, len(indices), 0.0)
    for sample in loader:
        if sample.views is None:
            emit({"id": sample.record.id, "labels": list(sample.record.labels), "status": "failed",
                  "error": sample.error})  # fmt: skip
            continue
        video = _Mapping(sample, torch.empty(len(sample.views), T * H * W))
        queue.extend((video, view) for view in range(len(sample.views)))
        while len(queue) >= batch_size:
            run_batch(batch_size)
    if queue:
        run_batch(len(queue))
    return seconds, clips


# ---------------------------------------------------------------------------------------- truth
def truth_masks(
    model: nn.Module, dataset: VideoDataset, truth: str | Path, ids: Iterable[str] | None = None
) -> dict[str, Tensor] | None:
    """Each video's ground-truth foreground on the clips' token grid: {id: (N,) the fraction of each
    token the object covers}, in time-major raster order like the maps; for the videos `ids` (default
    every video of `dataset`: give the mapped ones, a video that could not be read may have no truth).

    Only when the truth lines up with the clips the oracle saw: one view per video (1x1), whose frames
    are the video's frames in order (stride 1 on a video as long as the clip), covering the whole
    (square) frame (resize = size), on a token grid the set's truth grid divides into whole tokens.
    A finer truth grid is average-pooled (the mean of coverage fractions is the coverage of their
    union). Otherwise None, with an info log line saying what does not line up.

    Raises:
        InputError: a video of `ids` has no truth file in `truth`.
    """
    ids = [r.id for r in dataset.records] if ids is None else list(ids)
    if not ids:
        return {}
    if dataset.views != (1, 1):
        log.info("foreground recall needs one view per video; not measured with %s views",
                 "x".join(map(str, dataset.views)))  # fmt: skip
        return None
    first = load_truth(truth, ids[0])
    frames = first["mask"].shape[0] * first["tubelet"]
    if not torch.equal(dataset.indices(frames), torch.arange(frames)[None]):
        log.info("foreground recall needs each clip to be its whole video (%d frames of a %d-frame video "
                 "at stride 1); not measured", dataset.frames, frames)  # fmt: skip
        return None
    if dataset.resize != dataset.size:
        log.info("foreground recall needs the clip to cover the whole frame (resize = size); not measured")
        return None
    grid = model.config.grid_of(dataset.frames, dataset.size)  # the clips' token grid
    fine = tuple(first["mask"].shape)
    if any(f % g for f, g in zip(fine, grid, strict=True)):
        log.info("the synthetic set's truth grid %s does not divide into the clips' token grid %s; "
                 "foreground recall not measured", fine, grid)  # fmt: skip
        return None
    factor = tuple(f // g for f, g in zip(fine, grid, strict=True))
    masks = {}
    for vid in ids:
        mask = load_truth(truth, vid)["mask"].float()  # (T', H', W')
        masks[vid] = F.avg_pool3d(mask[None], factor, factor)[0].flatten()  # (T*H*W,)
    return masks
