"""Initialise a class-token video backbone from an image ViT/DeiT checkpoint in timm naming.

Read with safetensors or `torch.load(weights_only=True)`; timm itself is never imported. The
learned time embedding is not in an image checkpoint and stays as initialised (zeros), so at
initialisation every frame is treated alike. For TimeSformer, the temporal attention and its norm
of every divided block start as copies of the spatial ones and `temporal_fc` at zero, as the original
TimeSformer code initialises from ViT (so the divided blocks compute the image model's function frame
by frame). Joint blocks (`BackboneConfig.divided`, HaltingVT) have no temporal part: they take the
image block as it is.

NOTE: the released TimeSformer and HaltingVT code zero `temporal_fc` in a loop over
`self.blocks.modules()` that skips the first module it matches, which reads as "every block but the
first". The first module that loop visits is the `ModuleList` itself (its text names the blocks), so
every divided block's `temporal_fc` ends at zero there too: zeroing all of them is the released
behaviour, not a deviation from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError
from .base import VideoBackbone
from .checkpoint import load_checked, remap

__all__ = ["TIMM_VIT_RULES", "load_image_weights", "read_state_dict"]

TIMM_VIT_RULES = [
    (r"cls_token", "embed.cls_token"),
    (r"pos_embed", "embed.pos_embed"),
    (r"patch_embed\.proj\.(weight|bias)", r"embed.proj.\1"),
    (
        r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
        r"blocks.\1.\2.\3",
    ),
    (r"norm\.(weight|bias)", r"norm.\1"),
    (r"head\.(weight|bias)", r"head.\1"),
]


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` file or a torch checkpoint (unwrapping `model`/`state_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InputError(
            f"{path} holds no state dict of tensors (looked under 'model', 'state_dict', 'module')"
        )
    return obj


def load_image_weights(
    model: VideoBackbone, checkpoint: str | Path | Mapping[str, Tensor], *, load_head: bool = False
) -> VideoBackbone:
    """Copy an image ViT's weights (timm naming) into a class-token video backbone, in place.

    Args:
        model: a `VideoViT` with arch "vit-cls" or a `TimeSformer` of the same width and depth.
        checkpoint: a file path (`.safetensors`, `.pth`, `.bin`) or a state dict.
        load_head: also copy the classifier (only when the class counts agree; usually the image
            head is discarded and the video head trained).

    Returns:
        `model`, for chaining.

    Raises:
        CheckpointMismatchError: keys or shapes that do not fit, all listed (a checkpoint made for
            another image size fails on `embed.pos_embed`).
    """
    if model.config.arch not in ("vit-cls", "timesformer"):
        raise InputError(
            f"image weights fit class-token backbones (arch 'vit-cls' or 'timesformer'), not {model.config.arch!r}"
        )
    state = read_state_dict(checkpoint) if isinstance(checkpoint, (str, Path)) else dict(checkpoint)
    if not load_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    mapped, unmatched = remap(state, TIMM_VIT_RULES)
    optional = {"embed.time_embed"} | ({"head.weight", "head.bias"} if not load_head else set())
    if model.config.arch == "timesformer":
        for i in range(model.config.divided_blocks):  # joint blocks have no temporal part
            for part in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
                src = f"blocks.{i}.attn.{part}"
                if src in mapped:
                    mapped[f"blocks.{i}.temporal_attn.{part}"] = mapped[src]
            for part in ("weight", "bias"):
                if f"blocks.{i}.norm1.{part}" in mapped:
                    mapped[f"blocks.{i}.temporal_norm1.{part}"] = mapped[f"blocks.{i}.norm1.{part}"]
                fc = model.blocks[i].temporal_fc
                mapped[f"blocks.{i}.temporal_fc.{part}"] = torch.zeros_like(getattr(fc, part))
    load_checked(model, mapped, unmatched=unmatched, optional=optional, source="image checkpoint")
    return model
