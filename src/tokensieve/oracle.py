"""The oracle of token value: Grad-CAM with the true label (LITE, Hao et al., "Principles of Visual
Tokens for Efficient Video Understanding", arXiv:2411.13626, Sec. 3, Eq. 1-2).

    values = ts.oracle(model, video, labels)        # (B, N) in [0, 1], one value per patch token

On the unreduced model (its plan taken out for the pass and put back), for the target class c of
each clip (its true label, or with `label="pred"` the model's own prediction):

    y_c           the pre-softmax score (logit) of class c
    A_ik          activation k of token i at the chosen tensor (`block`, `tensor`)
    w_k   = mean_i dy_c / dA_ik                                  (Eq. 1: gradient averaged over tokens)
    v_i   = ReLU(sum_k w_k A_ik)                                 (Eq. 2)
    value = (v - min v) / (max v - min v)  per clip             (min-max to [0, 1]; all zeros if flat)

Averages and min-max run over the clip's patch tokens (a class token is excluded). Values are in the
tokens' time-major raster order (`TokenState.pos`), whatever the backbone.

The paper's tensor is "the feature map activations of the MLP in the last blocks"; which block and
which tensor are left open, so both are parameters:
- `tensor="output"` (default): the block's output tokens, i.e. what its MLP residual produces and the
  next layer reads: every feature of the token, as Grad-CAM's last convolutional feature map is in
  CNNs. `tensor="hidden"`: the MLP's hidden activation (after GELU, 4x wider), the MLP alone.
- `block` (default: the last block whose patch tokens still reach the head). On a mean-pooled model
  (VideoMAE) that is the last block: every token's output is pooled, so each gets a value (the
  gradient is the same for every token there, which makes the value the token's linear contribution
  to the class score, as CAM on global pooling). On a class-token model (TimeSformer, class-token
  joint ViTs) the head reads only the class token, so the last block's patch-token outputs never
  reach it and their gradient is zero: the default is the second-to-last block, whose output the
  last block's attention hands to the class token.

Cost: one forward pass and a backward pass from the head to the chosen tensor only (the blocks
before it run without building a graph). Neither is part of a method's inference cost (the true
label is privileged), so an enclosing FLOP count does not count them (`flops.uncounted`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .errors import InputError
from .flops import uncounted

__all__ = ["LABELS", "TENSORS", "VALUES", "default_block", "oracle"]

LABELS = ("true", "pred")
TENSORS = ("output", "hidden", "embed")
VALUES = ("gradcam", "gradxact", "gradnorm")


def default_block(model: nn.Module) -> int:
    """The block whose output the oracle reads by default: the last whose patch tokens reach the head."""
    depth = len(model.blocks)
    return depth - 1 if model.config.pool == "mean" else max(depth - 2, 0)


def check_oracle(
    label: str, tensor: str, block: int | None, depth: int | None = None, *, value: str = "gradcam",
    method: str = "oracle",
) -> None:  # fmt: skip
    """Validate the oracle's parameters (`block` against `depth` when known)."""
    if value not in VALUES:
        raise InputError(f"{method}: value must be one of {', '.join(VALUES)}, got {value!r}")
    if label not in LABELS:
        raise InputError(f"{method}: label must be one of {', '.join(LABELS)}, got {label!r}")
    if tensor not in TENSORS:
        raise InputError(f"{method}: tensor must be one of {', '.join(TENSORS)}, got {tensor!r}")
    if block is not None and depth is not None and not -depth <= block < depth:
        raise InputError(
            f"{method}: block must be in [{-depth}, {depth - 1}] for a model of {depth} blocks, got {block}"
        )


def _target_scores(logits: Tensor, labels: Tensor | None, label: str) -> Tensor:
    """(B,) the logit of each clip's target class (multi-hot labels: the sum over its classes)."""
    if label == "pred":
        return logits.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    if labels is None:
        raise InputError(
            "the oracle needs the true labels: ts.evaluate, tokensieve sweep and training pass them "
            "(or call model.forward_features(video, inputs=tokens.Inputs(video, labels))); "
            "label=pred uses the model's prediction instead"
        )
    if labels.is_floating_point():  # (B, K) multi-hot
        if labels.shape != logits.shape:
            raise InputError(
                f"multi-hot labels must be (B, K) = {tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        return (logits * labels.to(logits.dtype)).sum(1)
    if labels.shape != logits.shape[:1]:
        raise InputError(
            f"labels must be (B,) = ({logits.shape[0]},) class indices, got {tuple(labels.shape)}"
        )
    if (
        labels.numel()
        and labels.device.type != "meta"
        and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1])
    ):
        raise InputError(f"labels must be class indices in [0, {logits.shape[1] - 1}]")
    return logits.gather(1, labels.view(-1, 1).long()).squeeze(1)


def oracle(
    model: nn.Module,
    video: Tensor,
    labels: Tensor | None = None,
    *,
    label: Literal["true", "pred"] = "true",
    block: int | None = None,
    tensor: Literal["output", "hidden", "embed"] = "output",
    value: Literal["gradcam", "gradxact", "gradnorm"] = "gradcam",
) -> Tensor:
    """Grad-CAM value of every patch token of each clip, on the model without its plan.

    Args:
        model: a tokensieve backbone (its installed plan is taken out for the pass and put back; it
            runs in eval mode, then its mode is restored).
        video: (B, T, C, H, W) normalised clips.
        labels: (B,) true class indices or (B, K) multi-hot; needed unless `label="pred"`.
        label: "true" (the paper's oracle) or "pred" (the model's top class; the paper reports it costs
            8.5 points at half the tokens).
        block: which block's activations (negative counts from the end); None: `default_block`.
        tensor: "output" (the block's output tokens), "hidden" (its MLP's hidden activation) or "embed"
            (the patch embedding's tokens, which block 0 receives; `block` is then not used).
        value: "gradcam" (the paper), "gradxact" (gradient x activation per token: Grad-CAM without
            averaging the weights over tokens) or "gradnorm" (the gradient's L2 norm per token).

    Returns:
        (B, N) float32 values in [0, 1], N = T*H*W patch tokens in time-major raster order, detached.
        Works under `torch.no_grad` and `torch.inference_mode` too (the pass turns gradients on).
    """
    from .reducers.plan import without_plan  # reducers import this module

    depth = len(model.blocks)
    check_oracle(label, tensor, block, depth, value=value)
    index = (default_block(model) if block is None else block) % depth
    first = 1 if model.config.has_cls and tensor == "hidden" else 0  # the class token's row of the MLP input
    target = {"output": model.blocks[index], "embed": model.embed}.get(tensor) or model.blocks[index].mlp.act
    captured: list[Tensor] = []

    def watch(_module: nn.Module, _args: object, out):  # type: ignore[no-untyped-def]
        torch.set_grad_enabled(True)  # from here on: the graph from this tensor to the logits only
        if tensor != "hidden":  # a TokenState
            leaf = out.x.detach().requires_grad_()
            captured.append(leaf)
            return out.replace(x=leaf)
        leaf = out.detach().requires_grad_()
        captured.append(leaf)
        return leaf

    was_training = model.training
    with without_plan(model), torch.inference_mode(False), torch.no_grad(), uncounted():
        clip = video.clone()  # normal tensors, even when made in inference mode
        labels = None if labels is None else labels.clone()
        handle = target.register_forward_hook(watch)
        model.eval()
        try:
            logits = model(clip)
        finally:
            handle.remove()
            model.train(was_training)
        (activation,) = captured
        (grad,) = torch.autograd.grad(
            _target_scores(logits, labels, label).sum(), activation, allow_unused=True
        )
        if grad is None:  # the tensor does not reach the head (a class-token model's last patch outputs)
            grad = torch.zeros_like(activation)
        A, G = activation[:, first:].float(), grad[:, first:].float()  # (B, N, K)
        if value == "gradcam":
            values = torch.relu((A * G.mean(1, keepdim=True)).sum(-1))  # (B, N)   Eq. 1-2
        elif value == "gradxact":
            values = torch.relu((A * G).sum(-1))  # (B, N)
        else:
            values = G.norm(dim=-1)  # (B, N)
        low, high = values.amin(1, keepdim=True), values.amax(1, keepdim=True)
        return ((values - low) / (high - low).clamp_min(torch.finfo(values.dtype).tiny)).detach()
