"""Checkpoint plumbing for training: every RNG state a run depends on, and atomic writes.

A resumed run equals an uninterrupted one only if everything random restarts where it stopped:
the global torch RNG (dropout, drop-path), Python's and numpy's, CUDA's when used, and every
`torch.Generator` a reducer holds as its own RNG (`random`, `random_frames`, STA's first-frame
drops). `rng_state` collects them in types `torch.load(weights_only=True)` accepts; `set_rng_state`
puts them back. `save_atomic` writes through a temporary file and `os.replace`, so a kill never
leaves a torn checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "CHECKPOINT",
    "generators",
    "load_checkpoint",
    "rng_state",
    "save_atomic",
    "seed_everything",
    "set_rng_state",
]

CHECKPOINT = "last.pt"
"""The file name of a run's latest checkpoint inside its `out` folder."""


def generators(model: nn.Module) -> dict[str, torch.Generator]:
    """Every `torch.Generator` held as an attribute by a module of the model (reducers' own RNG)."""
    return {
        f"{name}.{attr}" if name else attr: value
        for name, module in model.named_modules()
        for attr, value in vars(module).items()
        if isinstance(value, torch.Generator)
    }


def rng_state(model: nn.Module, cuda: bool) -> dict[str, Any]:
    """This process's RNG states, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "generators": {name: g.get_state() for name, g in generators(model).items()},
    }
    if cuda:
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(model: nn.Module, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    held = generators(model)
    for name, value in state["generators"].items():
        if name not in held:
            raise ValueError(
                f"the checkpoint holds the RNG of {name!r}, which this model's plan does not have"
            )
        held[name].set_state(value)
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


def load_checkpoint(out: Path | None) -> dict[str, Any]:
    if out is None:
        raise ValueError("resume=True needs out= (the folder holding the checkpoint)")
    path = out / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"cannot resume: no checkpoint {path} (train without resume to start a run)")
    return torch.load(path, map_location="cpu", weights_only=True)
