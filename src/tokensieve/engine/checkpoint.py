"""Checkpoint plumbing for training: every RNG state a run depends on, and atomic writes.

A resumed run equals an uninterrupted one only if everything random restarts where it stopped:
the global torch RNG (dropout, drop-path), Python's and numpy's, and CUDA's when used. (Reducers
hold no RNG: their draws are keyed by clip and training step, `tokensieve.rng`.) `rng_state`
collects them in types `torch.load(weights_only=True)` accepts; `set_rng_state` puts them back.
`save_atomic` writes through a temporary file and `os.replace`, so a kill never leaves a torn
checkpoint. `load_checkpoint` turns a truncated, corrupt or foreign `last.pt` into one
`InputError` naming the file; `check_resumable` refuses to resume a checkpoint into another backbone,
plan or global batch.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..backbones.checkpoint import fit_problems
from ..backbones.saved import RUN_CHECKPOINT, read_checkpoint
from ..errors import InputError

if TYPE_CHECKING:
    from .distributed import World
    from .train import TrainConfig

__all__ = [
    "CHECKPOINT",
    "check_resumable",
    "load_checkpoint",
    "rng_state",
    "save_atomic",
    "seed_everything",
    "set_rng_state",
]

log = logging.getLogger(__name__)

CHECKPOINT = RUN_CHECKPOINT
"""The file name of a run's latest checkpoint inside its `out` folder."""


def rng_state(cuda: bool) -> dict[str, Any]:
    """This process's RNG states, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if cuda:
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write atomically: a temporary file, flushed to disk, renamed over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# What resuming reads besides the model (`read_checkpoint` checks `model`, `spec`, `backbone`).
_TRAINING_STATE = {
    "optimizer": dict, "scheduler": dict, "step": int, "epoch": int, "rng": list, "config": dict,
    "history": list, "epoch_sums": dict, "world_size": int,
}  # fmt: skip


def load_checkpoint(out: Path | None) -> dict[str, Any]:
    """The checkpoint of the run in `out`, checked to hold everything resuming needs.

    Raises:
        InputError: no `out`, no checkpoint, or one that is truncated, corrupt, foreign or lacks
            training state (one line naming the file).
    """
    if out is None:
        raise InputError("resume=True needs out= (the folder holding the checkpoint)")
    path = out / CHECKPOINT
    if not path.exists():
        raise InputError(f"cannot resume: no checkpoint {path} (train without resume to start a run)")
    ckpt = read_checkpoint(path)
    bad = sorted(k for k, kind in _TRAINING_STATE.items() if not isinstance(ckpt.get(k), kind))
    if not bad and (not ckpt["rng"] or not isinstance(ckpt["config"].get("batch_size"), int)):
        bad = ["rng" if not ckpt["rng"] else "config"]
    if bad:
        raise InputError(
            f"cannot resume from {path}: its training state is missing or damaged ({', '.join(bad)})"
        )
    return ckpt


# Settings that do not change the trajectory: resuming with other values is fine.
_HARMLESS = {"workers", "checkpoint_every", "keep_checkpoints", "log_every", "tensorboard", "eval_batch_size"}
# Backbone fields that change training but not the weights: resuming with other values warns.
_REGULARISERS = ("drop", "attn_drop", "drop_path")


def check_resumable(ckpt: dict[str, Any], model: nn.Module, config: TrainConfig, world: World) -> None:
    """Refuse a checkpoint of another backbone, plan or global batch; warn about other changed settings."""
    saved_backbone, backbone = ckpt["backbone"], asdict(model.config)
    differ = [
        f"{k}: {saved_backbone.get(k)!r} -> {v!r}"
        for k, v in backbone.items()
        if k not in _REGULARISERS and _plain(saved_backbone.get(k)) != _plain(v)
    ]
    if differ:
        raise InputError(
            f"cannot resume: the checkpoint was trained with another backbone ({'; '.join(differ)}); "
            "resume with the same model or start a new run"
        )
    spec, saved = getattr(model, "spec", None) or "none", ckpt["spec"] or "none"
    if spec != saved:
        raise InputError(
            f"cannot resume: the checkpoint was trained with plan {saved!r} but the model has plan {spec!r}; "
            f"install the same plan (ts.apply(model, {saved!r})) or start a new run"
        )
    _check_weights_fit(ckpt["model"], model)
    old = ckpt["config"]
    old_global = old["batch_size"] * ckpt["world_size"]
    if old_global != config.batch_size * world.size:
        raise InputError(
            f"cannot resume: the checkpoint's global batch is {old_global} ({ckpt['world_size']} "
            f"processes x {old['batch_size']}), this run's is {config.batch_size * world.size}; "
            "the data order would differ"
        )
    changed = [
        f"{k}: {old[k]!r} -> {v!r}"
        for k, v in config.to_dict().items()
        if k not in _HARMLESS and k in old and _plain(old[k]) != _plain(v)
    ]
    changed += [
        f"{k}: {saved_backbone.get(k)!r} -> {backbone[k]!r}"
        for k in _REGULARISERS
        if saved_backbone.get(k) != backbone[k]
    ]
    if changed:
        log.warning("resuming with changed settings (the run will not match an uninterrupted one): %s",
                    "; ".join(changed))  # fmt: skip
    if ckpt["world_size"] != world.size:
        log.warning("resuming on %d processes a run checkpointed on %d: dropout RNG streams differ",
                    world.size, ckpt["world_size"])  # fmt: skip


def _check_weights_fit(weights: dict[str, Any], model: nn.Module) -> None:
    """One line naming what does not fit (the model was changed after `ts.build`, say)."""
    own = model.state_dict()
    missing, unexpected, mismatched = fit_problems(own, weights)
    problems = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    problems += [f"{k}: {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise InputError(
            f"cannot resume: the checkpoint's weights do not fit the model ({'; '.join(problems[:5])}{more})"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
