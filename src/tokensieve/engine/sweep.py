"""The sweep: every method at a grid of budgets, each against `random` at the same GFLOPs.

    report = ts.sweep(model, dataset, methods=["sta", "tome"], budgets=[0.3, 0.5], out="sweep/")

1. Settings. A budget is a target token ratio: the mean over the blocks of the tokens each block
   processes, as a fraction of all tokens (a block whose MLP runs on fewer tokens than its attention
   counts the mean of the two). Each method declares the spec parameter that sets its budget
   (`Reducer.budget`: a keep ratio such as `random`'s `keep` or STTS's `T0`, or a count of tokens
   removed such as ToMe's and STA's `r`, `Reducer.budget_removes`); the sweep searches the value whose
   schedule (`reducers.schedule`, no data needed) comes closest to the budget. A method that cannot run
   on the model, or cannot come within `BUDGET_TOLERANCE` of a budget, is recorded as refused with the
   reason. A learned method runs with its trained weights (`selectors`), or is refused without them.
2. The random baseline at matched GFLOPs. For each setting, `random` keeps the number of tokens
   (right after the patch embedding, or later if that cannot match) whose GFLOPs per view come
   closest to the setting's, within `MATCH_TOLERANCE`; it is evaluated with `SEEDS` seeds.
3. One decoding pass. Each video's views are decoded and preprocessed once; every setting not yet
   recorded for it runs on them (batches of `batch_size` views, several videos per batch).
4. Records. One line per (video, setting) in `out/results.jsonl` under a provenance header
   (`engine/results.py`): a killed sweep rerun with the same arguments redoes nothing that was
   recorded, and a sweep of another model, data or views is refused. Under `torchrun` videos are split
   across processes and merged by rank 0, as in evaluation.
Adaptive methods (each clip keeps its own count: `attention:mass=0.9`, given with their parameters)
run as one setting: its budget (the mean token ratio) and GFLOPs are measured per video as it runs
(each video's views counted on their own, so the means survive a resume and a torchrun split), then
random is matched to the mean GFLOPs and run in a second pass over the videos. A method without a
budget whose cost is the same on every clip (`halting:...,halted=zero`) runs as one setting at that cost.

5. The report. Per setting: top-1 with a 95% bootstrap interval over videos, top-5, GFLOPs per view,
   measured speed-up over the unreduced model (`ts.benchmark`, same process), the foreground recall of
   what was kept (synthetic sets with ground truth), and the accuracy difference to the matched random
   baseline (mean of its seeds) with a paired bootstrap interval and a verdict. `engine/report.py`
   writes `report.md` and `pareto.png`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data.datasets import VideoDataset
from ..data.synthetic import load_truth
from ..data.transforms import normalize
from ..errors import InputError
from ..flops import count_flops, flops
from ..reducers import REGISTRY, apply, parse
from ..reducers.base import frames_needed
from ..reducers.plan import (
    InstalledPlan,
    current_plan,
    load_trained,
    schedule,
    spec_pairs,
    spec_parameters,
    split_plus,
    split_terms,
    trained_keys,
    weights_key,
)  # fmt: skip
from ..reducers.plan import plan as make_plan
from ..reducers.resize import resized_sides
from ..tokens import Inputs, TokenState, covered
from .distributed import World, barrier, gather, on_main, setup
from .evaluate import _Todo, check_fits, hash_tensors, label_tensor, model_checksum, top5_entries
from .report import (
    BASELINE,
    MATCHED,
    RANDOM_SEEDS,
    RESIZE,
    RESIZE_MATCHED,
    Setting,
    SweepReport,
    bootstrap_ci,
    paired_bootstrap_ci,
    verdict,
)
from .results import Provenance, RecordWriter, merge, read_done, record_key, start_run

__all__ = [
    "BUDGETS",
    "MATCH_TOLERANCE",
    "METHODS",
    "SEEDS",
    "Planned",
    "matched_random",
    "matched_resize",
    "plan_settings",
    "spec_at_budget",
    "sweep",
    "token_ratio",
]

log = logging.getLogger(__name__)

BUDGETS: tuple[float, ...] = (0.25, 0.4, 0.55, 0.7, 0.85)
"""Default target token ratios."""
METHODS: tuple[str, ...] = tuple(sorted(n for n, cls in REGISTRY.items() if cls.standalone))
"""The methods a sweep runs by default: every registered one that is a method on its own (not `adaptive`,
which changes the method after it: give `lite++` to run LITE++ at every budget)."""
SEEDS = RANDOM_SEEDS
"""Seeds of the matched random baseline (the report's reading guide says how many)."""
MATCH_TOLERANCE = MATCHED
"""The matched random baseline's GFLOPs are within this fraction of the setting's where a token count
allows it (else the nearest, with a warning and a mark in the report)."""
BUDGET_TOLERANCE = 0.1
"""A method whose nearest setting misses the budget's token ratio by more than this is refused."""
SWEEP_PLAN = "sweep"
"""The `plan` of a sweep's results header (an evaluation's file holds one plan's records)."""

Progress = Callable[[int, int], None]
"""progress(settings x videos done, to do in this run): once `out` is checked, then after each batch."""


# ---------------------------------------------------------------------------------------- budgets
def token_ratio(model: nn.Module, spec: str | None, grid: tuple[int, int, int] | None = None) -> float:
    """Mean over the blocks of the tokens each block processes, as a fraction of all tokens, on clips of
    token grid `grid` (default the model's own, `config.grid`).

    A reducer inside block p (between its attention and MLP) makes that block count the mean of the
    tokens its attention and its MLP see. Computed from the plan's schedule: no data, no forward.

    Raises:
        InputError: the plan cannot run on `model` at `grid` (as `apply` would say).
    """
    grid = tuple(grid or model.config.grid)
    T, H, W = grid
    full, depth = T * H * W, len(model.blocks)
    steps = schedule(model, make_plan(spec) if spec else [], grid)
    num, i, total = full, 0, 0.0
    for p in range(depth):
        while i < len(steps) and steps[i].site.position == p and not steps[i].inside:
            num, i = steps[i].tokens_out, i + 1
        block = float(num)
        while i < len(steps) and steps[i].site.position == p and steps[i].inside:
            block, num, i = (block + steps[i].tokens_out) / 2, steps[i].tokens_out, i + 1
        total += block
    return total / (depth * full)


def _with(base: str, key: str, value: float | int) -> str:
    """`base` (one method's spec, maybe with parameters) with `key` set to `value`."""
    method, _, args = base.partition(":")
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{method}:{','.join([*filter(None, args.split(',')), f'{key}={text}'])}"


def spec_at_budget(
    model: nn.Module, base: str, budget: float, grid: tuple[int, int, int] | None = None
) -> tuple[str, float]:
    """The spec of method `base` (e.g. "sta" or "sta:balance=frame") whose token ratio comes closest
    to `budget`, and that ratio, on clips of token grid `grid` (default the model's own).

    Raises:
        InputError: the method has no budget parameter, cannot run on `model` at any setting, or its
            nearest setting misses `budget` by more than `BUDGET_TOLERANCE` (naming the nearest).
    """
    method, given = _one_method(base)
    cls = REGISTRY[method]
    key = cls.budget
    if key is None:
        raise InputError(f"{method} has no budget parameter, so it cannot be swept")
    if key in given:
        raise InputError(f"{base}: leave {key} out; the sweep sets it from the budget")
    ratios: dict[float | int, float | None] = {}

    def ratio(value: float | int) -> float | None:
        if value not in ratios:
            try:
                ratios[value] = token_ratio(model, _with(base, key, value), grid)
            except InputError:
                ratios[value] = None
        return ratios[value]

    if cls.budget_removes:  # an int count of removed tokens: more removes more
        lo, hi = 0, math.prod(grid or model.config.grid)  # ratio(lo) is defined; the largest valid below hi
        if ratio(lo) is None:
            raise InputError(f"{base} cannot run on this model: {_why(model, _with(base, key, lo), grid)}")
        while hi - lo > 1:  # valid values form a prefix 0..v (a larger r is refused once it is too large)
            mid = (lo + hi) // 2
            r = ratio(mid)
            if r is None or r < budget:
                hi = mid
            else:
                lo = mid
        candidates: list[float | int] = [lo, lo + 1]
    else:  # a ratio in (0, 1]: more keeps more; the hundredths, which every paper's settings are
        if ratio(1.0) is None:
            raise InputError(f"{base} cannot run on this model: {_why(model, _with(base, key, 1.0), grid)}")
        candidates = [k / 100 for k in range(1, 101)]
    # The nearest ratio; among the values that give it, the roundest (keep=0.5 rather than 0.53).
    found = [
        (abs(r - budget), len(f"{v:g}"), abs(r - v), v) for v in candidates if (r := ratio(v)) is not None
    ]
    if not found:
        raise InputError(f"{base} cannot run on this model near budget {budget:g}")
    miss, _, _, value = min(found)
    achieved = ratio(value)
    assert achieved is not None
    if miss > BUDGET_TOLERANCE:
        raise InputError(
            f"{base} cannot come near a token ratio of {budget:g} on this model: the nearest setting "
            f"{key}={value} keeps {achieved:.3g}"
        )
    return _with(base, key, value), achieved


def _one_method(base: str) -> tuple[str, dict[str, Any]]:
    """(method, given parameters) of a one-method spec; `X++` (X with adaptive budgets) counts as X, and a
    method that installs companions before it (`halting`: the Glimpser) as itself.

    Raises:
        InputError: a spec of several methods.
    """
    parsed = parse(base)
    if len(split_terms(base)) != 1:
        raise InputError(
            f"{base}: give one method (or X++ for X with adaptive budgets); the sweep sets its budget"
        )
    return parsed[-1]  # the method named: `parse` puts what it brings along (adaptive, the Glimpser) first


def _split_plus(base: str) -> tuple[str, list[str]]:
    """`X++:args` -> ("X:<X's own args>", [the adaptive budget's "key=value" args])."""
    name, _, args = base.strip().partition(":")
    method = name[:-2]
    mine, rest = split_plus(method, spec_pairs(name, args, base))
    plain = ",".join(f"{k}={v}" for k, v in mine.items())
    return f"{method}:{plain}" if plain else method, [f"{k}={v}" for k, v in rest.items()]


def _why(model: nn.Module, spec: str, grid: tuple[int, int, int] | None = None) -> str:
    try:
        token_ratio(model, spec, grid)
    except InputError as err:
        return str(err)
    return "no setting fits"


# ---------------------------------------------------------------------------------------- GFLOPs
class _Flops:
    """GFLOPs per view of plans on a twin of the model on the meta device (counted, never computed), on
    clips of `frames` frames of `size` (default the model's own)."""

    def __init__(self, model: nn.Module, *, frames: int | None = None, size: int | None = None) -> None:
        with torch.device("meta"):
            self.twin = _meta_twin(model)
        apply(self.twin, None)
        self.frames, self.size = frames, size
        cfg = self.twin.config
        self.grid = cfg.grid_of(frames or cfg.frames, size or cfg.size)
        self.cache: dict[str, float] = {}

    def __call__(self, spec: str | None) -> float:
        key = spec or "none"
        if key not in self.cache:
            apply(self.twin, spec, grid=self.grid)
            self.cache[key] = float(flops(self.twin, frames=self.frames, size=self.size))
        return self.cache[key]


def _meta_twin(model: nn.Module) -> nn.Module:
    """The same backbone rebuilt from its config (on the current default device), with the modules the
    model had removed removed too (a converted bare model has no `fc_norm`): its GFLOPs are the model's."""
    from ..backbones import build_from_config
    from ..backbones.saved import _remove, _removed_modules

    twin = build_from_config(model.config)
    return _remove(twin, _removed_modules(model))


def matched_random(
    model: nn.Module,
    target: float,
    count: Callable[[str | None], float],
    grid: tuple[int, int, int] | None = None,
) -> str:
    """The `random` spec (without seed) whose GFLOPs per view (`count(spec)`) come closest to
    `target`: the fewest blocks before it (`at`) that come within `MATCH_TOLERANCE`, the nearest
    token count there, on clips of token grid `grid` (default the model's own; `count` counts on the
    same clips). On a backbone whose blocks need equal frames (divided space-time attention) it
    keeps the same count in every frame."""
    T, H, W = grid or model.config.grid
    full = T * H * W
    per_frame = frames_needed(model)
    unit = T if per_frame else 1  # tokens per step of the count

    def spec(at: int, n: int) -> str:
        return f"random:keep={n / full:.6g},at={at}" + (",per_frame=true" if per_frame else "")

    best: tuple[float, str] | None = None
    for at in range(len(model.blocks)):
        lo, hi = 1, full // unit  # counts in units; GFLOPs grow with the count
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if count(spec(at, mid * unit)) < target:
                lo = mid
            else:
                hi = mid
        for n in (lo, hi):
            miss = abs(count(spec(at, n * unit)) - target) / target
            if best is None or miss < best[0]:
                best = (miss, spec(at, n * unit))
        if best[0] <= MATCH_TOLERANCE:
            break
    assert best is not None
    if best[0] > MATCH_TOLERANCE:
        log.warning("random cannot match %.4g GFLOPs within %.1f%%: nearest %s is %.2f%% off",
                    target, 100 * MATCH_TOLERANCE, best[1], 100 * best[0])  # fmt: skip
    return best[1]


def matched_resize(
    model: nn.Module,
    target: float,
    count: Callable[[str | None], float],
    grid: tuple[int, int, int] | None = None,
) -> str | None:
    """The `resize` spec whose GFLOPs per view (`count(spec)`) come closest to `target` without exceeding it
    by more than `MATCH_TOLERANCE`: of every frame size `resize:keep=` gives (each side within a patch of the
    aspect-preserving size, `resized_sides`; written as the share of tokens that gives it back), the
    costliest at or below that. None when none is, or the model cannot run smaller frames. Why never above:
    sizes come in whole patches, so the match is coarse (the report gives the difference), and a baseline
    must not win a verdict by spending more than the method."""
    _, H, W = grid or model.config.grid
    specs = []
    for h in range(1, H + 1):
        for w in range(1, W + 1):
            keep = f"{h * w / (H * W):.6g}"
            if (h, w) != (H, W) and resized_sides(H, W, float(keep)) == (h, w):
                specs.append(f"resize:keep={keep}")
    costs = {}
    for spec in specs:
        try:
            costs[spec] = count(spec)
        except InputError:  # a backbone that cannot run another size
            return None
    within = [s for s in costs if costs[s] <= target * (1 + MATCH_TOLERANCE)]
    return max(within, key=costs.__getitem__, default=None)


# ---------------------------------------------------------------------------------------- settings
@dataclass
class Planned:
    """One (method, budget) of the sweep before it runs."""

    method: str
    budget: float | None
    spec: str | None = None
    refused: str | None = None
    ratio: float | None = None
    gflops: float | None = None
    random: str | None = None  # matched random spec, without seed
    random_gflops: float | None = None
    seeds: list[str] = field(default_factory=list)  # the matched random specs run, one per seed
    resize: str | None = None  # matched resize spec (the model on smaller frames): None for random, resize
    resize_gflops: float | None = None
    adaptive: bool = False  # each clip keeps its own count: ratio and gflops are measured as it runs
    views: int | None = None  # views the measured ratio and GFLOPs are means over (adaptive only)


def _adaptive(model: nn.Module, spec: str, grid: tuple[int, int, int] | None = None) -> bool:
    """Whether `spec` as given makes clips keep different counts (so it has no budget to set)."""
    try:
        reducers = make_plan(spec)
        for reducer in reducers:
            reducer.setup(model)  # as `apply` does: where some run depends on the model (halting)
        return any(step.after.ragged for step in schedule(model, reducers, grid))
    except InputError:
        return False


def _learned(base: str, model: nn.Module, *, as_given: bool = False) -> bool:
    """Whether method `base` has parameters to train (tried at its largest budget, or `as_given`)."""
    cls = REGISTRY[_one_method(base)[0]]
    keep_all = 0 if cls.budget_removes else 1.0
    spec = base if cls.budget is None or as_given else _with(base, cls.budget, keep_all)
    reducer = next(r for r in make_plan(spec) if r.name == cls.name)
    reducer.setup(model)
    return any(True for _ in reducer.parameters())


def _check_trained(model: nn.Module, spec: str, trained: Mapping[str, Tensor]) -> None:
    """Refuse trained weights whose names or shapes do not fit the reducer of `spec`."""
    method = _one_method(spec)[0]
    reducer = next(r for r in make_plan(spec) if r.name == method)
    reducer.setup(model)
    wanted = {k: tuple(v.shape) for k, v in reducer.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in trained.items()}
    if wanted != given:
        differ = sorted(k for k in wanted.keys() | given.keys() if wanted.get(k) != given.get(k))
        raise InputError(
            f"the trained {reducer.name} weights do not fit {spec} ({', '.join(differ[:3])} differ)"
        )


def _whole_misfit(
    model: nn.Module, spec: str, weights: Mapping[str, Tensor], grid: tuple[int, int, int] | None = None
) -> str | None:
    """Why whole-model `weights` do not fit `model` with `spec` installed (names or shapes), or None."""
    with apply(model, spec, grid=grid):
        wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in weights.items()}
    if wanted == given:
        return None
    differ = sorted(k for k in wanted.keys() | given.keys() if wanted.get(k) != given.get(k))
    return f"the trained weights of {spec} are not this model's ({', '.join(differ[:3])} differ)"


def plan_settings(
    model: nn.Module,
    methods: Sequence[str],
    budgets: Sequence[float],
    *,
    selectors: Mapping[str, Mapping[str, Tensor]] | None = None,
    seeds: int = SEEDS,
    count: Callable[[str | None], float] | None = None,
    grid: tuple[int, int, int] | None = None,
) -> list[Planned]:
    """The settings of a sweep: "none", then every method at every budget, with its GFLOPs and its
    matched random baseline (refused ones say why), on clips of token grid `grid` (default the model's
    own; `count` must count on the same clips: by default `_Flops` at `config.frames` x `config.size`)."""
    count = count or _Flops(model)
    settings = [Planned("none", None, spec="none", ratio=1.0, gflops=count(None))]
    for base in methods:
        if base.partition(":")[0].strip() == "none":
            continue
        method, given = _one_method(base)  # raises for an unknown method
        adaptive = _adaptive(model, base.strip(), grid)
        trained = (selectors or {}).get(weights_key(method, given))
        whole = REGISTRY[method].trains_backbone  # trained with the model: its weights are a whole model's
        untrained = (whole or _learned(base, model, as_given=adaptive)) and trained is None
        missing = f"{method} is learned and this model has no trained {weights_key(method, given)} weights"
        key = REGISTRY[method].budget
        plus = base.partition(":")[0].strip().endswith("++")
        if plus and key is not None and key not in given:  # X++: at every budget, each measured
            for budget in budgets:
                item = Planned(base.strip(), budget, adaptive=True)
                settings.append(item)
                try:
                    if untrained:
                        raise InputError(missing)
                    plain, extra = _split_plus(base)  # the budget is set on the method's own schedule
                    spec, _ = spec_at_budget(model, plain, budget, grid)
                    item.spec = spec.replace(method, f"{method}++", 1) + "".join(f",{a}" for a in extra)
                    if trained is not None:
                        _check_trained(model, item.spec, trained)
                except InputError as err:
                    item.spec, item.refused = None, str(err)
            continue
        if key is None and not adaptive:  # no budget, the same cost on every clip: one setting at that cost
            item = Planned(base.strip(), None)
            settings.append(item)
            try:
                with apply(model, base.strip(), grid=grid):  # refused as `apply` would say
                    pass
                if untrained:
                    raise InputError(missing)
                if whole and (misfit := _whole_misfit(model, base.strip(), trained, grid)):
                    raise InputError(misfit)
                item.spec, item.ratio = base.strip(), token_ratio(model, base.strip(), grid)
                item.budget, item.gflops = round(item.ratio, 2), count(item.spec)
                _match(item, model, count, grid, seeds)
            except InputError as err:
                item.spec, item.refused = None, str(err)
            continue
        if adaptive:  # one setting; its budget and GFLOPs are measured as it runs
            item = Planned(base.strip(), None, spec=base.strip(), adaptive=True)
            if untrained:
                item.spec, item.refused = None, missing
            elif whole:
                item.refused = _whole_misfit(model, base.strip(), trained, grid)
                item.spec = None if item.refused else item.spec
            settings.append(item)
            continue
        for budget in budgets:
            item = Planned(base.strip(), budget)  # the method with its fixed parameters: one row each
            settings.append(item)
            if untrained:
                item.refused = f"{missing}: train it (tokensieve train --plan {method}:...) and sweep the run"
                continue
            try:
                item.spec, item.ratio = spec_at_budget(model, base.strip(), budget, grid)
                item.gflops = count(item.spec)
                if trained is not None:
                    _check_trained(model, item.spec, trained)
            except InputError as err:
                item.refused = str(err)
                item.spec = None
                continue
            _match(item, model, count, grid, seeds)
    return settings


def _match(
    item: Planned, model: nn.Module, count: Callable[[str | None], float], grid: tuple[int, int, int] | None,
    seeds: int,
) -> None:  # fmt: skip
    """Fill `item`'s baselines matched to its GFLOPs: random (with its seeds) and resize (except for the
    baselines themselves)."""
    assert item.gflops is not None
    item.random = matched_random(model, item.gflops, count, grid)
    item.random_gflops = count(item.random)
    item.resize = item.resize_gflops = None
    item.seeds = [f"{item.random},seed={s}" for s in range(seeds)]
    if item.method.partition(":")[0].strip() not in ("random", "resize"):
        item.resize = matched_resize(model, item.gflops, count, grid)
        item.resize_gflops = None if item.resize is None else count(item.resize)


def _baselines(item: Planned) -> list[str]:
    """The baseline plans `item` is compared with: its random seeds, then its resize plan if any."""
    return [*item.seeds, *([item.resize] if item.resize else [])]


def canonical(spec: str) -> str:
    """One text per plan: every parameter with its default filled in, in a fixed order. A method that
    brings companions (`halting`: the Glimpser, `Reducer.expand`) is written alone: they come back with it."""
    terms = []
    for term in split_terms(spec):
        name = term.partition(":")[0].strip()
        for method, values in parse(term):
            if method == "none" or (name in REGISTRY and method != name):
                continue
            defaults = {n: p.default for n, (p, _) in spec_parameters(REGISTRY[method]).items()}
            merged = {**defaults, **values}
            terms.append(f"{method}:" + ",".join(f"{k}={merged[k]}" for k in sorted(merged)))
    return "+".join(terms) or "none"


# ---------------------------------------------------------------------------------------- running
@dataclass
class _Video:
    index: int
    id: str
    labels: list[int]
    views: Tensor | None
    error: str | None
    todo: list[str]  # canonical specs still to run
    truth: Tensor | None = None  # (T, H, W) foreground mask when recall is measured


def _install_all(
    model: nn.Module,
    specs: Sequence[str],
    selectors: Mapping[str, Mapping[str, Tensor]],
    grid: tuple[int, int, int] | None = None,
) -> dict[str, InstalledPlan]:
    """Install each plan once (learned reducers get their trained weights); the installed plans are
    swapped in with `install()`, without re-initialising anything. A plan of a method trained with the
    whole model (`Reducer.trains_backbone`: HaltingVT) runs on a copy of the model holding those weights:
    its installed plan's `model` is that copy. Each is checked for clips of token grid `grid` (default
    the model's own)."""
    states = {}
    for spec in specs:
        whole = _whole_model_key(spec)
        if whole is not None:
            states[spec] = _install_whole(model, spec, selectors[whole], grid)
            continue
        states[spec] = apply(model, None if spec == "none" else spec, grid=grid)
        misfits = load_trained(model, selectors)
        assert not misfits, f"{spec}: planning let through trained weights that do not fit ({misfits})"
    return states


def _whole_model_key(spec: str | None) -> str | None:
    """The `weights_key` of the method of `spec` trained with the whole model, or None."""
    if spec is None or spec == "none":
        return None
    return next((weights_key(m, given) for m, given in parse(spec) if REGISTRY[m].trains_backbone), None)


def _install_whole(
    model: nn.Module, spec: str, weights: Mapping[str, Tensor], grid: tuple[int, int, int] | None = None
) -> InstalledPlan:
    """`spec` installed on a copy of `model` (bare, in its mode) that then takes the whole-model `weights`."""
    kept = current_plan(model)
    apply(model, None)
    try:
        copy = deepcopy(model)
    finally:
        kept.install()
    installed = apply(copy, spec, grid=grid)
    copy.load_state_dict(weights)
    return installed


def _recall(state: TokenState, truth: Tensor) -> Tensor:
    """(B,) foreground recall: the share of the object (its coverage of each token, summed over the
    clip) that lies in the kept tokens; a merged token counts for every patch it stands for. NaN for a
    clip without the object."""
    kept = covered(state).to(truth.dtype)  # (B, THW) from the source map
    cover = truth.flatten(1)  # (B, THW) fraction of each token the object covers
    return (kept * cover).sum(1) / cover.sum(1)


def sweep(
    model: nn.Module,
    dataset: VideoDataset,
    *,
    out: str | Path,
    methods: Sequence[str] | None = None,
    budgets: Sequence[float] = BUDGETS,
    selectors: Mapping[str, Mapping[str, Tensor]] | None = None,
    seeds: int = SEEDS,
    views: tuple[int, int] | None = None,
    batch_size: int = 16,
    workers: int = 2,
    truth: str | Path | None = None,
    speed: bool = True,
    speed_batch: int | None = None,
    progress: Progress | None = None,
    model_name: str | None = None,
    header: Mapping[str, str] | None = None,
    examples: bool = False,
) -> SweepReport:
    """Run the sweep (module docstring) and write `out/results.jsonl`, `report.md`, `pareto.png`.

    Args:
        model: a tokensieve backbone; the learned reducers of its installed plan count as trained
            weights of their methods (unless `selectors` gives them); its plan is put back afterwards.
        dataset: the videos (`VideoDataset`).
        out: the sweep's folder.
        methods: method specs without their budget parameter ("sta", "attention:per_frame=true");
            default `METHODS` (every method that stands alone).
        budgets: target token ratios in (0, 1).
        selectors: trained weights of learned methods (`reducer.state_dict()`), by `weights_key`: the method's
            name ("stts"), with the parameters other than the budget they were trained with if any
            ("lite:tensor=embed,value=gradnorm").
        seeds: seeds of the matched random baseline.
        views: (clips, crops) per video; default the dataset's.
        batch_size: views per forward pass.
        workers: decoding processes.
        truth: the folder of a synthetic set (`make_synthetic`), for the foreground recall; only
            measured when one view covers the whole clip (views 1x1 of a set of the model's size).
        speed: measure each plan's speed-up over the unreduced model (`ts.benchmark`, rank 0).
        speed_batch: batch size of the speed measurement; default `batch_size`.
        progress: see `Progress`.
        model_name: the model's name or path, for the header.
        header: extra "what: value" lines for the top of the report (the CLI passes its command).
        examples: draw each method's kept tokens at its middle budget on the first video
            (`ts.viz.kept_tokens`) into `out/examples/`, shown in the report.

    Raises:
        InputError: bad methods or budgets, a dataset that does not fit the model, an `out` holding
            another sweep's records (naming what differs) or in use by a live sweep.
    """
    began = time.perf_counter()
    budgets = [float(b) for b in budgets]
    if not budgets or any(not 0 < b < 1 for b in budgets):
        raise InputError(
            f"budgets must be token ratios in (0, 1), got {', '.join(map(str, budgets)) or 'none'}"
        )
    if seeds < 1 or batch_size < 1 or workers < 0:
        raise InputError(
            f"need seeds >= 1, batch_size >= 1, workers >= 0; got {seeds}, {batch_size}, {workers}"
        )
    if views is not None:
        dataset = dataset.with_views(views)
    check_fits(model, dataset)
    grid = model.config.grid_of(dataset.frames, dataset.size)  # the clips' token grid: what plans run on
    if dataset.multilabel:
        raise InputError(
            "the sweep compares top-1 of single-label data; multi-label lists (mAP) are not supported yet: "
            "evaluate each plan with tokensieve eval"
        )
    out = Path(out)
    own = {  # a method trained with the whole model owns all of its weights
        key: model.state_dict() if r.trains_backbone else r.state_dict()
        for r, key in zip(model.plan, trained_keys(model), strict=True)
        if r.trains_backbone or any(True for _ in r.parameters())
    }
    selectors = {**own, **(selectors or {})}
    methods = list(methods) if methods is not None else list(METHODS)
    for base in methods:  # bad names and parameters before anything runs
        method, given = _one_method(base)
        key = REGISTRY[method].budget
        if key is not None and key in given and not _adaptive(model, base, grid):
            raise InputError(f"{base}: leave {key} out; the sweep sets it")
    kept = current_plan(model)
    apply(model, None)
    try:
        log.info("choosing the settings of %d methods at %d budgets and their random baselines",
                 len([m for m in methods if not m.startswith("none")]), len(set(budgets)))  # fmt: skip
        count = _Flops(model, frames=dataset.frames, size=dataset.size)
        settings = plan_settings(model, methods, sorted(set(budgets)), selectors=selectors, seeds=seeds,
                                 count=count, grid=grid)  # fmt: skip
        return _sweep(model, dataset, settings, out=out, selectors=selectors, batch_size=batch_size,
                      workers=workers, truth=Path(truth) if truth is not None else None, speed=speed,
                      speed_batch=speed_batch or batch_size, progress=progress, model_name=model_name,
                      header=dict(header or {}), examples=examples, began=began, seeds=seeds)  # fmt: skip
    finally:
        kept.install()


def _checksum(model: nn.Module, selectors: Mapping[str, Mapping[str, Tensor]]) -> str:
    """The model's checksum, with the trained selectors' weights folded in."""
    text = model_checksum(model)
    if not selectors:
        return text
    digest = hashlib.sha256(text.encode())
    hash_tensors(digest, ((f"{m}.{name}", t) for m in sorted(selectors) for name, t in selectors[m].items()))
    return "sha256:" + digest.hexdigest()


def _truth_fits(model: nn.Module, dataset: VideoDataset, truth: Path | None) -> bool:
    cfg = model.config
    if truth is None:
        return False
    if dataset.views != (1, 1):
        log.info("foreground recall needs one view per video covering the clip; not measured with %s views",
                 "x".join(map(str, dataset.views)))  # fmt: skip
        return False
    if dataset.sampling != "dense" or dataset.stride != 1:
        log.info("foreground recall needs each clip to be its video's frames in order (dense, stride 1); "
                 "not measured")  # fmt: skip
        return False
    sample = load_truth(truth, dataset.records[0].id)
    grid = cfg.grid_of(dataset.frames, dataset.size)  # the clips' token grid
    fits = tuple(sample["mask"].shape) == grid and sample["patch"] == cfg.patch
    if not fits or sample["tubelet"] != cfg.tubelet:
        log.info("the synthetic set's truth masks (grid %s) do not match the clips' token grid %s; "
                 "foreground recall not measured", tuple(sample["mask"].shape), grid)  # fmt: skip
        return False
    return True


def _sweep(
    model: nn.Module, dataset: VideoDataset, settings: list[Planned], *, out: Path,
    selectors: Mapping[str, Mapping[str, Tensor]], batch_size: int, workers: int, truth: Path | None,
    speed: bool, speed_batch: int, progress: Progress | None, model_name: str | None,
    header: dict[str, str], examples: bool, began: float, seeds: int,
) -> SweepReport:  # fmt: skip
    device = next(model.parameters()).device
    world = setup(device)
    runs = sorted({canonical(s) for item in settings if item.spec for s in [item.spec, *_baselines(item)]})
    provenance = Provenance(
        model=model_name, checksum=_checksum(model, selectors), plan=SWEEP_PLAN, views=dataset.views,
        frames=dataset.frames, size=dataset.size, resize=dataset.resize, sampling=dataset.sampling,
        stride=dataset.stride if dataset.sampling == "dense" else None,
        short=dataset.short if dataset.sampling == "dense" else None, dtype="float32",
    )  # fmt: skip
    if len(set(gather(world, provenance.checksum))) > 1:
        raise InputError(
            "the torchrun processes hold different weights (load the same model in every process)"
        )
    results = out / "results.jsonl"
    lock = on_main(world, lambda: start_run(results, provenance))
    try:
        recall = _truth_fits(model, dataset, truth)
        ids = [r.id for r in dataset.records]

        def run(
            plans: Sequence[str], every: Sequence[str]
        ) -> tuple[tuple[float, float], list[dict[str, Any]]]:
            """Run `plans` on the videos still without them; then the records of `every` plan, merged."""
            seconds = _run(model, dataset, plans, results=results, provenance=provenance, selectors=selectors,
                           batch_size=batch_size, workers=workers, truth=truth if recall else None, world=world,
                           progress=progress)  # fmt: skip
            barrier(world)
            keys = [record_key(i, s) for s in every for i in ids]
            merged = on_main(world, lambda: merge(results, keys, provenance))
            return seconds, merged if merged is not None else list(read_done(results).values())

        decode, records = run(runs, runs)
        if _match_adaptive(model, dataset, settings, records, seeds):
            # A second pass: the random baselines matched to what the adaptive settings measured.
            more = sorted(
                {canonical(s) for item in settings if item.adaptive for s in _baselines(item)} - set(runs)
            )
            if more:  # (each may already be a setting of the first pass)
                runs = [*runs, *more]
                again, records = run(more, runs)
                decode = (decode[0] + again[0], decode[1] + again[1])
        speeds = _speeds(model, settings, speed_batch, dataset) if speed and world.is_main else {}
        table = _settings_table(settings, records, ids, speeds)
        picture = _examples(model, settings, dataset, selectors, out) if world.is_main and examples else {}
        waited, total = (sum(values) for values in zip(*gather(world, decode), strict=True))
        lines = _header_lines(
            model_name, provenance, dataset, world, time.perf_counter() - began, waited, total
        )
        report = SweepReport(settings=table, header={**header, **lines}, examples=picture)
        from .report import write_report

        # Rank 0 writes; every process waits for it (and gets its error), so all of them leave together.
        on_main(world, lambda: write_report(report, out))
        return report
    finally:
        if lock is not None:
            lock.release()


def _match_adaptive(
    model: nn.Module,
    dataset: VideoDataset,
    settings: Sequence[Planned],
    records: Sequence[dict[str, Any]],
    seeds: int,
) -> bool:
    """Fill each adaptive setting's measured budget and GFLOPs (means over the views of its records)
    and its random baseline matched to them, on the dataset's clips. Returns whether any was filled."""
    per_video = math.prod(dataset.views)
    grid = model.config.grid_of(dataset.frames, dataset.size)
    count: _Flops | None = None
    filled = False
    for item in settings:
        if not item.adaptive or item.spec is None:
            continue
        own = canonical(item.spec)
        mine = [r for r in records if r.get("setting") == own and r.get("status") == "ok" and "gflops" in r]
        if not mine:
            item.refused, item.spec = "no video could be evaluated", None
            continue
        item.views = len(mine) * per_video  # every video has as many views: the mean of records is theirs
        item.gflops = sum(r["gflops"] for r in mine) / len(mine)
        item.ratio = sum(r["ratio"] for r in mine) / len(mine)
        item.budget = round(item.ratio, 2)
        count = count or _Flops(model, frames=dataset.frames, size=dataset.size)
        _match(item, model, count, grid, seeds)
        filled = True
    return filled


def _run(
    model: nn.Module, dataset: VideoDataset, runs: Sequence[str], *, results: Path, provenance: Provenance,
    selectors: Mapping[str, Mapping[str, Tensor]], batch_size: int, workers: int, truth: Path | None,
    world: World, progress: Progress | None,
) -> tuple[float, float]:  # fmt: skip
    """Run every plan of `runs` on every video not yet recorded for it; returns (seconds waiting for
    decoded videos, seconds in all) of this process."""
    began = time.perf_counter()
    done = read_done(results)
    todo = {i: [s for s in runs if record_key(r.id, s) not in done] for i, r in enumerate(dataset.records)}
    videos = [i for i in range(len(dataset)) if todo[i]]
    mine = videos[world.rank :: world.size]
    barrier(world)  # every process has read the same records before any writes
    finished_before = len(dataset) * len(runs) - sum(len(t) for t in todo.values())
    if finished_before and world.is_main:
        log.info("%s: resuming: %d of %d (video, setting) results already recorded", results,
                 finished_before, len(dataset) * len(runs))  # fmt: skip
    total = sum(len(todo[i]) for i in mine)
    if not mine:
        if progress is not None and not finished_before:  # a pass with nothing recorded: start the display
            progress(0, 0)  # (one whose work is all recorded leaves the display as the last pass left it)
        return 0.0, time.perf_counter() - began
    kept = current_plan(model)
    was_training = model.training
    model.eval()  # first: the reducers `_install_all` creates take the model's mode
    states = _install_all(model, runs, selectors, model.config.grid_of(dataset.frames, dataset.size))
    loader = DataLoader(_Todo(dataset, mine), batch_size=None, num_workers=workers,
                        prefetch_factor=2 if workers else None)  # fmt: skip
    writer = RecordWriter(results, world.rank, provenance)
    waited, finished, batch, rows = 0.0, 0, [], 0

    def flush() -> None:
        nonlocal finished, batch, rows
        finished += _run_batch(model, batch, states, writer)
        batch, rows = [], 0
        if progress is not None:
            progress(finished, total)

    try:
        if progress is not None:
            progress(0, total)
        samples = iter(loader)
        while True:
            start = time.perf_counter()
            sample = next(samples, None)
            waited += time.perf_counter() - start
            if sample is None:
                break
            video = _Video(sample.index, sample.record.id, list(sample.record.labels), sample.views, sample.error,
                           todo[sample.index])  # fmt: skip
            if video.views is None:
                for spec in video.todo:
                    writer.write({"id": video.id, "setting": spec, "labels": video.labels, "status": "failed",
                                  "error": video.error})  # fmt: skip
                finished += len(video.todo)
                continue
            if truth is not None:
                video.truth = load_truth(truth, video.id)["mask"]
            batch.append(video)
            rows += len(video.views)
            if rows >= batch_size:
                flush()
        if batch:
            flush()
    finally:
        writer.close()
        kept.install()
        model.train(was_training)
    return waited, time.perf_counter() - began


def _run_batch(
    model: nn.Module, batch: list[_Video], states: Mapping[str, InstalledPlan], writer: RecordWriter
) -> int:
    """Every plan still to do for the videos of `batch` on their views; returns records written."""
    cfg = model.config
    device = next(model.parameters()).device
    views = torch.cat([v.views for v in batch])  # (V, T, C, S, S) uint8
    x = normalize(views.to(device).float().div_(255), cfg.mean, cfg.std)
    owner = torch.cat([torch.full((len(v.views),), i) for i, v in enumerate(batch)])  # (V,)
    truth = torch.stack([v.truth for v in batch]) if all(v.truth is not None for v in batch) else None
    written = 0
    for spec in dict.fromkeys(s for v in batch for s in v.todo):
        rows = [i for i, v in enumerate(batch) if spec in v.todo]
        net = states[spec].install().model  # `model`, or its copy with a whole trained model's weights
        adaptive = states[spec].adaptive
        # An adaptive plan runs each video's views on their own: its GFLOPs and tokens are its own.
        for group in [[i] for i in rows] if adaptive else [rows]:
            take = torch.isin(owner, torch.tensor(group))
            who = owner[take]
            given = None
            if any(r.wants_labels for r in net.plan):  # an oracle: the labels reach the plan
                given = Inputs(x[take], label_tensor([batch[i].labels for i in who.tolist()], cfg.num_classes,
                                                     multilabel=False).to(device))  # fmt: skip
            measured: dict[str, float] = {}
            # Recall of kept tokens, on the truth's grid: not of a plan that runs another size (resize).
            traced = truth is not None and not any(r.resizes_input for r in net.plan)
            with torch.no_grad() if adaptive else torch.inference_mode():
                clips = cfg.grid_of(x.shape[1], tuple(x.shape[-2:]))  # before any plan resizes them
                with _measuring(net, measured, clips) if adaptive else contextlib.nullcontext():
                    state = net.forward_features(x[take], trace=traced, inputs=given)
                    probs = net.forward_head(state).float().softmax(-1).cpu()  # (v, K)
                recall = _recall(state, truth[who].to(device)).cpu() if traced else None
            for i in group:
                video, mine = batch[i], who == i
                record: dict[str, Any] = {
                    "id": video.id, "setting": spec, "labels": video.labels, "status": "ok",
                    "top5": top5_entries(probs[mine].mean(0)), **measured,
                }  # fmt: skip
                if recall is not None:
                    r = float(recall[mine].nanmean())
                    record["recall"] = None if math.isnan(r) else round(r, 6)
                writer.write(record)
                written += 1
    return written


@contextlib.contextmanager
def _measuring(model: nn.Module, into: dict[str, float], grid: tuple[int, int, int]) -> Iterator[None]:
    """Measure one video's forward (all its views, clips of token grid `grid`): `into` gets "gflops" (per
    view, the mean over its views) and "ratio" (the token ratio `token_ratio` computes from a schedule,
    here from the tokens each block really took, as a share of the clips' grid, whatever a plan did to
    the clip first (resize): a block whose MLP sees fewer tokens than its attention counts the mean)."""
    attention: list[Tensor] = []  # (v,) tokens at each block's attention
    mlp: dict[int, Tensor] = {}  # block -> (v,) tokens at its MLP, when a reducer runs in between
    hooks = [block.register_forward_pre_hook(lambda _m, args: attention.append(args[0].num_tokens))
             for block in model.blocks]  # fmt: skip
    for p, block in enumerate(model.blocks):
        if not isinstance(block.inner, nn.Identity):
            hooks.append(block.inner.register_forward_hook(
                lambda _m, _a, out, p=p: mlp.__setitem__(p, out.num_tokens)))  # fmt: skip
    try:
        with count_flops(model) as counted:
            yield
    finally:
        for hook in hooks:
            hook.remove()
    per_block = torch.stack([(n + mlp.get(p, n)).double() / 2 for p, n in enumerate(attention)])  # (L, v)
    T, H, W = grid
    views = attention[0].shape[0]
    into["gflops"] = counted.macs / views / 1e9
    into["ratio"] = float(per_block.mean() / (T * H * W))


def _examples(
    model: nn.Module, settings: Sequence[Planned], dataset: VideoDataset,
    selectors: Mapping[str, Mapping[str, Tensor]], out: Path,
) -> dict[str, str]:  # fmt: skip
    """Each method's kept tokens at its middle budget on the first readable video, as
    `out/examples/<method>.png`; method -> path relative to `out`."""
    from .. import viz

    log.info("drawing an example of each method's kept tokens")
    first = next((s for s in map(dataset.__getitem__, range(len(dataset))) if s.views is not None), None)
    if first is None:
        return {}
    clip, labels = first.views[0], first.record.labels
    grid = model.config.grid_of(dataset.frames, dataset.size)
    chosen: dict[str, Planned] = {}
    for method in dict.fromkeys(item.method for item in settings if item.method != "none"):
        ran = sorted((s for s in settings if s.method == method and s.spec), key=lambda s: s.budget or 0.0)
        if ran:
            chosen[method] = ran[len(ran) // 2]
    kept, paths = current_plan(model), {}
    try:
        for method, item in chosen.items():
            assert item.spec is not None
            net = _install_all(model, [item.spec], selectors, grid)[item.spec].model
            path = f"examples/{re.sub(r'[^A-Za-z0-9_.=-]+', '_', method)}.png"  # "attention:mass=0.9" too
            viz.save(viz.kept_tokens(net, clip, label=labels[0] if labels else None), out / path)
            paths[method] = path
    finally:
        kept.install()
    return paths


# ---------------------------------------------------------------------------------------- summary
def _speeds(
    model: nn.Module, settings: Sequence[Planned], batch: int, dataset: VideoDataset
) -> dict[str, float]:
    """Speed-up over the unreduced model of every plan run (one seed of each random baseline), measured
    in interleaved rounds in this process (`ts.benchmark`). Not of a plan that reads the labels (an
    oracle): it cannot run at inference, and its privileged pass would be timed with it. Nor of a method
    trained with the whole model (HaltingVT): what it halts depends on those weights and on real content,
    which random pixels are not (benchmarks/halting.py measures it)."""
    from ..bench import benchmark

    plans = list(dict.fromkeys(  # each setting, one seed of its random baseline, its resize baseline
        s for item in settings if item.spec for s in (item.spec, *item.seeds[:1], *filter(None, [item.resize]))
    ))  # fmt: skip
    # Not timed: an oracle (labels), or a method whose cost depends on its trained whole model (HaltingVT)
    plans = [p for p in plans if not any(r.wants_labels or r.trains_backbone for r in make_plan(p))]
    log.info("measuring the speed of %d plans (batch %d)", len(plans), batch)
    results = benchmark(model, plans=plans, batch_size=batch, warmup=2, repeats=5, frames=dataset.frames,
                        size=dataset.size)  # warns when busy  # fmt: skip
    return {canonical(r.plan): r.speedup for r in results}


def _correct(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], tuple[float, float]]:
    """(video id, canonical spec) -> (top-1 hit, top-5 hit) of every successful record."""
    hits = {}
    for r in records:
        if r.get("status") != "ok" or not r["labels"]:
            continue
        label, top5 = r["labels"][0], [c for c, _ in r["top5"]]
        hits[(r["id"], r["setting"])] = (float(top5[0] == label), float(label in top5))
    return hits


def _settings_table(
    settings: Sequence[Planned],
    records: Sequence[dict[str, Any]],
    ids: Sequence[str],
    speeds: Mapping[str, float],
) -> list[Setting]:
    """Metrics of every setting over the videos every one of its runs (itself, its random seeds, its resize
    baseline) has; Δ and the verdict against the baseline with the higher top-1 on them (random on a tie, or
    when the resize size costs more than `RESIZE_MATCHED` less than the setting)."""
    hits = _correct(records)
    recalls = {(r["id"], r["setting"]): r.get("recall") for r in records if r.get("status") == "ok"}
    table = []
    for item in settings:
        if item.spec is None:
            table.append(Setting(item.method, item.budget, None, refused=item.refused))
            continue
        own, seeds = canonical(item.spec), [canonical(s) for s in item.seeds]
        resized = [canonical(item.resize)] if item.resize else []
        videos = [i for i in ids if all((i, s) in hits for s in (own, *seeds, *resized))]
        if not videos:
            table.append(Setting(item.method, item.budget, item.spec, refused="no video could be evaluated"))
            continue
        top1 = torch.tensor([hits[(i, own)][0] for i in videos])
        top5 = torch.tensor([hits[(i, own)][1] for i in videos])
        kept = [recalls.get((i, own)) for i in videos]
        recall = [r for r in kept if r is not None]
        row: dict[str, Any] = dict(
            gflops=item.gflops, speedup=speeds.get(own), top1=float(top1.mean()), top1_ci=bootstrap_ci(top1),
            top5=float(top5.mean()), recall=sum(recall) / len(recall) if recall else None,
        )  # fmt: skip
        if seeds:
            rand = torch.tensor([[hits[(i, s)][0] for s in seeds] for i in videos]).mean(
                1
            )  # (n,) mean of seeds
            row.update(random_spec=item.random, random_gflops=item.random_gflops, random_top1=float(rand.mean()),
                       random_speedup=speeds.get(seeds[0]))  # fmt: skip
            against, base = BASELINE, rand
            if resized:
                size = torch.tensor([hits[(i, resized[0])][0] for i in videos])  # (n,)
                row.update(resize_spec=item.resize, resize_gflops=item.resize_gflops, resize_top1=float(size.mean()),
                           resize_speedup=speeds.get(resized[0]))  # fmt: skip
                near = (
                    item.resize_gflops is not None
                    and item.resize_gflops >= (1 - RESIZE_MATCHED) * item.gflops
                )
                if near and size.mean() > rand.mean():  # a size much cheaper than the setting is not matched
                    against, base = RESIZE, size
            if item.method.partition(":")[0] != "random":
                ci = paired_bootstrap_ci(top1, base)
                row.update(baseline=against, delta=float((top1 - base).mean()), delta_ci=ci,
                           verdict=verdict(ci, against))  # fmt: skip
        table.append(Setting(item.method, item.budget, item.spec, views=item.views, **row))
    return table


def _cpu() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _header_lines(
    model_name: str | None, provenance: Provenance, dataset: VideoDataset, world: World, seconds: float,
    waited: float, busy: float,
) -> dict[str, str]:  # fmt: skip
    import datetime
    import os
    import platform

    from .. import __version__

    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{_cpu()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
        + (f", {world.size} processes" if world.size > 1 else ""),
        "versions": f"tokensieve {__version__}, torch {torch.__version__}, python {platform.python_version()}",
        "model": f"{model_name or 'a model'} ({provenance.checksum[:19]})",
        "data": f"{len(dataset)} videos, {dataset.views[0]}x{dataset.views[1]} views of {dataset.frames}x{dataset.size}",
        "wall time": f"{seconds:.0f} s; decoding (waiting for videos): {waited:.1f} s of {busy:.1f} s running "
        f"({100 * waited / max(busy, 1e-9):.0f}%)",
    }
