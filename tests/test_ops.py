"""`tokensieve.ops.perturbed_topk` against a naive oracle that materialises every sample's one-hot,
for both backward estimators (`jacobian="diagonal"`, the released STTS code's, and `"full"`, Eq. 11)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tokensieve.errors import InputError
from tokensieve.ops import JACOBIANS, _PerturbedTopK, perturbed_topk


def reference_noise(B: int, S: int, N: int, seed: int, dtype: torch.dtype) -> Tensor:
    """The noise `perturbed_topk` draws from `torch.Generator().manual_seed(seed)` (its documented call)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((B, S, N), generator=generator, device=generator.device, dtype=dtype)  # (B, S, N)


def reference_onehots(scores: Tensor, noise: Tensor, k: int, sigma: float) -> Tensor:
    """(B, S, K, N) one-hot of every sample's top-k, ranked by a full descending sort (not topk)."""
    perturbed = scores.detach().unsqueeze(1) + sigma * noise  # (B, S, N)
    idx = perturbed.argsort(dim=-1, descending=True)[..., :k].sort(dim=-1).values  # (B, S, K)
    return F.one_hot(idx, scores.shape[1]).to(scores.dtype)  # (B, S, K, N)


def reference_forward(scores: Tensor, noise: Tensor, k: int, sigma: float) -> Tensor:
    return reference_onehots(scores, noise, k, sigma).mean(dim=1)  # (B, K, N)


def reference_grad(
    scores: Tensor, noise: Tensor, k: int, sigma: float, grad_out: Tensor, jacobian: str
) -> Tensor:
    """<G, dY/ds> with the Jacobian estimate built explicitly from the one-hots.

    full: J[k, m, n] = mean_s Y*_s[k, m] Z_s[n] / sigma, every (m, n) pair, (B, K, N, N).
    diagonal: only m = n, J[k, n] = mean_s Y*_s[k, n] Z_s[n] / sigma, (B, K, N), multiplied with G
    entry by entry (the released STTS backward, restated).
    """
    onehots = reference_onehots(scores, noise, k, sigma)  # (B, S, K, N)
    S = noise.shape[1]
    if jacobian == "full":
        full = torch.einsum("bskm,bsn->bkmn", onehots, noise) / (S * sigma)  # (B, K, N, N)
        return torch.einsum("bkm,bkmn->bn", grad_out, full)  # (B, N)
    diagonal = (onehots * noise.unsqueeze(2)).sum(dim=1) / (S * sigma)  # (B, K, N)
    return (grad_out * diagonal).sum(dim=1)  # (B, N)


def hard_reference(scores: Tensor, k: int) -> Tensor:
    idx = torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values  # (B, K)
    return F.one_hot(idx, scores.shape[1]).to(scores.dtype)  # (B, K, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_path_is_sorted_topk_onehot(dtype: torch.dtype) -> None:
    scores = torch.randn(3, 11, dtype=dtype)
    for k in (1, 4, 11):
        expected = hard_reference(scores, k)
        out = perturbed_topk(scores, k, training=False)
        assert out.dtype == dtype and out.shape == (3, k, 11)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        # sigma = 0 in training is the same hard selection.
        torch.testing.assert_close(perturbed_topk(scores, k, sigma=0.0), expected, rtol=0, atol=0)


def test_hard_path_golden_and_time_order() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2]])
    out = perturbed_topk(scores, 3, training=False)
    # top-3 are items 1 (0.9), 3 (0.8), 2 (0.3); rows follow index order 1, 2, 3, not score order.
    expected = torch.tensor([[[0.0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0]]])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    x = torch.arange(5.0).view(1, 5, 1)  # (B, N, C)
    assert (out @ x).flatten().tolist() == [1.0, 2.0, 3.0]


CASES = [  # (B, N, K, S, sigma)
    (2, 8, 3, 50, 0.05),
    (3, 16, 1, 40, 0.1),  # K = 1
    (2, 6, 6, 30, 0.5),  # K = N
    (1, 20, 10, 100, 0.01),
    (4, 9, 4, 1, 1.0),  # a single sample
]


@pytest.mark.parametrize(("B", "N", "K", "S", "sigma"), CASES)
def test_forward_matches_naive_reference(B: int, N: int, K: int, S: int, sigma: float) -> None:
    scores = torch.rand(B, N)
    noise = reference_noise(B, S, N, seed=7, dtype=scores.dtype)
    out = perturbed_topk(scores, K, num_samples=S, sigma=sigma, generator=torch.Generator().manual_seed(7))
    assert out.shape == (B, K, N) and out.dtype == scores.dtype
    torch.testing.assert_close(out, reference_forward(scores, noise, K, sigma), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.sum(dim=2), torch.ones(B, K), rtol=0, atol=1e-6)  # each slot one item
    columns = out.sum(dim=1)  # (B, N): probability item n is selected at all
    assert columns.min() >= 0 and columns.max() <= 1 + 1e-6
    torch.testing.assert_close(columns.sum(dim=1), torch.full((B,), float(K)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("jacobian", JACOBIANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("B", "N", "K", "S", "sigma"), CASES)
def test_grad_matches_naive_reference(
    B: int, N: int, K: int, S: int, sigma: float, dtype: torch.dtype, jacobian: str
) -> None:
    scores = torch.rand(B, N, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(B, K, N, dtype=dtype)
    out = perturbed_topk(
        scores, K, num_samples=S, sigma=sigma, generator=torch.Generator().manual_seed(3), jacobian=jacobian
    )
    (grad,) = torch.autograd.grad(out, scores, grad_out)
    noise = reference_noise(B, S, N, seed=3, dtype=dtype)
    expected = reference_grad(scores, noise, K, sigma, grad_out, jacobian)
    # Gradients scale like 1 / sigma; compare relative to the largest entry in float32.
    scale = 1.0 if dtype == torch.float64 else max(1.0, expected.abs().max().item())
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5 * scale)


def _golden_case() -> tuple[Tensor, Tensor, Tensor]:
    """N = 3 items, K = 2 slots, S = 2 samples, sigma = 0.5 (so 1 / (S sigma) = 1), noise given.

    sample 1: Z = [-1, 0.5, 2] -> s + Z / 2 = [-0.2, 0.45, 1.1] -> items {1, 2}: slot 0 = 1, slot 1 = 2
    sample 2: Z = [ 2, -2,  1] -> s + Z / 2 = [ 1.3, -0.8, 0.6] -> items {0, 2}: slot 0 = 0, slot 1 = 2
    """
    scores = torch.tensor([[0.3, 0.2, 0.1]], dtype=torch.float64, requires_grad=True)
    noise = torch.tensor([[[-1.0, 0.5, 2.0], [2.0, -2.0, 1.0]]], dtype=torch.float64)  # (B, S, N)
    grad_out = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]], dtype=torch.float64)  # G (B, K, N)
    return scores, noise, grad_out


def test_forward_golden() -> None:
    scores, noise, _ = _golden_case()
    out = _PerturbedTopK.apply(scores, noise, 2, 0.5, "diagonal")
    # slot 0 held item 1 once and item 0 once; slot 1 held item 2 twice.
    expected = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_full_grad_golden() -> None:
    scores, noise, grad_out = _golden_case()
    _PerturbedTopK.apply(scores, noise, 2, 0.5, "full").backward(grad_out)
    # Each sample weighs its whole noise vector by <G, Y*_s>: sample 1 G[0,1] + G[1,2] = 2 + 6 = 8,
    # sample 2 G[0,0] + G[1,2] = 1 + 6 = 7. 8 [-1, 0.5, 2] + 7 [2, -2, 1] = [6, -10, 23].
    torch.testing.assert_close(scores.grad, torch.tensor([[6.0, -10.0, 23.0]], dtype=torch.float64))


def test_diagonal_grad_golden() -> None:
    scores, noise, grad_out = _golden_case()
    _PerturbedTopK.apply(scores, noise, 2, 0.5, "diagonal").backward(grad_out)
    # Each selected item n gets G[slot, n] Z_s[n], its own noise only:
    #   item 0: sample 2, slot 0: G[0,0] * 2 = 2
    #   item 1: sample 1, slot 0: G[0,1] * 0.5 = 1
    #   item 2: sample 1, slot 1: G[1,2] * 2 = 12; sample 2, slot 1: G[1,2] * 1 = 6 -> 18
    torch.testing.assert_close(scores.grad, torch.tensor([[2.0, 1.0, 18.0]], dtype=torch.float64))


def test_default_jacobian_is_the_released_diagonal() -> None:
    scores = torch.rand(2, 7, requires_grad=True)
    grad_out = torch.randn(2, 3, 7)
    grads = {}
    for jacobian in (None, "diagonal", "full"):
        kwargs = {} if jacobian is None else {"jacobian": jacobian}
        out = perturbed_topk(scores, 3, num_samples=30, generator=torch.Generator().manual_seed(4), **kwargs)
        (grads[jacobian],) = torch.autograd.grad(out, scores, grad_out)
    torch.testing.assert_close(grads[None], grads["diagonal"], rtol=0, atol=0)
    assert not torch.allclose(grads[None], grads["full"])


def test_global_rng_is_used_without_generator() -> None:
    scores = torch.rand(2, 12)
    torch.manual_seed(5)
    a = perturbed_topk(scores, 4, num_samples=20)
    torch.manual_seed(5)
    b = perturbed_topk(scores, 4, num_samples=20)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, perturbed_topk(scores, 4, num_samples=20))


@pytest.mark.parametrize("jacobian", ["full", "diagonal"])
def test_two_item_race_against_the_closed_form(jacobian: str) -> None:
    # N = 2, K = 1: item 0 wins with probability Phi((s0 - s1) / (sigma sqrt 2)), whose derivative
    # wrt s0 is phi(d) / (sigma sqrt 2) and wrt s1 its negative. The full Jacobian estimates both
    # without bias; the diagonal one estimates dY[0, 0] / ds0 alike and drops the cross term
    # dY[0, 0] / ds1 (exactly 0) although its true value is -slope.
    sigma, gap = 0.5, 0.3
    scores = torch.tensor([[gap, 0.0]], dtype=torch.float64, requires_grad=True)
    out = perturbed_topk(
        scores,
        1,
        num_samples=200_000,
        sigma=sigma,
        generator=torch.Generator().manual_seed(0),
        jacobian=jacobian,
    )
    out[0, 0, 0].backward()
    d = gap / (sigma * math.sqrt(2))
    p = 0.5 * (1 + math.erf(d / math.sqrt(2)))
    slope = math.exp(-0.5 * d * d) / math.sqrt(2 * math.pi) / (sigma * math.sqrt(2))
    assert abs(out[0, 0, 0].item() - p) < 0.01
    # Standard error of the estimate is below 2 / sqrt(200000) = 0.0045.
    assert abs(scores.grad[0, 0].item() - slope) < 0.03
    if jacobian == "full":
        assert abs(scores.grad[0, 1].item() + slope) < 0.03
    else:
        assert scores.grad[0, 1].item() == 0.0


def test_raising_a_score_raises_its_selection_probability() -> None:
    scores = torch.tensor([[0.5, 0.45, 0.4, 0.3, 0.1]], requires_grad=True)
    target, c = 2, 3.0  # item 2 sits right at the border of the top-2
    out = perturbed_topk(
        scores, 2, num_samples=20_000, sigma=0.1, generator=torch.Generator().manual_seed(1), jacobian="full"
    )
    (out[0, :, target].sum() * c).backward()
    grad = scores.grad[0]
    assert grad[target] > 0
    assert (grad[[0, 1, 3]] < 0).all()  # its competitors lose when they gain (cross terms: full only)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage any aten op returns (forward and backward run through it on CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.num_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.num_ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("jacobian", JACOBIANS)
def test_memory_never_materialises_per_sample_onehots(jacobian: str) -> None:
    # At token scale, the (B, S, K, N) float one-hots would take 2 * 300 * 784 * 1568 * 4 B = 2.95 GB.
    B, N, K, S = 2, 1568, 784, 300
    scores = torch.rand(B, N, requires_grad=True)
    grad_out = torch.randn(B, K, N)
    with _LargestAllocation() as mode:
        out = perturbed_topk(
            scores, K, num_samples=S, generator=torch.Generator().manual_seed(0), jacobian=jacobian
        )
        out.backward(grad_out)
    assert mode.num_ops > 5  # the mode did see the ops
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    onehot_bytes = B * S * K * N * 4
    # Largest expected: (B, S, N) noise / (B, S, K) int64 indices (~3.8 MB) or the (B, K, N) output (~9.8 MB).
    assert mode.largest <= max(B * K * N * 4, B * S * K * 8, B * S * N * 4)
    assert mode.largest * 200 < onehot_bytes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": torch.rand(2, 3, 4)}, "scores must be a 2-D"),
        ({"scores": torch.rand(5)}, "scores must be a 2-D"),
        ({"scores": torch.arange(6).view(1, 6)}, "floating-point"),
        ({"k": 0}, r"k must be in \[1, N\] = \[1, 6\], got 0"),
        ({"k": 7}, r"k must be in \[1, N\] = \[1, 6\], got 7"),
        ({"num_samples": 0}, "num_samples must be >= 1, got 0"),
        ({"sigma": -0.1}, "sigma must be >= 0, got -0.1"),
        ({"sigma": float("nan")}, "sigma must be >= 0"),
        ({"jacobian": "exact"}, "jacobian must be one of diagonal, full; got 'exact'"),
    ],
)
def test_bad_input_raises(kwargs: dict, match: str) -> None:
    args = {"scores": torch.rand(1, 6), "k": 2} | kwargs
    with pytest.raises(InputError, match=match):
        perturbed_topk(args.pop("scores"), args.pop("k"), **args)
    # The hard path validates the same way.
    with pytest.raises(ValueError, match=match):
        args = {"scores": torch.rand(1, 6), "k": 2} | kwargs
        perturbed_topk(args.pop("scores"), args.pop("k"), training=False, **args)
