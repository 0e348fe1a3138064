"""Video Swin checkpoints as native backbones: the original release and mmaction2 (0.x and 1.x), and
torchvision's `swin3d_t/s/b` state dicts.

The original (`SwinTransformer/Video-Swin-Transformer`, an mmaction2 0.x fork; STTS's Swin) saves an mmcv
checkpoint `{"meta", "state_dict"}` whose `state_dict` holds

    backbone.patch_embed.{proj, norm}.*
    backbone.layers.{s}.blocks.{j}.{norm1, norm2, attn.qkv, attn.proj, mlp.fc1, mlp.fc2}.*
    backbone.layers.{s}.blocks.{j}.attn.relative_position_bias_table, ...attn.relative_position_index
    backbone.layers.{s}.downsample.{norm, reduction}.*                   (every stage but the last)
    backbone.norm.*  (mmaction2 1.x: backbone.norm3.*),  cls_head.fc_cls.*

torchvision names the same tensors `patch_embed.*`, `features.{2s}.{j}.*` (`mlp.0`, `mlp.3` for fc1, fc2),
`features.{2s+1}.{norm, reduction}.*`, `norm.*`, `head.*`. Our blocks are numbered across stages, and a
stage's merging belongs to its last block (`blocks.{i}.downsample`), as released.

The config is read off the tensors from `swin3d-b`: width, channels, tubelet and patch (the patch
convolution), stages and depth (the blocks of each stage), heads (the bias table's columns), MLP width,
classes, qkv bias and the window (the one whose relative position index is the file's; without an index,
from the bias table's rows: 8x7x7 or 16x7x7). Not in the tensors: the clip size, which the model does not
depend on (`any_size`). The relative position index is a buffer we build from the window; a file whose
index is another is refused.

STTS's Swin (same layout) also holds its selectors, `backbone.time_score_predictor.{j}.score_network.*` (and
`space_score_predictor`, the spatial form no released config uses): they become an installed `stts` plan with
the released scorer (`mvit_weights.selection_spec`, `selector_keys`, shared with STTS's MViT). Places, ratios
and `sigma` come from the config mmaction2 0.x saves as `meta["config"]` (mmcv's `pretty_text`, parsed by
`read_config`, never run), with STTS's `num_frames` / `image_size`; a file without it takes
`time_left_ratio=` / `space_left_ratio=` (place: stage 0). STTS's "before stage s" (s > 0) is our slot before
stage s's first block, which holds the tokens stage s - 1's merging made, as in the released loop.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from . import mvit_weights
from .checkpoint import load_checked
from .config import PRESETS, BackboneConfig
from .swin import Swin3D, relative_position_index

__all__ = [
    "config_from_state",
    "from_mmaction",
    "from_torchvision",
    "is_mmaction",
    "is_torchvision",
    "read_config",
]

log = logging.getLogger(__name__)

_INDEX = "attn.relative_position_index"
_KNOWN_WINDOWS = ((8, 7, 7), (16, 7, 7))
"""The released windows, for a file without its relative position index."""


# ---------------------------------------------------------------------------------------- what a file is
def _tensors(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def is_mmaction(obj: Any) -> bool:
    """Whether a loaded file is an original / mmaction2 Video Swin checkpoint (`state_dict`, or the bare
    dict, with `backbone.layers.` tensors)."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    return (
        _tensors(state)
        and "backbone.patch_embed.proj.weight" in state
        and any(k.startswith("backbone.layers.") for k in state)
    )


def is_torchvision(obj: Any) -> bool:
    """Whether a loaded file is the state dict of torchvision's `swin3d_*` (`patch_embed`, `features`)."""
    return _tensors(obj) and "patch_embed.proj.weight" in obj and any(k.startswith("features.") for k in obj)


# ---------------------------------------------------------------------------------------- key maps
_BLOCK_PARTS = {
    "norm1": "norm1", "norm2": "norm2", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2",
}  # fmt: skip


def _rename(
    state: Mapping[str, Tensor], blocks: re.Pattern, merges: re.Pattern, fixed: Mapping[str, str]
) -> tuple[dict[str, Tensor], list[str], dict[int, Tensor]]:
    """Our names for a file's tensors: `blocks` matches (stage, block, rest) of a block's tensor, `merges`
    (stage, rest) of a stage's merging, `fixed` maps whole prefixes. Returns the renamed tensors, the keys
    no rule placed, and each block's relative position index (by our block number)."""
    depths: dict[int, int] = {}
    for key in state:
        if m := blocks.fullmatch(key):
            s, j = int(m.group(1)), int(m.group(2))
            depths[s] = max(depths.get(s, 0), j + 1)
    offsets = [sum(depths.get(s, 0) for s in range(stage)) for stage in range(max(depths, default=-1) + 2)]
    mapped: dict[str, Tensor] = {}
    unmatched: list[str] = []
    indices: dict[int, Tensor] = {}
    for key, value in state.items():
        if m := blocks.fullmatch(key):
            block, rest = offsets[int(m.group(1))] + int(m.group(2)), m.group(3)
            part, _, leaf = rest.rpartition(".")
            if rest == _INDEX:
                indices[block] = value
            elif rest == "attn.relative_position_bias_table":
                mapped[f"blocks.{block}.{rest}"] = value
            elif part in _BLOCK_PARTS:
                mapped[f"blocks.{block}.{_BLOCK_PARTS[part]}.{leaf}"] = value
            else:
                unmatched.append(key)
        elif (m := merges.fullmatch(key)) and int(m.group(1)) + 1 < len(offsets):
            mapped[f"blocks.{offsets[int(m.group(1)) + 1] - 1}.downsample.{m.group(2)}"] = value
        elif prefix := next((p for p in fixed if key.startswith(p)), None):
            mapped[fixed[prefix] + key.removeprefix(prefix)] = value
        else:
            unmatched.append(key)
    return mapped, unmatched, indices


MMACTION_BLOCKS = re.compile(r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.(.+)")
MMACTION_MERGES = re.compile(r"backbone\.layers\.(\d+)\.downsample\.((?:norm|reduction)\.\w+)")
MMACTION_FIXED = {
    "backbone.patch_embed.": "embed.",
    "backbone.norm3.": "norm.",  # mmaction2 1.x
    "backbone.norm.": "norm.",
    "cls_head.fc_cls.": "head.",
}
# torchvision's stage s is features.{2s} and its merging features.{2s+1}: `from_torchvision` first renames
# them features.{s}.b.* and features.{s}.m.*.
TORCHVISION_BLOCKS = re.compile(r"features\.(\d+)\.b\.(\d+)\.(.+)")
TORCHVISION_MERGES = re.compile(r"features\.(\d+)\.m\.((?:norm|reduction)\.\w+)")
TORCHVISION_FIXED = {"patch_embed.": "embed.", "norm.": "norm.", "head.": "head."}


# ---------------------------------------------------------------------------------------- the model
def _window(state: Mapping[str, Tensor], indices: Mapping[int, Tensor], source: str) -> tuple[int, int, int]:
    """The window whose relative position index is the file's (or, without one, the released window of as
    many bias-table rows)."""
    table = state.get("blocks.0.attn.relative_position_bias_table")
    if table is None:
        return PRESETS["swin3d-b"].window
    rows = table.shape[0]
    index = indices.get(0)
    if index is None:
        known = [w for w in _KNOWN_WINDOWS if math.prod(2 * n - 1 for n in w) == rows]
        if not known:
            raise InputError(
                f"{source}: no relative position index, and no released window has {rows} bias rows"
            )
        return known[0]
    volume = index.shape[0]
    divisors = [n for n in range(1, volume + 1) if volume % n == 0]
    for window in itertools.product(divisors, divisors, divisors):
        if math.prod(window) != volume or math.prod(2 * n - 1 for n in window) != rows:
            continue
        if torch.equal(relative_position_index(window), index.long().cpu()):
            return window  # type: ignore[return-value]
    raise InputError(f"{source}: its relative position index is none of a window of {volume} tokens")


def config_from_state(
    state: Mapping[str, Tensor], indices: Mapping[int, Tensor], *, source: str, **config_changes: Any
) -> BackboneConfig:
    """The Swin config the tensors (already in our names) describe; see the module docstring."""
    base = PRESETS["swin3d-b"]
    fields = {f.name for f in dataclasses.fields(BackboneConfig)}
    unknown = sorted(set(config_changes) - fields)
    if unknown:
        raise InputError(f"unknown config field(s) {unknown}; valid fields: {', '.join(sorted(fields))}")
    found: dict[str, Any] = {}
    if (proj := state.get("embed.proj.weight")) is not None:
        found["dim"], found["channels"], found["tubelet"], found["patch"] = proj.shape[:4]
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if blocks:
        found["depth"] = blocks[-1] + 1
        found["stages"] = tuple(i + 1 for i in blocks if f"blocks.{i}.downsample.reduction.weight" in state)
        found["qkv_bias"] = "qkv" if "blocks.0.attn.qkv.bias" in state else "none"
    if (table := state.get("blocks.0.attn.relative_position_bias_table")) is not None:
        found["heads"] = table.shape[1]
    if (fc1 := state.get("blocks.0.mlp.fc1.weight")) is not None:
        found["mlp_dim"] = fc1.shape[0]
    if (head := state.get("head.weight")) is not None:
        found["num_classes"] = head.shape[0]
    if "window" not in config_changes:
        found["window"] = _window(state, indices, source)
    return dataclasses.replace(base, **{**found, **config_changes})


def _build(
    state: dict[str, Tensor],
    unmatched: list[str],
    indices: dict[int, Tensor],
    source: str,
    stts: Mapping[str, Any] | None = None,
    predictors: Mapping[str, Tensor] | None = None,
    **changes: Any,
) -> Swin3D:
    config = config_from_state(state, indices, source=source, **changes)
    model = Swin3D(config)
    for (
        block,
        index,
    ) in indices.items():  # the index is rebuilt from the window; a file's other one is refused
        if block < len(model.blocks):
            ours = model.blocks[block].attn.relative_position_index
            if not torch.equal(index.long().cpu(), ours.cpu()):
                raise InputError(
                    f"{source}: block {block}'s relative position index is not that of window {config.window}"
                )
    if predictors:
        from ..reducers import apply  # (the reducers import the backbones)

        spec = mvit_weights.selection_spec(
            stts or {}, config.grid[0], source=source, name=str, sigma=STTS_SIGMA, block=_stts_block(source, config.stages),
            called="config",
        )  # fmt: skip
        log.info("%s: its STTS selectors run as the plan %s", source, spec)
        apply(model, spec)
        state = {**state, **mvit_weights.selector_keys(model, predictors)}
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # before copying, so float64 weights are not rounded through float32
        model = model.to(dtype=dtypes.pop())
    load_checked(model, state, unmatched=unmatched, source=source)
    return model.eval()


# ---------------------------------------------------------------------------------------- STTS's selectors
STTS_SIGMA = 0.05
"""The released Swin backbone's default `sigma` (training noise only)."""
STTS_RATIOS = ("time_left_ratio", "space_left_ratio")
"""Keywords of `from_mmaction` that give the ratios of a file whose config does not."""


def _stts_block(source: str, stages: tuple[int, ...]) -> Callable[[int], int]:
    """Our block of STTS's "before stage s": 0, or the first block of stage s (its slot holds the tokens
    stage s - 1's patch merging made, as the released loop selects them)."""

    def block(stage: int) -> int:
        if not 0 <= stage <= len(stages):
            raise InputError(
                f"{source}: STTS selects before Swin stage {stage}, but the model has {len(stages) + 1}"
            )
        return (0, *stages)[stage]

    return block


def read_config(text: Any, source: str) -> dict[str, Any]:
    """The `model` settings of an mmcv config's text (`cfg.pretty_text`, which mmaction2 0.x saves as the
    checkpoint's `meta["config"]`), or {} when there is none. The text is parsed, never run: only literals
    and `dict(...)` calls are read (anything else in a value reads as None).

    Raises:
        InputError: the text is not Python.
    """
    if not isinstance(text, str):
        return {}
    try:
        tree = ast.parse(text)
    except SyntaxError as err:
        raise InputError(
            f"{source}: its meta config is not an mmcv config ({err.msg}, line {err.lineno})"
        ) from err
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "model" for t in node.targets
        ):
            model = _literal(node.value)
            return model if isinstance(model, dict) else {}
    return {}


def _literal(node: ast.AST) -> Any:
    """The value of a literal or `dict(...)` expression; None for anything else."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {
            _literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True) if k is not None
        }
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand)
        return -value if isinstance(value, (int, float)) else None
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "dict"
        and not node.args
    ):
        return {k.arg: _literal(k.value) for k in node.keywords if k.arg is not None}
    return None


def _stts_settings(
    backbone: Mapping[str, Any], predictors: Mapping[str, Tensor], ratios: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """The selection settings: the file's backbone config, its ratios replaced by the keywords given
    (`time_left_ratio=`, `space_left_ratio=`); a kind of selector the config does not place runs at stage 0
    (every released config's place) with the `tpool` / `spatch` scorer its keys imply."""
    settings = dict(backbone)
    for what, score in (("time", "tpool"), ("space", "spatch")):
        ratio = ratios.get(f"{what}_left_ratio")
        held = any(k.startswith(mvit_weights.PREDICTORS[what[0].upper()]) for k in predictors)
        if ratio is None:
            continue
        if not held:
            raise InputError(f"{source}: {what}_left_ratio= given, but the file holds no {what} selector")
        settings[f"{what}_left_ratio"] = list(ratio) if isinstance(ratio, (list, tuple)) else [ratio]
        if not settings.get(f"{what}_pruning_loc"):
            settings[f"{what}_pruning_loc"] = [0]
            settings.setdefault(f"{what}_score", score)
    return settings


def from_mmaction(ckpt: Mapping[str, Any], *, source: str, **config_changes: Any) -> Swin3D:
    """The Video Swin of an original / mmaction2 0.x or 1.x checkpoint (`is_mmaction`); an STTS checkpoint's
    selectors (`backbone.time_score_predictor.0.score_network.*`, `backbone.space_score_predictor.*`) run as
    an installed `stts` plan (see the module docstring).

    Args:
        config_changes: `BackboneConfig` fields to override; for an STTS checkpoint also `time_left_ratio=` /
            `space_left_ratio=` (a ratio, or one per selector), which replace its config's (and are needed
            when the file carries no config).

    Raises:
        InputError: a window or config this backbone cannot read; STTS selectors without their ratios, or
            before a stage the model does not have.
        CheckpointMismatchError: missing, unexpected and mis-shaped tensors, all listed.
    """
    state = ckpt.get("state_dict", ckpt)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    selectors = tuple("backbone." + p for p in mvit_weights.PREDICTORS.values())
    predictors = {k.removeprefix("backbone."): state.pop(k) for k in list(state) if k.startswith(selectors)}
    ratios = {k: config_changes.pop(k) for k in STTS_RATIOS if k in config_changes}
    meta = ckpt.get("meta") if "state_dict" in ckpt else None
    backbone = read_config(meta.get("config") if isinstance(meta, dict) else None, source).get("backbone")
    backbone = backbone if isinstance(backbone, dict) else {}
    if ratios and not predictors:
        raise InputError(f"{source} holds no STTS selectors: {', '.join(ratios)}= apply to STTS checkpoints")
    stts = _stts_settings(backbone, predictors, ratios, source) if predictors else None
    for ours, theirs in (("frames", "num_frames"), ("size", "image_size")):  # STTS's fork sets them
        if predictors and ours not in config_changes and isinstance(backbone.get(theirs), int):
            config_changes[ours] = backbone[theirs]
    mapped, unmatched, indices = _rename(state, MMACTION_BLOCKS, MMACTION_MERGES, MMACTION_FIXED)
    source = f"{source} (Video Swin checkpoint)"
    return _build(mapped, unmatched, indices, source, stts, predictors, **config_changes)


def from_torchvision(state: Mapping[str, Tensor], *, source: str, **config_changes: Any) -> Swin3D:
    """The Video Swin of torchvision's `swin3d_*` state dict (`is_torchvision`).

    Raises:
        InputError: a window or config this backbone cannot read.
        CheckpointMismatchError: missing, unexpected and mis-shaped tensors, all listed.
    """
    halved = {}
    for key, value in state.items():
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        if m:
            index = int(m.group(1))
            key = f"features.{index // 2}.{'m' if index % 2 else 'b'}.{m.group(2)}"
        halved[key] = value
    mapped, unmatched, indices = _rename(halved, TORCHVISION_BLOCKS, TORCHVISION_MERGES, TORCHVISION_FIXED)
    unmatched = [_torchvision_name(k) for k in unmatched]
    return _build(mapped, unmatched, indices, f"{source} (torchvision Swin3d state dict)", **config_changes)


def _torchvision_name(key: str) -> str:
    """A key as torchvision names it (undoing the halving of `from_torchvision`), for the error message."""
    m = re.fullmatch(r"features\.(\d+)\.([bm])\.(.+)", key)
    return f"features.{2 * int(m.group(1)) + (m.group(2) == 'm')}.{m.group(3)}" if m else key
