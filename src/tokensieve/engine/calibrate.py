"""Pick LITE++'s confidence thresholds on a calibration split (`ts.calibrate`).

    cal = ts.calibrate(model, calibration_set, "lite++:keep=0.5", gflops=60.0)
    cal.install(model)                   # "lite++:keep=0.5,low=...,high=...", the trained selector kept

The paper's thresholds did not survive in our copy of it, and they depend on the model, the data and
the confidence estimate anyway. Each view's budget depends only on its own confidence, so two passes
over the split tell everything: every view once on the base budget and once on the small one (the
confidence, its glance included, is the same in both). Any (low, high) then picks per view which of the
two predictions it gets and what it costs, so all threshold pairs (at the midpoints between the
confidences seen, thinned to `THRESHOLDS` quantiles) are scored without running the model again:
top-1 over videos (views' probabilities averaged, as evaluation does) and mean GFLOPs per view. The
pair with the best top-1 whose mean GFLOPs stay within the target wins (ties: the cheaper, then the
wider base band).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data.datasets import VideoDataset
from ..data.transforms import normalize
from ..errors import InputError
from ..flops import flops
from ..reducers import apply
from ..reducers.adaptive import AdaptiveBudget
from ..reducers.base import BUDGETS, At
from ..reducers.plan import InstalledPlan, current_plan, load_trained, trained_keys
from ..tokens import Inputs
from .evaluate import _Todo, check_fits, label_tensor

__all__ = ["THRESHOLDS", "Calibration", "calibrate"]

log = logging.getLogger(__name__)

THRESHOLDS = 64
"""Candidate values of each threshold: quantiles of the confidences seen (plus 0 and 1)."""


@dataclass(frozen=True)
class Calibration:
    """The thresholds `calibrate` chose, and what they give on the calibration split.

    Attributes:
        spec: the plan with the chosen `low` and `high`, for `ts.apply`.
        low, high: the thresholds.
        top1: top-1 on the split with them; gflops: their mean GFLOPs per view (the glance counted);
        small_share: the share of views they put on the small budget.
        base_top1, base_gflops: every view on the base budget (glance counted); small_top1,
            small_gflops: every view on the small one.
        views, videos: the split's size.
        weights: the trained weights the learned reducers ran with (`weights_key` -> `state_dict()`).
    """

    spec: str
    low: float
    high: float
    top1: float
    gflops: float
    small_share: float
    base_top1: float
    base_gflops: float
    small_top1: float
    small_gflops: float
    views: int
    videos: int
    weights: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict, repr=False)

    def install(self, model: nn.Module) -> InstalledPlan:
        """Apply `spec` to `model` with the trained weights it was calibrated with."""
        installed = apply(model, self.spec)
        load_trained(model, self.weights)
        return installed


def calibrate(
    model: nn.Module,
    dataset: VideoDataset,
    spec: str = "lite++:keep=0.5",
    *,
    gflops: float,
    selectors: Mapping[str, Mapping[str, Tensor]] | None = None,
    batch_size: int = 8,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Choose `low` and `high` of an adaptive-budget plan for the best top-1 at a mean GFLOPs target.

    Args:
        model: a tokensieve backbone (trained selectors loaded, for `lite++`); its plan is put back.
        dataset: the calibration split (single-label).
        spec: an adaptive plan, `X++:...` or `adaptive:...+X:...`; its own `low`/`high` are ignored.
        gflops: the target mean GFLOPs per view, between the all-small and the all-base cost.
        selectors: trained weights of the learned method (`weights_key` -> `state_dict()`); by default
            those of `model`'s installed plan (calibrate a trained `lite` model with "lite++:...").
        progress: called with (videos done, videos) after each batch.

    Raises:
        InputError: a spec without adaptive budgets, multi-label data, or a target no thresholds reach.
    """
    if dataset.multilabel:
        raise InputError("calibrate scores top-1 and needs single-label data")
    check_fits(model, dataset)
    previous = current_plan(model)
    weights = {**_trained(model), **(selectors or {})}
    try:
        installed = apply(model, spec)
        load_trained(model, weights)
        budget = next((r for r in installed.reducers if isinstance(r, AdaptiveBudget)), None)
        if budget is None:
            raise InputError(f"{spec!r} has no adaptive budgets; give e.g. lite++:keep=0.5")
        confidence, base, small, owner, labels = _passes(
            model, budget, dataset, batch_size, workers, progress
        )
        clip = _one_view(model, dataset)
        costs = {}
        for name, (low, high) in {"base": (0.0, 1.0), "small": (0.0, 0.0)}.items():
            budget.low, budget.high = low, high
            costs[name] = float(flops(model, video=clip))
    finally:
        previous.install()
    result = _choose(spec, confidence, base, small, owner, labels, costs, gflops, hard=budget.hard)
    return dataclasses.replace(result, weights=weights)


def _trained(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """The trained weights of `model`'s installed plan, by `weights_key` (copies)."""
    return {
        key: {k: v.detach().clone() for k, v in r.state_dict().items()}
        for r, key in zip(model.plan, trained_keys(model), strict=True)
        if any(True for _ in r.parameters())
    }


def _passes(
    model: nn.Module, budget: AdaptiveBudget, dataset: VideoDataset, batch_size: int, workers: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(confidence (V,), base probs (V, K), small probs (V, K), video of each view (V,), labels (videos,))."""
    cfg, device = model.config, next(model.parameters()).device
    slot = next(m for m in model.modules() if isinstance(m, At) and m.reducer is budget)
    seen: list[Tensor] = []
    hook = slot.register_forward_hook(lambda _m, _a, out: seen.append(out.aux[BUDGETS].confidence))
    wants_labels = any(r.wants_labels for r in model.plan)
    loader = DataLoader(_Todo(dataset, range(len(dataset))), batch_size=None, num_workers=workers)
    confidence, base, small, owner, labels = [], [], [], [], []
    was_training = model.training
    model.eval()
    try:
        for done, sample in enumerate(loader, 1):
            if sample.views is None:
                raise InputError(f"calibrate: {sample.record.path} cannot be decoded ({sample.error})")
            label = sample.record.labels[0] if sample.record.labels else -1
            for views in sample.views.split(batch_size):
                x = normalize(views.to(device).float().div_(255), cfg.mean, cfg.std)
                given = Inputs(
                    x, label_tensor([[label]] * len(x), cfg.num_classes, multilabel=False).to(device)
                )
                for probs, (low, high) in ((base, (0.0, 1.0)), (small, (0.0, 0.0))):
                    budget.low, budget.high = low, high
                    with torch.inference_mode():
                        state = model.forward_features(x, inputs=given if wants_labels else None)
                        probs.append(model.forward_head(state).float().softmax(-1).cpu())
                confidence.append(seen[-1].float().cpu())
                owner.append(torch.full((len(x),), done - 1))
            labels.append(label)
            if progress is not None:
                progress(done, len(dataset))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(confidence), torch.cat(base), torch.cat(small), torch.cat(owner), torch.tensor(labels)


def _one_view(model: nn.Module, dataset: VideoDataset) -> Tensor:
    """A (1, T, C, S, S) normalised view to count GFLOPs on (every view of a budget costs the same)."""
    cfg = model.config
    views = next(s.views for s in (dataset[i] for i in range(len(dataset))) if s.views is not None)
    device = next(model.parameters()).device
    return normalize(views[:1].to(device).float().div_(255), cfg.mean, cfg.std)


def _choose(
    spec: str, confidence: Tensor, base: Tensor, small: Tensor, owner: Tensor, labels: Tensor,
    costs: dict[str, float], target: float, *, hard: str,
) -> Calibration:  # fmt: skip
    """Score every threshold pair on the two passes and keep the best within the target."""
    videos = len(labels)
    cuts = torch.cat([torch.tensor([0.0, 1.0]), _midpoints(confidence)])
    cuts = torch.unique(cuts)  # sorted
    lows = cuts if hard == "small" else torch.zeros(1)
    pairs = [(lo, hi) for lo in lows.tolist() for hi in cuts.tolist() if lo <= hi]
    low_t, high_t = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])  # (P,)
    on_small = confidence.unsqueeze(0) > high_t.unsqueeze(1)  # (P, V)
    if hard == "small":
        on_small |= confidence.unsqueeze(0) < low_t.unsqueeze(1)
    probs = torch.where(on_small.unsqueeze(-1), small, base)  # (P, V, K)
    summed = torch.zeros(len(pairs), videos, base.shape[1]).index_add_(1, owner, probs)  # (P, videos, K)
    top1 = (summed.argmax(-1) == labels).float().mean(1)  # (P,)
    share = on_small.double().mean(1)  # (P,)
    cost = share * costs["small"] + (1 - share) * costs["base"]  # (P,)
    fits = cost <= target * (1 + 1e-9)
    if not fits.any():
        raise InputError(
            f"calibrate: no thresholds reach {target:g} GFLOPs; every view on the small budget costs "
            f"{costs['small']:.4g} (glance included), on the base budget {costs['base']:.4g}"
        )
    # Best top-1 within the target; then the cheaper; then the wider base band (high - low).
    key = torch.stack([top1, -cost, high_t - low_t], 1)[fits]
    order = sorted(range(len(key)), key=lambda i: tuple(key[i].tolist()), reverse=True)
    i = int(fits.nonzero().squeeze(1)[order[0]])
    low, high = round(float(low_t[i]), 6), round(float(high_t[i]), 6)
    everything = lambda use_small: float(  # noqa: E731  top-1 with every view on one budget
        (torch.zeros(videos, base.shape[1]).index_add_(0, owner, small if use_small else base).argmax(-1) == labels)
        .float().mean()
    )  # fmt: skip
    result = Calibration(
        spec=_set(spec, low=low, high=high), low=low, high=high, top1=float(top1[i]), gflops=float(cost[i]),
        small_share=float(share[i]), base_top1=everything(False), base_gflops=costs["base"],
        small_top1=everything(True), small_gflops=costs["small"], views=len(confidence), videos=videos,
    )  # fmt: skip
    log.info("calibrated %s: top-1 %.4f at %.4g GFLOPs (%.0f%% of views small)", result.spec, result.top1,
             result.gflops, 100 * result.small_share)  # fmt: skip
    return result


def _midpoints(values: Tensor) -> Tensor:
    """Up to `THRESHOLDS` cut points between the sorted distinct values (at their quantiles)."""
    distinct = torch.unique(values.double())
    mids = (distinct[1:] + distinct[:-1]) / 2
    if len(mids) > THRESHOLDS:
        mids = mids[torch.linspace(0, len(mids) - 1, THRESHOLDS).round().long()]
    return mids.float()


def _set(spec: str, **params: float) -> str:
    """`spec` with the adaptive term's `params` set (replacing any given)."""
    terms = re.split(r"\+(?=\s*\w)", spec)
    for t, term in enumerate(terms):
        method, _, args = term.strip().partition(":")
        if method == "adaptive" or method.endswith("++"):
            kept = [
                a
                for a in filter(None, (a.strip() for a in args.split(",")))
                if a.partition("=")[0].strip() not in params
            ]
            kept += [f"{k}={v:g}" for k, v in params.items()]
            terms[t] = f"{method}:{','.join(kept)}"
    return "+".join(terms)
