"""Training: AdamW (or Adam) with warm-up and cosine decay, reducer hooks, exact resume, torchrun.

    ts.apply(model, "stts:T0=0.6,S4=0.9")
    data = ClipDataset(records, frames=16, size=224, num_classes=400)
    result = ts.train(model, data, val=val_dataset, out="runs/stts", epochs=30, lr=1e-3, reducer_lr=1e-4)

One step, for every method alike (no method is special-cased here):

    for reducer in model.plan: reducer.on_train_step(step, total_steps)
    video   = normalize(clips)
    teacher = {r.name: r.teach(frozen_teacher, Inputs(video, labels)) for r in model.plan if r.wants_teacher}
    state   = model.forward_features(video, inputs=Inputs(video, labels, teacher))
    logits  = model.forward_head(state)
    loss    = cross_entropy(logits, labels) + sum(state.aux[LOSSES].values())

That is the training hook: a reducer reads the clip and the labels (`state.aux[INPUTS]`), asks for a
teacher pass (`wants_teacher`, `teach`), and adds its losses (`state.add_loss`). The teacher is
`train(teacher=...)` or, by default, a frozen copy of the model as given (its weights before this
run's training or resume), without its plan.

`model.train()` / `model.eval()` switch what reducers do (perturbed top-K in training, say); the loop
does nothing else for them. Extra losses are logged by name.

Optimiser (AdamW, weight decay only on >= 2-D weights, separate reducer and backbone rates) and
warm-up + cosine schedule: `engine.optim`.

Determinism and resume. Everything random is a function of what a checkpoint holds:
- data: epoch e visits `torch.randperm(n, Generator().manual_seed(config.seed + e))`
  (`epoch_batches`); every clip's augmentation is a pure function of (dataset.seed, e, index)
  (`ClipDataset`), so DataLoader workers do not matter and resuming mid-epoch just skips the
  batches done;
- the model's own randomness (dropout, drop-path): the global torch RNG, seeded with seed + rank
  when the run starts (as are Python's and numpy's: a side effect on the calling process) and
  saved per process in every checkpoint;
- the plan's randomness (random selections, STTS's perturbation noise): keyed by clip and step
  (`tokensieve.rng`), so it depends on neither the batch split nor what ran before, and needs no
  saved state;
- nothing else touches the global RNG: the DataLoader gets its own generator and the per-epoch
  evaluation runs under `torch.random.fork_rng`.
A run interrupted after a checkpoint and resumed with `resume=True` therefore reaches the same
weights as an uninterrupted run, bit for bit on CPU.

Checkpoints (`<out>/last.pt`, and `<out>/step-<s>.pt` with `keep_checkpoints`) are written every
`checkpoint_every` steps, after every epoch (after its evaluation) and at the end, through a
temporary file and `os.replace`, so a kill never leaves a torn `last.pt`. Contents: `model` (state
dict), `spec` (the plan), `backbone` (its config), `optimizer`, `scheduler`, `step`, `epoch`,
`rng` (one entry per process), `config` (this run's `TrainConfig`), `history` (finished epochs),
`epoch_sums` (the running loss sums of the current epoch), `world_size`. They load with
`torch.load(path, weights_only=True)`.

Scale-out with `torchrun` (DDP, gloo on CPU): the global batch is world x `batch_size`. Each epoch's
permutation (the same on every process) is cut into global batches, the last incomplete one dropped,
and process r takes rows r, r + world, ... of each. DDP averages gradients, so a step equals one
process with the whole global batch; the logged loss is the global-batch mean (all-reduced). DDP runs
without `find_unused_parameters` (no extra graph walk per step): every trainable parameter must get a
gradient in every step, or DDP stops with its own error naming the parameter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data.clips import ClipBatch, ClipDataset, collate_clips
from ..data.datasets import VideoDataset
from ..data.transforms import normalize
from ..errors import InputError
from ..reducers.plan import apply
from ..tokens import INPUTS, LOSSES, STATS, Inputs
from .checkpoint import (
    CHECKPOINT,
    check_resumable,
    load_checkpoint,
    rng_state,
    save_atomic,
    seed_everything,
    set_rng_state,
)
from .distributed import World, barrier, epoch_batches, gather, on_main, setup
from .evaluate import EvalSummary, check_fits, evaluate
from .optim import lr_factor, param_groups
from .results import discard

__all__ = [
    "CHECKPOINT",
    "EpochResult",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "epoch_batches",
    "lr_factor",
    "param_groups",
    "recipe_config",
    "train",
]

log = logging.getLogger(__name__)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a training run (saved in every checkpoint).

    Attributes:
        epochs: passes over the training data.
        batch_size: clips per process per step (global batch = processes x batch_size).
        lr: peak learning rate of the backbone parameters.
        reducer_lr: peak learning rate of the plan's parameters; None = `lr`.
        optimizer: "adamw" (decoupled weight decay) or "adam" (L2 weight decay in the gradient, HaltingVT's).
        weight_decay: weight decay (not on 1-D parameters, tokens, embeddings).
        betas: Adam(W) betas.
        warmup_epochs: linear warm-up length in epochs (fractions allowed; rounded to steps).
        warmup_start: the warm-up starts from this fraction of the peak rate (`optim.lr_factor`).
        min_lr_ratio: the cosine ends at this fraction of each group's peak rate.
        clip_grad: maximum global gradient norm; None = no clipping.
        label_smoothing: cross-entropy label smoothing (multi-label: targets smoothed towards
            `label_smoothing / num_classes`, as timm's binary cross-entropy).
        freeze_backbone: train only the plan's parameters (always so for a method that trains alone,
            `Reducer.freezes_backbone`: LITE).
        dtype: "float32", or "bfloat16" to run forward passes under autocast.
        seed: data order and the dropout/drop-path RNG (augmentation draws from `ClipDataset.seed`).
        workers: decoding processes of the DataLoader (0 decodes in the training process).
        checkpoint_every: also checkpoint every this many steps; None = after each epoch and at the end.
        keep_checkpoints: keep every checkpoint as `step-<s>.pt` besides `last.pt`.
        eval_views: (clips, crops) per video for the end-of-epoch evaluation.
        eval_batch_size: clips per forward pass in evaluation; None = `batch_size`.
        log_every: log (and write TensorBoard scalars) every this many steps.
        tensorboard: write TensorBoard logs to `<out>/tensorboard` when `torch.utils.tensorboard`
            imports (rank 0 only).
    """

    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    reducer_lr: float | None = None
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 0.0
    warmup_start: float = 0.0
    min_lr_ratio: float = 0.0
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    freeze_backbone: bool = False
    dtype: str = "float32"
    seed: int = 0
    workers: int = 2
    checkpoint_every: int | None = None
    keep_checkpoints: bool = False
    eval_views: tuple[int, int] = (1, 1)
    eval_batch_size: int | None = None
    log_every: int = 10
    tensorboard: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise InputError(f"{name} must be {what}, got {getattr(self, name)!r}")

        need(self.epochs >= 1, "epochs", ">= 1")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.lr >= 0, "lr", ">= 0")
        need(self.reducer_lr is None or self.reducer_lr >= 0, "reducer_lr", ">= 0 (or None: lr)")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2, "betas", "two values in [0, 1)")
        need(self.optimizer in _OPTIMIZERS, "optimizer", f"one of {', '.join(_OPTIMIZERS)}")
        need(self.warmup_epochs >= 0, "warmup_epochs", ">= 0")
        need(0 <= self.warmup_start <= 1, "warmup_start", "in [0, 1]")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        need(self.clip_grad is None or self.clip_grad > 0, "clip_grad", "> 0 (or None: no clipping)")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)")
        need(self.dtype in _DTYPES, "dtype", f"one of {', '.join(_DTYPES)}")
        need(self.seed >= 0, "seed", ">= 0")
        need(self.workers >= 0, "workers", ">= 0")
        need(
            self.checkpoint_every is None or self.checkpoint_every >= 1, "checkpoint_every", ">= 1 (or None)"
        )
        need(
            self.eval_views[0] >= 1 and self.eval_views[1] in (1, 3),
            "eval_views",
            "(clips >= 1, crops 1 or 3)",
        )
        need(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size", ">= 1 (or None)")
        need(self.log_every >= 1, "log_every", ">= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StepInfo:
    """What one finished step reports to the `progress` callback.

    Attributes:
        step: steps done (1-based: the first finished step reports 1); `total_steps` of the run.
        epoch: the epoch of this step (0-based).
        loss: total loss of the step, mean over the global batch (all processes).
        losses: the parts of `loss` by name: "task" and every extra loss the plan added.
        lr: learning rate of each parameter group used in this step, by group name.
        clips_per_s: training clips per second in this run so far, all processes.
        stats: the plan's statistics by name (`TokenState.add_stat`: HaltingVT's share of tokens still
            running after each block, its mean halting score), mean over the global batch; not losses.
    """

    step: int
    total_steps: int
    epoch: int
    loss: float
    losses: dict[str, float]
    lr: dict[str, float]
    clips_per_s: float
    stats: dict[str, float] = field(default_factory=dict)


Progress = Callable[[StepInfo], None]


@dataclass(frozen=True)
class EpochResult:
    """One finished epoch: mean losses over its steps (global-batch means), the learning rate of
    its last step, and the evaluation at its end (None without validation data)."""

    epoch: int
    steps: int
    loss: float
    losses: dict[str, float]
    lr: dict[str, float]
    eval: EvalSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["eval"] = None if self.eval is None else self.eval.to_dict()
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> EpochResult:
        summary = doc["eval"]
        summary = None if summary is None else EvalSummary(**summary)
        return cls(**{**doc, "eval": summary})


@dataclass(frozen=True)
class TrainResult:
    """A finished run: `steps` of `total_steps` done (equal unless interrupted), one `EpochResult` per
    epoch (including those of runs this one resumed), the last checkpoint, and the first step of this
    process's run (`resumed_from`, 0 for a fresh run)."""

    steps: int
    total_steps: int
    epochs: tuple[EpochResult, ...]
    checkpoint: Path | None
    resumed_from: int
    config: TrainConfig
    seconds: float
    clips_per_s: float | None
    failed: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "total_steps": self.total_steps, "epochs": [e.to_dict() for e in self.epochs],
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "resumed_from": self.resumed_from, "config": self.config.to_dict(), "seconds": self.seconds,
            "clips_per_s": self.clips_per_s, "failed": list(self.failed),
        }  # fmt: skip


# ---------------------------------------------------------------------------------------- the loop
class _Forward(nn.Module):
    """The training forward as one module (what DDP wraps): logits and the plan's extra losses."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, video: Tensor, inputs: Inputs
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Logits, the labels of their rows (a reducer may add clips to the batch: HaltingVT's fake clips),
        the plan's extra losses and its statistics."""
        state = self.model.forward_features(video, inputs=inputs)
        labels = state.aux[INPUTS].labels
        return (
            self.model.forward_head(state),
            labels,
            dict(state.aux.get(LOSSES, {})),
            dict(state.aux.get(STATS, {})),
        )


def recipe_config(model: nn.Module) -> TrainConfig:
    """The default `TrainConfig` for `model`'s plan: the defaults, with the training recipe its methods'
    papers used (`Reducer.recipe`: HaltingVT's Adam at 1e-5, warm-up from 0.1, gradient clipping at 40)."""
    recipe: dict[str, Any] = {}
    for reducer in getattr(model, "plan", ()):
        for key, value in reducer.recipe.items():
            if recipe.get(key, value) != value:
                raise InputError(f"the plan's methods train with different {key}: give it explicitly")
            recipe[key] = value
    if recipe:
        log.info("training with the plan's recipe: %s", ", ".join(f"{k}={v}" for k, v in recipe.items()))
    return TrainConfig(**recipe)


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` without its plan, in eval mode: the default teacher."""
    teacher = copy.deepcopy(model)
    apply(teacher, None)
    return teacher.eval().requires_grad_(False)


def _task_loss(logits: Tensor, labels: Tensor, smoothing: float) -> Tensor:
    if labels.is_floating_point():  # multi-hot: binary cross-entropy per class
        K = logits.shape[-1]
        off = smoothing / K
        target = labels * (1 - smoothing) + off  # 1 -> 1 - smoothing + off, 0 -> off
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


def _tensorboard(out: Path | None, config: TrainConfig, world: World) -> Any:
    if out is None or not config.tensorboard or not world.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.debug("torch.utils.tensorboard does not import (tensorboard not installed): no TensorBoard logs")
        return None
    return SummaryWriter(str(out / "tensorboard"))


@contextlib.contextmanager
def _training_mode(model: nn.Module, frozen: list[nn.Parameter]) -> Iterator[None]:
    """model.train() and the frozen parameters for the run; both restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        for p, flag in zip(frozen, flags, strict=True):
            p.requires_grad_(flag)


def train(
    model: nn.Module,
    dataset: ClipDataset,
    config: TrainConfig | None = None,
    *,
    val: VideoDataset | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    teacher: nn.Module | None = None,
    **changes: Any,
) -> TrainResult:
    """Train `model` (with its installed plan) on `dataset`.

    Args:
        model: a tokensieve backbone; `ts.apply` its plan first. Trained in place.
        dataset: training clips (`ClipDataset`) of the model's input size.
        config: hyperparameters; `changes` override its fields (`ts.train(m, d, epochs=3, lr=1e-4)`).
        val: evaluated with `ts.evaluate` (views `config.eval_views`) after every epoch.
        out: folder for checkpoints, evaluation records and TensorBoard logs; None keeps nothing.
        resume: continue the run whose checkpoint is `<out>/last.pt`.
        progress: called after every step with a `StepInfo`, on every process (raising in it stops
            the run; checkpoints already written stay valid).
        teacher: the frozen model whose pass reducers with `wants_teacher` receive (`Reducer.teach`);
            default a frozen copy of `model` as given, without its plan (made only if one asks).
        **changes: `TrainConfig` fields; an unknown name raises TypeError.

    Returns:
        The `TrainResult` (the same on every process).

    Raises:
        InputError: bad settings (naming the parameter), nothing trainable, a dataset of another clip
            size or with fewer videos than one global batch, `out` already holding a run (without
            `resume`), `resume` without a checkpoint or with a damaged one or one of another backbone,
            plan or global batch; distributed evaluation without out; more than `dataset.max_failed`
            of the videos unreadable.
    """
    config = dataclasses.replace(config or recipe_config(model), **changes)
    check_fits(model, dataset)
    cfg = model.config
    too_big = [r.id for r in dataset.records if max(r.labels) >= cfg.num_classes]
    if too_big:
        raise InputError(f"video {too_big[0]!r} has a label >= the model's {cfg.num_classes} classes")
    device = next(model.parameters()).device
    world = setup(device)
    steps_per_epoch = len(dataset) // (config.batch_size * world.size)
    if steps_per_epoch == 0:
        raise InputError(
            f"the dataset has {len(dataset)} videos, fewer than one global batch "
            f"({world.size} processes x batch_size {config.batch_size})"
        )
    out = Path(out) if out is not None else None
    if val is not None and out is None and world.size > 1:
        raise InputError(
            "distributed training with validation data needs out= (evaluation shares records there)"
        )
    ckpt = load_checkpoint(out) if resume else None
    if ckpt is None and out is not None and (out / CHECKPOINT).exists():
        raise InputError(
            f"{out} already holds a training run ({CHECKPOINT}); resume it (resume=True, --resume) "
            "or choose another out"
        )
    unused = len(dataset) - steps_per_epoch * config.batch_size * world.size
    if unused and world.is_main:  # once per run, not once per process or epoch
        log.warning(
            "%d of the %d training clips are not used in each epoch: a step takes one global batch of "
            "%d clips (%d processes x batch_size %d) and the last, partial one is dropped; which clips "
            "are left out changes every epoch",
            unused, len(dataset), config.batch_size * world.size, world.size, config.batch_size,
        )  # fmt: skip

    if teacher is None and any(r.wants_teacher for r in model.plan):
        teacher = _frozen_copy(model)  # before a resume loads the checkpoint: the weights the run began with
    elif teacher is not None:
        teacher.eval().requires_grad_(False)

    plan_ids = {id(p) for p in model.plan.parameters()}
    alone = [r.name for r in model.plan if r.freezes_backbone]
    if alone and not config.freeze_backbone:
        log.info("the backbone is frozen: %s trains alone", ", ".join(alone))
    freeze = config.freeze_backbone or bool(alone)
    frozen = [p for p in model.parameters() if id(p) not in plan_ids] if freeze else []
    with _training_mode(model, frozen):
        groups = param_groups(model, config)  # raises when nothing is trainable
        optimizer = _OPTIMIZERS[config.optimizer](
            groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        total = config.epochs * steps_per_epoch
        warmup = round(config.warmup_epochs * steps_per_epoch)
        schedule = functools.partial(
            lr_factor, total=total, warmup=warmup, min_ratio=config.min_lr_ratio, start=config.warmup_start
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        seed_everything(config.seed + world.rank)
        history: list[EpochResult] = []
        step, sums = 0, {}
        if ckpt is not None:
            check_resumable(ckpt, model, config, world)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            rngs = ckpt["rng"]
            set_rng_state(rngs[world.rank % len(rngs)])
            step, sums = ckpt["step"], dict(ckpt["epoch_sums"])
            history = [EpochResult.from_dict(e) for e in ckpt["history"]]
            log.info("resuming %s at step %d of %d (epoch %d)", out / CHECKPOINT, step, total, ckpt["epoch"])
        elif out is not None and world.is_main:
            out.mkdir(parents=True, exist_ok=True)
        barrier(world)
        run = _Run(model=model, dataset=dataset, config=config, world=world, device=device, out=out,
                   optimizer=optimizer, scheduler=scheduler, total=total, steps_per_epoch=steps_per_epoch,
                   history=history, step=step, sums=sums, progress=progress, teacher=teacher)  # fmt: skip
        start = step
        try:
            run.loop(val)
        finally:
            run.close()
    barrier(world)
    return TrainResult(
        steps=run.step, total_steps=total, epochs=tuple(run.history), checkpoint=run.last_checkpoint,
        resumed_from=start, config=config, seconds=run.seconds,
        clips_per_s=run.clips / run.seconds if run.seconds > 0 else None, failed=tuple(sorted(run.failed)),
    )  # fmt: skip


@dataclass(eq=False)
class _Run:
    """One training run between steps: what a checkpoint saves, plus meters."""

    model: nn.Module
    dataset: ClipDataset
    config: TrainConfig
    world: World
    device: torch.device
    out: Path | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total: int
    steps_per_epoch: int
    history: list[EpochResult]
    step: int
    sums: dict[str, float]
    progress: Progress | None
    teacher: nn.Module | None = None  # the frozen model reducers' `teach` runs on

    def __post_init__(self) -> None:
        config, world, device = self.config, self.world, self.device
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        forward = _Forward(self.model)
        self.net: nn.Module = forward
        if world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            # Buffers (VideoMAE's sin-cos table) are equal everywhere: no broadcast every forward.
            # Newer torch names the option `forward_sync_buffers` (and deprecates `broadcast_buffers`).
            known = inspect.signature(DistributedDataParallel).parameters
            sync = "forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"
            self.net = DistributedDataParallel(forward, device_ids=ids, **{sync: False})
        self.autocast = torch.autocast(
            device.type, dtype=_DTYPES[config.dtype], enabled=config.dtype != "float32"
        )
        self.writer = _tensorboard(self.out, config, world)
        self.failed: set[str] = set()
        self.seconds, self.clips = 0.0, 0
        self.last_checkpoint: Path | None = (
            self.out / CHECKPOINT if self.out is not None and self.step > 0 else None
        )

    # ------------------------------------------------------------------ one step
    def _step(self, batch: ClipBatch) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        cfg = self.model.config
        for reducer in self.model.plan:
            reducer.on_train_step(self.step, self.total)
        clips = batch.videos.to(self.device, non_blocking=True)  # (B, T, C, S, S) in [0, 1]
        video = normalize(clips, cfg.mean, cfg.std)
        labels = batch.labels.to(self.device, non_blocking=True)
        given = Inputs(video, labels)
        taught = {r.name: r.teach(self.teacher, given) for r in self.model.plan if r.wants_teacher}
        with self.autocast:
            logits, labels, extra, stats = self.net(video, given._replace(teacher=taught))
        task = _task_loss(logits.float(), labels, self.config.label_smoothing)
        loss = task + sum((v.float() for v in extra.values()), torch.zeros((), device=self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        return loss, {"task": task, **extra}, stats

    def _global_mean(self, loss: Tensor, parts: dict[str, Tensor]) -> tuple[float, dict[str, float]]:
        """The step's losses averaged over the global batch (every process's local mean, averaged)."""
        values = torch.stack(
            [loss.detach().float(), *(v.detach().float() for v in parts.values())]
        )  # (1 + P,)
        if self.world.size > 1:
            dist.all_reduce(values)  # gloo has no AVG: sum, then divide
            values = values / self.world.size
        values = values.tolist()
        return values[0], dict(zip(parts, values[1:], strict=True))

    # ------------------------------------------------------------------ the epochs
    def loop(self, val: VideoDataset | None) -> None:
        cfg, world = self.config, self.world
        first_epoch = self.step // self.steps_per_epoch
        for epoch in range(first_epoch, cfg.epochs):
            done = self.step - epoch * self.steps_per_epoch
            if done == 0:
                self.sums = {}
            batches = epoch_batches(len(self.dataset), batch_size=cfg.batch_size, world=world, seed=cfg.seed,
                                    epoch=epoch)  # fmt: skip
            self.dataset.set_epoch(epoch)
            loader = DataLoader(
                self.dataset, batch_sampler=batches[done:].tolist(), num_workers=cfg.workers,
                collate_fn=collate_clips, generator=torch.Generator(),  # never draws from the global RNG
                prefetch_factor=2 if cfg.workers else None, pin_memory=self.device.type == "cuda",
            )  # fmt: skip
            tick = time.perf_counter()
            for batch in loader:
                self._count_failures(batch.failed)
                loss, parts, stats = self._step(batch)
                self.step += 1
                self.seconds += time.perf_counter() - tick
                self.clips += len(batch.videos) * world.size
                mean, means = self._global_mean(loss, {**parts, **stats})
                stats = {k: means.pop(k) for k in stats}
                self.sums = {k: self.sums.get(k, 0.0) + v for k, v in {"loss": mean, **means}.items()}
                info = StepInfo(step=self.step, total_steps=self.total, epoch=epoch, loss=mean, losses=means,
                                lr=self._lrs_used(), clips_per_s=self.clips / self.seconds, stats=stats)  # fmt: skip
                self._log(info)
                end_of_epoch = self.step == (epoch + 1) * self.steps_per_epoch
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not end_of_epoch:
                    self._checkpoint(epoch)
                if self.progress is not None:
                    self.progress(info)
                tick = time.perf_counter()
            self._finish_epoch(epoch, val)

    def _lrs_used(self) -> dict[str, float]:
        """The rate each group used in the step just done (the scheduler has already moved on)."""
        factor = self.scheduler.lr_lambdas[0](self.step - 1)
        return {g["name"]: g["initial_lr"] * factor for g in self.optimizer.param_groups}

    def _count_failures(self, failed: tuple[str, ...]) -> None:
        if not failed:
            return
        self.failed.update(f.split(": ", 1)[0] for f in failed)
        limit = self.dataset.max_failed * len(self.dataset)
        if len(self.failed) > limit:
            raise InputError(
                f"{len(self.failed)} of {len(self.dataset)} training videos could not be loaded, more than "
                f"{self.dataset.max_failed:.0%}; last: {failed[-1]}"
            )

    def _log(self, info: StepInfo) -> None:
        if info.step % self.config.log_every and info.step != info.total_steps:
            return
        if self.world.is_main:
            parts = " ".join(f"{k}={v:.4f}" for k, v in info.losses.items())
            log.info("step %d/%d epoch %d loss=%.4f (%s) lr=%s %.1f clips/s", info.step, info.total_steps,
                     info.epoch, info.loss, parts, ",".join(f"{v:.3g}" for v in info.lr.values()),
                     info.clips_per_s)  # fmt: skip
            if info.stats:
                log.info(
                    "step %d stats: %s", info.step, " ".join(f"{k}={v:.4f}" for k, v in info.stats.items())
                )
        if self.writer is not None:
            self.writer.add_scalar("train/loss", info.loss, info.step)
            for k, v in info.losses.items():
                self.writer.add_scalar(f"train/{k}", v, info.step)
            for k, v in info.lr.items():
                self.writer.add_scalar(f"lr/{k}", v, info.step)
            for k, v in info.stats.items():
                self.writer.add_scalar(f"stats/{k}", v, info.step)
            self.writer.add_scalar("train/clips_per_s", info.clips_per_s, info.step)

    def _finish_epoch(self, epoch: int, val: VideoDataset | None) -> None:
        count = self.steps_per_epoch
        means = {k: v / count for k, v in self.sums.items()}
        summary = None
        if val is not None:
            records = None if self.out is None else self.out / "eval" / f"epoch-{epoch}.jsonl"
            if records is not None:  # this epoch's weights are evaluated from the start (`discard`)
                on_main(self.world, lambda: discard(records))
            # Evaluation must not move the training RNG (its DataLoader and FLOP count draw from it).
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                summary = evaluate(
                    self.model, val, views=self.config.eval_views,
                    batch_size=self.config.eval_batch_size or self.config.batch_size,
                    workers=self.config.workers, out=records, dtype=_DTYPES[self.config.dtype],
                )  # fmt: skip
            if self.world.is_main:
                log.info("epoch %d: top1=%s top5=%s map=%s", epoch, summary.top1, summary.top5, summary.map)
            if self.writer is not None:
                for key in ("top1", "top5", "mean_class_accuracy", "map"):
                    if getattr(summary, key) is not None:
                        self.writer.add_scalar(f"val/{key}", getattr(summary, key), epoch)
        loss = means.pop("loss", float("nan"))
        self.history.append(
            EpochResult(epoch=epoch, steps=count, loss=loss, losses=means, lr=self._lrs_used(), eval=summary)
        )
        self.sums = {}
        self._checkpoint(epoch + 1)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, epoch: int) -> None:
        """Save the run after `self.step` steps; `epoch` is the epoch the next step belongs to."""
        if self.out is None:
            return
        rngs = gather(self.world, rng_state(self.device.type == "cuda"))  # one per process
        if self.world.is_main:
            payload = {
                "format": 1, "model": self.model.state_dict(), "spec": getattr(self.model, "spec", None),
                "backbone": asdict(self.model.config), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": epoch, "rng": rngs,
                "config": self.config.to_dict(), "history": [e.to_dict() for e in self.history],
                "epoch_sums": dict(self.sums), "world_size": self.world.size,
            }  # fmt: skip
            path = self.out / CHECKPOINT
            save_atomic(payload, path)
            if self.config.keep_checkpoints:
                save_atomic(payload, self.out / f"step-{self.step:08d}.pt")
            log.info("checkpoint: %s (step %d)", path, self.step)
        self.last_checkpoint = self.out / CHECKPOINT

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
