"""MViT v1 checkpoints as native backbones: pySlowFast / STTS files and torchvision's `mvit_v1_b`.

pySlowFast (and STTS, a fork of it) saves `{"epoch", "model_state", "optimizer_state", "cfg"}` (`cfg`:
the config as YAML text, `CfgNode.dump()`), `model_state` holding

    patch_embed.proj.{weight, bias}, cls_token, pos_embed_{spatial, temporal, class}       (1, n, C) each
    blocks.{i}.{norm1, norm2, attn.proj, mlp.fc1, mlp.fc2, proj}.{weight, bias}             proj: widening blocks
    blocks.{i}.attn.qkv.{weight, bias}  or  blocks.{i}.attn.{q, k, v}.{weight, bias}        fused, or separate
    blocks.{i}.attn.pool_{q, k, v}.weight, blocks.{i}.attn.norm_{q, k, v}.{weight, bias}     where it pools
    norm.{weight, bias}, head.projection.{weight, bias}

These are our names but for the embedding (`embed.`) and the head (`SLOWFAST_RULES`); separate q/k/v
(pySlowFast's code from 2021-06 to 2022-06) are fused. torchvision's state dict holds the same tensors
under other names (`TORCHVISION_RULES`; class token and positions without their leading 1s).

The model's config is read off the tensors (`config_from_state`), starting from `mvit-b-16x4`: width,
depth, stages (the blocks with a query pooling), heads (width / the pooling convolutions' channels),
frames, size, patch and tubelet (the patch convolution's kernel, 2s - 1), MLP width, classes, qkv bias,
and whether the blocks of kv stride 1 pool keys and values (`kv_pool`: torchvision's and STTS's do, the
original pySlowFast MViT-B 16x4 zoo file does not). Not in the tensors: the first stage's kv stride (the
cfg's `POOL_KV_STRIDE_ADAPTIVE`, else MViT-B's (1, 8, 8)) and the pooling norms' epsilon (pySlowFast
and STTS build them with LayerNorm's default 1e-5, torchvision with 1e-6). NOTE: STTS's released
evaluation head applies a softmax; ours returns logits.

An STTS checkpoint also holds its trained selectors, `time_score_predictor.{j}.score_network.*` and
`space_score_predictor.{j}.score_network.*` (the released `PredictorLG`): they become an installed `stts`
plan (`stts_spec`) with the released scorer, frame descriptor and anchor pooling, at the places and
ratios of the cfg's `TIME_PRUNING_LOC`/`TIME_LEFT_RATIO` and `SPACE_PRUNING_LOC`/`SPACE_LEFT_RATIO`; the
temporal ratio is written K / T with the released K = int(T * ratio).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ..errors import InputError
from .base import VideoBackbone
from .checkpoint import load_checked, remap
from .config import PRESETS, BackboneConfig
from .mvit import POOL_KERNEL, MViT

__all__ = [
    "SLOWFAST_RULES",
    "TORCHVISION_RULES",
    "config_from_state",
    "from_slowfast",
    "from_torchvision",
    "is_slowfast",
    "is_torchvision",
    "read_cfg",
    "selection_spec",
    "selector_keys",
    "stts_spec",
]

log = logging.getLogger(__name__)

_BLOCK = r"blocks\.(\d+)\."
_PARTS = r"norm1|norm2|attn\.qkv|attn\.proj|attn\.norm_[qkv]|mlp\.fc1|mlp\.fc2|proj"

SLOWFAST_RULES = [
    (r"patch_embed\.proj\.(weight|bias)", r"embed.proj.\1"),
    (r"cls_token", "embed.cls_token"),
    (r"pos_embed_(spatial|temporal|class)", r"embed.pos_embed_\1"),
    (_BLOCK + rf"({_PARTS})\.(weight|bias)", r"blocks.\1.\2.\3"),
    (_BLOCK + r"attn\.([qkv])\.(weight|bias)", r"blocks.\1.attn.qkv.\3#\2"),  # separate q, k, v: fused
    (_BLOCK + r"attn\.pool_([qkv])\.weight", r"blocks.\1.attn.pool_\2.weight"),
    (r"norm\.(weight|bias)", r"norm.\1"),
    (r"head\.projection\.(weight|bias)", r"head.\1"),
]

TORCHVISION_RULES = [
    (r"conv_proj\.(weight|bias)", r"embed.proj.\1"),
    (r"pos_encoding\.class_token", "embed.cls_token"),
    (r"pos_encoding\.spatial_pos", "embed.pos_embed_spatial"),
    (r"pos_encoding\.temporal_pos", "embed.pos_embed_temporal"),
    (r"pos_encoding\.class_pos", "embed.pos_embed_class"),
    (_BLOCK + r"(norm1|norm2|attn\.qkv)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (_BLOCK + r"attn\.project\.0\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_BLOCK + r"attn\.pool_([qkv])\.pool\.weight", r"blocks.\1.attn.pool_\2.weight"),
    (_BLOCK + r"attn\.pool_([qkv])\.norm_act\.0\.(weight|bias)", r"blocks.\1.attn.norm_\2.\3"),
    (_BLOCK + r"mlp\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_BLOCK + r"mlp\.3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (_BLOCK + r"project\.(weight|bias)", r"blocks.\1.proj.\2"),
    (r"norm\.(weight|bias)", r"norm.\1"),
    (r"head\.1\.(weight|bias)", r"head.\1"),
]
_UNSQUEEZED = (
    "embed.cls_token",
    "embed.pos_embed_spatial",
    "embed.pos_embed_temporal",
    "embed.pos_embed_class",
)
"""torchvision keeps these as (C,) or (n, C); ours (and pySlowFast's) are (1, n, C)."""

SLOWFAST_EPS, TORCHVISION_EPS = 1e-5, 1e-6
"""The pooling norms' epsilon of each source (`BackboneConfig.pool_eps`)."""


# ---------------------------------------------------------------------------------------- what a file is
def _tensors(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def is_slowfast(obj: Any) -> bool:
    """Whether a loaded file is a pySlowFast checkpoint of an MViT (`model_state` with `blocks.` and
    `patch_embed.` tensors)."""
    if not isinstance(obj, dict) or not _tensors(obj.get("model_state")):
        return False
    keys = _strip_module(obj["model_state"]).keys()
    return "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys)


def is_torchvision(obj: Any) -> bool:
    """Whether a loaded file is the state dict of torchvision's MViT (`conv_proj`, `pos_encoding`)."""
    return _tensors(obj) and "conv_proj.weight" in obj and "pos_encoding.class_token" in obj


def _strip_module(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A DistributedDataParallel model's tensors without their `module.` prefix."""
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def read_cfg(text: Any, source: str) -> dict[str, Any]:
    """The pySlowFast config a checkpoint carries (`CfgNode.dump()`, YAML text) as nested dicts, or {}
    when it carries none.

    Raises:
        InputError: PyYAML is missing (needed only for a checkpoint with a config), or the text is not YAML.
    """
    if not isinstance(text, str):
        return {}
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - PyYAML comes with transformers and most installs
        raise InputError(
            f"{source} carries its pySlowFast config as YAML: reading it needs PyYAML (pip install pyyaml)"
        ) from err
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(f"{source}: its cfg is not YAML ({str(err).splitlines()[0]})") from err
    return cfg if isinstance(cfg, dict) else {}


# ---------------------------------------------------------------------------------------- the model
def config_from_state(
    state: Mapping[str, Tensor],
    *,
    pool_eps: float,
    cfg: Mapping[str, Any] | None = None,
    **config_changes: Any,
) -> BackboneConfig:
    """The MViT config the tensors (already in our names) describe; see the module docstring.

    Args:
        state: tensors under our names (after `SLOWFAST_RULES` / `TORCHVISION_RULES`).
        pool_eps: the source's pooling-norm epsilon.
        cfg: pySlowFast's config (`read_cfg`), for the kv stride and the stochastic depth, and checked for
            what we do not build.
        **config_changes: `BackboneConfig` fields that override what was read (`kv_stride`, `heads`, ...).

    Raises:
        InputError: an unknown config field, or a model this backbone does not build (other pooling kernels
            or query strides: pySlowFast's MViT-B-24 32x3; joint positions; no class token).
    """
    base = PRESETS["mvit-b-16x4"]
    fields = {f.name for f in dataclasses.fields(BackboneConfig)}
    unknown = sorted(set(config_changes) - fields)
    if unknown:
        raise InputError(f"unknown config field(s) {unknown}; valid fields: {', '.join(sorted(fields))}")
    mvit = dict((cfg or {}).get("MVIT") or {})
    _check_supported(state, mvit)

    def shape(key: str) -> tuple[int, ...] | None:
        value = state.get(key)
        return tuple(value.shape) if value is not None else None

    found: dict[str, Any] = {"pool_eps": pool_eps}
    if (cls := shape("embed.cls_token")) is not None:
        found["dim"] = cls[-1]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        found["depth"] = max(blocks) + 1
        found["stages"] = tuple(sorted(i for i in blocks if f"blocks.{i}.attn.pool_q.weight" in state))
        pooled_kv = [f"blocks.{i}.attn.pool_k.weight" in state for i in sorted(blocks)]
        found["kv_pool"] = "all" if all(pooled_kv) else "strided"
        found["qkv_bias"] = "qkv" if "blocks.0.attn.qkv.bias" in state else "none"
    if (proj := shape("embed.proj.weight")) is not None:
        found["channels"], found["tubelet"], found["patch"] = proj[1], (proj[2] + 1) // 2, (proj[3] + 1) // 2
    if (temporal := shape("embed.pos_embed_temporal")) is not None:
        found["frames"] = temporal[1] * found.get("tubelet", base.tubelet)
    if (spatial := shape("embed.pos_embed_spatial")) is not None:
        found["size"] = math.isqrt(spatial[1]) * found.get("patch", base.patch)
    if (fc1 := shape("blocks.0.mlp.fc1.weight")) is not None:
        found["mlp_dim"] = fc1[0]
    if (head := shape("head.weight")) is not None:
        found["num_classes"] = head[0]
    pool = next(
        (v for k, v in state.items() if re.fullmatch(r"blocks\.\d+\.attn\.pool_[qkv]\.weight", k)), None
    )
    if pool is not None and "heads" not in config_changes:
        found["heads"] = max(found.get("dim", base.dim) // pool.shape[0], 1)
    if mvit.get("POOL_KV_STRIDE_ADAPTIVE") is not None:
        found["kv_stride"] = tuple(int(s) for s in mvit["POOL_KV_STRIDE_ADAPTIVE"])
    if mvit.get("DROPPATH_RATE") is not None:  # training only
        found["drop_path"] = float(mvit["DROPPATH_RATE"])
    return dataclasses.replace(base, **{**found, **config_changes})


def _check_supported(state: Mapping[str, Tensor], mvit: Mapping[str, Any]) -> None:
    """Refuse, by name, the MViT variants this backbone does not build."""
    kernels = {
        tuple(v.shape[2:])
        for k, v in state.items()
        if re.fullmatch(r"blocks\.\d+\.attn\.pool_[qkv]\.weight", k)
    }
    if kernels - {POOL_KERNEL}:
        raise InputError(
            f"this MViT pools with kernels {sorted(kernels)}; tokensieve builds MViT-B's 3x3x3 pooling only "
            "(POOL_KVQ_KERNEL [3, 3, 3]: not pySlowFast's MViT-B-24 32x3)"
        )
    if "pos_embed" in state or "embed.pos_embed" in state:
        raise InputError(
            "this MViT has joint positions (SEP_POS_EMBED False); tokensieve builds separable ones"
        )
    strides = [tuple(int(s) for s in q[1:]) for q in mvit.get("POOL_Q_STRIDE") or []]
    if any(s != (1, 2, 2) for s in strides):
        raise InputError(f"this MViT pools queries at strides {strides}; tokensieve builds (1, 2, 2) only")


PREDICTORS = {"T": "time_score_predictor.", "S": "space_score_predictor."}
"""The prefixes of STTS's selectors in its checkpoints, by kind of selection."""


def stts_spec(cfg: Mapping[str, Any], frames: int, *, source: str) -> str:
    """The `stts` plan an STTS MViT checkpoint's cfg describes, its selections in the cfg's order.

    Args:
        cfg: the checkpoint's config (`read_cfg`).
        frames: temporal slices after the patch embedding (`config.grid[0]`).

    Raises:
        InputError: see `selection_spec`.
    """
    return selection_spec(cfg.get("MVIT") or {}, frames, source=source, name=str.upper, sigma=0.1)


def selection_spec(
    settings: Mapping[str, Any],
    frames: int,
    *,
    source: str,
    name: Callable[[str], str],
    sigma: float,
    block: Callable[[int], int] = int,
    called: str = "cfg",
) -> str:
    """The `stts` plan of STTS's selection settings, under the names `name` gives them (MViT's cfg:
    `TIME_PRUNING_LOC`; Swin's backbone config: `time_pruning_loc`), its selections in their order.

    Args:
        settings: the settings (`{name}_pruning_loc`, `_left_ratio`, `_score` for time and space, `sigma`).
        frames: temporal slices after the patch embedding.
        name: the settings' spelling of a lower-case name (`str.upper`, `str`).
        sigma: the released default, for settings without one.
        block: our block of a released place (raises `InputError` for a place we do not reproduce).
        called: what the messages call the settings.

    Raises:
        InputError: no pruning places, ratios that do not pair with them, another scorer than the released
            `tpool` / `spatch`, a temporal ratio that keeps no slice, or a place `block` refuses.
    """
    entries = []
    for kind, what, score in (("T", "time", "tpool"), ("S", "space", "spatch")):
        loc, left, scored = (name(f"{what}_{part}") for part in ("pruning_loc", "left_ratio", "score"))
        places, ratios = settings.get(loc) or [], settings.get(left) or []
        if len(places) != len(ratios):
            raise InputError(f"{source}: its {called} gives {loc} {places} but {left} {ratios}")
        if places and settings.get(scored) != score:
            raise InputError(f"{source}: {scored} {settings.get(scored)!r}; tokensieve runs STTS's {score!r}")
        for place, ratio in zip(places, ratios, strict=True):
            if kind == "T":  # the released count, K = int(T * ratio), as the ratio K / T
                kept = int(frames * float(ratio))
                if kept < 1:
                    raise InputError(f"{source}: {left} {ratio} of {frames} slices keeps none")
                ratio, frames = kept / frames, kept
            entries.append(f"{kind}{block(int(place))}={float(ratio)!r}")
    if not entries:
        raise InputError(
            f"{source} holds STTS selectors, but its {called} names no {name('time_pruning_loc')} / "
            f"{name('space_pruning_loc')} to run them at"
        )
    sigma = float(settings.get(name("sigma"), sigma))
    return f"stts:{','.join(entries)},pool=meanmax,anchor_pool=mean,scorer=released,sigma={sigma!r}"


def selector_keys(model: VideoBackbone, predictors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """STTS's selector tensors under the names of the installed plan's scorers: the j-th temporal (spatial)
    predictor is the j-th T (S) selection in the order of its places."""
    (reducer,) = model.plan
    slots = {kind: [i for i, s in enumerate(reducer.selections) if s.kind == kind] for kind in PREDICTORS}
    out = {}
    for key, value in predictors.items():
        kind = next(k for k, prefix in PREDICTORS.items() if key.startswith(prefix))
        j, _, rest = key.removeprefix(PREDICTORS[kind]).partition(".")
        rest = rest.removeprefix("score_network.")
        index = slots[kind][int(j)] if j.isdigit() and int(j) < len(slots[kind]) else f"{kind}{j}?"
        out[f"plan.0.selections.{index}.scorer.{rest}"] = value  # an unknown one stays unexpected
    return out


def _build(
    config: BackboneConfig,
    state: Mapping[str, Tensor],
    unmatched: list[str],
    source: str,
    spec: str | None = None,
    predictors: Mapping[str, Tensor] | None = None,
) -> MViT:
    model = MViT(config)
    if spec is not None:
        from ..reducers import apply  # (the reducers import the backbones)

        apply(model, spec)
        state = {**state, **selector_keys(model, predictors or {})}
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # before copying, so float64 weights are not rounded through float32
        model = model.to(dtype=dtypes.pop())
    load_checked(model, state, unmatched=unmatched, source=source)
    return model.eval()


def from_slowfast(ckpt: Mapping[str, Any], *, source: str, **config_changes: Any) -> MViT:
    """The MViT of a pySlowFast / STTS checkpoint (`is_slowfast`), with STTS's selectors installed as an
    `stts` plan when it holds them.

    Raises:
        InputError: a model this backbone does not build, a config it cannot read.
        CheckpointMismatchError: missing, unexpected and mis-shaped tensors, all listed.
    """
    model_state = _strip_module(ckpt["model_state"])
    predictors = {
        k: model_state.pop(k) for k in list(model_state) if k.startswith(tuple(PREDICTORS.values()))
    }
    state, unmatched = remap(model_state, SLOWFAST_RULES)
    cfg = read_cfg(ckpt.get("cfg"), source)
    if "kv_stride" not in config_changes and "POOL_KV_STRIDE_ADAPTIVE" not in (cfg.get("MVIT") or {}):
        log.info(
            "%s carries no POOL_KV_STRIDE_ADAPTIVE: MViT-B's (1, 8, 8) assumed (pass kv_stride=)", source
        )
    config = config_from_state(state, pool_eps=SLOWFAST_EPS, cfg=cfg, **config_changes)
    spec = stts_spec(cfg, config.grid[0], source=source) if predictors else None
    if spec is not None:
        log.info("%s: its STTS selectors run as the plan %s", source, spec)
    return _build(config, state, unmatched, f"{source} (pySlowFast MViT checkpoint)", spec, predictors)


def from_torchvision(state: Mapping[str, Tensor], *, source: str, **config_changes: Any) -> MViT:
    """The MViT of torchvision's `mvit_v1_b` state dict (`is_torchvision`); kv stride (1, 8, 8) unless given.

    Raises:
        CheckpointMismatchError: missing, unexpected and mis-shaped tensors, all listed.
    """
    mapped, unmatched = remap(state, TORCHVISION_RULES)
    for key in _UNSQUEEZED:
        if key in mapped:
            mapped[key] = mapped[key].reshape(1, -1, mapped[key].shape[-1])  # (C,) / (n, C) -> (1, n, C)
    config = config_from_state(mapped, pool_eps=TORCHVISION_EPS, **config_changes)
    return _build(config, mapped, unmatched, f"{source} (torchvision MViT state dict)")
