"""tokensieve: fewer tokens, faster video transformers.

import tokensieve as ts
model = ts.build("videomae-b", num_classes=400)   # or ts.load(hub_id, saved model or run), ts.from_hf(model)
ts.flops(model, frames=16, size=224)              # GFLOPs per clip (multiply-add = 1 FLOP)
ts.oracle(model, video, labels)                   # (B, N) Grad-CAM value of every token (LITE's oracle)
ts.benchmark(model)                               # clips/s, median of repeats
ts.save(model, "my-model")                        # backbone config + plan spec + weights
ts.viz.save(ts.viz.kept_tokens(model, clip), "kept.png")  # what a plan keeps, drops and merges
"""

from __future__ import annotations

import logging

from . import assets, data, metrics, ops, rng, viz
from .backbones import PRESETS, BackboneConfig, MViT, Swin3D, TimeSformer, VideoBackbone, VideoViT, build
from .backbones.hf import from_hf, load
from .backbones.image_init import load_image_weights
from .backbones.saved import save
from .bench import benchmark
from .engine.calibrate import calibrate
from .engine.evaluate import evaluate
from .engine.sweep import sweep
from .engine.train import train
from .errors import InputError
from .flops import flops
from .oracle import oracle
from .reducers import REGISTRY as METHODS
from .reducers import apply, plan
from .tokens import TokenState

__all__ = [
    "METHODS",
    "PRESETS",
    "BackboneConfig",
    "InputError",
    "MViT",
    "Swin3D",
    "TimeSformer",
    "TokenState",
    "VideoBackbone",
    "VideoViT",
    "apply",
    "assets",
    "benchmark",
    "build",
    "calibrate",
    "data",
    "evaluate",
    "flops",
    "from_hf",
    "load",
    "load_image_weights",
    "metrics",
    "ops",
    "oracle",
    "plan",
    "rng",
    "save",
    "sweep",
    "train",
    "viz",
]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
