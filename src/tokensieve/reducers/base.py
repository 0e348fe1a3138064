"""The reducer contract and the one registry of methods.

A reducer is an `nn.Module` taking a `TokenState` and returning one. It declares
- `name`: its spec name (`"random"` in `"random:keep=0.5"`), set by `@register`;
- `needs`: what the block before it must record (`KEYS`, `CLS_ATTN`, `ATTN_RECEIVED`);
- `positions(depth)`: where it runs, as the number of blocks run before it (0 = right after the
  patch embedding). A reducer with `inside = True` runs *within* block `p` instead, between its
  attention and its MLP, and reads what that block's attention recorded (ToMe, EViT-style
  attention pruning); position 0 is then valid even for a reducer that needs keys;
- `count(layout, site)`: the `Layout` it leaves from the one it is given (tokens, equal frames or
  not, ragged or not), so a plan's token budget is known before anything runs and bad parameters fail
  at `apply` time; `takes_ragged` says whether it can be given a ragged batch (clips holding
  different counts). `schedule` checks every step and every block's `Need` against these layouts.

One reducer object may run at several positions (STA's three stages, ToMe in every block). `apply`
binds each place to a `Site` (stage index, position, model depth) and the reducer's forward receives
it; nothing about where it runs is kept as mutable state.

Its constructor's keyword-only arguments are exactly its spec parameters, with the paper's defaults;
the spec parser reads them from the signature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from .. import rng
from ..errors import InputError
from ..tokens import CLIP_KEY, Inputs, Layout, TokenState, compact

if TYPE_CHECKING:
    from ..backbones.base import VideoBackbone

__all__ = [
    "BUDGETS",
    "REGISTRY",
    "At",
    "Budgets",
    "Reducer",
    "Site",
    "check_keep",
    "frame_count",
    "frames_needed",
    "keep_count",
    "keep_frames",
    "keep_top",
    "per_frame_count",
    "ragged_count",
    "register",
    "require",
    "require_frames",
    "small_keep",
    "top_count",
]

BUDGETS = "budgets"
"""`aux` key of the per-clip budgets an `adaptive` reducer sets (`Budgets`, not per token); the next
`keep_top` reads them and takes them out."""


class Budgets(NamedTuple):
    """Per-clip budgets for the next keep-based selection (LITE++, `reducers.adaptive`).

    Attributes:
        small: (B,) bool, True where the clip gets the small budget.
        share: the small budget for a method keeping 0.4 or more (`small_keep`).
        confidence: (B,) the confidence estimate the budgets were chosen from (`ts.calibrate` reads it).
    """

    small: Tensor
    share: float
    confidence: Tensor | None = None


def small_keep(keep: float, share: float) -> float:
    """The small budget of a method keeping `keep`: min(share, max(keep - 0.1, keep / 2)). With share 0.3
    it is LITE++'s: 0.3 for keep in {0.5, 0.7, 0.9}, 0.2 for keep 0.3."""
    return min(share, max(keep - 0.1, keep / 2))


class Site(NamedTuple):
    """Where one call of a reducer runs: the `stage`-th of its `positions(depth)`, in a model of
    `depth` blocks whose patch embedding makes the token `grid` (T, H, W) of the clips it runs on (the
    model's own, or another input size's)."""

    stage: int
    position: int
    depth: int
    grid: tuple[int, int, int]


class Reducer(nn.Module):
    """Base class of every token-reduction method."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    inside: ClassVar[bool] = False
    """True: runs inside block `p`, between attention and MLP, instead of before block `p`."""
    keeps_records: ClassVar[bool] = True
    """False: its output no longer carries the side results the attention before it recorded (ToMe's
    merge makes them stale), so `apply` refuses a reducer that needs them right after it, in the same
    place."""
    leaves_holes: bool = False
    """True: when it keeps the same number of cells of every frame of a full grid, the cells it drops may stay
    holes, which a backbone whose blocks need "windows" fills (Video Swin; `schedule` then marks the layout
    it leaves with `Layout.holes`). STA on Swin, and `random` per frame (its baseline there). A class
    attribute, or a property when it depends on the setting."""
    standalone: ClassVar[bool] = True
    """False: not a method on its own, only a change to how the method after it runs (`adaptive`); the
    sweep does not list it."""
    takes_budgets: bool = False
    """True: it keeps a share of each clip through `keep_top`, so it can take the per-clip budgets an
    `adaptive` reducer before it sets (LITE++); `apply` refuses any other method right after one."""
    takes_ragged: ClassVar[bool] = False
    """True: it can be given a ragged batch (a padding mask, clips holding different counts) and honours
    the mask. `apply` refuses a plan that gives a ragged batch to a reducer without it."""
    pattern_parameters: ClassVar[dict[str, type]] = {}
    """Spec parameters named by a pattern rather than the signature (STTS's `T0=0.6`, `S4=0.9`:
    regex -> type); the constructor receives them as keyword arguments and validates them."""
    keyed_random: bool = False
    """True when the method will draw random numbers keyed by clip in the next forward pass
    (`tokensieve.rng`, `draw_stream`); the backbone then hashes every input clip into
    `aux[CLIP_KEY]`. A class attribute, or a property when it depends on the mode (STTS draws
    only in training)."""
    wants_labels: ClassVar[bool] = False
    """True: it reads the labels (`aux[INPUTS].labels`) in evaluation too (an oracle); `ts.evaluate` and
    the sweep then pass them. In training they are always there."""
    wants_teacher: ClassVar[bool] = False
    """True: in training, `teach` runs on a frozen teacher model before every step and its result
    reaches the forward pass as `aux[INPUTS].teacher[name]`."""
    freezes_backbone: ClassVar[bool] = False
    """True: the method trains alone, on the frozen backbone (LITE's selector): `ts.train` freezes the
    backbone whatever `freeze_backbone` says."""
    changes_cls: bool = False
    """True: it changes the class token (HaltingVT's Glimpser drops its skip connection, the released
    halting zeroes it once halted); every other reducer passes it on untouched."""
    overrides_readout: ClassVar[bool] = False
    """True: the model's head reads `readout(state, model)` instead of its configured pooling."""
    resizes_input: ClassVar[bool] = False
    """True: it works on the clip before the patch embedding (`resize`): the backbone hands the clip to
    `resize_clip` and embeds what it returns, and `input_grid` says the token grid that makes, so `schedule`
    gives every later step that grid. It must be the plan's first method (`schedule` refuses otherwise)."""
    budget: ClassVar[str | None] = None
    """The spec parameter that sets how many tokens the method keeps (`tokensieve sweep` sets it from a
    target token ratio): a keep ratio in (0, 1], more keeping more, or with `budget_removes` a count of
    tokens removed, more keeping fewer. None: the method has no fixed budget."""
    budget_removes: ClassVar[bool] = False
    trained_with: ClassVar[tuple[str, ...]] = ()
    """The spec parameters that change what a learned method learns (LITE's oracle targets and inputs),
    not only how it trains or how much it keeps: its trained weights are filed under them
    (`reducers.plan.weights_key`), so weights learned for one setting never run under another's name."""
    trains_backbone: ClassVar[bool] = False
    """True: the method is trained with the whole model (HaltingVT): its trained weights are a whole
    model's state dict (backbone and plan), filed by `weights_key` like a selector's."""
    recipe: ClassVar[dict[str, Any]] = {}
    """The training settings the method's paper used (`TrainConfig` fields), the defaults of `ts.train`
    and `tokensieve train` for a plan with it; anything given explicitly wins."""
    main_settings: ClassVar[tuple[str, ...]] = ()
    """Specs of the paper's main fixed-budget settings on 16x224 ViT-S/B, which `tokensieve bench
    --methods` and benchmarks/reducers.py measure."""

    @classmethod
    def expand(cls, values: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """The (method, parameters) pairs one spec term with these converted parameters installs: itself
        (the default), or companions first (`halting:glimpser=0.5` is the Glimpser, then the halting)."""
        return [(cls.name, values)]

    def __init__(self) -> None:
        super().__init__()
        self.train_step = 0  # the current training step (`on_train_step`); random draws depend on it

    def positions(self, depth: int) -> tuple[int, ...]:
        """Block counts before each place this reducer runs, for a model of `depth` blocks."""
        raise NotImplementedError

    def setup(self, model: VideoBackbone) -> None:
        """Called once by `apply` with the model the reducer is installed into, before anything runs:
        learned reducers create their parameters here (they need the model's width). Default: nothing."""

    def needs_for(self, model: VideoBackbone) -> frozenset[str]:
        """What the preceding attention must record for this reducer on `model` (default `needs`)."""
        return self.needs

    def count(self, layout: Layout, site: Site) -> Layout:
        """The layout this reducer leaves from `layout` at `site`: tokens per clip (the most a clip can
        hold when the result is ragged), equal frames or not, ragged or not. Raises `InputError` when
        its parameters do not fit the input. `schedule` gives it a ragged layout only if `takes_ragged`."""
        raise NotImplementedError

    def forward(self, state: TokenState, site: Site) -> TokenState:
        raise NotImplementedError

    def input_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """The token grid the model runs at on clips that make `grid` (only if `resizes_input`)."""
        raise NotImplementedError

    def resize_clip(self, video: Tensor, patch: int) -> Tensor:
        """The clip (B, T, C, H, W) the model embeds instead of `video` (only if `resizes_input`)."""
        raise NotImplementedError

    def teach(self, teacher: VideoBackbone, inputs: Inputs) -> Any:
        """The training hook's teacher pass (only if `wants_teacher`): whatever this reducer needs from a
        frozen teacher on this step's clips and labels (`inputs.video`, `inputs.labels`): Grad-CAM
        targets, teacher logits, ... The training loop calls it before the forward pass (with
        autograd on, so it may differentiate the teacher; its parameters do not train) and hands the
        result to `forward` as `state.aux[INPUTS].teacher[self.name]`; the reducer adds its losses with
        `state.add_loss`. No method needs code in the training loop."""
        return None

    def on_train_step(self, step: int, total_steps: int) -> None:
        """Called by the training loop before every optimisation step (0-based, of `total_steps`):
        the place for parameters scheduled over training (STTS decays its sigma here). It must depend
        only on its arguments, so a resumed run schedules exactly as an uninterrupted one. The base
        records the step: in training, random draws depend on it (`draw_stream`). An override calls
        `super().on_train_step(step, total_steps)`."""
        self.train_step = step

    def draw_stream(self, state: TokenState, site: Site, seed: int, *purpose: int) -> tuple[Tensor, int]:
        """(clip keys (B,), stream id) of this call's random draws (`tokensieve.rng`).

        A draw is a pure function of the clip (its key), the method's `seed`, the stage it runs at,
        `purpose` (to tell apart several draws of one call) and, in training mode, the step set by
        `on_train_step`: so a clip gets the same draws in a batch of any size or composition, on
        any number of processes, whatever ran before; and new ones at every training step.
        """
        keys = state.aux.get(CLIP_KEY)
        if keys is None:
            raise ValueError(
                f"{self.name} draws random numbers keyed by clip, but the state holds no clip keys; "
                "install plans with tokensieve.apply (which makes the backbone hash its input clips)"
            )
        step = self.train_step if self.training else -1
        return keys, rng.stream(seed, site.stage, step, *purpose)

    def readout(self, state: TokenState, model: VideoBackbone) -> Tensor:
        """(B, C) features for the classifier from the final state (only if `overrides_readout`);
        `model` gives access to its norms."""
        raise NotImplementedError


class At(nn.Module):
    """One place of an installed plan: calls `reducer` with its `site`.

    The reducer itself is registered once, in `model.plan`; this slot only refers to it (it is not a
    submodule), so the reducer's parameters appear once in the state dict however many places it
    runs at. On clips of another token grid than the model's own (`site.grid`) the reducer is given the
    site of that grid (the plan was checked against it: `VideoBackbone.check_plan`).
    """

    def __init__(self, reducer: Reducer, site: Site) -> None:
        super().__init__()
        self.__dict__["reducer"] = reducer  # a reference, not a submodule
        self.site = site

    def forward(self, state: TokenState) -> TokenState:
        site = self.site if state.grid == self.site.grid else self.site._replace(grid=state.grid)
        return self.reducer(state, site)

    def extra_repr(self) -> str:
        return f"{self.reducer.name}, stage={self.site.stage}"


REGISTRY: dict[str, type[Reducer]] = {}


def register(name: str):  # type: ignore[no-untyped-def]
    """Class decorator adding a reducer to the registry under its spec name."""

    def add(cls: type[Reducer]) -> type[Reducer]:
        if name in REGISTRY:
            raise ValueError(f"reducer {name!r} is registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return add


# ---------------------------------------------------------------------------------- helpers


def frames_needed(model: VideoBackbone) -> bool:
    """Whether some block of `model` needs the same number of tokens in every frame (divided space-time
    attention): then a selection before it keeps a share of every frame (`per_frame`)."""
    return any(model.need(p)[0] != "tokens" for p in range(len(model.blocks)))


def keep_count(keep: float, num: int) -> int:
    """How many of `num` tokens a keep ratio keeps: round(keep * num), at least one."""
    return max(1, round(keep * num))


def check_keep(keep: float, method: str) -> None:
    if not 0.0 < keep <= 1.0:
        raise InputError(f"{method}: keep must be in (0, 1], got {keep}")


def require(state: TokenState, key: str, method: str) -> Tensor:
    """The side result `key` recorded by the block before `method`, or a clear error."""
    value = state.aux.get(key)
    if value is None:
        raise InputError(
            f"{method} needs {key!r} recorded by the attention before it; install plans with "
            "tokensieve.apply (which tells each block what to record)"
        )
    return value


def _unequal_frames(method: str) -> InputError:
    return InputError(
        f"{method} works frame by frame and needs the same number of tokens in every frame, but the "
        "reduction before it leaves unequal counts; place it before that reduction or use a per-frame mode"
    )


def per_frame_count(layout: Layout, method: str) -> int:
    """Tokens per frame of a layout with equal frames, or a clear error when counts differ."""
    if layout.frames is None:
        raise _unequal_frames(method)
    return layout.tokens // layout.frames


def require_frames(state: TokenState, method: str) -> int:
    """The state's number of equal frames, or a clear error when per-frame counts differ."""
    if state.frames is None:
        raise _unequal_frames(method)
    return state.frames


def top_count(keep: float, layout: Layout, *, per_frame: bool, method: str) -> Layout:
    """The `count` of a `keep_top` selection with a fixed ratio `keep` (of every clip's real tokens, or
    of every frame's with `per_frame`): a ragged input stays ragged, each clip keeping its share. After
    per-clip budgets (`layout.budgets`) the result is ragged."""
    if layout.budgets:
        return ragged_count(layout, per_frame=per_frame, method=method)
    if per_frame:
        k = keep_count(keep, per_frame_count(layout, f"{method} (per_frame)"))
        return layout if k * layout.frames == layout.tokens else Layout(k * layout.frames, layout.frames)
    k = keep_count(keep, layout.tokens)
    if k == layout.tokens:
        return layout
    return Layout(k, ragged=layout.ragged)


def ragged_count(layout: Layout, *, per_frame: bool, method: str) -> Layout:
    """The `count` of a `keep_top` selection with a per-clip budget: up to every token, ragged."""
    if per_frame:
        per_frame_count(layout, f"{method} (per_frame)")  # needs equal frames to select in
    return Layout(layout.tokens, ragged=True)


def keep_top(
    state: TokenState, scores: Tensor, keep: float | Tensor, *, per_frame: bool = False
) -> TokenState:
    """Keep the highest-scoring tokens of each clip (of each frame with `per_frame`), in their order.

    With a fixed ratio on a dense batch every clip keeps `keep_count(keep, N)` tokens (per frame:
    of n): no synchronisation, the result is dense. With per-clip budgets, or on a ragged batch,
    clip b keeps `keep_count(keep_b, n_b)` of its n_b real tokens (per frame: of each frame's) and
    `compact` lays the result out ragged. Padding tokens are never kept. Per-clip budgets an `adaptive`
    reducer set (`aux[BUDGETS]`) turn a fixed ratio into one per clip (`small_keep(keep)` where the clip's
    budget is small); they are used once (the result no longer carries them).

    Args:
        scores: (B, N) one score per token.
        keep: the ratio kept, in (0, 1]: one float, or (B,) one per clip (a per-video budget).
        per_frame: select within every frame (the state must hold equal frames).

    Raises:
        InputError: a per-clip ratio outside (0, 1] (read back with the counts, in the same
            synchronisation).
    """
    B, N = scores.shape
    budgets = state.aux.get(BUDGETS)
    if budgets is not None:
        if isinstance(keep, Tensor):
            raise ValueError("keep_top: per-clip ratios and per-clip budgets cannot both be given")
        small = torch.tensor(small_keep(keep, budgets.share), device=scores.device)
        keep = torch.where(budgets.small.to(scores.device), small, torch.tensor(keep, device=scores.device))
        state = state.with_aux(**{BUDGETS: None})
    if not isinstance(keep, Tensor) and state.mask is None:
        return _keep_top_fixed(state, scores, keep, per_frame=per_frame)
    if isinstance(keep, Tensor) and keep.shape != (B,):
        raise ValueError(f"per-clip keep ratios must be (B={B},), got {tuple(keep.shape)}")
    F = require_frames(state, "keep_top (per_frame)") if per_frame else 1
    n = N // F
    with torch.no_grad():
        real = state.num_tokens.double() / F  # (B,) real tokens per clip (per frame)
        ratio = keep.double() if isinstance(keep, Tensor) else torch.full_like(real, keep)
        k = (ratio * real).round().clamp_min(1).long()  # (B,): keep_count per clip
        if state.mask is not None:  # padding ranks last
            low = float("-inf") if scores.is_floating_point() else torch.iinfo(scores.dtype).min
            scores = scores.masked_fill(~state.mask, low)
        rank = scores.view(B, F, n).argsort(dim=2, descending=True, stable=True).argsort(2)  # (B, F, n)
        chosen = (rank < k.view(B, 1, 1)).view(B, N)
    invalid = None
    if isinstance(keep, Tensor):  # read back with the counts: one synchronisation for both
        invalid = (~((keep > 0) & (keep <= 1)), "per-clip keep ratios must be in (0, 1]")
    return compact(state, chosen, frames=F if per_frame else None, invalid=invalid)


def _keep_top_fixed(state: TokenState, scores: Tensor, keep: float, *, per_frame: bool) -> TokenState:
    B, N = scores.shape
    if not per_frame:
        k = keep_count(keep, N)
        if k == N:
            return state
        with torch.no_grad():
            idx = scores.topk(k, dim=1).indices.sort(1).values  # (B, k)
        return state.gather(idx)
    F = state.frames
    n = state.tokens_per_frame  # raises when per-frame counts differ
    k = keep_count(keep, n)
    if k == n:
        return state
    with torch.no_grad():
        idx = scores.view(B, F, n).topk(k, dim=2).indices.sort(2).values  # (B, F, k)
        idx = (idx + torch.arange(F, device=idx.device).view(1, F, 1) * n).view(B, F * k)  # (B, F*k)
    return state.gather(idx, frames=F)


def frame_count(keep: float, layout: Layout, method: str) -> Layout:
    """The `count` of a whole-frame selection keeping `keep_count(keep, frames)` frames."""
    n = per_frame_count(layout, method)
    k = keep_count(keep, layout.frames)
    return Layout(k * n, frames=k, whole=layout.whole, frame_grid=layout.frame_grid)


def keep_frames(state: TokenState, frame_idx: Tensor) -> TokenState:
    """Keep whole frames (temporal slices) by index; each keeps its grid (`frame_grid`).

    Args:
        frame_idx: (B, K) indices into the state's `frames`, ascending to keep time order.
    """
    n = state.tokens_per_frame  # raises when per-frame counts differ
    B, K = frame_idx.shape
    if K == state.frames:
        return state
    idx = (frame_idx.unsqueeze(-1) * n + torch.arange(n, device=frame_idx.device)).view(B, K * n)  # (B, K*n)
    return state.gather(idx, frames=K, frame_grid=state.frame_grid)
