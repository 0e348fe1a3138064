"""Native video backbones and the preset registry."""

from __future__ import annotations

from .base import VideoBackbone
from .config import PRESETS, BackboneConfig, preset
from .mvit import MViT
from .swin import Swin3D
from .timesformer import TimeSformer
from .videovit import VideoViT

__all__ = [
    "PRESETS",
    "BackboneConfig",
    "MViT",
    "Swin3D",
    "TimeSformer",
    "VideoBackbone",
    "VideoViT",
    "build",
    "build_from_config",
]

_ARCHS: dict[str, type[VideoBackbone]] = {
    "videomae": VideoViT,
    "vit-cls": VideoViT,
    "timesformer": TimeSformer,
    "vivit": VideoViT,
    "mvit": MViT,
    "swin": Swin3D,
}


def build_from_config(config: BackboneConfig) -> VideoBackbone:
    """A backbone with random weights for `config`."""
    return _ARCHS[config.arch](config)


def build(name: str, **changes: object) -> VideoBackbone:
    """A registered preset with random weights.

    Args:
        name: preset name (`tokensieve.PRESETS` lists them), e.g. "videomae-b".
        **changes: config fields to override, e.g. `num_classes=174`, `drop_path=0.1`.

    Raises:
        KeyError: unknown preset (the message lists the valid ones).
        TypeError: unknown config field.
    """
    return build_from_config(preset(name, **changes))
