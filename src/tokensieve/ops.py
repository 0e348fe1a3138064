"""Differentiable top-k selection by perturbed maxima, without materialising per-sample one-hots.

STTS (Wang et al., "Efficient Video Transformers with Spatial-Temporal Token Selection", ECCV 2022,
arXiv:2111.11591, Sec. 3.3) trains its scorers end to end through a top-k written as a linear program
over indicator matrices (Eqs. 8-9, after Cordonnier et al.'s differentiable patch selection, CVPR
2021), smoothed with the perturbed-maximum method (Berthet et al., "Learning with Differentiable
Perturbed Optimizers", NeurIPS 2020, arXiv:2002.08676). With `Y*(s)` the (K, N)
indicator of the top-k of `s`, rows in ascending index order (so selected frames stay in time order):

    forward  (Eq. 10):  Y_sigma(s)   = E_Z[ Y*(s + sigma Z) ]                Z ~ N(0, I_N)
    backward (Eq. 11):  dY_sigma/ds  = E_Z[ Y*(s + sigma Z) Z^T ] / sigma

both estimated with S Monte Carlo samples (S = 500 in the paper). For an incoming gradient G (K, N)
the vector-Jacobian product only needs the selected positions of every sample:

    grad_s[n] = 1 / (S sigma) * sum_s ( sum_k G[k, idx_s[k]] ) * Z_s[n]

where idx_s are the sorted top-k indices of sample s. So the op saves idx (B, S, K) and Z (B, S, N)
and never builds a (B, S, K, N) tensor: the forward scatter-adds the counts into (B, K, N), the
backward gathers G at idx and contracts (B, S) with (B, S, N). At token scale (N = 1568, K = 784,
S = 500) the one-hot formulation would need ~2.5 GB of float32 per clip; this one peaks at ~15 MB
(benchmarks/topk.py).

NOTE(paper): the released operator returns zero gradient when sigma <= 1e-20; here sigma == 0 (or
`training=False`) takes the hard path, whose output is not connected to `scores` at all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["perturbed_topk"]


def _sorted_topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of the last axis, in ascending index order.

    Args:
        scores: (..., N) values to rank.
        k: how many to keep, 1 <= k <= N.

    Returns:
        (..., K) int64 indices, ascending along the last axis.
    """
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values  # (..., K)


def _hard_topk(scores: Tensor, k: int) -> Tensor:
    """The exact (B, K, N) indicator of the sorted top-k of every row of `scores` (B, N)."""
    B, N = scores.shape
    idx = _sorted_topk(scores.detach(), k)  # (B, K)
    out = scores.new_zeros(B, k, N)  # (B, K, N)
    return out.scatter_(2, idx.unsqueeze(-1), 1.0)  # (B, K, N)


class _PerturbedTopK(torch.autograd.Function):
    """Monte Carlo perturbed top-k; the noise `Z` is drawn by the caller and passed in."""

    @staticmethod
    def forward(ctx, scores: Tensor, noise: Tensor, k: int, sigma: float) -> Tensor:
        B, S, N = noise.shape
        perturbed = noise.mul(sigma).add_(scores.unsqueeze(1))  # (B, S, N), one buffer
        idx = perturbed.topk(k, dim=-1, sorted=False).indices  # (B, S, K)
        del perturbed  # free it before the sort allocates its two (B, S, K) results
        idx = idx.sort(dim=-1).values  # (B, S, K), ascending: slot j holds the j-th selected item
        # Count how often each item fills each slot: counts[b, j, idx[b, s, j]] += 1 for every s.
        # Whole-number counts divided once give exactly the mean of the one-hots.
        counts = scores.new_zeros(B, k, N)  # (B, K, N)
        ones = scores.new_ones(()).expand(B, k, S)  # (B, K, S), a view: no memory
        counts.scatter_add_(2, idx.transpose(1, 2), ones)  # (B, K, N)
        ctx.save_for_backward(idx, noise)
        ctx.sigma = sigma
        return counts.div_(S)  # (B, K, N)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        idx, noise = ctx.saved_tensors  # (B, S, K), (B, S, N)
        S = noise.shape[1]
        # <G, Y*(s + sigma Z_s)> for every sample: the gradient at the items that sample selected.
        picked = grad_out.gather(2, idx.transpose(1, 2))  # (B, K, S)
        weight = picked.sum(dim=1)  # (B, S)
        grad = torch.bmm(weight.unsqueeze(1), noise).squeeze(1)  # (B, 1, S) @ (B, S, N) -> (B, N)
        return grad / (S * ctx.sigma), None, None, None


def perturbed_topk(
    scores: Tensor,
    k: int,
    *,
    num_samples: int = 500,
    sigma: float = 0.05,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Selects the top-k items of every row as a (soft, in training) indicator matrix.

    Row j of the result is the j-th selected item, items in ascending index order, so `Y @ x`
    gathers the selected rows of `x` (B, N, C) in their original (time or raster) order.

    Hard path (`training=False` or `sigma == 0`): the exact one-hot of the sorted top-k indices,
    not connected to the autograd graph. Perturbed path: the mean of `num_samples` one-hots of the
    top-k of `scores + sigma * Z`, differentiable with the estimator E[Y Z^T] / sigma. The noise is
    drawn as `torch.randn((B, num_samples, N), generator=generator, device=generator.device,
    dtype=scores.dtype)` and then moved to `scores.device` (with `generator=None`, the global RNG
    draws directly on `scores.device`), so a seeded generator reproduces the draw exactly.

    Args:
        scores: (B, N) floating-point scores; larger means more likely kept.
        k: how many items to select per row, 1 <= k <= N.
        num_samples: Monte Carlo samples S of the perturbed path (500 in STTS).
        sigma: standard deviation of the perturbation (STTS decays it linearly to 0 over training).
        training: False always takes the hard path.
        generator: source of the noise; None uses the global RNG.

    Returns:
        (B, K, N) indicator in the dtype of `scores`. Every row sums to 1, every column to at most 1.

    Raises:
        ValueError: `scores` not a 2-D floating-point tensor, or `k`, `num_samples` or `sigma` out
            of range.
    """
    if scores.dim() != 2 or not scores.is_floating_point():
        raise InputError(
            f"scores must be a 2-D floating-point (B, N) tensor, got shape {tuple(scores.shape)} "
            f"and dtype {scores.dtype}"
        )
    B, N = scores.shape
    if not 1 <= k <= N:
        raise InputError(f"k must be in [1, N] = [1, {N}], got {k}")
    if num_samples < 1:
        raise InputError(f"num_samples must be >= 1, got {num_samples}")
    if not sigma >= 0:  # also rejects NaN
        raise InputError(f"sigma must be >= 0, got {sigma}")

    if not training or sigma == 0:
        return _hard_topk(scores, k)  # (B, K, N)
    if generator is None:
        noise = torch.randn(B, num_samples, N, device=scores.device, dtype=scores.dtype)  # (B, S, N)
    else:
        noise = torch.randn(
            (B, num_samples, N), generator=generator, device=generator.device, dtype=scores.dtype
        ).to(scores.device)  # (B, S, N)
    return _PerturbedTopK.apply(scores, noise, k, float(sigma))  # (B, K, N)
