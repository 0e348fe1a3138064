"""Reduction plans: parse a spec string, install its reducers into a backbone.

Spec grammar: `method[:key=value[,key=value]...]`, several joined with `+`
(`"stts:T0=0.5+sta:r=32"`). Parameters are the keyword-only constructor arguments of the method's
reducer class; values are converted to the annotated type.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from torch import nn

from ..backbones.base import VideoBackbone
from .base import REGISTRY, Reducer

__all__ = ["apply", "parse", "plan", "spec_parameters"]


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


def _describe(cls: type[Reducer]) -> str:
    params = spec_parameters(cls)
    if not params:
        return f"{cls.name} (no parameters)"
    return f"{cls.name}: " + ", ".join(f"{n}={p.default!r}" for n, (p, _) in params.items())


def _convert(value: str, annotation: Any, method: str, key: str) -> Any:
    hints = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
    if hints is not None:
        if value not in [str(h) for h in hints]:
            raise ValueError(f"{method}: {key} must be one of {', '.join(map(str, hints))}; got {value!r}")
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
        raise ValueError(
            f"{method}: {key} expects a {annotation if isinstance(annotation, str) else annotation.__name__}, got {value!r}"
        ) from None
    return value


def parse(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """Split a spec into (method, parameters) pairs, checking names and converting values.

    Raises:
        ValueError: unknown method (lists the valid ones), unknown parameter (lists the method's
            parameters with defaults), malformed `key=value`, or a value of the wrong type.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"a plan spec is a non-empty string such as 'none' or 'random:keep=0.5', got {spec!r}"
        )
    items = []
    for term in spec.split("+"):
        method, _, args = term.strip().partition(":")
        if method not in REGISTRY:
            raise ValueError(
                f"unknown method {method!r} in {spec!r}; valid methods: {', '.join(sorted(REGISTRY))}"
            )
        cls = REGISTRY[method]
        params = spec_parameters(cls)
        values: dict[str, Any] = {}
        for pair in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq:
                raise ValueError(f"{method}: expected key=value, got {pair!r}")
            if key not in params:
                raise ValueError(f"{method} has no parameter {key!r}; valid: {_describe(cls)}")
            values[key] = _convert(value.strip(), params[key][1], method, key)
        items.append((method, values))
    return items


def plan(spec: str) -> list[Reducer]:
    """The reducers of a spec, constructed but not installed."""
    return [REGISTRY[method](**params) for method, params in parse(spec)]


def apply(model: VideoBackbone, spec: str | None) -> VideoBackbone:
    """Install a reduction plan into `model` (in place), replacing any plan installed before.

    Args:
        model: a tokensieve backbone.
        spec: a plan spec, or None / "none" to remove reduction.

    Returns:
        `model`, for chaining.

    Raises:
        ValueError: bad spec, a position outside the model, or a reducer that needs a side result
            at position 0 (there is no block before it to record it).
    """
    reducers = plan(spec) if spec is not None else []
    depth = len(model.blocks)
    slots: list[list[Reducer]] = [[] for _ in range(depth)]
    for reducer in reducers:
        for p in reducer.positions(depth):
            if not 0 <= p < depth:
                raise ValueError(
                    f"{reducer.name}: position {p} is outside this model; valid positions: 0..{depth - 1}"
                )
            if reducer.needs and p == 0:
                raise ValueError(
                    f"{reducer.name} needs {', '.join(sorted(reducer.needs))} recorded by the block before it, "
                    f"so it cannot run at position 0; valid positions: 1..{depth - 1}"
                )
            slots[p].append(reducer)
    for p, installed in enumerate(slots):
        if not installed:
            model.reducers[p] = nn.Identity()
        else:
            model.reducers[p] = installed[0] if len(installed) == 1 else nn.Sequential(*installed)
    for p, block in enumerate(model.blocks):
        after = slots[p + 1] if p + 1 < depth else []
        block.record = frozenset().union(*(r.needs for r in after))
    return model
