"""GFLOPs in the video papers' convention, counted from what actually executes.

Convention (VideoMAE, STA, STTS, HaltingVT tables): one multiply-add = one FLOP; every matrix
product counts, including the two attention products QK^T and AV; one clip (one view) per number.
Softmax, activations and additions do not count. Layer norms count 5 FLOPs per element (4 without
affine), as fvcore counts them: the published numbers were measured with fvcore, and without the
norms ViT-H would come out at 1191.0 instead of the published 1192 (ViT-B: 180.3 vs 180.5, both
"180"). `FlopCount.by_op` keeps the norms apart from the matrix products.

The counter is a `TorchDispatchMode` that sees every aten operator the forward pass runs, with its
real shapes, so whatever a reducer does (a scorer MLP, a similarity matmul, fewer tokens after
pruning) is counted without the reducer declaring anything. Attribution to the model's parts
(`embed`, `blocks`, `reducers.<p>`, readout) comes from module hooks.

Counted operators: mm, addmm, bmm, baddbmm, convolution, every fused SDPA kernel (CPU flash, CUDA
flash / memory-efficient / cuDNN) and layer norm. The SDPA math fallback (used on the meta device)
decomposes into bmm and is counted there.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import InputError
from .tokens import Inputs

__all__ = ["FlopCount", "count_flops", "flops", "register_cpu_sdpa_formula", "uncounted"]

aten = torch.ops.aten


def _mm(a: Tensor, b: Tensor) -> int:
    return a.shape[0] * a.shape[1] * b.shape[1]


def _bmm(a: Tensor, b: Tensor) -> int:
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _conv(x: Tensor, w: Tensor, out: Tensor, transposed: bool) -> int:
    # Each output element of a (non-transposed) conv is a dot product of Cin/groups * prod(kernel).
    kernel = math.prod(w.shape[2:])
    if transposed:
        return x.numel() * w.shape[1] * kernel
    return out.numel() * w.shape[1] * kernel


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> int:
    # q (B, nh, Nq, hd), k (B, nh_kv, Nk, hd), v (B, nh_kv, Nk, hdv): QK^T and AV.
    B, nh, Nq, hd = q.shape
    Nk, hdv = k.shape[-2], v.shape[-1]
    return B * nh * Nq * Nk * (hd + hdv)


_SDPA_OPS = {
    getattr(aten, name)
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    if hasattr(aten, name)
}


def _macs(func: object, args: tuple, out: object) -> tuple[str, int]:
    """(kind, multiply-adds) of one aten call; kind is "matmul", "conv", "attention" or "norm"."""
    packet = getattr(func, "overloadpacket", None)
    if packet is aten.mm:
        return "matmul", _mm(args[0], args[1])
    if packet is aten.addmm:
        return "matmul", _mm(args[1], args[2])
    if packet is aten.bmm:
        return "matmul", _bmm(args[0], args[1])
    if packet is aten.baddbmm:
        return "matmul", _bmm(args[1], args[2])
    if packet is aten.convolution:
        return "conv", _conv(args[0], args[1], out, bool(args[6]))
    if packet in _SDPA_OPS:
        return "attention", _sdpa(args[0], args[1], args[2])
    if packet is aten.native_layer_norm:
        affine = len(args) > 2 and args[2] is not None
        return "norm", args[0].numel() * (5 if affine else 4)
    return "", 0


@dataclass
class FlopCount:
    """Multiply-adds of one counted run.

    Attributes:
        macs: total multiply-adds of the run (all clips of the batch).
        by_module: multiply-adds per part of the model (`embed`, `blocks`, `reducers.3`, `head`, ...).
        by_op: multiply-adds per kind of operator ("matmul", "conv", "attention", "norm").
        clips: clips in the batch that was run.
        per_clip: GFLOPs of each clip when counted clip by clip (`flops(model, video=batch)`): they
            differ when the plan's cost depends on the clip (an adaptive budget); empty otherwise.
    """

    macs: int = 0
    by_module: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    by_op: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    clips: int = 1
    per_clip: tuple[float, ...] = ()

    @property
    def gflops(self) -> float:
        """GFLOPs per clip in the papers' convention (multiply-add = 1 FLOP): the mean over the clips."""
        return self.macs / self.clips / 1e9

    def add(self, other: FlopCount) -> FlopCount:
        """This count with `other`'s (another run) added in: multiply-adds, parts and clips."""
        for mine, theirs in ((self.by_module, other.by_module), (self.by_op, other.by_op)):
            for key, value in theirs.items():
                mine[key] += value
        self.macs += other.macs
        self.clips += other.clips
        return self

    def share(self, prefix: str) -> float:
        """Fraction of the multiply-adds spent in parts whose name starts with `prefix`."""
        part = sum(v for k, v in self.by_module.items() if k.startswith(prefix))
        return part / self.macs if self.macs else 0.0


_PAUSED: list[bool] = []
"""Non-empty while an `uncounted` block runs."""


@contextmanager
def uncounted() -> Iterator[None]:
    """Nothing run inside the block is counted by an enclosing `count_flops`: work that is not part of
    a method's inference cost, such as the oracle's privileged gradient pass (`tokensieve.oracle`),
    which uses the true label and so could never run at inference."""
    _PAUSED.append(True)
    try:
        yield
    finally:
        _PAUSED.pop()


class _Counter(TorchDispatchMode):
    def __init__(self, result: FlopCount, scope: list[str]) -> None:
        super().__init__()
        self.result = result
        self.scope = scope

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        kind, macs = _macs(func, args, out)
        if macs and not _PAUSED:
            self.result.macs += macs
            self.result.by_op[kind] += macs
            self.result.by_module[self.scope[-1] if self.scope else "other"] += macs
        return out


def _tracked(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The parts flops are attributed to: direct children (the members of a list under the list's
    name, since a `ModuleList` is never called itself), and each reducer slot on its own (a reducer's
    work, its scorer included, is its slot's)."""
    for name, child in model.named_children():
        if name == "plan":  # the reducers themselves: each runs through its slot, counted there
            continue
        if name == "reducers":
            for pos, reducer in child.named_children():
                if not isinstance(reducer, nn.Identity):
                    yield f"reducers.{pos}", reducer
        elif isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            for member in child.children():
                yield name, member
        else:
            yield name, child


@contextmanager
def count_flops(model: nn.Module, *, clips: int = 1) -> Iterator[FlopCount]:
    """Count the multiply-adds of everything run inside the block.

    Example:
        with count_flops(model, clips=video.shape[0]) as fc:
            model(video)
        fc.gflops
    """
    result = FlopCount(clips=clips)
    scope: list[str] = []
    handles = []

    def leave(_module: nn.Module, _args: object, _out: object) -> None:
        scope.pop()  # a hook that returned something would replace the module's output

    for name, module in _tracked(model):
        handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: scope.append(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with _Counter(result, scope):
            yield result
    finally:
        for handle in handles:
            handle.remove()


def flops(
    model: nn.Module,
    *,
    frames: int | None = None,
    size: int | tuple[int, int] | None = None,
    video: Tensor | None = None,
    detail: bool = False,
) -> float | FlopCount:
    """GFLOPs per clip of `model` (with its installed plan), counted from one forward pass in eval
    mode (the model's mode is restored).

    Args:
        model: a tokensieve backbone (any module taking (B, T, C, H, W) works).
        frames, size: clip length and frame side (or (height, width)) of a random batch-1 input; default
            the model's configured input. Any other the model runs at counts its own token grid (the
            positions are carried to it: docs/design.md, "Input sizes"). Ignored when `video` is given.
        video: a real (B, T, C, H, W) batch to count on, for methods whose cost depends on content.
            Each clip is counted on its own, from the tokens it really keeps (padding of a ragged
            batch never counts): `FlopCount.per_clip` holds each clip's GFLOPs, the number returned
            is their mean.
        detail: return the `FlopCount` (per-part breakdown, per-clip GFLOPs) instead of the number.

    Returns:
        GFLOPs per clip (multiply-add = 1 FLOP, attention included; the mean over the clips of
        `video`), or the `FlopCount`.

    A model built on the meta device (`with torch.device("meta"): ts.build(...)`) is counted
    without computing anything. A plan that reads the labels (`Reducer.wants_labels`, an oracle) is
    given placeholder labels (class 0): its fixed budget does not depend on them, and its privileged
    pass is not counted (`uncounted`).
    """
    if video is None:
        cfg = getattr(model, "config", None)
        frames = frames or getattr(cfg, "frames", None)
        size = size or getattr(cfg, "size", None)
        if frames is None or size is None:
            raise InputError("pass frames= and size= (or video=) for a model without a tokensieve config")
        param = next(model.parameters())
        channels = getattr(cfg, "channels", 3)
        height, width = (size, size) if isinstance(size, int) else size
        video = torch.randn(1, frames, channels, height, width, device=param.device, dtype=param.dtype)
    installed = getattr(model, "__dict__", {}).get("installed")
    if video.device.type == "meta" and installed is not None and installed.adaptive:
        raise InputError(
            f"the cost of plan {installed.spec!r} depends on each clip's content, which the meta device does "
            "not have: count it on real clips (video=batch)"
        )
    was_training = model.training
    model.eval()  # inference cost: learned selectors take their hard (eval) path
    try:
        result = FlopCount(clips=0)
        per_clip = []
        labelled = any(getattr(r, "wants_labels", False) for r in getattr(model, "plan", ()))
        for clip in video.split(1):  # one by one: each clip's own cost, whatever the others keep
            with torch.no_grad(), count_flops(model) as one:
                if labelled:
                    labels = torch.zeros(1, dtype=torch.long, device=clip.device)
                    model.forward_head(model.forward_features(clip, inputs=Inputs(clip, labels)))
                else:
                    model(clip)
            result.add(one)
            per_clip.append(one.gflops)
        result.per_clip = tuple(per_clip)
    finally:
        model.train(was_training)
    return result if detail else result.gflops


def register_cpu_sdpa_formula() -> bool:
    """Teach torch's `FlopCounterMode` the CPU SDPA kernel when this torch lacks it.

    torch < 2.15 has no formula for `aten._scaled_dot_product_flash_attention_for_cpu`, the kernel
    `F.scaled_dot_product_attention` runs on CPU, so attention counts as zero there.

    Returns:
        True if a formula was registered now, False if torch already had one.
    """
    from torch.utils import flop_counter

    op = aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry:
        return False

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    return True
