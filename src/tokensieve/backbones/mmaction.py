"""The released HaltingVT checkpoints (Wu et al. 2023, github.com/dun-research/HaltingVT) as native
backbones: mmaction2 1.x recognizers saved by mmengine.

An mmengine checkpoint is a dict: `state_dict` (the recognizer's tensors), `meta` (among others
`cfg`, the config as text), and the training state (`optimizer`, `param_schedulers`,
`message_hub`). The recognizer's tensors are named

    backbone.model.{cls_token, pos_embed, time_embed}              pos_embed: (1, 1 + H*W, C)
    backbone.model.patch_embed.proj.{weight, bias}                 a Conv2d per frame
    backbone.model.blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias}
    backbone.model.blocks.{i}.{temporal_norm1, temporal_attn.qkv, temporal_attn.proj,
                               temporal_fc}.{weight, bias}          divided (Glimpser) blocks only
    backbone.model.norm.{weight, bias}
    cls_head.fc_cls.{weight, bias}                                 the classifier
    cls_head.fc_motion.{weight, bias}                              the Motion Loss's real/fake head

The backbone's own `head` is absent (built with `num_classes=0`). These are exactly our TimeSformer's
names with `config.divided` set (`HALTINGVT_RULES`), so the model is a `haltingvt-s`-shaped config
read off the tensors' shapes (`config_from_state`). Not in the tensors: the head count (DeiT's
width / 64; pass `heads=` otherwise) and the normalisation (mean = std = 0.5, the released configs'
127.5 on 0-255 pixels).

What is returned is the bare backbone: the halting and Glimpser steps are a plan
(`ts.apply(model, "halting:...")` or `--plan`); the plan equivalent to the checkpoint's config is
logged when `meta` holds it. The motion head is used only by the training loss and is not loaded
(logged). The released code orders tokens space-major (`n*T + t`); ours are time-major. Weights do
not depend on the order and the readout is the class token, so no permutation is needed.

mmengine pickles its own objects beside the weights (the message hub's history buffers, numpy
arrays), which `torch.load(weights_only=True)` refuses. `read_foreign` reads such a file with every
class the safe reader does not know replaced by an inert placeholder: none of their code runs, and
neither mmengine nor mmaction2 is needed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .base import VideoBackbone
from .checkpoint import load_checked, remap
from .config import PRESETS, BackboneConfig
from .timesformer import TimeSformer

__all__ = [
    "HALTINGVT_RULES",
    "config_from_state",
    "from_checkpoint",
    "halting_spec",
    "is_checkpoint",
    "is_haltingvt",
    "read_foreign",
]

log = logging.getLogger(__name__)

PREFIX = "backbone.model."
MOTION = "cls_head.fc_motion."  # the Motion Loss's 2-way head: training only
UNREADABLE = "an mmaction2 checkpoint needs torch >= 2.6, or its weights saved alone as {'state_dict': ...}"
"""What to do when `read_foreign` cannot read a file either (said after the refusal)."""
_B = r"backbone\.model\."
_BLOCK_PARTS = (
    "norm1|attn\\.qkv|attn\\.proj|norm2|mlp\\.fc1|mlp\\.fc2"
    "|temporal_norm1|temporal_attn\\.qkv|temporal_attn\\.proj|temporal_fc"
)

HALTINGVT_RULES = [
    (_B + r"cls_token", "embed.cls_token"),
    (_B + r"pos_embed", "embed.pos_embed"),
    (_B + r"time_embed", "embed.time_embed"),
    (_B + r"patch_embed\.proj\.(weight|bias)", r"embed.proj.\1"),
    (_B + rf"blocks\.(\d+)\.({_BLOCK_PARTS})\.(weight|bias)", r"blocks.\1.\2.\3"),
    (_B + r"norm\.(weight|bias)", r"norm.\1"),
    (r"cls_head\.fc_cls\.(weight|bias)", r"head.\1"),
]


# ---------------------------------------------------------------------------------------- reading
class _Placeholder:
    """Stands for an object of a class the safe reader does not know: accepts whatever its pickle
    hands it and keeps nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def read_foreign(path: Path) -> Any:
    """Read a `torch.save` zip file whose only refusal by `torch.load(weights_only=True)` is classes it
    does not know, with each of them read as an inert placeholder (`_Placeholder`).

    Raises:
        InputError: torch older than 2.6 (no placeholders for named classes).
        ValueError: not a zip `torch.save` file (the legacy format cannot be scanned for classes).
        pickle.UnpicklingError: the placeholders do not fit the pickle (e.g. a foreign dict subclass).
    """
    if torch.__version__ < "2.6":  # (class, name) pairs in `safe_globals` came with torch 2.6
        raise InputError(f"reading {path} needs torch >= 2.6: it holds objects of classes torch refuses")
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    with (
        torch.serialization.safe_globals([(_Placeholder, name) for name in names]),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def is_checkpoint(obj: Any) -> bool:
    """Whether `obj` (a loaded file) is an mmengine checkpoint: a dict whose `state_dict` holds tensors."""
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        return False
    state = obj["state_dict"]
    return all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())


def is_haltingvt(state: Mapping[str, Tensor]) -> bool:
    """Whether a recognizer's state dict holds HaltingVT's backbone (`backbone.model.` keys)."""
    return any(k.startswith(PREFIX) for k in state)


# ---------------------------------------------------------------------------------------- the model
def config_from_state(state: Mapping[str, Tensor], **config_changes: Any) -> BackboneConfig:
    """The `haltingvt-s`-shaped config the tensors of a HaltingVT recognizer describe.

    Width from `cls_token`, depth from the block indices, `divided` from the last block with a
    temporal part, frames from `time_embed`, patch and channels from `patch_embed`, size from
    `pos_embed` (1 + a square grid), MLP width from the first block's `mlp.fc1`, classes from
    `cls_head.fc_cls`. A tensor that is missing leaves `haltingvt-s`'s value, so that loading then
    reports it with every other problem.

    Args:
        state: the recognizer's state dict (`backbone.model.` and `cls_head.` keys).
        **config_changes: `BackboneConfig` fields that override what the tensors say; `heads` is
            needed when the width is not a multiple of 64 (DeiT's head width).

    Raises:
        InputError: an unknown config field, a width without `heads`, a `pos_embed` that is not a
            class slot plus a square grid (the released `use_motion_token` variant adds a slot).
    """
    base = PRESETS["haltingvt-s"]
    fields = {f.name for f in dataclasses.fields(BackboneConfig)}
    unknown = sorted(set(config_changes) - fields)
    if unknown:
        raise InputError(f"unknown config field(s) {unknown}; valid fields: {', '.join(sorted(fields))}")

    def shape(key: str) -> tuple[int, ...] | None:
        value = state.get(PREFIX + key)
        return tuple(value.shape) if value is not None else None

    found: dict[str, Any] = {}
    if (cls := shape("cls_token")) is not None:
        found["dim"] = cls[-1]
    if blocks := _block_indices(state):
        found["depth"] = max(blocks) + 1
        temporal = _block_indices(state, "temporal_")
        found["divided"] = max(temporal) + 1 if temporal else 0
    if (time := shape("time_embed")) is not None:
        found["frames"] = time[1]
    if (proj := shape("patch_embed.proj.weight")) is not None:
        found["patch"], found["channels"] = proj[-1], proj[1]
    if (fc1 := shape("blocks.0.mlp.fc1.weight")) is not None:
        found["mlp_dim"] = fc1[0]
    if (fc_cls := state.get("cls_head.fc_cls.weight")) is not None:
        found["num_classes"] = fc_cls.shape[0]
    if (pos := shape("pos_embed")) is not None:
        side = math.isqrt(pos[1] - 1)
        if side * side != pos[1] - 1:
            raise InputError(
                f"pos_embed holds {pos[1]} positions, not a class slot plus a square grid "
                "(the use_motion_token variant is not supported)"
            )
        found["size"] = side * found.get("patch", base.patch)
    dim = found.get("dim", base.dim)
    if "heads" not in config_changes:
        if dim % 64:
            raise InputError(
                f"the checkpoint's width {dim} is not a multiple of 64, DeiT's head width: pass heads="
            )
        found["heads"] = dim // 64
    return dataclasses.replace(base, **{**found, **config_changes})


def _block_indices(state: Mapping[str, Tensor], part: str = "") -> set[int]:
    """The indices of the blocks with a tensor whose name goes on with `part`."""
    pattern = re.compile(re.escape(PREFIX) + r"blocks\.(\d+)\." + part)
    return {int(m.group(1)) for k in state if (m := pattern.match(k))}


def halting_spec(meta: Any) -> str | None:
    """The plan spec equivalent to the halting settings of the config text in a checkpoint's `meta`
    (`halt_center`, `halt_scale`, the last `keep_rate`), or None when it does not hold all three."""
    text = meta.get("cfg") if isinstance(meta, dict) else None
    if not isinstance(text, str):
        return None
    number = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    center = re.search(rf"\bhalt_center\s*=\s*{number}", text)
    scale = re.search(rf"\bhalt_scale\s*=\s*{number}", text)
    keep = re.search(r"\bkeep_rate\s*=\s*[\[(]([^\])]*)[\])]", text)
    rates = re.findall(number, keep.group(1)) if keep else []
    if not (center and scale and rates):
        return None
    beta, gamma, glimpser = (f"{float(v):g}" for v in (center.group(1), scale.group(1), rates[-1]))
    return f"halting:beta={beta},gamma={gamma},glimpser={glimpser}"


def from_checkpoint(ckpt: Mapping[str, Any], *, source: str, **config_changes: Any) -> VideoBackbone:
    """The bare HaltingVT backbone of an mmengine checkpoint (see the module docstring).

    Args:
        ckpt: the loaded checkpoint (`is_checkpoint`).
        source: where it was read from, for messages.
        **config_changes: `BackboneConfig` fields to override (`heads`, `drop_path`, ...).

    Returns:
        A `TimeSformer` with `config.divided` set, in eval mode, on the CPU, in the weights' dtype.

    Raises:
        InputError: not HaltingVT's recognizer, or a config the tensors cannot give.
        CheckpointMismatchError: missing, unexpected and mis-shaped tensors, all listed.
    """
    state = dict(ckpt["state_dict"])
    if not is_haltingvt(state):
        raise InputError(
            f"{source}: its state_dict has no {PREFIX} keys: tokensieve reads HaltingVT's mmaction2 "
            "checkpoints, not other recognizers"
        )
    motion = {k: state.pop(k) for k in list(state) if k.startswith(MOTION)}
    config = config_from_state(state, **config_changes)
    mapped, unmatched = remap(state, HALTINGVT_RULES)
    model = TimeSformer(config)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # before copying, so float64 weights are not rounded through float32
        model = model.to(dtype=dtypes.pop())
    load_checked(model, mapped, unmatched=unmatched, source=f"{source} (mmaction2 HaltingVT checkpoint)")
    if motion:
        log.info(
            "%s: %s (the Motion Loss's real/fake head) is used in training only and is not loaded",
            source, MOTION.rstrip("."),
        )  # fmt: skip
    spec = halting_spec(ckpt.get("meta"))
    if spec is not None:
        log.info("%s was trained with the plan %s; install it with ts.apply or --plan", source, spec)
    return model.eval()
