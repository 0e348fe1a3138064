"""The optimiser of a training run: AdamW parameter groups and the learning-rate schedule.

Optimiser: AdamW over up to four parameter groups, (backbone, reducers) x (decay, no decay). Reducer
parameters are `model.plan.parameters()` with `reducer_lr`, everything else is the backbone with `lr`.
No weight decay on 1-D parameters (biases, norm weights, VideoMAE's q/v biases) nor on class tokens
and learned position/time embeddings (timm's `no_weight_decay` convention). `freeze_backbone` sets
`requires_grad=False` on everything outside the plan (classifier included) for the run and leaves it
out of the optimiser.

Learning rate, per step s of S, with W warm-up steps and r = `min_lr_ratio` (`lr_factor`):

    factor(s) = a + (1 - a) * (s + 1) / W                      for s < W
              = r + (1 - r) * (1 + cos(pi * (s - W) / (S - W))) / 2   otherwise

times each group's base rate, a = `warmup_start` (0 by default: the first step already moves, and step
W runs at the full rate; HaltingVT's recipe warms up from a = 0.1 as mmengine's LinearLR does).

`optimizer="adam"` runs Adam with L2 weight decay added to the gradient (torch's `Adam`, HaltingVT's
released recipe) instead of AdamW's decoupled decay, over the same groups.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import InputError

if TYPE_CHECKING:
    from .train import TrainConfig

__all__ = ["lr_factor", "param_groups"]

_NO_DECAY_NAMES = ("cls_token", "pos_embed", "time_embed")


# ---------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float = 0.0, start: float = 0.0) -> float:
    """Multiplier of the peak learning rate at 0-based `step` of `total`: linear warm-up from `start`
    over `warmup` steps, then a half cosine from 1 down to `min_ratio` (formula in this module's
    docstring)."""
    if step < warmup:
        return start + (1 - start) * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------------------- parameters
def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim <= 1 or name.rsplit(".", 1)[-1] in _NO_DECAY_NAMES


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups of `model`: (backbone | reducer) x (decay | no decay), each with its
    `name`, `lr` and `weight_decay`; only parameters that require gradients; empty groups left out.

    Raises:
        ValueError: when no parameter requires a gradient.
    """
    plan = getattr(model, "plan", nn.ModuleList())
    reducer_ids = {id(p) for p in plan.parameters()}
    reducer_lr = config.lr if config.reducer_lr is None else config.reducer_lr
    buckets: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = "reducer" if id(p) in reducer_ids else "backbone"
        kind = "no_decay" if _no_decay(name, p) else "decay"
        buckets.setdefault(f"{owner}.{kind}", []).append(p)
    if not buckets:
        spec = getattr(model, "spec", None) or "none"
        frozen = " the backbone is frozen and" if config.freeze_backbone else ""
        raise InputError(
            f"nothing to train:{frozen} no parameter of the model or of plan {spec!r} requires a gradient; "
            "use a plan with learned parameters or do not freeze the backbone"
        )
    groups = []
    for key in ("backbone.decay", "backbone.no_decay", "reducer.decay", "reducer.no_decay"):
        if key in buckets:
            lr = reducer_lr if key.startswith("reducer") else config.lr
            decay = 0.0 if key.endswith("no_decay") else config.weight_decay
            groups.append({"name": key, "params": buckets[key], "lr": lr, "weight_decay": decay})
    return groups
