"""Reduction plans: parse a spec string, install its reducers into a backbone.

Spec grammar: `method[:key=value[,key=value]...]`, several joined with `+`
(`"stts:T0=0.5+sta:r=32"`). Parameters are the keyword-only constructor arguments of the method's
reducer class; values are converted to the annotated type.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn

from ..backbones.base import VideoBackbone
from ..errors import InputError
from .base import REGISTRY, At, Reducer, Site

__all__ = ["Step", "apply", "load_trained", "parse", "pattern_label", "plan", "schedule", "spec_parameters"]


def spec_parameters(cls: type[Reducer]) -> dict[str, tuple[inspect.Parameter, Any]]:
    """A method's spec parameters: its constructor's keyword-only arguments, each with its resolved
    type annotation (`str` when unannotated)."""
    hints = typing.get_type_hints(cls.__init__)
    sig = inspect.signature(cls.__init__)
    return {
        n: (p, hints.get(n, str))
        for n, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def pattern_label(pattern: str) -> str:
    """How a pattern parameter is shown to people: `T\\d+` (a `Reducer.pattern_parameters` key) -> `T<block>`."""
    return pattern.replace(r"\d+", "<block>")


def _describe(cls: type[Reducer]) -> str:
    params = spec_parameters(cls)
    named = [f"{n}={p.default!r}" for n, (p, _) in params.items()]
    patterns = [
        f"{pattern_label(pattern)}=<{kind.__name__}>" for pattern, kind in cls.pattern_parameters.items()
    ]
    if not named and not patterns:
        return f"{cls.name} (no parameters)"
    return f"{cls.name}: " + ", ".join(patterns + named)


def _pattern(cls: type[Reducer], key: str) -> type | None:
    """The type of a parameter named by one of the method's patterns (STTS's `T0`, `S4`), or None."""
    return next(
        (kind for pattern, kind in cls.pattern_parameters.items() if re.fullmatch(pattern, key)), None
    )


def _convert(value: str, annotation: Any, method: str, key: str) -> Any:
    hints = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
    if hints is not None:
        if value not in [str(h) for h in hints]:
            raise InputError(f"{method}: {key} must be one of {', '.join(map(str, hints))}; got {value!r}")
        return next(h for h in hints if str(h) == value)
    try:
        if annotation in (bool, "bool"):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return value.lower() in ("1", "true", "yes")
        if annotation in (int, "int"):
            return int(value)
        if annotation in (float, "float"):
            return float(value)
    except ValueError:
        raise InputError(
            f"{method}: {key} expects a {annotation if isinstance(annotation, str) else annotation.__name__}, got {value!r}"
        ) from None
    return value


def parse(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """Split a spec into (method, parameters) pairs, checking names and converting values.

    Raises:
        InputError: unknown method (lists the valid ones), unknown parameter (lists the method's
            parameters with defaults), a parameter given twice in one term, malformed `key=value`,
            or a value of the wrong type.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(
            f"a plan spec is a non-empty string such as 'none' or 'random:keep=0.5', got {spec!r}"
        )
    items = []
    for term in spec.split("+"):
        method, _, args = term.strip().partition(":")
        if method not in REGISTRY:
            raise InputError(
                f"unknown method {method!r} in {spec!r}; valid methods: {', '.join(sorted(REGISTRY))}"
            )
        cls = REGISTRY[method]
        params = spec_parameters(cls)
        values: dict[str, Any] = {}
        for pair in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq:
                raise InputError(f"{method}: expected key=value, got {pair!r}")
            kind = params[key][1] if key in params else _pattern(cls, key)
            if kind is None:
                raise InputError(f"{method} has no parameter {key!r}; valid: {_describe(cls)}")
            if key in values:  # the last value winning silently would hide a typo
                raise InputError(f"{method}: {key} is given twice in {spec!r}; give each parameter once")
            values[key] = _convert(value.strip(), kind, method, key)
        items.append((method, values))
    return items


def plan(spec: str) -> list[Reducer]:
    """The reducers of a spec, constructed but not installed."""
    return [REGISTRY[method](**params) for method, params in parse(spec)]


class Step(NamedTuple):
    """One place of an installed plan, in execution order."""

    reducer: Reducer
    site: Site
    inside: bool
    tokens_in: int
    tokens_out: int
    frames_out: int | None


def schedule(model: VideoBackbone, reducers: list[Reducer]) -> list[Step]:
    """Where each reducer runs on `model`, in execution order, with the token counts it leaves.

    Every check that does not need data happens here: positions inside the model, side results
    available, backbone compatibility, and parameters that fit the token counts they will see.

    Raises:
        ValueError: naming the reducer and what was expected.
    """
    depth = len(model.blocks)
    grid = model.config.grid
    placed: list[tuple[int, int, Reducer, Site]] = []
    for order, reducer in enumerate(reducers):
        reducer.check(model)
        positions = reducer.positions(depth)
        for stage, p in enumerate(positions):
            valid = f"0..{depth - 1}" if reducer.inside or not reducer.needs_for(model) else f"1..{depth - 1}"
            if not 0 <= p < depth:
                raise InputError(
                    f"{reducer.name}: position {p} is outside this model; valid positions: {valid}"
                )
            if reducer.needs_for(model) and p == 0 and not reducer.inside:
                raise InputError(
                    f"{reducer.name} needs {', '.join(sorted(reducer.needs_for(model)))} recorded by the block "
                    f"before it, so it cannot run at position 0; valid positions: {valid}"
                )
            # Execution order: before block p, then inside block p; plan order breaks ties.
            placed.append((2 * p + reducer.inside, order, reducer, Site(stage, p, depth, grid)))
    T, H, W = grid
    num, frames = T * H * W, T
    steps = []
    for _, _, reducer, site in sorted(placed, key=lambda item: item[:2]):
        out, frames_out = reducer.count(num, frames, site)
        steps.append(Step(reducer, site, reducer.inside, num, out, frames_out))
        num, frames = out, frames_out
    return steps


def apply(model: VideoBackbone, spec: str | None) -> VideoBackbone:
    """Install a reduction plan into `model` (in place), replacing any plan installed before.

    The reducers become `model.plan` (so learned ones train, save and load with the model); each
    place they run at gets a slot: `model.reducers[p]` before block `p`, `model.blocks[p].inner`
    between its attention and MLP. Each block is told what its attention must record.

    Args:
        model: a tokensieve backbone.
        spec: a plan spec, or None / "none" to remove reduction.

    Returns:
        `model`, for chaining.

    Raises:
        ValueError: bad spec, a position outside the model, a reducer that needs a side result at
            position 0 (there is no block before it to record it), a method the backbone cannot
            run, or parameters that do not fit the token counts.
    """
    reducers = plan(spec) if spec is not None else []
    for reducer in reducers:
        reducer.setup(model)  # learned reducers size their parameters to the model
        reducer.train(model.training)  # a new reducer follows the model's train/eval mode
    steps = schedule(model, reducers)  # raises before anything is changed
    readers = [r for r in reducers if r.overrides_readout]
    if len(readers) > 1:
        raise InputError(
            f"only one method of a plan can replace the readout; {', '.join(r.name for r in readers)} all do"
        )
    depth = len(model.blocks)
    before: list[list[nn.Module]] = [[] for _ in range(depth)]
    inner: list[list[nn.Module]] = [[] for _ in range(depth)]
    record: list[set[str]] = [set() for _ in range(depth)]
    for step in steps:
        p = step.site.position
        (inner if step.inside else before)[p].append(At(step.reducer, step.site))
        # The attention that records: block p's own for an inside reducer, else block p - 1's.
        recorder = p if step.inside else p - 1
        if recorder >= 0:
            record[recorder] |= step.reducer.needs_for(model)
    for p, block in enumerate(model.blocks):
        model.reducers[p] = _slot(before[p])
        block.inner = _slot(inner[p])
        block.record = frozenset(record[p])
    model.plan = nn.ModuleList(reducers).train(model.training)
    model.spec = None if spec is None else spec.strip()
    model.__dict__["readout_by"] = readers[0] if readers else None  # a reference, not a submodule
    return model


def load_trained(model: VideoBackbone, trained: Mapping[str, Mapping[str, Tensor]]) -> list[str]:
    """Give each reducer of `model`'s installed plan the weights `trained` holds for its method (method
    -> `state_dict()`), where their names and shapes fit. Returns the methods whose weights did not fit
    (those reducers keep theirs)."""
    misfits = []
    for reducer in model.plan:
        weights = trained.get(reducer.name)
        if weights is None:
            continue
        try:
            reducer.load_state_dict(weights)
        except RuntimeError:
            misfits.append(reducer.name)
    return misfits


def _slot(modules: list[nn.Module]) -> nn.Module:
    if not modules:
        return nn.Identity()
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)
