"""Backbone configuration and the preset registry: presets are rows of one table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..errors import InputError
from .layers import ACTS, Act, QkvBias

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "BackboneConfig", "preset"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINETICS_MEAN = (0.45, 0.45, 0.45)  # TimeSformer's normalisation
KINETICS_STD = (0.225, 0.225, 0.225)
HALF = (0.5, 0.5, 0.5)  # HaltingVT's and ViViT's normalisation: mean = std = 127.5 on 0-255 pixels

Arch = Literal["videomae", "vit-cls", "timesformer", "vivit", "mvit", "swin"]
ARCHS = ("videomae", "vit-cls", "timesformer", "vivit", "mvit", "swin")
NO_CLS = ("videomae", "swin")  # the archs without a class token
Pool = Literal["mean", "first", "cls"]
KvPool = Literal["all", "strided"]
KV_POOLS = ("all", "strided")


@dataclass(frozen=True)
class BackboneConfig:
    """Everything that fixes a backbone's shape and numerics.

    Attributes:
        arch: "videomae" (joint attention, Conv3d tubelets, fixed sin-cos positions, no class token),
            "vit-cls" (joint attention, per-frame Conv2d patches, class token, learned spatial
            positions shared by frames plus a learned time embedding: image-initialised joint
            models such as HaltingVT's), "timesformer" (divided space-time attention) or "vivit" (ViViT's
            model 1: joint attention, Conv3d tubelets, class token, learned positions over the whole
            sequence, the class token's included) or "mvit" (MViT v1: overlapping Conv3d patches, class
            token, separable learned positions, pooling attention in stages; `backbones/mvit.py`) or "swin"
            (Video Swin: Conv3d patches + LayerNorm, no class token, no absolute positions, shifted-window
            attention with a relative position bias, patch merging between stages; `backbones/swin.py`).
        frames, size: input clip length and square frame side the positions are built for (`grid`); the
            model runs at any other the tubelet and patch divide (`grid_of`).
        patch, tubelet: spatial patch side and temporal tubelet length (1 for per-frame patches; arch
            "videomae", "vivit" and "mvit" only may have more). For "mvit" they are the patch
            convolution's strides (its kernel is 2 * stride - 1: MViT-B's 3x7x7 at stride 2x4x4).
        dim, heads, mlp_dim: width, heads and MLP width of the blocks; for "mvit" and "swin" those of
            the first stage (each later stage doubles all three: `width`, `heads_at`).
        pool: "mean" (mean of tokens, then `fc_norm`; "swin": the final norm on every token, then the
            mean), "first" (final norm, token 0: VideoMAE without mean pooling) or "cls" (final norm,
            class token).
        qkv_bias: "qv" for VideoMAE (no key bias), "qkv" for timm/TimeSformer, "none".
        eps: LayerNorm epsilon of the blocks and the final norm; `fc_norm_eps` for `fc_norm`.
        act: the MLP's activation: "gelu" (exact, erf) or "gelu_tanh" (its tanh approximation: ViViT's,
            Flax's default `nn.gelu`).
        num_classes: classifier outputs; 0 means no classifier (the head returns pooled features).
        mean, std: per-channel normalisation the weights expect (inputs in [0, 1] before it).
        divided: arch "timesformer" only: how many leading blocks use divided space-time attention, the
            later ones joint attention over every token (HaltingVT: 2, its Glimpser stage); None: all.
        stages: arch "mvit" and "swin" only: the blocks that start a new stage (MViT-B: 1, 3, 14; Swin-B:
            2, 4, 22). An MViT stage's first block pools its queries at stride (1, 2, 2) (its skip
            connection by a max-pool), and has twice the previous stage's width and heads (the block
            before it widens the tokens in its MLP); a Swin stage's first block opens with the patch
            merging (2x2 tokens of each frame into one of twice the width), then has twice the heads.
        window: arch "swin" only: the attention window (t, h, w) in tokens (K400: (8, 7, 7); SSv2
            (16, 7, 7)); every other block shifts it by half (`window // 2`).
        kv_stride: arch "mvit": the key/value pooling stride of the first stage (MViT-B: (1, 8, 8)),
            divided by 2 spatially at each stage (at least 1), as pySlowFast's `POOL_KV_STRIDE_ADAPTIVE`.
        kv_pool: arch "mvit": "all" (every block pools keys and values with its 3x3x3 convolution, also
            at stride 1: STTS and torchvision) or "strided" (only blocks whose kv stride exceeds 1: the
            original pySlowFast config of the MViT-B 16x4 zoo file).
        pool_eps: arch "mvit": LayerNorm epsilon after each pooling convolution (pySlowFast and STTS: 1e-5,
            torchvision: 1e-6; a checkpoint keeps its source's).
    """

    arch: Arch
    frames: int
    size: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    patch: int = 16
    tubelet: int = 1
    channels: int = 3
    pool: Pool = "cls"
    qkv_bias: QkvBias = "qkv"
    eps: float = 1e-6
    fc_norm_eps: float = 1e-5
    act: Act = "gelu"
    num_classes: int = 400
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    divided: int | None = None
    stages: tuple[int, ...] = ()
    kv_stride: tuple[int, int, int] = (1, 1, 1)
    kv_pool: KvPool = "all"
    pool_eps: float = 1e-5
    window: tuple[int, int, int] = (8, 7, 7)

    def __post_init__(self) -> None:
        has_cls = self.arch not in NO_CLS
        if self.arch not in ARCHS:
            raise InputError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if has_cls and self.pool != "cls":
            raise InputError(
                f"arch {self.arch!r} reads out its class token: pool must be 'cls', got {self.pool!r}"
            )
        if self.arch == "swin" and self.pool != "mean":
            raise InputError(
                f"arch 'swin' reads out the mean of its tokens: pool must be 'mean', got {self.pool!r}"
            )
        if not has_cls and self.pool not in ("mean", "first"):
            raise InputError(
                f"arch 'videomae' has no class token: pool must be 'mean' or 'first', got {self.pool!r}"
            )
        if self.arch in ("vit-cls", "timesformer") and self.tubelet != 1:
            raise InputError(
                f"arch {self.arch!r} embeds every frame on its own: tubelet must be 1, got {self.tubelet}"
            )
        if self.frames % self.tubelet:
            raise InputError(f"frames ({self.frames}) must be divisible by the tubelet ({self.tubelet})")
        if self.size % self.patch:
            raise InputError(f"size ({self.size}) must be divisible by the patch ({self.patch})")
        if self.dim % self.heads:
            raise InputError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.act not in ACTS:
            raise InputError(f"act must be one of {', '.join(ACTS)}, got {self.act!r}")
        if self.divided is not None and self.arch != "timesformer":
            raise InputError(f"divided sets TimeSformer's divided blocks; arch {self.arch!r} has none")
        if self.divided is not None and not 0 <= self.divided <= self.depth:
            raise InputError(f"divided must be in 0..depth ({self.depth}), got {self.divided}")
        if self.stages and self.arch not in ("mvit", "swin"):
            raise InputError(
                f"stages sets MViT's pooling stages and Swin's merging stages; arch {self.arch!r} has none"
            )
        if len(self.window) != 3 or min(self.window) < 1:
            raise InputError(f"window must be three sizes >= 1 (t, h, w), got {self.window}")
        if self.arch == "swin" and (self.qkv_bias == "qv" or self.act != "gelu"):
            raise InputError("arch 'swin' has a bias on all of q, k and v or on none and the exact GELU")
        if list(self.stages) != sorted(set(self.stages)) or not all(0 < s < self.depth for s in self.stages):
            raise InputError(
                f"stages must be increasing blocks in 1..depth-1 ({self.depth - 1}), got {self.stages}"
            )
        if len(self.kv_stride) != 3 or min(self.kv_stride) < 1:
            raise InputError(f"kv_stride must be three strides >= 1 (t, h, w), got {self.kv_stride}")
        if self.kv_pool not in KV_POOLS:
            raise InputError(f"kv_pool must be one of {', '.join(KV_POOLS)}, got {self.kv_pool!r}")
        if self.arch == "mvit" and self.qkv_bias == "qv":
            raise InputError(
                "arch 'mvit' has a bias on all of q, k and v or on none: qkv_bias must be 'qkv' or 'none'"
            )
        if self.arch in ("mvit", "swin") and self.mlp_dim % self.dim:
            raise InputError(
                f"arch {self.arch!r} widens its MLP by a ratio: mlp_dim ({self.mlp_dim}) must be a multiple of dim"
            )

    @property
    def grid(self) -> tuple[int, int, int]:
        """(T, H, W) token grid of a `frames` x `size` x `size` clip."""
        side = self.size // self.patch
        return (self.frames // self.tubelet, side, side)

    def grid_of(self, frames: int, size: int | tuple[int, int]) -> tuple[int, int, int]:
        """(T, H, W) token grid of a clip of `frames` frames of `size` (a side, or (height, width)): any
        frame count the tubelet divides and any frame size the patch divides (positions are carried to
        the grid by each backbone's rule: docs/design.md, "Input sizes").

        Raises:
            InputError: a count or side the tubelet or patch does not divide, or smaller than it.
        """
        height, width = (size, size) if isinstance(size, int) else size
        if frames % self.tubelet:
            raise InputError(f"frames ({frames}) must be divisible by the tubelet size {self.tubelet}")
        if height % self.patch or width % self.patch:
            raise InputError(f"frame size {height}x{width} must be divisible by the patch size {self.patch}")
        if frames < self.tubelet or min(height, width) < self.patch:
            raise InputError(
                f"a clip needs at least {self.tubelet} frame(s) of at least {self.patch}x{self.patch} pixels, "
                f"got {frames} of {height}x{width}"
            )
        return (frames // self.tubelet, height // self.patch, width // self.patch)

    @property
    def divided_blocks(self) -> int:
        """How many leading blocks use divided space-time attention."""
        if self.arch != "timesformer":
            return 0
        return self.depth if self.divided is None else self.divided

    @property
    def has_cls(self) -> bool:
        return self.arch not in NO_CLS

    def width(self, position: int) -> int:
        """Channels of the tokens before block `position` (`depth`: after the last block): `dim`, doubled
        at each stage started by then (MViT widens the tokens in the block before a stage, Swin in the
        patch merging that ends the stage before)."""
        return self.dim * 2 ** sum(s <= position for s in self.stages)

    def heads_at(self, block: int) -> int:
        """Attention heads of `block` (their width stays dim / heads): doubled at every stage started."""
        return self.heads * 2 ** sum(s <= block for s in self.stages)


def _videomae(dim: int, depth: int, heads: int) -> BackboneConfig:
    # NOTE: block eps 1e-6 as in the original VideoMAE code; the hub configs say 1e-12 and a
    # converted checkpoint keeps whatever its config says.
    return BackboneConfig(
        arch="videomae", frames=16, size=224, patch=16, tubelet=2, dim=dim, depth=depth, heads=heads,
        mlp_dim=4 * dim, pool="mean", qkv_bias="qv", num_classes=400,
    )  # fmt: skip


_TINY = {
    "dim": 32,
    "depth": 3,
    "heads": 2,
    "mlp_dim": 64,
    "frames": 4,
    "size": 32,
    "patch": 8,
    "num_classes": 10,
}

# MViT-B (Fan et al. 2021) as STTS fine-tunes it: 16 blocks, stages at 1, 3, 14; pySlowFast's stochastic depth.
_MVIT_B = {
    "arch": "mvit", "size": 224, "patch": 4, "tubelet": 2, "dim": 96, "depth": 16, "heads": 1, "mlp_dim": 384,
    "stages": (1, 3, 14), "kv_stride": (1, 8, 8), "drop_path": 0.2, "mean": KINETICS_MEAN, "std": KINETICS_STD,
}  # fmt: skip

_SWIN = {"arch": "swin", "frames": 32, "size": 224, "patch": 4, "tubelet": 2, "pool": "mean", "eps": 1e-5}

PRESETS: dict[str, BackboneConfig] = {
    "videomae-s": _videomae(384, 12, 6),
    "videomae-b": _videomae(768, 12, 12),
    "videomae-l": _videomae(1024, 24, 16),
    "videomae-h": _videomae(1280, 32, 16),
    "timesformer-b": BackboneConfig(
        arch="timesformer", frames=8, size=224, dim=768, depth=12, heads=12, mlp_dim=3072,
        mean=KINETICS_MEAN, std=KINETICS_STD,
    ),
    "joint-deit-s": BackboneConfig(arch="vit-cls", frames=8, size=224, dim=384, depth=12, heads=6, mlp_dim=1536),
    # HaltingVT (Wu et al. 2023): DeiT-S, 2 divided blocks (the Glimpser stage) then 10 joint; Mini-Kinetics.
    "haltingvt-s": BackboneConfig(
        arch="timesformer", frames=8, size=224, dim=384, depth=12, heads=6, mlp_dim=1536, divided=2,
        num_classes=200, drop_path=0.1, mean=HALF, std=HALF,
    ),
    # Image ViTs (Dosovitskiy et al.) as one-frame videos, as TokenLearner applies them: timm-named
    # weights load with ts.load_image_weights; depth is a config change (`depth=22`).
    **{
        f"vit-{width}{patch}-{size}": BackboneConfig(
            arch="vit-cls", frames=1, size=size, patch=patch, num_classes=1000, mean=HALF, std=HALF,
            **({"dim": 384, "heads": 6, "mlp_dim": 1536} if width == "s" else {"dim": 768, "heads": 12, "mlp_dim": 3072}),
            depth=12,
        )
        for width, patch in (("s", 32), ("b", 32), ("b", 16))
        for size in (384, 224)
    },
    # ViViT-B/16x2, model 1 (Arnab et al. 2021), as google/vivit-b-16x2-kinetics400: 32x224, 3137 tokens.
    "vivit-b": BackboneConfig(
        arch="vivit", frames=32, size=224, tubelet=2, dim=768, depth=12, heads=12, mlp_dim=3072,
        act="gelu_tanh", mean=HALF, std=HALF,
    ),
    # MViT-B 16x4 (8 x 56 x 56 tokens) and 32x3 (16 temporal slices: the MViT paper's 16-block 32x3).
    "mvit-b-16x4": BackboneConfig(frames=16, **_MVIT_B),
    "mvit-b-32x3": BackboneConfig(frames=32, **_MVIT_B),
    # Video Swin (Liu et al. 2022) as released: K400 32x224 (16 x 56 x 56 tokens), window 8x7x7; depths
    # 2/2/6/2 (T) and 2/2/18/2 (S, B); stochastic depth 0.2 (`drop_path_rate` of the released base model
    # config and of STTS's Swin-B recipes; it matters for training only).
    "swin3d-t": BackboneConfig(**_SWIN, dim=96, depth=12, heads=3, mlp_dim=384, stages=(2, 4, 10), drop_path=0.2),
    "swin3d-s": BackboneConfig(**_SWIN, dim=96, depth=24, heads=3, mlp_dim=384, stages=(2, 4, 22), drop_path=0.2),
    "swin3d-b": BackboneConfig(**_SWIN, dim=128, depth=24, heads=4, mlp_dim=512, stages=(2, 4, 22), drop_path=0.2),
    # Swin-B for Something-Something v2: 32 frames (16 slices), window 16x7x7, 174 classes.
    "swin3d-b-ssv2": BackboneConfig(
        **{**_SWIN, "window": (16, 7, 7), "num_classes": 174}, dim=128, depth=24, heads=4, mlp_dim=512,
        stages=(2, 4, 22), drop_path=0.2,
    ),
    # Tiny presets for tests: a few thousand parameters, clips of 4 frames of 32x32.
    "videomae-tiny": BackboneConfig(arch="videomae", tubelet=2, pool="mean", qkv_bias="qv", **_TINY),
    "timesformer-tiny": BackboneConfig(arch="timesformer", **_TINY),
    "joint-tiny": BackboneConfig(arch="vit-cls", **_TINY),
    "haltingvt-tiny": BackboneConfig(arch="timesformer", **{**_TINY, "depth": 4}, divided=2),
    "vivit-tiny": BackboneConfig(arch="vivit", tubelet=2, act="gelu_tanh", **_TINY),
    # MViT-B's shape in small: 8 frames of 32x32 -> 4 x 8 x 8 tokens, pooled to 4x4 at block 1, 2x2 at block 3,
    # then a block that does not pool (the last block's query pooling would only shape tokens nobody reads).
    "mvit-tiny": BackboneConfig(
        arch="mvit", frames=8, size=32, patch=4, tubelet=2, dim=8, depth=5, heads=1, mlp_dim=32, stages=(1, 3),
        kv_stride=(1, 4, 4), num_classes=10, mean=KINETICS_MEAN, std=KINETICS_STD,
    ),
    # Video Swin's shape in small: 8 frames of 32x32 -> 4 x 8 x 8 tokens, window 2x3x3 (every stage pads:
    # 8 -> 9, then 4 -> 6), merged to 4x4 at block 2 and 2x2 at block 4 (where the window shrinks to 2x2
    # and its spatial shift to 0).
    "swin3d-tiny": BackboneConfig(
        arch="swin", frames=8, size=32, patch=4, tubelet=2, dim=8, depth=5, heads=1, mlp_dim=16, stages=(2, 4),
        window=(2, 3, 3), pool="mean", eps=1e-5, num_classes=10,
    ),
}  # fmt: skip


def preset(name: str, **changes: object) -> BackboneConfig:
    """The config of a registered preset, with `changes` applied (e.g. `num_classes=174`)."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(BackboneConfig)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise InputError(f"unknown config field(s) {unknown}; valid fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(PRESETS[name], **changes)
