"""Reduction plans: parse a spec string, install its reducers into a backbone.

Spec grammar: `method[:key=value[,key=value]...]`, several joined with `+`
(`"stts:T0=0.5+sta:r=32"`). Parameters are the keyword-only constructor arguments of the method's
reducer class; values are converted to the annotated type.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

from torch import Tensor, nn

from ..backbones.base import VideoBackbone
from ..errors import InputError
from ..tokens import NEEDS, Layout
from .base import REGISTRY, At, Reducer, Site

__all__ = [
    "InstalledPlan",
    "Step",
    "apply",
    "current_plan",
    "is_adaptive",
    "load_trained",
    "parse",
    "pattern_label",
    "plan",
    "schedule",
    "spec_pairs",
    "spec_parameters",
    "split_plus",
    "split_terms",
    "trained_keys",
    "weights_key",
    "without_plan",
]


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
    options = typing.get_args(annotation)
    if type(None) in options:  # an optional parameter (`mass: float | None`): "none" leaves it unset
        if value.lower() == "none":
            return None
        annotation = next(a for a in options if a is not type(None))
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
    for term in split_terms(spec):
        method, _, args = term.strip().partition(":")
        given = spec_pairs(method, args, spec)
        base = method[:-2] if method.endswith("++") else method
        if base not in REGISTRY or (base != method and not REGISTRY[base].takes_budgets):
            shorthands = sorted(f"{name}++" for name, cls in REGISTRY.items() if cls.takes_budgets)
            raise InputError(
                f"unknown method {method!r} in {spec!r}; valid methods: {', '.join(sorted(REGISTRY))}; with "
                f"adaptive budgets: {', '.join(shorthands)}"
            )
        if base == method:
            items += REGISTRY[method].expand(_values(method, given))
            continue
        mine, rest = split_plus(base, given)  # the LITE++ shorthand: adaptive + the method
        unknown = sorted(set(rest) - set(spec_parameters(REGISTRY["adaptive"])))
        if unknown:
            raise InputError(
                f"{method} has no parameter {unknown[0]!r}; valid: {_describe(REGISTRY[base])}; "
                f"{_describe(REGISTRY['adaptive'])}"
            )
        items += [("adaptive", _values("adaptive", rest)), (base, _values(base, mine))]
    return items


def split_terms(spec: str) -> list[str]:
    """The method terms of a spec: a "+" before a name joins methods; "lite++" is a name."""
    return re.split(r"\+(?=\s*\w)", spec)


def split_plus(method: str, given: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The parameters of `method++:...` split into (`method`'s own, the rest for `adaptive`): each goes
    to the method if it takes it."""
    cls = REGISTRY[method]
    mine = {k: v for k, v in given.items() if k in spec_parameters(cls) or _pattern(cls, k)}
    return mine, {k: v for k, v in given.items() if k not in mine}


def spec_pairs(method: str, args: str, spec: str) -> dict[str, str]:
    """The `key=value` pairs of one term, as strings, each key once."""
    pairs: dict[str, str] = {}
    for pair in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq:
            raise InputError(f"{method}: expected key=value, got {pair!r}")
        if key in pairs:  # the last value winning silently would hide a typo
            raise InputError(f"{method}: {key} is given twice in {spec!r}; give each parameter once")
        pairs[key] = value.strip()
    return pairs


def _values(method: str, pairs: Mapping[str, str]) -> dict[str, Any]:
    """`pairs` converted to `method`'s parameter types."""
    cls = REGISTRY[method]
    params = spec_parameters(cls)
    values: dict[str, Any] = {}
    for key, value in pairs.items():
        kind = params[key][1] if key in params else _pattern(cls, key)
        if kind is None:
            raise InputError(f"{method} has no parameter {key!r}; valid: {_describe(cls)}")
        values[key] = _convert(value, kind, method, key)
    return values


def plan(spec: str) -> list[Reducer]:
    """The reducers of a spec, constructed but not installed."""
    return [REGISTRY[method](**params) for method, params in parse(spec)]


class Step(NamedTuple):
    """One place of an installed plan, in execution order, with the layouts before and after it."""

    reducer: Reducer
    site: Site
    inside: bool
    before: Layout
    after: Layout

    @property
    def tokens_in(self) -> int:
        return self.before.tokens

    @property
    def tokens_out(self) -> int:
        """Tokens per clip it leaves (for a ragged result, the most a clip can hold)."""
        return self.after.tokens

    @property
    def frames_out(self) -> int | None:
        return self.after.frames

    @property
    def where(self) -> str:
        return _where(self.site, self.inside)


def _where(site: Site, inside: bool) -> str:
    """Where a place is, as messages say it: "before block 2", "inside block 1", "after the last block"."""
    if inside:
        return f"inside block {site.position}"
    return "after the last block" if site.position == site.depth else f"before block {site.position}"


def _place(
    reducer: Reducer, model: VideoBackbone, stage: int, p: int, grid: tuple[int, int, int]
) -> tuple[int, Site]:
    """The sort key (execution order) and site of one place of `reducer` on clips of token grid `grid`, or
    an error naming the valid positions."""
    depth = len(model.blocks)
    needs = reducer.needs_for(model)
    # `depth`: after the last block, before the head (where no block is left to record ahead).
    last = depth - 1 if reducer.inside or (needs and model.records_ahead) else depth
    by_block_before = needs and not reducer.inside and not model.records_ahead
    first = 1 if by_block_before else 0
    valid = f"{first}..{last}"
    if not 0 <= p <= last:
        raise InputError(f"{reducer.name}: position {p} is outside this model; valid positions: {valid}")
    if by_block_before and p == 0:
        raise InputError(
            f"{reducer.name} needs {', '.join(sorted(needs))} recorded by the block before it, so it cannot "
            f"run at position 0; valid positions: {valid}"
        )
    # Execution order: before block p, then inside block p (between its attention and MLP).
    return 2 * p + reducer.inside, Site(stage, p, depth, grid)


def schedule(
    model: VideoBackbone, reducers: list[Reducer], grid: tuple[int, int, int] | None = None
) -> list[Step]:
    """Where each reducer runs on `model`, in execution order, with the layouts it is given and leaves,
    on clips of token grid `grid` (default the one the model's positions are built for, `config.grid`;
    the model runs at others too: `VideoBackbone.check_plan`).

    Every check that does not need data happens here: positions inside the model, side results
    available, parameters that fit the token counts they will see, a ragged batch reaching only
    reducers that take one (`Reducer.takes_ragged`), and every block (and reducer) given tokens laid out
    as it needs (`VideoBackbone.need`: equal frames for divided attention, say).

    Raises:
        InputError: naming the reducer (or block) that cannot run and the one whose output it cannot take.
    """
    depth = len(model.blocks)
    grid = tuple(model.config.grid if grid is None else grid)
    resizers = [r for r in reducers if r.resizes_input]
    if resizers and (len(resizers) > 1 or reducers[0] is not resizers[0]):
        raise InputError(
            f"{resizers[-1].name} changes the clip before the patch embedding, so it must be the plan's first "
            f"method, and only one per plan (got {' + '.join(r.name for r in reducers)})"
        )
    if resizers and not model.any_size:
        raise InputError(
            f"{resizers[0].name} changes the clip's size, and {type(model).__name__} runs only at the size its "
            "positions are built for"
        )
    embedded = resizers[0].input_grid(grid) if resizers else grid  # the grid the later steps see
    placed = [
        (key, order, reducer, site)
        for order, reducer in enumerate(reducers)
        for key, site in (
            _place(reducer, model, stage, p, grid if reducer.resizes_input else embedded)
            for stage, p in enumerate(reducer.positions(depth))
        )
    ]
    placed.sort(key=lambda item: item[:2])  # execution order, then plan order (stable: stages in order)
    layout = Layout.of_grid(grid)
    made_by = "the patch embedding"  # who left the current layout's kind, for the messages
    steps: list[Step] = []
    queue = iter(placed)
    upcoming = next(queue, None)
    for p in range(depth + 1):
        for inside in (False, True):
            if inside and p < depth:
                need, what = model.need(p)
                if not layout.fits(need):
                    raise InputError(
                        f"{type(model).__name__} block {p} ({what}) needs {NEEDS[need]}, but {made_by} leaves "
                        f"{layout.describe()}; {_HINTS[need]}"
                    )
                # What the block itself does to the tokens (MViT's pooling), before the reducers inside it.
                layout = model.layout_after(p, layout)
            stale_by = None  # a reducer at this place whose output lacks the attention's records
            while upcoming is not None and upcoming[0] == 2 * p + inside:
                _, _, reducer, site = upcoming
                step_where = _where(site, inside)
                if stale_by is not None and reducer.needs_for(model):
                    raise InputError(
                        f"{reducer.name} ({step_where}) needs {', '.join(sorted(reducer.needs_for(model)))} "
                        f"recorded by the attention before it, but {stale_by}, which runs there first, "
                        f"leaves tokens those records no longer describe; place {reducer.name} first"
                    )
                if not reducer.keeps_records:
                    stale_by = reducer.name
                if layout.budgets and not reducer.takes_budgets:
                    raise InputError(
                        f"{reducer.name} ({step_where}) cannot use the per-clip budgets {made_by} sets; "
                        "follow adaptive with a method that keeps a share of each clip (random, attention, "
                        "lite, oracle)"
                    )
                if layout.ragged and not reducer.takes_ragged:
                    raise InputError(
                        f"{reducer.name} ({step_where}) cannot take a batch whose clips hold different numbers "
                        f"of tokens, which {made_by} leaves; place {reducer.name} before it"
                    )
                try:
                    after = reducer.count(layout, site)
                except InputError as error:
                    if made_by == "the patch embedding":
                        raise
                    raise InputError(f"{error} ({made_by} leaves {layout.describe()})") from None
                lost_grid = layout.frame_grid is not None and after.frame_grid is None
                if after.kind != layout.kind or after.budgets or lost_grid:
                    made_by = f"{reducer.name} ({step_where})"
                # Cells dropped from every frame's full grid, the same number in each: holes, if the reducer may
                # leave them (a windowed block fills them); otherwise no holes.
                punched = not after.ragged and after.frames == layout.frames and after.frame_grid is None
                holes = layout.frame_grid if reducer.leaves_holes and punched else None
                after = after._replace(holes=holes)
                steps.append(Step(reducer, site, inside, layout, after))
                layout = after
                upcoming = next(queue, None)
            if inside and p < depth:  # what the block does at its end (Video Swin's patch merging)
                layout = model.layout_leaving(p, layout)
    if layout.budgets:
        raise InputError(
            f"{made_by} sets per-clip budgets, but no method after it uses them; follow it with a method "
            "that keeps a share of each clip (adaptive+lite:keep=0.5, or lite++:keep=0.5)"
        )
    # After the layouts, so that a plan a backbone's grid refuses is told so first.
    for step in steps:
        missing = () if model.records is None else step.reducer.needs_for(model) - model.records
        if missing:
            raise InputError(
                f"{step.reducer.name} ({step.where}) needs {', '.join(sorted(missing))} recorded by the attention "
                f"before it, which {type(model).__name__}'s attention does not record ({model.no_records_why})"
            )
    return steps


_HINTS = {
    "frames": "use a method or mode that keeps them (per_frame=true, balance=frame), or place it after that block",
    "grid": "before such a block only whole frames may go (uniform, random_frames, stts), or reduce after the "
    "last block",
    "windows": "before such a block only whole frames may go (uniform, random_frames, stts) or the same number of "
    "cells of every frame (sta, random with per_frame=true), or reduce after the last block",
}
"""What to do when a block's `Need` is not met, as the error says it."""


class InstalledPlan:
    """A plan `apply` installed into a model: its reducers, where they run, and how to swap it.

    `remove()` puts the model back to its bare state and `install()` puts this plan back, the same
    reducer objects (trained weights and all), without re-initialising anything: the benchmark and the
    sweep swap plans this way. As a context manager it puts back, on exit, whatever plan the model
    had before `apply`:

        with ts.apply(model, "random:keep=0.5") as installed:
            logits = model(video)         # reduced; model's earlier plan is back after the block

    Attributes:
        model: the model it is installed into.
        spec: the plan's spec (None for the bare model).
        reducers: the reducers (`model.plan` while installed).
        steps: `schedule`'s steps: where each reducer runs, with the layouts before and after, on clips of
            the model's own grid (`config.grid`); `steps_at(grid)` for another.
    """

    def __init__(
        self,
        model: VideoBackbone,
        spec: str | None,
        reducers: nn.ModuleList,
        steps: list[Step],
        slots: tuple[nn.Module, ...],
        inner: tuple[nn.Module, ...],
        records: tuple[frozenset[str], ...],
        readout_by: Reducer | None,
        grid: tuple[int, int, int] | None = None,
    ) -> None:
        self.model, self.spec, self.reducers, self.steps = model, spec, reducers, steps
        self.grid = tuple(model.config.grid if grid is None else grid)  # the token grid `steps` are of
        self._slots, self._inner, self._records, self._readout_by = slots, inner, records, readout_by
        self._previous: InstalledPlan | None = None  # what `__exit__` puts back
        self._entered = False
        self._at: dict[tuple[int, int, int], list[Step]] = {}  # `steps_at`'s schedules of other grids

    def steps_at(self, grid: tuple[int, int, int]) -> list[Step]:
        """`steps` on clips of token grid `grid` (another frame count or frame size): the plan checked
        against that grid by `schedule` the first time, then remembered. Every reducer adapts to the grid
        it is given (its `Site.grid`) or refuses it here.

        Raises:
            InputError: what a reducer (or block) needs that this grid does not give, with both grids.
        """
        grid = tuple(grid)
        own = self.grid
        if grid == own or not self.reducers:
            return self.steps
        steps = self._at.get(grid)
        if steps is None:
            try:
                steps = schedule(self.model, list(self.reducers), grid)
            except InputError as error:
                raise InputError(
                    f"plan {self.spec!r} does not fit this input's token grid {grid} (it was installed for "
                    f"{own}): {error}"
                ) from None
            self._at[grid] = steps
        return steps

    @property
    def installed(self) -> bool:
        return getattr(self.model, "installed", None) is self

    @property
    def adaptive(self) -> bool:
        """Whether the plan's cost depends on the clip: somewhere clips of a batch hold different counts,
        so GFLOPs are a mean over clips (`ts.flops(model, video=batch)`)."""
        return any(step.after.ragged for step in self.steps)

    @property
    def slots(self) -> list[At]:
        """Every place a reducer runs (`At` modules, however they are grouped), in block order."""
        return [m for slot in (*self._slots, *self._inner) for m in slot.modules() if isinstance(m, At)]

    def install(self) -> InstalledPlan:
        """Put this plan (back) into its model, replacing whatever is installed. Returns itself."""
        model = self.model
        for p, slot in enumerate(self._slots):
            model.reducers[p] = slot
        for block, inner, record in zip(model.blocks, self._inner, self._records, strict=True):
            block.inner, block.record = inner, record
        model.plan, model.spec = self.reducers, self.spec
        model.__dict__["readout_by"] = self._readout_by  # a reference, not a submodule
        model.__dict__["installed"] = self
        return self

    def remove(self) -> None:
        """Take the plan out: the model runs bare (the reducers keep their state for `install`)."""
        if self.installed:
            _bare(self.model).install()

    def __enter__(self) -> InstalledPlan:
        self._entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._entered = False
        (self._previous or _bare(self.model)).install()

    def __repr__(self) -> str:
        state = "installed" if self.installed else "not installed"
        return f"InstalledPlan({self.spec!r}, {len(self.steps)} step(s), {state})"


def _bare(model: VideoBackbone) -> InstalledPlan:
    depth = len(model.blocks)
    return InstalledPlan(
        model, None, nn.ModuleList(), [], tuple(nn.Identity() for _ in range(depth + 1)),
        tuple(nn.Identity() for _ in range(depth)), (frozenset(),) * depth, None,
    )  # fmt: skip


def current_plan(model: VideoBackbone) -> InstalledPlan:
    """The plan installed in `model` now (the bare plan if none was), to put back later with `install`."""
    installed = model.__dict__.get("installed")
    if installed is not None:
        return installed
    return InstalledPlan(
        model, model.spec, model.plan, [], tuple(model.reducers), tuple(b.inner for b in model.blocks),
        tuple(b.record for b in model.blocks), model.readout_by,
    )  # fmt: skip


@contextmanager
def without_plan(model: VideoBackbone) -> Iterator[VideoBackbone]:
    """Run `model` bare inside the block (no reducer anywhere); the installed plan is back afterwards,
    also when the block is entered from a reducer's own forward pass (an oracle's full pass)."""
    current = current_plan(model)
    _bare(model).install()
    try:
        yield model
    finally:
        current.install()


def is_adaptive(model: VideoBackbone) -> bool:
    """Whether the plan installed in `model` costs what each clip keeps (`InstalledPlan.adaptive`)."""
    installed = model.__dict__.get("installed")
    return installed is not None and installed.adaptive


def apply(
    model: VideoBackbone, spec: str | None, *, grid: tuple[int, int, int] | None = None
) -> InstalledPlan:
    """Install a reduction plan into `model` (in place), replacing any plan installed before.

    The reducers become `model.plan` (so learned ones train, save and load with the model); each
    place they run at gets a slot: `model.reducers[p]` before block `p` (`p = depth`: after the last
    block, before the head), `model.blocks[p].inner` between its attention and MLP. Each block is told
    what its attention must record.

    Args:
        model: a tokensieve backbone.
        spec: a plan spec, or None / "none" to remove reduction.
        grid: the token grid (T, H, W) of the clips the plan is for, when not the model's own
            (`config.grid`): the plan is checked against it here (against any other at its first forward).

    Returns:
        The `InstalledPlan` (its `model` is `model`): `remove()` / `install()` swap it out and back,
        and `with` puts back the plan the model had before.

    Raises:
        InputError: bad spec, a position outside the model, a reducer that needs a side result at
            position 0 (there is no block before it to record it), a layout a block or reducer cannot
            take (each named), or parameters that do not fit the token counts.
    """
    previous = current_plan(model)
    reducers = plan(spec) if spec is not None else []
    for reducer in reducers:
        reducer.setup(model)  # learned reducers size their parameters to the model
        reducer.train(model.training)  # a new reducer follows the model's train/eval mode
    steps = schedule(model, reducers, grid)  # raises before anything is changed
    readers = [r for r in reducers if r.overrides_readout]
    if len(readers) > 1:
        raise InputError(
            f"only one method of a plan can replace the readout; {', '.join(r.name for r in readers)} all do"
        )
    depth = len(model.blocks)
    before: list[list[nn.Module]] = [[] for _ in range(depth + 1)]
    inner: list[list[nn.Module]] = [[] for _ in range(depth)]
    record: list[set[str]] = [set() for _ in range(depth)]
    for step in steps:
        if step.reducer.resizes_input:  # it works on the clip (`VideoBackbone.forward_features`): no slot
            continue
        p = step.site.position
        (inner if step.inside else before)[p].append(At(step.reducer, step.site))
        # The attention that records: block p's own for an inside reducer, else block p - 1's.
        # (A model that records ahead does it with block p, before the slot: `VideoBackbone._slot`.)
        recorder = p if step.inside or model.records_ahead else p - 1
        if 0 <= recorder < depth:
            record[recorder] |= step.reducer.needs_for(model)
    installed = InstalledPlan(
        model, None if spec is None else spec.strip(), nn.ModuleList(reducers).train(model.training), steps,
        tuple(map(_slot, before)), tuple(map(_slot, inner)), tuple(map(frozenset, record)),
        readers[0] if readers else None, grid,
    )  # fmt: skip
    if not previous._entered:  # only a plan inside a `with` block will put back its own predecessor
        previous._previous = None
    installed._previous = previous
    return installed.install()


def weights_key(method: str, given: Mapping[str, Any]) -> str:
    """Under which key trained weights of `method` given the parameters `given` are filed: the method's
    name, followed by those of its `Reducer.trained_with` parameters given a value other than their
    default, sorted ("stts", "lite", "lite:tensor=embed,value=gradnorm"). A budget or a training setting
    (STTS's sigma) changes how many tokens a trained selector keeps or how it got there, not what it
    learned to score."""
    cls = REGISTRY[method]
    params = spec_parameters(cls)
    fixed = sorted((k, v) for k, v in given.items() if k in cls.trained_with and v != params[k][0].default)
    return method + (":" + ",".join(f"{k}={v}" for k, v in fixed) if fixed else "")


def trained_keys(model: VideoBackbone) -> list[str]:
    """The `weights_key` of each reducer of `model`'s installed plan, in `model.plan` order."""
    return [weights_key(method, given) for method, given in (parse(model.spec) if model.spec else [])]


def load_trained(model: VideoBackbone, trained: Mapping[str, Mapping[str, Tensor]]) -> list[str]:
    """Give each reducer of `model`'s installed plan the weights `trained` holds for it (`weights_key` ->
    `state_dict()`), where their names and shapes fit; for a method trained with the whole model
    (`Reducer.trains_backbone`: HaltingVT) they are the whole model's and replace `model`'s. Returns the
    keys whose weights did not fit (those reducers, or that model, keep theirs)."""
    misfits = []
    for reducer, key in zip(model.plan, trained_keys(model), strict=True):
        weights = trained.get(key)
        if weights is None:
            continue
        try:
            (model if reducer.trains_backbone else reducer).load_state_dict(weights)
        except RuntimeError:
            misfits.append(key)
    return misfits


def _slot(modules: list[nn.Module]) -> nn.Module:
    if not modules:
        return nn.Identity()
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)
