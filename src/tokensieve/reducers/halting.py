"""`halting`: HaltingVT (Wu et al., "HaltingVT: Adaptive Token Halting Transformer for Efficient Video
Recognition", 2023), and its `glimpser`.

The backbone (`haltingvt-s`) is a TimeSformer whose first two blocks are divided (the Glimpser stage)
and whose later ten are joint. Two mechanisms cut its tokens:

Glimpser (`glimpser`, Sec. 3.2): inside block `at` (1: the second divided block), between its spatial
attention and its MLP, each frame keeps its ceil(R x n) patch tokens with the most class-token
attention (averaged over heads, from that spatial attention); the MLP and every later block run on them.
The released code's selecting block also drops the class token's skip connection there: the new class
token is the frame-averaged attention output alone (`cls_skip=false`, the default: the published
numbers and the released checkpoints have it; `cls_skip=true` is the clean residual).

Halting (Sec. 3.3, A-ViT's adaptive computation time per token) after every joint block l:

    h_l = sigmoid(gamma * x_l[0] - beta)       channel 0 of each token's block output (`form=released`;
                                               the paper writes + beta: `form=paper`)
    c_l = c_{l-1} + h_l                        cumulative score (h = 1 at the last block: all halt)
    a token halts at the first l with c_l > 1 - eps; before that its output enters the readout with
    weight h_l and its remainder R drops by h_l; at that layer it enters with weight R (`act_step`)
    ponder rho = layers run + remainder at halting; loss alpha_p * mean(rho) over tokens and clips

The class token takes part like any token; the readout (`overrides_readout`) is its halting-weighted
sum of outputs, through the final norm, into the classifier.

**A halted token leaves the computation** (`halted=remove`, A-ViT's semantics): it is neither updated
nor attended to by later blocks; the batch goes on ragged and packed, so the cost falls with the tokens
(the paper's GFLOPs/V, measured per clip). The released code instead multiplies halted tokens by zero
and keeps them in every later block, attended to (a zeroed token is LN(0) = the norm's bias there):
shapes never shrink and nothing gets faster (`halted=zero`, for its checkpoints). The class token is
never removed: once halted, its readout is final and it only serves as a key to the tokens still
running (A-ViT masks it there), which changes their halting and cost, never the output.

Motion Loss (Sec. 3.4), in training with `motion > 0`: for every clip a fake clip, one of its frames
(drawn keyed by clip and step) repeated, joins the batch with the clip's label; a 2-way head on the
final class feature tells real from fake (cross-entropy, weight `motion`). The released code adds it
with weight 1 (its `motion_loss_beta=0.001` only switches it on; the paper says 0.01): default 1.
The fake clips also take the classification loss, as released: the training loop reads the labels of
every row from the state (`aux[INPUTS].labels`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import rng
from ..backbones.base import VideoBackbone, init_weights
from ..errors import InputError
from ..tokens import (
    ATTN_RECEIVED,
    CLIP_KEY,
    CLS_ATTN,
    CLS_UPDATE,
    INPUTS,
    SOURCE_MAP,
    Layout,
    TokenState,
    compact,
    register_token_aux,
)
from .base import Reducer, Site, check_keep, keep_top, register, require, top_count

__all__ = ["Act", "Glimpser", "Halting", "act_step", "halting_map"]

HALT = register_token_aux("halt", merge="keep")
"""Per token: (B, N, 3), its ACT state (cumulative score c, remainder R, ponder rho)."""
HALT_OUT = register_token_aux("halt_out", merge="keep")
"""Per token, on a model read out by mean pooling only: (B, N, C), its halting-weighted output so far."""
HALT_CLIP = "halt_clip"
"""Not per token: `ClipAct`, the class token's ACT state, the readout so far and the ponder of tokens gone."""
HALTED = "halted"
"""Not per token, only while tracing sources (`forward_features(trace=True)`): (B, T*H*W) long, for each
cell of the grid the block after which its token halted, -1 where none did (`halting_map`)."""


class Act(NamedTuple):
    """ACT state of a set of tokens after some layer: each (B, N)."""

    c: Tensor  # cumulative halting score
    remainder: Tensor  # R: 1 minus the scores spent before halting
    ponder: Tensor  # rho: layers run, plus the remainder at the halting layer

    @staticmethod
    def start(like: Tensor) -> Act:
        return Act(torch.zeros_like(like), torch.ones_like(like), torch.zeros_like(like))


class ClipAct(NamedTuple):
    """Per clip: what halting keeps beside the tokens."""

    cls: Act | None  # the class token's ACT state, each (B, 1); None on a mean-pooled model
    output: Tensor  # (B, C): the class token's halting-weighted outputs so far; on a mean-pooled model the
    # sum of the halting-weighted outputs of the tokens that halted and left; after the last block, the
    # readout features
    spent: Tensor  # (B,): the ponder of the patch tokens that halted and left
    count: Tensor  # (B,): tokens that entered halting, the class token included


def act_step(act: Act, h: Tensor, *, eps: float, last: bool) -> tuple[Act, Tensor, Tensor]:
    """One layer of ACT for tokens still running (A-ViT's bookkeeping, as HaltingVT releases it).

    Args:
        act: the state before the layer, (B, N) each; every token given is still running.
        h: (B, N) this layer's halting scores.
        eps: a token halts once its cumulative score exceeds 1 - eps.
        last: the model's last layer: every token halts (h = 1).

    Returns:
        (state after the layer, weight (B, N) of this layer's output in the readout, running (B, N)
        bool: still running after it).
    """
    if last:
        h = torch.ones_like(h)
    c = act.c + h
    reached = c > 1 - eps
    going = c < 1 - eps  # equal to 1 - eps: halts without its remainder, as released
    weight = torch.where(reached, act.remainder, torch.where(going, h, torch.zeros_like(h)))
    ponder = act.ponder + 1 + torch.where(reached, act.remainder, torch.zeros_like(h))
    remainder = act.remainder - torch.where(going, h, torch.zeros_like(h))
    return Act(c, remainder, ponder), weight, going


@register("glimpser")
class Glimpser(Reducer):
    """HaltingVT's Glimpser: every frame's top ceil(keep x n) tokens by class attention, in block `at`.

    The attention is block `at`'s spatial attention; `cls_skip=false` drops the class token's skip
    connection there, as released."""

    inside = True
    standalone = False  # part of `halting`; `attention:per_frame=true` is the stand-alone criterion
    budget = "keep"

    def __init__(self, *, keep: float = 0.5, at: int = 1, cls_skip: bool = False) -> None:
        super().__init__()
        check_keep(keep, self.name)
        self.keep, self.at, self.cls_skip = keep, at, cls_skip
        self.changes_cls = not cls_skip

    def needs_for(self, model: VideoBackbone) -> frozenset[str]:
        if not model.config.has_cls:  # ranked by the attention each token receives, as `attention` does
            return frozenset({ATTN_RECEIVED})
        return frozenset({CLS_ATTN} if self.cls_skip else {CLS_ATTN, CLS_UPDATE})

    def positions(self, depth: int) -> tuple[int, ...]:
        return (self.at,)

    def ratio(self, n: int) -> float:
        """The keep ratio that keeps ceil(keep x n) of n tokens (released rounding; `keep_count` rounds)."""
        return math.ceil(self.keep * n) / n

    def count(self, layout: Layout, site: Site) -> Layout:
        n = layout.tokens // layout.frames if layout.frames else layout.tokens
        return top_count(self.ratio(n), layout, per_frame=True, method=self.name)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        if state.cls is None:
            scores = require(state, ATTN_RECEIVED, self.name)  # (B, N)
        else:
            scores = require(state, CLS_ATTN, self.name)  # (B, N), per frame from the spatial attention
            if not self.cls_skip:
                state = state.replace(cls=require(state, CLS_UPDATE, self.name))
        return keep_top(state, scores, self.ratio(state.tokens_per_frame), per_frame=True)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, at={self.at}, cls_skip={self.cls_skip}"


@register("halting")
class Halting(Reducer):
    """HaltingVT: per-token adaptive halting after every joint block, read out by the class token.

    See the module docstring."""

    overrides_readout = True
    takes_ragged = True
    trains_backbone = True
    # Everything but the seed changes what the model learns (its trained weights are a whole model).
    trained_with = ("beta", "gamma", "eps", "glimpser", "cls_skip", "halted", "form", "ponder", "motion",
                    "at")  # fmt: skip
    # The released configs: Adam, lr 1e-5, L2 decay 1e-5, 5 warm-up epochs from 0.1x, cosine to 0, clip 40.
    recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "adam", "lr": 1e-5, "weight_decay": 1e-5, "warmup_epochs": 5.0, "warmup_start": 0.1,
        "clip_grad": 40.0,
    }  # fmt: skip

    def __init__(
        self,
        *,
        beta: float = 10.0,
        gamma: float = 10.0,
        eps: float = 0.01,
        glimpser: float = 0.5,
        cls_skip: bool = False,
        halted: Literal["remove", "zero"] = "remove",
        form: Literal["released", "paper"] = "released",
        ponder: float = 5e-4,
        motion: float = 1.0,
        at: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < eps < 1.0:
            raise InputError(f"halting: eps must be in (0, 1), got {eps}")
        if gamma <= 0:
            raise InputError(f"halting: gamma must be > 0, got {gamma}")
        check_keep(glimpser, "halting (glimpser)")
        if ponder < 0 or motion < 0:
            raise InputError(f"halting: ponder and motion are loss weights >= 0, got {ponder} and {motion}")
        if at is not None and at < 0:
            raise InputError(f"halting: at is a block index >= 0, got {at}")
        self.beta, self.gamma, self.eps, self.glimpser, self.cls_skip = beta, gamma, eps, glimpser, cls_skip
        self.halted, self.form, self.ponder, self.motion, self.at, self.seed = (
            halted, form, ponder, motion, at, seed,
        )  # fmt: skip
        self.changes_cls = halted == "zero"
        self.first = 0 if at is None else at  # the first halting block (set from the model by `setup`)
        self.motion_head: nn.Linear | None = None
        self.__dict__["model"] = None

    @classmethod
    def expand(cls, values: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """`halting:glimpser=R` is the Glimpser (unless R = 1) followed by the halting."""
        keep = values.get("glimpser", 0.5)
        if keep >= 1.0:
            return [(cls.name, values)]
        return [("glimpser", {"keep": keep, "cls_skip": values.get("cls_skip", False)}), (cls.name, values)]

    @property
    def keyed_random(self) -> bool:  # type: ignore[override]
        return self.training and self.motion > 0  # the fake clips' frames

    def setup(self, model: VideoBackbone) -> None:
        if not model.config.has_cls and model.config.pool != "mean":
            raise InputError(
                f"{self.name} reads out the class token's halting-weighted outputs, or their mean over the "
                f"tokens on a mean-pooled model; this model reads out its token 0 (pool={model.config.pool!r})"
            )
        depth, divided = len(model.blocks), model.config.divided_blocks
        # By default from the first joint block after the two-block Glimpser stage (a model without one:
        # from block 0, which `schedule` refuses with the block's own message).
        first = max(divided, 2 if self.glimpser < 1 else 0)
        self.first = self.at if self.at is not None else (first if first < depth else 0)
        if self.first >= depth:
            raise InputError(f"{self.name}: at={self.first} is not a block of this {depth}-block model")
        self.__dict__["model"] = model  # a reference (its norm and patch embedding), not a submodule
        if self.motion > 0 and self.motion_head is None:
            weight = model.head.weight if isinstance(model.head, nn.Linear) else model.embed.cls_token
            self.motion_head = nn.Linear(model.config.dim, 2, device=weight.device, dtype=weight.dtype)
            init_weights(self.motion_head)

    def positions(self, depth: int) -> tuple[int, ...]:
        fakes = (0,) if self.motion > 0 else ()  # the Motion Loss's fake clips join the batch there
        return fakes + tuple(range(self.first + 1, depth + 1))

    def count(self, layout: Layout, site: Site) -> Layout:
        if site.position == 0 or self.halted == "zero":
            return layout
        return Layout(layout.tokens, ragged=True)

    # ------------------------------------------------------------------ forward
    def forward(self, state: TokenState, site: Site) -> TokenState:
        if site.position == 0:  # before block 0 (`positions`): the Motion Loss's fake clips
            return self._add_fakes(state, site) if self.training else state
        return self._halt(state, site)

    def score(self, x0: Tensor) -> Tensor:
        """Halting scores from channel 0 of the block outputs."""
        sign = -1.0 if self.form == "released" else 1.0
        return torch.sigmoid(self.gamma * x0 + sign * self.beta)

    def _halt(self, state: TokenState, site: Site) -> TokenState:
        last = site.position == site.depth
        B, _, C = state.x.shape
        lead = int(state.cls is not None)  # the class token leads the ACT columns; none: mean pooling
        real = state.mask if state.mask is not None else torch.ones_like(state.x[..., 0], dtype=torch.bool)
        clip: ClipAct | None = state.aux.get(HALT_CLIP)
        if clip is None:  # the first halting block: every token starts running
            count = real.sum(1).to(state.x.dtype) + lead
            start = Act.start(state.x[:, :1, 0]) if lead else None
            clip = ClipAct(start, state.x.new_zeros(B, C), state.x.new_zeros(B), count)
            tokens = Act.start(state.x[..., 0])
        else:
            tokens = Act(*state.aux[HALT].unbind(-1))
        # The class token is column 0 of one ACT step over every token.
        act = (
            tokens
            if clip.cls is None
            else Act(*(torch.cat([a, t], 1) for a, t in zip(clip.cls, tokens, strict=True)))
        )
        x = state.x if clip.cls is None else torch.cat([state.cls, state.x], 1)  # (B, lead + N, C)
        real_all = real if clip.cls is None else F.pad(real, (1, 0), value=True)
        running = real_all & (act.c < 1 - self.eps)
        h = self.score(x[..., 0])  # (B, lead + N)
        after, weight, going = act_step(act, h, eps=self.eps, last=last)
        # Halted tokens keep their state (a zeroed token runs on, but no longer counts).
        after = Act(*(torch.where(running, new, old) for new, old in zip(after, act, strict=True)))
        weight = torch.where(running, weight, torch.zeros_like(weight))
        going = going & running
        tokens_after = torch.stack([a[:, lead:] for a in after], -1)  # (B, N, 3)
        cls_after = Act(*(a[:, :1] for a in after)) if lead else None
        if lead:
            output, summed = clip.output + weight[:, :1] * state.cls[:, 0], None  # (B, C)
        else:  # every token's own halting-weighted outputs, for the mean
            output = clip.output
            summed = state.aux.get(HALT_OUT, 0.0) + weight[..., None] * state.x  # (B, N, C)
        block = site.position - 1
        stopping = (running & ~going)[:, lead:]  # (B, N) the patch tokens that halt here (all, at the last)
        if self.training:  # the share of the patch tokens still running, and the mean score of this block
            share = going[:, lead:].sum() / (clip.count - lead).sum()
            state = state.add_stat(f"halting.running.{block}", share)
            state = state.add_stat(f"halting.h.{block}", (h * running).sum() / running.sum())
        if state.aux.get(SOURCE_MAP) is not None:
            state = _note_halted(state, stopping, block)
        # What a halting token leaves behind is final: its ponder and, for the mean, its weighted outputs.
        spent = clip.spent + (tokens_after[..., 2] * stopping).sum(1)
        if summed is not None:
            output = output + (summed * stopping[..., None]).sum(1)
        if last:  # every token halts here; only the readout is left
            state = state if self.halted == "zero" else state.replace(frames=None)  # as `count` says
            return self._finish(state, ClipAct(cls_after, output, spent, clip.count))
        state = state.with_aux(**{HALT: tokens_after}, **({} if summed is None else {HALT_OUT: summed}))
        if self.halted == "zero":
            cls = None if state.cls is None else state.cls * going[:, :1, None]
            state = state.replace(x=state.x * going[:, lead:, None], cls=cls)
        else:
            kept = going[:, lead:]
            if not lead:
                # A clip whose every token halted keeps one, halted (it weighs nothing): no clip is empty.
                first = torch.zeros_like(kept)
                first[:, 0] = True
                kept = kept | (first & ~kept.any(1, keepdim=True))
            state = compact(state, kept)
            state = state if state.frames is None else state.replace(frames=None)  # ragged, as `count` says
        return state.with_aux(**{HALT_CLIP: ClipAct(cls_after, output, spent, clip.count)})

    def _finish(self, state: TokenState, clip: ClipAct) -> TokenState:
        """After the last block: the readout features (the class token's weighted outputs through the final
        norm, or the mean of every token's through `fc_norm`), and in training the ponder and motion losses."""
        model = self.__dict__["model"]
        mean = clip.cls is None
        features = model.fc_norm(clip.output / clip.count[:, None]) if mean else model.norm(clip.output)
        state = state.with_aux(**{HALT_CLIP: clip._replace(output=features)})
        if not self.training:
            return state
        ponder = clip.spent if mean else clip.spent + clip.cls.ponder[:, 0]  # (B,)
        state = state.add_loss("halting.ponder", self.ponder * ponder.sum() / clip.count.sum())
        if self.motion > 0:
            B = features.shape[0] // 2  # real clips, then their fakes (`_add_fakes`)
            real_or_fake = torch.cat([features.new_ones(B), features.new_zeros(B)]).long()
            loss = F.cross_entropy(self.motion_head(features), real_or_fake)
            state = state.add_loss("halting.motion", self.motion * loss)
        return state

    def _add_fakes(self, state: TokenState, site: Site) -> TokenState:
        """The batch followed by one fake clip per clip: one of its frames, repeated (Motion Loss)."""
        inputs = state.aux[INPUTS]
        video = inputs.video  # (B, T, C, H, W)
        B, T = video.shape[:2]
        keys, stream = self.draw_stream(state, site, self.seed)
        frame = rng.uniform_bits(keys, 1, stream=stream)[:, 0].remainder(T)  # (B,)
        fake = video[torch.arange(B, device=video.device), frame].unsqueeze(1).expand_as(video).contiguous()
        made = self.__dict__["model"].embed(fake, state.grid)
        labels = None if inputs.labels is None else torch.cat([inputs.labels, inputs.labels])
        aux = {
            **state.aux,
            INPUTS: inputs._replace(video=torch.cat([video, fake]), labels=labels),
            CLIP_KEY: torch.cat([state.aux[CLIP_KEY], rng.clip_keys(fake)]),
        }
        if state.aux.get(SOURCE_MAP) is not None:
            aux[SOURCE_MAP] = torch.cat([state.aux[SOURCE_MAP]] * 2)
        return state.replace(
            x=torch.cat([state.x, made.x]), pos=torch.cat([state.pos, made.pos]),
            cls=None if state.cls is None else torch.cat([state.cls, made.cls]), aux=aux,
        )  # fmt: skip

    def readout(self, state: TokenState, model: VideoBackbone) -> Tensor:
        done = state.aux.get(HALT_CLIP)
        if done is None:
            raise ValueError(
                "halting: no halting state reached the head; install plans with tokensieve.apply"
            )
        return done.output

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gamma={self.gamma}, eps={self.eps}, halted={self.halted}, form={self.form}, "
            f"ponder={self.ponder}, motion={self.motion}, first={self.first}"
        )


def _note_halted(state: TokenState, now: Tensor, block: int) -> TokenState:
    """While tracing: the cells of the tokens halting `now` (B, N) halted after `block`."""
    halted = state.aux.get(HALTED)
    if halted is None:
        halted = torch.full_like(state.aux[SOURCE_MAP], -1)
    cells = torch.where(now, state.pos, torch.full_like(state.pos, -1))  # (B, N): -1 for the others
    value = torch.where(now, block, -1)  # the others write -1, which the maximum ignores
    mark = torch.full_like(halted, -1).scatter_reduce(1, cells.clamp_min(0), value, reduce="amax")
    return state.with_aux(**{HALTED: torch.where(mark >= 0, mark, halted)})


def halting_map(state: TokenState) -> Tensor:
    """(B, T*H*W) for each grid cell the block after which its token halted, -1 where none did (a token
    the Glimpser dropped, or a state not traced): from a state of `forward_features(video, trace=True)`."""
    halted = state.aux.get(HALTED)
    if halted is None:
        T, H, W = state.grid
        return torch.full((state.x.shape[0], T * H * W), -1, dtype=torch.long, device=state.x.device)
    return halted
