"""Differentiable top-k selection by perturbed maxima, without materialising per-sample one-hots.

STTS (Wang et al., "Efficient Video Transformers with Spatial-Temporal Token Selection", ECCV 2022,
arXiv:2111.11591, Sec. 3.3) trains its scorers end to end through a top-k written as a linear program
over indicator matrices (Eqs. 8-9, after Cordonnier et al.'s differentiable patch selection, CVPR
2021), smoothed with the perturbed-maximum method (Berthet et al., "Learning with Differentiable
Perturbed Optimizers", NeurIPS 2020, arXiv:2002.08676). With `Y*(s)` the (K, N)
indicator of the top-k of `s`, rows in ascending index order (so selected frames stay in time order):

    forward  (Eq. 10):  Y_sigma(s)                = E_Z[ Y*(s + sigma Z) ]                Z ~ N(0, I_N)
    backward (Eq. 11):  dY_sigma[k, m] / ds[n]    = E_Z[ Y*(s + sigma Z)[k, m] Z[n] ] / sigma

both estimated with S Monte Carlo samples (S = 500 in the paper). Two backward estimators
(`jacobian=`), for an incoming gradient G (K, N) and idx_s the sorted top-k indices of sample s:

    full      (Eq. 11, every (m, n) pair):
        grad_s[n] = 1 / (S sigma) * sum_s ( sum_k G[k, idx_s[k]] ) * Z_s[n]
    diagonal  (the released code: for every slot k only the entries m = n, i.e. the derivative of
               Y[k, n] with respect to its own score s[n]; the cross terms m != n are dropped):
        dY[k, m] / ds[n] ~ delta_mn E_Z[ Y*[k, n] Z[n] ] / sigma
        grad_s[n] = 1 / (S sigma) * sum_s sum_k [idx_s[k] = n] G[k, n] Z_s[n]

The released backward averages, over samples, the one-hot entry of item n in slot k times the noise
of that same item n, a (K, N) estimate per clip, and multiplies it elementwise with G before summing
over slots: that is the diagonal estimator. An item fills at most one slot per sample, so a sample
contributes G[k, n] Z_s[n] at each of its K selected items n, and nothing elsewhere. Example: N = 2,
K = 1, G = [[1, 0]] (the gradient of P(item 0 wins)); the true gradient is (+c, -c), c > 0; full
estimates both entries, diagonal estimates (+c, 0).

Both only need the selected positions of every sample, so the op saves idx (B, S, K) and Z (B, S, N)
and never builds a (B, S, K, N) tensor: the forward scatter-adds the counts into (B, K, N); the full
backward gathers G at idx and contracts (B, S) with (B, S, N); the diagonal backward gathers G and Z
at idx, multiplies them (B, S, K) and scatter-adds the products into (B, N). At token scale
(N = 1568, K = 784, S = 500) the one-hot formulation would need ~2.5 GB of float32 per clip; this one
peaks at ~15 MB per clip (110 MB for a batch of 8, benchmarks/topk.py).

NOTE(paper): the released operator returns zero gradient when sigma <= 1e-20; here sigma == 0 (or
`training=False`) takes the hard path, whose output is not connected to `scores` at all.
NOTE(paper): the default estimator is `diagonal`, the one the released training used; `full` is
Eq. 11 as written.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["JACOBIANS", "perturbed_topk"]

JACOBIANS = ("diagonal", "full")
"""The backward estimators of `perturbed_topk` (module docstring): the released code's, Eq. 11's."""


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
    def forward(ctx, scores: Tensor, noise: Tensor, k: int, sigma: float, jacobian: str) -> Tensor:
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
        ctx.sigma, ctx.jacobian = sigma, jacobian
        return counts.div_(S)  # (B, K, N)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        idx, noise = ctx.saved_tensors  # (B, S, K), (B, S, N)
        S = noise.shape[1]
        # G[k, idx_s[k]]: the incoming gradient at the item each sample put in each slot.
        picked = grad_out.gather(2, idx.transpose(1, 2))  # (B, K, S)
        if ctx.jacobian == "full":
            # <G, Y*(s + sigma Z_s)> per sample, times that sample's whole noise vector.
            weight = picked.sum(dim=1)  # (B, S)
            grad = torch.bmm(weight.unsqueeze(1), noise).squeeze(1)  # (B, 1, S) @ (B, S, N) -> (B, N)
        else:
            # Diagonal: each selected item n gets G[k, n] Z_s[n], its own noise only.
            terms = noise.gather(2, idx).mul_(picked.transpose(1, 2))  # (B, S, K)
            grad = grad_out.new_zeros(noise.shape[0], noise.shape[2])  # (B, N)
            grad.scatter_add_(1, idx.flatten(1), terms.flatten(1))  # (B, N)
        return grad / (S * ctx.sigma), None, None, None, None


def perturbed_topk(
    scores: Tensor,
    k: int,
    *,
    num_samples: int = 500,
    sigma: float = 0.05,
    training: bool = True,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    jacobian: Literal["diagonal", "full"] = "diagonal",
) -> Tensor:
    """Selects the top-k items of every row as a (soft, in training) indicator matrix.

    Row j of the result is the j-th selected item, items in ascending index order, so `Y @ x`
    gathers the selected rows of `x` (B, N, C) in their original (time or raster) order.

    Hard path (`training=False` or `sigma == 0`): the exact one-hot of the sorted top-k indices,
    not connected to the autograd graph. Perturbed path: the mean of `num_samples` one-hots of the
    top-k of `scores + sigma * Z`, differentiable with a Monte Carlo estimate of E[Y Z^T] / sigma:
    `jacobian="diagonal"` (default, the released STTS code) keeps, for every slot k, only the
    derivative of Y[k, n] with respect to its own score s[n]; `"full"` is Eq. 11 with every cross
    term (see the module docstring for both as equations). The noise Z is `noise` when given
    (STTS passes draws keyed by clip, `tokensieve.rng`); otherwise it is drawn as
    `torch.randn((B, num_samples, N), generator=generator, device=generator.device,
    dtype=scores.dtype)` and then moved to `scores.device` (with `generator=None`, the global RNG
    draws directly on `scores.device`), so a seeded generator reproduces the draw exactly.

    Args:
        scores: (B, N) floating-point scores; larger means more likely kept.
        k: how many items to select per row, 1 <= k <= N.
        num_samples: Monte Carlo samples S of the perturbed path (500 in STTS).
        sigma: standard deviation of the perturbation (STTS decays it linearly to 0 over training).
        training: False always takes the hard path.
        generator: source of the noise when `noise` is not given; None uses the global RNG.
        noise: (B, num_samples, N) standard normal draws to use as Z.
        jacobian: the backward estimator, "diagonal" (released STTS) or "full" (Eq. 11).

    Returns:
        (B, K, N) indicator in the dtype of `scores`. Every row sums to 1, every column to at most 1.

    Raises:
        InputError: `scores` not a 2-D floating-point tensor, `k`, `num_samples` or `sigma` out of
            range, or `jacobian` not one of `JACOBIANS`.
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
    if jacobian not in JACOBIANS:
        raise InputError(f"jacobian must be one of {', '.join(JACOBIANS)}; got {jacobian!r}")

    if not training or sigma == 0:
        return _hard_topk(scores, k)  # (B, K, N)
    if noise is not None:
        if noise.shape != (B, num_samples, N):
            raise InputError(
                f"noise must be (B, num_samples, N) = ({B}, {num_samples}, {N}), got {tuple(noise.shape)}"
            )
        noise = noise.to(scores.dtype)
    elif generator is None:
        noise = torch.randn(B, num_samples, N, device=scores.device, dtype=scores.dtype)  # (B, S, N)
    else:
        noise = torch.randn(
            (B, num_samples, N), generator=generator, device=generator.device, dtype=scores.dtype
        ).to(scores.device)  # (B, S, N)
    return _PerturbedTopK.apply(scores, noise, k, float(sigma), jacobian)  # (B, K, N)
