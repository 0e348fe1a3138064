"""Multi-view evaluation: accuracy next to GFLOPs per view and measured throughput.

    summary = ts.evaluate(model, dataset, views=(5, 3), batch_size=8, workers=2, out="results.jsonl")

For every video: decode its views in a worker process (`VideoDataset`), normalise them as the model
expects, run the model (with its installed plan) in batches that may mix videos, average the class
probabilities over the views (softmax; sigmoid for multi-label data), and write one record as soon
as the video's last view is done. Metrics come from the records: top-1, top-5 and mean per-class
accuracy, or mAP for multi-label data, over the videos that could be read; failures are counted.

Records (`engine/results.py`) make a run resumable and safe to interrupt: rerunning with the same
`out` skips finished videos, redoes a torn last one, and never counts one twice. The file's header
says what produced it (the model's checksum, plan, views, clip shape, sampling, dtype): a run that
differs in any of these is refused before it starts, naming the fields, as is a second run on the
same `out` while the first is alive, and a file that is not a results file. Under `torchrun`
the unfinished videos are split across processes without padding (process r takes every r-th),
each writes its own part file, and rank 0 merges after a barrier; the summary is computed from the
merged records, so it is the same for any number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..bench import check_compilable, compile_model
from ..data.clips import ClipDataset
from ..data.datasets import Sample, VideoDataset
from ..data.transforms import normalize
from ..errors import InputError
from ..flops import FlopCount, count_flops, flops
from ..reducers.plan import is_adaptive
from ..tokens import Inputs
from .distributed import World, barrier, gather, on_main, setup
from .results import Provenance, RecordWriter, merge, read_done, start_run

__all__ = ["EvalSummary", "check_fits", "evaluate", "model_checksum", "summarize"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]
"""progress(videos done, videos to do in this run, clips per second so far): called once `out` is
checked and locked (with 0 done), then after each video."""


@dataclass(frozen=True)
class EvalSummary:
    """What an evaluation measured.

    Attributes:
        videos: videos in the dataset.
        evaluated: videos with a prediction; `failed`: videos that could not be read (in `errors`).
        top1, top5, mean_class_accuracy: in [0, 1] over the evaluated labelled videos (single-label).
        map: mean average precision over classes with positives (multi-label data), else None.
        views: (clips, crops) per video; `gflops_per_view`: GFLOPs of one view with the plan: for a plan
            whose cost depends on the clip (an adaptive budget, `InstalledPlan.adaptive`) the mean over
            the `gflops_views` views this run put through the model, counted as they ran; otherwise
            counted on one clip (`gflops_views` = 0).
        clips_per_s: views per second through the model (forward only) in this run, all processes
            together; None when every video was already done.
        plan: the installed plan's spec.
        errors: first failures, "id: error".
        done_before: videos of the dataset already recorded in `out` when the run started (resumed).
    """

    videos: int
    evaluated: int
    failed: int
    top1: float | None
    top5: float | None
    mean_class_accuracy: float | None
    map: float | None
    views: tuple[int, int]
    gflops_per_view: float
    clips_per_s: float | None
    plan: str | None
    errors: tuple[str, ...] = ()
    done_before: int = 0
    gflops_views: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------- metrics
def _average_precision(scores: Tensor, positive: Tensor) -> float:
    """AP of one class: mean precision at the rank of each positive (scores sorted descending)."""
    order = scores.argsort(descending=True)
    hits = positive[order].float()  # (n,)
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def summarize(
    records: Sequence[dict[str, Any]], *, num_classes: int, multilabel: bool
) -> dict[str, float | int | None]:
    """Metrics of a list of records (see module docstring); None where nothing is measurable."""
    ok = [r for r in records if r["status"] == "ok" and r["labels"]]
    metrics: dict[str, float | int | None] = {
        "evaluated": sum(r["status"] == "ok" for r in records),
        "failed": sum(r["status"] == "failed" for r in records),
        "top1": None, "top5": None, "mean_class_accuracy": None, "map": None,
    }  # fmt: skip
    if not ok:
        return metrics
    if multilabel:
        scores = torch.tensor([r["scores"] for r in ok])  # (n, K)
        positive = torch.zeros(len(ok), num_classes, dtype=torch.bool)
        for i, r in enumerate(ok):
            positive[i, r["labels"]] = True
        aps = [
            _average_precision(scores[:, k], positive[:, k])
            for k in range(num_classes)
            if positive[:, k].any()
        ]
        metrics["map"] = sum(aps) / len(aps)
        return metrics
    labels = torch.tensor([r["labels"][0] for r in ok])  # (n,)
    top5 = torch.tensor([[c for c, _ in r["top5"]] + [-1] * (5 - len(r["top5"])) for r in ok])  # (n, 5)
    hit1 = top5[:, 0] == labels
    metrics["top1"] = float(hit1.float().mean())
    metrics["top5"] = float((top5 == labels[:, None]).any(1).float().mean())
    per_class = [float(hit1[labels == c].float().mean()) for c in labels.unique().tolist()]
    metrics["mean_class_accuracy"] = sum(per_class) / len(per_class)
    return metrics


# ---------------------------------------------------------------------------------------- running
def check_fits(model: torch.nn.Module, dataset: VideoDataset | ClipDataset) -> None:
    """Refuse a dataset whose clips or classes do not fit the model, saying how to build it. Clips of
    another length or size run with the model's positions carried to their grid (docs/design.md, "Input
    sizes"; logged once) where the tubelet and patch divide them and the backbone runs at any size."""
    cfg = model.config
    if (dataset.frames, dataset.size) != (cfg.frames, cfg.size):
        own = f"{cfg.frames}x{cfg.size}"
        if not getattr(model, "any_size", True):
            raise InputError(
                f"the dataset makes {dataset.frames}x{dataset.size} clips but {type(model).__name__} runs only "
                f"at {own}; build the dataset with frames={cfg.frames}, size={cfg.size}"
            )
        try:
            cfg.grid_of(dataset.frames, dataset.size)
        except InputError as err:
            raise InputError(f"the dataset makes {dataset.frames}x{dataset.size} clips: {err}") from None
        log.info('the model\'s positions are built for %s clips; they are interpolated to the dataset\'s %dx%d '
                 '(docs/design.md, "Input sizes")', own, dataset.frames, dataset.size)  # fmt: skip
    if dataset.num_classes is not None and dataset.num_classes > cfg.num_classes:
        raise InputError(
            f"the dataset has {dataset.num_classes} classes but the model predicts {cfg.num_classes}"
        )


class _Todo(Dataset):
    """The dataset restricted to the videos this process still has to do."""

    def __init__(self, dataset: VideoDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        return self.dataset[self.indices[i]]


def model_checksum(model: torch.nn.Module) -> str:
    """The "sha256:<hex>" of a backbone's config and state dict: every tensor's name, dtype, shape and
    bytes, in state-dict order. The same on every process holding the same weights. sha256 hashes
    about 1 GB/s on one core (seconds for ViT-H's 2.5 GB): cheap next to an evaluation."""
    digest = hashlib.sha256(repr(getattr(model, "config", None)).encode())
    hash_tensors(digest, model.state_dict().items())
    return "sha256:" + digest.hexdigest()


def hash_tensors(digest: Any, named: Iterable[tuple[str, Tensor]]) -> None:
    """Feed every (name, tensor) to `digest` (a hashlib object): name, dtype, shape, then the raw bytes."""
    for name, tensor in named:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy


def _provenance(
    model: torch.nn.Module, dataset: VideoDataset, dtype: torch.dtype, name: str | None
) -> Provenance:
    dense = dataset.sampling == "dense"
    return Provenance(
        model=name, checksum=model_checksum(model), plan=getattr(model, "spec", None), views=dataset.views,
        frames=dataset.frames, size=dataset.size, resize=dataset.resize, sampling=dataset.sampling,
        stride=dataset.stride if dense else None, short=dataset.short if dense else None,
        dtype=str(dtype).removeprefix("torch."),
    )  # fmt: skip


@dataclass
class _Pending:
    """A video whose views are partly through the model."""

    sample: Sample
    total: int
    probs: Tensor | None = None  # (K,) running sum
    done: int = 0


def label_tensor(labels: Sequence[Sequence[int]], num_classes: int, *, multilabel: bool) -> Tensor:
    """Labels of a batch for reducers that read them (`Reducer.wants_labels`): (b,) the first label of
    each clip, -1 for an unlabelled one; multi-label: (b, K) multi-hot floats."""
    if multilabel:
        hot = torch.zeros(len(labels), num_classes)
        for row, classes in enumerate(labels):
            hot[row, list(classes)] = 1.0
        return hot
    return torch.tensor([classes[0] if classes else -1 for classes in labels], dtype=torch.long)


def top5_entries(probs: Tensor) -> list[list[int | float]]:
    """A record's "top5": [[class, probability rounded to 6 digits], ...] of (K,) `probs`, best first."""
    values, classes = probs.topk(min(5, probs.numel()))
    return [[int(c), round(float(v), 6)] for c, v in zip(classes, values, strict=True)]


def _record(sample: Sample, probs: Tensor | None, *, multilabel: bool) -> dict[str, Any]:
    record: dict[str, Any] = {"id": sample.record.id, "labels": list(sample.record.labels)}
    if probs is None:
        return {**record, "status": "failed", "error": sample.error}
    record.update(status="ok", top5=top5_entries(probs))
    if multilabel:
        record["scores"] = [round(float(v), 6) for v in probs]
    return record


def evaluate(
    model: torch.nn.Module,
    dataset: VideoDataset,
    *,
    views: tuple[int, int] | None = None,
    batch_size: int = 8,
    workers: int = 2,
    out: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    model_name: str | None = None,
    compile: bool = False,
) -> EvalSummary:
    """Evaluate `model` (with its installed plan) on `dataset`.

    Args:
        model: a tokensieve backbone, in eval mode for the run (its mode is restored).
        dataset: the videos and their sampling (`VideoDataset`).
        views: (temporal clips, spatial crops) per video; default the dataset's.
        batch_size: clips per forward pass (views of several videos share a batch).
        workers: decoding processes (0 decodes in this process).
        out: JSONL file of per-video records under a provenance header (`engine/results.py`);
            makes the run resumable. None keeps them in memory.
        dtype: torch.float32, or torch.bfloat16 to run under autocast.
        progress: called with (done, total, clips/s) when the run starts (0 done, after `out` is
            checked) and after each video; `total` counts this process's videos.
        model_name: the model's name or path, kept in `out`'s header for readers (the weights'
            checksum is what identifies the model).
        compile: run the model through `bench.compile_model` (torch.compile with frozen weights; one
            compilation per batch shape, the first batch's and the last's): faster on CPU, most in
            bfloat16 (docs/design.md). Fixed-budget plans only.

    Returns:
        The `EvalSummary` (the same on every process).

    Raises:
        InputError: the dataset does not fit the model; `out` is not a results file, holds results
            of another model, plan, views, clip shape, sampling or dtype (the message names which),
            or is being written by another live run.
        OSError: `out` cannot be written (a folder, a read-only location, a full disk), naming the
            file; nothing is left half-written, and records already written stay for a resume.
    """
    if batch_size < 1 or workers < 0:
        raise InputError(f"need batch_size >= 1 and workers >= 0, got {batch_size} and {workers}")
    if views is not None:
        dataset = dataset.with_views(views)
    check_fits(model, dataset)
    if compile:
        check_compilable(model)  # before any work
    device = next(model.parameters()).device
    world = setup(device)
    out = Path(out) if out is not None else None
    provenance, lock = None, None
    if out is not None:
        provenance = _provenance(model, dataset, dtype, model_name)
        if len(set(gather(world, provenance.checksum))) > 1:
            raise InputError(
                "the torchrun processes hold different weights (seed the model, or load the same "
                "checkpoint, in every process)"
            )
        lock = on_main(world, lambda: start_run(out, provenance))  # refuses before any work
    try:
        return _evaluate(model, dataset, batch_size=batch_size, workers=workers, out=out, dtype=dtype,
                         progress=progress, world=world, provenance=provenance, compile=compile)  # fmt: skip
    finally:
        if lock is not None:
            lock.release()


def _evaluate(
    model: torch.nn.Module, dataset: VideoDataset, *, batch_size: int, workers: int, out: Path | None,
    dtype: torch.dtype, progress: Progress | None, world: World, provenance: Provenance | None, compile: bool,
) -> EvalSummary:  # fmt: skip
    """`evaluate` once `out` is locked and checked: run the videos not done yet, merge, summarise."""
    cfg = model.config
    done = read_done(out, repair=False) if out is not None else {}
    todo = [i for i, r in enumerate(dataset.records) if r.id not in done]
    done_before = len(dataset) - len(todo)
    mine = todo[world.rank :: world.size]  # unpadded: no video is done twice
    barrier(world)  # every process has read the same `done` before any of them writes a record
    if done_before and world.is_main:
        log.info(
            "%s: resuming: %d of %d videos already done, %d to do", out, done_before, len(dataset), len(todo)
        )
    log.debug("rank %d: %d of %d videos to do", world.rank, len(mine), len(dataset))

    was_training = model.training
    model.eval()
    memory: list[dict[str, Any]] = []
    adaptive = is_adaptive(model)
    try:
        seconds, clips, macs = _run(model, dataset, mine, batch_size=batch_size, workers=workers, dtype=dtype,
                                    out=out, provenance=provenance, rank=world.rank, memory=memory,
                                    progress=progress, count=adaptive, compile=compile)  # fmt: skip
    finally:
        model.train(was_training)
    barrier(world)
    stats = gather(world, (clips, seconds, macs))
    clips, seconds, macs = sum(c for c, _, _ in stats), max(s for _, s, _ in stats), sum(m for *_, m in stats)
    if out is not None:
        merged = on_main(world, lambda: merge(out, [r.id for r in dataset.records], provenance))
        records = merged if merged is not None else list(read_done(out).values())
    else:
        records = memory  # one process (a memory-only run is not shared across ranks)
    ids = {r.id for r in dataset.records}
    records = [r for r in records if r["id"] in ids]  # an `out` reused with another list keeps its rows
    summary = summarize(records, num_classes=cfg.num_classes, multilabel=dataset.multilabel)
    if adaptive and clips:
        gflops, gflops_views = macs / clips / 1e9, clips
        log.info("GFLOPs per view: %.3f, the mean over the %d views run (the plan's cost depends on the clip)",
                 gflops, clips)  # fmt: skip
    else:
        gflops, gflops_views = (
            float(flops(model, frames=dataset.frames, size=dataset.size)),
            0,
        )  # of its clips
    errors = tuple(f"{r['id']}: {r['error']}" for r in records if r["status"] == "failed")[:20]
    return EvalSummary(
        videos=len(dataset), evaluated=summary["evaluated"], failed=summary["failed"], top1=summary["top1"],
        top5=summary["top5"], mean_class_accuracy=summary["mean_class_accuracy"], map=summary["map"],
        views=dataset.views, gflops_per_view=gflops, clips_per_s=clips / seconds if seconds > 0 else None,
        plan=getattr(model, "spec", None), errors=errors, done_before=done_before, gflops_views=gflops_views,
    )  # fmt: skip


def _run(
    model: torch.nn.Module, dataset: VideoDataset, indices: list[int], *, batch_size: int, workers: int,
    dtype: torch.dtype, out: Path | None, provenance: Provenance | None, rank: int, memory: list[dict[str, Any]],
    progress: Progress | None, count: bool, compile: bool,
) -> tuple[float, int, int]:  # fmt: skip
    """Run the model over `indices`; returns (seconds in the model, views through it, their
    multiply-adds when `count`, else 0)."""
    cfg, device = model.config, next(model.parameters()).device
    multilabel = dataset.multilabel
    wants_labels = any(r.wants_labels for r in model.plan)
    loader = DataLoader(
        _Todo(dataset, indices), batch_size=None, num_workers=workers,
        prefetch_factor=2 if workers else None, persistent_workers=False,
    )  # fmt: skip
    writer = RecordWriter(out, rank, provenance) if out is not None and provenance is not None else None
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    forward = compile_model(model) if compile else model
    if compile:  # compiled before the clock runs (a last, smaller batch compiles once more, timed)
        log.info("compiling the model for batches of %d clips", batch_size)
        blank = torch.zeros(batch_size, cfg.frames, cfg.channels, cfg.size, cfg.size, device=device)  # not an
        with torch.inference_mode(), autocast:  # inference tensor, as the batches are not: the same guards
            forward(blank)
    pending: list[_Pending] = []  # videos with views queued or in flight, in order
    queue: list[tuple[_Pending, Tensor]] = []  # (video, some of its views) not yet through the model
    queued = 0
    seconds, clips, finished = 0.0, 0, 0
    counted = FlopCount(clips=0)

    def emit(record: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        if writer is not None:
            writer.write(record)
        else:
            memory.append(record)
        if progress is not None:
            progress(finished, len(indices), clips / seconds if seconds else 0.0)

    def run_batch(limit: int) -> None:
        nonlocal queued, seconds, clips
        rows, owners = [], []
        while queue and len(rows) < limit:
            owner, views = queue[0]
            take = min(limit - len(rows), len(views))
            rows.extend(views[:take])
            owners.extend([owner] * take)
            if take == len(views):
                queue.pop(0)
            else:
                queue[0] = (owner, views[take:])
        queued -= len(rows)
        x = normalize(torch.stack(rows).to(device).float().div_(255), cfg.mean, cfg.std)  # (b, T, C, S, S)
        start = time.perf_counter()
        # Counting runs under no_grad: inference mode hands the counter composite ops (linear) undecomposed.
        counting = count_flops(model) if count else contextlib.nullcontext()
        with torch.no_grad() if count else torch.inference_mode(), autocast, counting as one:
            if wants_labels:  # an oracle: the labels reach the plan (`aux[INPUTS]`)
                given = Inputs(x, label_tensor([o.sample.record.labels for o in owners], cfg.num_classes,
                                               multilabel=multilabel).to(device))  # fmt: skip
                logits = model.forward_head(model.forward_features(x, inputs=given)).float()  # (b, K)
            else:
                logits = forward(x).float()  # (b, K)
        if count:
            counted.add(one)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        clips += len(rows)
        probs = (logits.sigmoid() if multilabel else logits.softmax(-1)).cpu()  # (b, K)
        for owner, p in zip(owners, probs, strict=True):
            owner.probs = p.clone() if owner.probs is None else owner.probs + p
            owner.done += 1

    try:
        if progress is not None:
            progress(0, len(indices), 0.0)
        for sample in loader:
            item = _Pending(sample, total=0 if sample.views is None else len(sample.views))
            pending.append(item)
            if sample.views is not None:
                queue.append((item, sample.views))
                queued += len(sample.views)
            while queued >= batch_size:
                run_batch(batch_size)
            while pending and pending[0].done == pending[0].total:  # finished videos, in order
                p = pending.pop(0)
                emit(_record(p.sample, None if p.probs is None else p.probs / p.total, multilabel=multilabel))
        while queue:
            run_batch(batch_size)
        for p in pending:
            emit(_record(p.sample, None if p.probs is None else p.probs / p.total, multilabel=multilabel))
    finally:
        if writer is not None:
            writer.close()
    return seconds, clips, counted.macs
