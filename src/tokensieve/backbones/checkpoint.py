"""Checked loading of foreign checkpoints: a key map of regex rules, fusion of split q/k/v
projections, and one error that lists every missing, unexpected and mis-shaped key."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import InputError

__all__ = ["CheckpointMismatchError", "fit_problems", "load_checked", "remap"]

_PARTS = ("#q", "#k", "#v")  # suffixes of the thirds of a fused qkv weight


class CheckpointMismatchError(InputError):
    """The checkpoint does not fit the model; the message lists every offending key."""


def remap(
    state: Mapping[str, Tensor], rules: Sequence[tuple[str, str]]
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename checkpoint keys with the first rule whose pattern matches the whole key.

    A target ending in `#q`, `#k` or `#v` names one third of a fused `qkv` weight or bias; the
    three thirds are concatenated (q, k, v order) into the key without the suffix.

    Returns:
        The renamed tensors and the source keys no rule matched.
    """
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    mapped: dict[str, Tensor] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        for pattern, target in compiled:
            if pattern.fullmatch(key):
                mapped[pattern.sub(target, key)] = value
                break
        else:
            unmatched.append(key)
    return _fuse_qkv(mapped), unmatched


def _fuse_qkv(mapped: dict[str, Tensor]) -> dict[str, Tensor]:
    fused = {k: v for k, v in mapped.items() if not k.endswith(_PARTS)}
    stems = sorted({k[:-2] for k in mapped if k.endswith(_PARTS)})
    for stem in stems:
        parts = [mapped.get(stem + suffix) for suffix in _PARTS]
        if any(p is None for p in parts):
            # Report the thirds that are there under their own names; the fused key stays missing.
            fused.update({stem + s: p for s, p in zip(_PARTS, parts, strict=True) if p is not None})
            continue
        fused[stem] = torch.cat(parts, 0)  # (3C, ...) in q, k, v order
    return fused


def fit_problems(
    own: Mapping[str, Tensor], given: Mapping[str, Tensor], *, optional: Iterable[str] = ()
) -> tuple[list[str], list[str], list[str]]:
    """How tensors `given` by model key fail to fit a model's state dict `own`: the sorted keys
    missing (not in `optional`), unexpected, and of another shape."""
    optional = set(optional)
    missing = sorted(k for k in own if k not in given and k not in optional)
    unexpected = sorted(set(given) - set(own))
    shapes = sorted(k for k, v in given.items() if k in own and v.shape != own[k].shape)
    return missing, unexpected, shapes


def load_checked(
    model: nn.Module,
    mapped: Mapping[str, Tensor],
    *,
    unmatched: Iterable[str] = (),
    optional: Iterable[str] = (),
    source: str = "checkpoint",
) -> None:
    """Copy `mapped` (keys already in the model's naming) into `model`, or raise listing every problem.

    Args:
        model: destination; its dtype and device are kept.
        mapped: tensors by model key.
        unmatched: source keys the key map could not place (reported as unexpected).
        optional: model keys that may be absent from the checkpoint (left as initialised).
        source: what the checkpoint is, for the error message.

    Raises:
        CheckpointMismatchError: missing keys, unexpected keys, or shape mismatches.
    """
    own = model.state_dict()
    missing, unexpected, mismatched = fit_problems(own, mapped, optional=optional)
    unexpected = sorted(set(unmatched) | set(unexpected))
    shapes = [f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]
    if unexpected or missing or shapes:
        lines = [f"{source} does not fit {type(model).__name__}:"]
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        ):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines.extend(f"    {k}" for k in keys)
        raise CheckpointMismatchError("\n".join(lines))
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v)
