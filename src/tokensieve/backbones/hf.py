"""Conversion of Hugging Face transformers video models into the native backbones.

`from_hf(model)` converts a live `VideoMAEForVideoClassification`, `VideoMAEModel`,
`TimesformerForVideoClassification`, `TimesformerModel`, `VivitForVideoClassification` or `VivitModel`;
`from_hf_state_dict(state, config, kind)` converts one's state dict (e.g. read from a hub file);
`load(hub_id_or_dir)` loads one through transformers first, and is also `ts.load` for tokensieve's own
saved models and training runs (`saved.py` reads those), for the released HaltingVT checkpoints
(`mmaction.py`) and for MViT checkpoints of pySlowFast, STTS and torchvision (`mvit_weights.py`). Both generations of parameter names are accepted: VideoMAE's `q_bias`/`v_bias` (hub
files, transformers 4.x and early 5.x) and `query.bias`/`value.bias` (transformers >= 5.x in memory);
ViViT's `encoder.layer.i.attention.attention.query` (hub files) and `layers.i.attention.q_proj`
(transformers >= 5.x in memory). Every key and shape is checked; a mismatch raises an error that lists
them all.

Numerics that must be copied, not defaulted (see docs/design.md): VideoMAE block norms use the
config's `layer_norm_eps` (1e-12 on the hub) while `fc_norm` uses 1e-5; TimeSformer and ViViT use
`layer_norm_eps` everywhere; the MLP's activation follows `hidden_act` (ViViT's "gelu_fast" is the
tanh approximation). TimeSformer orders tokens space-major (its readout is the class token, so no
permutation is needed); ViViT's Conv3d tokens are time-major like ours.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import InputError
from .base import VideoBackbone
from .checkpoint import load_checked, remap
from .config import HALF, IMAGENET_MEAN, IMAGENET_STD, KINETICS_MEAN, KINETICS_STD, BackboneConfig
from .saved import CONFIG_FILE, RUN_CHECKPOINT, is_run, is_saved, load_local
from .timesformer import TimeSformer
from .videovit import VideoViT

__all__ = ["SUPPORTED", "from_hf", "from_hf_state_dict", "load"]

log = logging.getLogger(__name__)

SUPPORTED = (
    "VideoMAEForVideoClassification",
    "VideoMAEModel",
    "TimesformerForVideoClassification",
    "TimesformerModel",
    "VivitForVideoClassification",
    "VivitModel",
)

_L = r"encoder\.layer\.(\d+)\."  # a block of the HF encoder
_B = r"blocks.\1."

# Per-block rules both transformers models share (the ViT layer of transformers).
_HF_BLOCK_RULES = [
    (_L + r"attention\.output\.dense\.(weight|bias)", _B + r"attn.proj.\2"),
    (_L + r"layernorm_before\.(weight|bias)", _B + r"norm1.\2"),
    (_L + r"layernorm_after\.(weight|bias)", _B + r"norm2.\2"),
    (_L + r"intermediate\.dense\.(weight|bias)", _B + r"mlp.fc1.\2"),
    (_L + r"output\.dense\.(weight|bias)", _B + r"mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
]

VIDEOMAE_RULES = [
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embed.proj.\1"),
    (_L + r"attention\.attention\.query\.weight", _B + "attn.qkv.weight#q"),
    (_L + r"attention\.attention\.key\.weight", _B + "attn.qkv.weight#k"),
    (_L + r"attention\.attention\.value\.weight", _B + "attn.qkv.weight#v"),
    (_L + r"attention\.attention\.(?:query\.bias|q_bias)", _B + "attn.q_bias"),
    (_L + r"attention\.attention\.(?:value\.bias|v_bias)", _B + "attn.v_bias"),
    (r"fc_norm\.(weight|bias)", r"fc_norm.\1"),
    *_HF_BLOCK_RULES,
]

TIMESFORMER_RULES = [
    (r"embeddings\.cls_token", "embed.cls_token"),
    (r"embeddings\.position_embeddings", "embed.pos_embed"),
    (r"embeddings\.time_embeddings", "embed.time_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embed.proj.\1"),
    (_L + r"temporal_layernorm\.(weight|bias)", _B + r"temporal_norm1.\2"),
    (_L + r"temporal_attention\.attention\.qkv\.(weight|bias)", _B + r"temporal_attn.qkv.\2"),
    (_L + r"temporal_attention\.output\.dense\.(weight|bias)", _B + r"temporal_attn.proj.\2"),
    (_L + r"temporal_dense\.(weight|bias)", _B + r"temporal_fc.\2"),
    (_L + r"attention\.attention\.qkv\.(weight|bias)", _B + r"attn.qkv.\2"),
    *_HF_BLOCK_RULES,
]


_V = r"(?:encoder\.layer|layers)\.(\d+)\."  # a ViViT block: hub files, or transformers >= 5 in memory

VIVIT_RULES = [
    (r"embeddings\.cls_token", "embed.cls_token"),
    (r"embeddings\.position_embeddings", "embed.pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embed.proj.\1"),
    (_V + r"attention\.(?:attention\.query|q_proj)\.(weight|bias)", _B + r"attn.qkv.\2#q"),
    (_V + r"attention\.(?:attention\.key|k_proj)\.(weight|bias)", _B + r"attn.qkv.\2#k"),
    (_V + r"attention\.(?:attention\.value|v_proj)\.(weight|bias)", _B + r"attn.qkv.\2#v"),
    (_V + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", _B + r"attn.proj.\2"),
    (_V + r"layernorm_before\.(weight|bias)", _B + r"norm1.\2"),
    (_V + r"layernorm_after\.(weight|bias)", _B + r"norm2.\2"),
    (_V + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", _B + r"mlp.fc1.\2"),
    (_V + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", _B + r"mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
]

# `VivitModel`'s pooler (dense + tanh on the normed class token) is not part of the backbone: the bare
# model's features are the normed class token, `last_hidden_state[:, 0]`. The released checkpoints are
# classifiers without one (their head reads the class token), so a bare model's pooler is untrained.
_VIVIT_POOLER = "pooler."


def _square(value: Any, what: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise InputError(f"only square {what} are supported, got {tuple(value)}")
        value = value[0]
    return int(value)


# transformers' `hidden_act` -> ours: exact GELU, or one of the three spellings of its tanh approximation
# (equal formulas; "gelu_fast" writes sqrt(2/pi) as 0.7978845608, 3e-12 from it: tests/test_vivit.py).
_ACTS = {"gelu": "gelu", "gelu_fast": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _act(config: Any) -> str:
    if config.hidden_act not in _ACTS:
        raise InputError(
            f"only hidden_act {', '.join(map(repr, _ACTS))} (exact or tanh-approximated GELU) is supported, "
            f"got {config.hidden_act!r}"
        )
    return _ACTS[config.hidden_act]


def _videomae_config(config: Any, num_classes: int) -> BackboneConfig:
    qv_bias = getattr(config, "qv_bias", getattr(config, "qkv_bias", True))
    return BackboneConfig(
        arch="videomae", frames=config.num_frames, size=_square(config.image_size, "image sizes"),
        patch=_square(config.patch_size, "patches"), tubelet=config.tubelet_size, channels=config.num_channels,
        dim=config.hidden_size, depth=config.num_hidden_layers, heads=config.num_attention_heads,
        mlp_dim=config.intermediate_size, pool="mean" if config.use_mean_pooling else "first",
        qkv_bias="qv" if qv_bias else "none", eps=config.layer_norm_eps, fc_norm_eps=1e-5, act=_act(config),
        num_classes=num_classes, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip


def _timesformer_config(config: Any, num_classes: int) -> BackboneConfig:
    if config.attention_type != "divided_space_time":
        raise InputError(
            f"only attention_type='divided_space_time' is supported, got {config.attention_type!r}"
        )
    return BackboneConfig(
        arch="timesformer", frames=config.num_frames, size=_square(config.image_size, "image sizes"),
        patch=_square(config.patch_size, "patches"), channels=config.num_channels, dim=config.hidden_size,
        depth=config.num_hidden_layers, heads=config.num_attention_heads, mlp_dim=config.intermediate_size,
        qkv_bias="qkv" if config.qkv_bias else "none", eps=config.layer_norm_eps, act=_act(config),
        num_classes=num_classes, mean=KINETICS_MEAN, std=KINETICS_STD,
    )  # fmt: skip


def _vivit_config(config: Any, num_classes: int) -> BackboneConfig:
    tubelet, *patch = config.tubelet_size  # (t, h, w)
    # NOTE: mean = std = 0.5 on [0, 1] inputs gives [-1, 1], what ViViT was trained on (Scenic's
    # zero_centering). transformers' VivitImageProcessor maps pixels to [-1, 1] first (rescale 1/127.5,
    # offset) and then normalises again with its 0.5/0.5, feeding [-3, 1]; we follow the original model.
    return BackboneConfig(
        arch="vivit", frames=config.num_frames, size=_square(config.image_size, "image sizes"),
        patch=_square(patch, "patches"), tubelet=tubelet, channels=config.num_channels, dim=config.hidden_size,
        depth=config.num_hidden_layers, heads=config.num_attention_heads, mlp_dim=config.intermediate_size,
        qkv_bias="qkv" if config.qkv_bias else "none", eps=config.layer_norm_eps, act=_act(config),
        num_classes=num_classes, mean=HALF, std=HALF,
    )  # fmt: skip


# transformers family (the class name without its suffix) -> config reader, key map, state-dict prefix
_FAMILIES = {
    "VideoMAE": (_videomae_config, VIDEOMAE_RULES, "videomae."),
    "Timesformer": (_timesformer_config, TIMESFORMER_RULES, "timesformer."),
    "Vivit": (_vivit_config, VIVIT_RULES, "vivit."),
}


def from_hf(model: nn.Module, **config_changes: Any) -> VideoBackbone:
    """Convert a transformers video model into a native backbone with the same weights and outputs.

    Args:
        model: one of `SUPPORTED`. The result has the model's dtype and device.
        **config_changes: `BackboneConfig` fields to override (e.g. `mean`, `std`, `drop_path`).

    Returns:
        `VideoViT` (VideoMAE, ViViT) or `TimeSformer`. For the bare `*Model` classes `num_classes` is 0
        and the head returns pooled features (for `VivitModel` the normed class token, not its pooler's
        output: the pooler is not converted).

    Raises:
        TypeError: the model class is not supported (the message lists the supported ones).
        CheckpointMismatchError: keys or shapes do not fit (all of them listed).
    """
    kind = type(model).__name__
    if kind not in SUPPORTED:
        raise InputError(f"cannot convert {kind}; supported transformers classes: {', '.join(SUPPORTED)}")
    ours = from_hf_state_dict(model.state_dict(), model.config, kind, **config_changes)
    return ours.train(model.training)


def from_hf_state_dict(
    state: Mapping[str, Tensor], hf_config: Any, kind: str, **config_changes: Any
) -> VideoBackbone:
    """Convert the state dict of a transformers video model, e.g. read straight from a hub file.

    Args:
        state: the model's tensors, with or without the `videomae.`/`timesformer.`/`vivit.` prefix, in
            either generation of names (hub files or transformers >= 5 in memory). A `VivitModel`'s
            pooler is left out (logged).
        hf_config: the transformers config (`VideoMAEConfig`, `TimesformerConfig` or `VivitConfig`) it
            belongs to.
        kind: the transformers class the state dict comes from, one of `SUPPORTED`.
        **config_changes: `BackboneConfig` fields to override.

    Returns:
        A native backbone in eval mode, with the dtype and device of the state's tensors.

    Raises:
        ValueError: `kind` is not one of `SUPPORTED`, or the config uses an unsupported feature.
        CheckpointMismatchError: keys or shapes do not fit (all of them listed).
    """
    if kind not in SUPPORTED:
        raise InputError(f"unknown kind {kind!r}; supported transformers classes: {', '.join(SUPPORTED)}")
    classifier = kind.endswith("ForVideoClassification")
    num_classes = hf_config.num_labels if classifier else 0
    read_config, rules, prefix = _FAMILIES[kind.removesuffix("ForVideoClassification").removesuffix("Model")]
    cfg = dataclasses.replace(read_config(hf_config, num_classes), **config_changes)
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    if cfg.arch == "vivit" and any(k.startswith(_VIVIT_POOLER) for k in state):
        log.info("%s: its pooler is not converted (the features are the normed class token)", kind)
        state = {k: v for k, v in state.items() if not k.startswith(_VIVIT_POOLER)}
    mapped, unmatched = remap(state, rules)
    ref = next((v for v in state.values() if v.is_floating_point()), None)
    ours = TimeSformer(cfg) if cfg.arch == "timesformer" else VideoViT(cfg)
    if ref is not None:
        # Before loading, so float64 weights are not rounded through float32.
        ours = ours.to(device=ref.device, dtype=ref.dtype)
    if not classifier and cfg.pool == "mean":
        # A bare VideoMAEModel has no fc_norm: its pooled features are the plain token mean, not a
        # mean through an untrained LayerNorm.
        ours.fc_norm = nn.Identity()
    load_checked(ours, mapped, unmatched=unmatched, source=f"{kind} state dict")
    return ours.eval()


_LOADERS = {
    "VideoMAEForVideoClassification": "VideoMAEForVideoClassification",
    "VideoMAEModel": "VideoMAEModel",
    "VideoMAEForPreTraining": "VideoMAEModel",  # the encoder of a pre-training checkpoint
    "TimesformerForVideoClassification": "TimesformerForVideoClassification",
    "TimesformerModel": "TimesformerModel",
    "VivitForVideoClassification": "VivitForVideoClassification",
    "VivitModel": "VivitModel",
}


def load(name_or_path: str | Path, *, revision: str | None = None, **config_changes: Any) -> VideoBackbone:
    """Load a model: a tokensieve saved model, a training run, or a transformers checkpoint.

    What `name_or_path` is decides how it loads:
    - "builtin:synthetic": the reference model shipped with tokensieve (`tokensieve.assets`);
    - a folder written by `ts.save` (it holds `tokensieve.json`): backbone, plan and weights;
    - a training run's folder (it holds `last.pt`) or a checkpoint file of a run (`last.pt`,
      `step-*.pt`): the model and plan as trained, at its latest step;
    - a released HaltingVT checkpoint file (mmaction2/mmengine, `backbone.model.` keys): its bare
      backbone, the config read off the tensors (`mmaction.py`; pass `heads=` for a width that is not
      a multiple of 64); the equivalent `halting:` plan is logged, for `ts.apply`;
    - an MViT v1 checkpoint file: pySlowFast's or STTS's (`model_state`, optionally `cfg`) or the state
      dict of torchvision's `mvit_v1_b`, the config read off the tensors (`mvit_weights.py`);
    - otherwise a transformers checkpoint, a hub id or a `save_pretrained` folder, loaded through
      transformers. The normalisation it expects (`image_mean`/`image_std` of its preprocessor
      config, when present) is carried in the returned model's config.

    Args:
        name_or_path: see above.
        revision: hub revision (transformers checkpoints only).
        **config_changes: `BackboneConfig` fields to override (e.g. `frames`, `size`).

    Returns:
        A native backbone in eval mode, with its plan installed when it was saved or trained with one.

    Raises:
        ImportError: transformers is not installed (`pip install tokensieve[hf]`) and a transformers
            checkpoint was asked for.
        InputError: the architecture is not supported; a damaged, foreign or incomplete saved model
            or checkpoint (one line naming the file).
        CheckpointMismatchError: the weights do not fit the model (all keys listed).
    """
    from .. import assets

    if assets.is_builtin(name_or_path):
        if revision is not None:
            raise InputError(f"{name_or_path} is a built-in model: revision= applies to hub ids only")
        return assets.load(str(name_or_path), **config_changes)
    local = Path(name_or_path)
    if local.is_file() or is_saved(local) or is_run(local):
        if revision is not None:
            raise InputError(f"{local} is a local tokensieve model or run: revision= applies to hub ids only")
        return load_local(local, **config_changes)
    if not local.exists() and (
        str(name_or_path).count("/") > 1 or str(name_or_path).startswith((".", "/", "~"))
    ):
        raise InputError(
            f"{name_or_path}: no such file or folder (and not a hub id, which is namespace/name)"
        )
    if local.is_dir() and not (local / "config.json").is_file():
        raise InputError(
            f"{local} is not a model folder: no {CONFIG_FILE} (ts.save), {RUN_CHECKPOINT} (a training run) "
            "or config.json (transformers save_pretrained)"
        )
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("ts.load needs transformers: pip install 'tokensieve[hf]'") from err
    name = str(name_or_path)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(name, revision=revision)
    except ValueError as err:  # a config.json transformers cannot read (unknown model_type, ...)
        raise InputError(f"{name}: {str(err).strip().splitlines()[0]}") from err
    architectures = list(getattr(hf_config, "architectures", None) or [])
    arch = next((a for a in architectures if a in _LOADERS), None)
    if arch is None:
        raise InputError(
            f"{name}: architecture {architectures or hf_config.model_type!r} is not supported; "
            f"supported: {', '.join(_LOADERS)}"
        )
    cls = getattr(transformers, _LOADERS[arch])
    hf_model = cls.from_pretrained(name, revision=revision, attn_implementation="eager").eval()
    changes = {**_preprocessor_norm(name, revision), **config_changes}
    return from_hf(hf_model, **changes)


def _preprocessor_norm(name: str, revision: str | None) -> dict[str, tuple[float, float, float]]:
    """`mean`/`std` from the checkpoint's preprocessor config, or {} when it has none."""
    local = Path(name)
    for filename in ("preprocessor_config.json", "video_preprocessor_config.json"):
        if local.is_dir():
            path = local / filename
        else:
            try:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(name, filename, revision=revision))
            except Exception:  # no such file on the hub, or offline
                continue
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        if "image_mean" in data and "image_std" in data:
            return {"mean": _triple(data["image_mean"]), "std": _triple(data["image_std"])}
    log.info(
        "%s has no preprocessor config with image_mean/image_std; keeping the architecture's default", name
    )
    return {}


def _triple(value: float | list[float]) -> tuple[float, float, float]:
    values = value if isinstance(value, list) else [value] * 3
    return tuple(float(v) for v in values)  # type: ignore[return-value]
