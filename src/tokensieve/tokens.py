"""`TokenState`: the one structure that flows from the patch embedding, through every block and
reducer, to the head.

Every reducer takes a `TokenState` and returns one; nothing else is threaded through a forward pass.
Index-driven operations go through `TokenState.gather` and merging through `TokenState.merge`, so
every per-token field (`x`, `pos`, `size`, `mask` and the per-token entries of `aux`) moves together.

Source map (opt-in, `track_sources`; `forward_features(video, trace=True)`): which original patches
each token stands for, kept as an owner map `aux[SOURCE_MAP]` (B, T*H*W): for each cell of the
original grid, the index of the token that now stands for it, -1 when none does. `gather` renumbers
it (cells of dropped tokens become -1) and `merge` hands a merged token's cells to its destination:
O(T*H*W) per operation, where a token -> patches matrix would be O(N * T*H*W). Without it nothing
is computed. `owners` and `covered` read it (or, without it, each real token's own `pos` cell).

Token order convention: `pos` indexes the *original* token grid `(T, H, W)` in time-major raster
order, `pos = t * H * W + h * W + w`, whatever order the source model used internally (TimeSformer
is space-major in Hugging Face; its converter permutes once at the embedding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from .errors import InputError

__all__ = [
    "ATTN_RECEIVED",
    "CLIP_KEY",
    "CLS_ATTN",
    "CLS_UPDATE",
    "INPUTS",
    "KEYS",
    "LOSSES",
    "NEEDS",
    "PROP_ATTN",
    "SOURCE_MAP",
    "STATS",
    "TOKEN_AUX",
    "VECTOR_ATTN",
    "Inputs",
    "Layout",
    "Need",
    "TokenState",
    "compact",
    "covered",
    "owners",
    "register_token_aux",
    "take",
    "track_sources",
]

# `aux` keys a block records when a reducer asks for them (`Reducer.needs`).
KEYS = "keys"
"""Keys of the block's attention, averaged over heads: (B, N, hd), class token excluded."""
CLS_ATTN = "cls_attn"
"""Attention paid by the class token to each patch token, averaged over heads: (B, N)."""
CLS_UPDATE = "cls_update"
"""Not per token: (B, 1, C), what a TimeSformer block's spatial attention adds to the class token (its
per-frame outputs averaged), recorded before the residual; HaltingVT's Glimpser replaces the class
token by it, as the released code does in its selecting block."""

ATTN_RECEIVED = "attn_received"
"""Attention each patch token receives, averaged over heads and queries: (B, N). The importance
signal for models without a class token."""
PROP_ATTN = "prop_attn"
"""Flag (not per token): attention adds log(size) of each key to its logits (ToMe's proportional
attention). Set by a merging reducer; read by `backbones.layers.attention_mask`."""

VECTOR_ATTN = "vector_attn"
"""`aux` flag: the joint blocks run the vector attention of TokenLearner's Eq. 2 (one head per channel, no
scaling: y_i = sum_j softmax_j(q_i * k_j) * v_j per channel) instead of their multi-head attention."""
CLIP_KEY = "clip_key"
"""(B,) int64: a hash of each clip's input (`rng.clip_keys`), put there by the backbone when the plan
draws random numbers. Random methods draw from it, so a clip gets the same draws in any batch."""

LOSSES = "losses"
"""Extra training losses reducers add along the forward pass: a dict name -> scalar tensor (not per
token). The training loop adds them to the task loss; `add_loss` is the way to put one in."""

STATS = "stats"
"""Statistics reducers report along a training forward pass (tokens still running, mean halting score):
a dict name -> scalar tensor. The training loop logs them beside the losses but does not add them;
`add_stat` puts one in."""

SOURCE_MAP = "source_map"
"""(B, T*H*W) long, only while tracking sources (`track_sources`): for each cell of the original grid
(time-major, as `pos`), the index of the token that stands for it now, -1 when no token does. Not per
token: `gather` and `merge` renumber it. A token's patches are the cells holding its index."""

INPUTS = "inputs"
"""What the model was given besides the clip's tokens (`Inputs`): the clip, and in training (or when a
plan asks for them in evaluation) the labels and the teacher's results. Put there by
`forward_features(video, inputs=...)`; reducers read it with `state.aux.get(INPUTS)`."""

MergeRule = Literal["drop", "keep", "mean", "sum"]

TOKEN_AUX: dict[str, MergeRule] = {}
"""Per-token `aux` entries (token axis 1: (B, N, ...)) by key, each with what `merge` does with it.
`gather` moves every one with the tokens; `merge` applies the rule: "drop" (a record of the tokens
before the merge, such as the attention's side results: the next block records afresh), "keep" (a
destination keeps its own value), "mean" (size-weighted mean of the merged tokens, as `x`) or "sum"
(added, as sizes). Methods register their own running state with `register_token_aux`."""


def register_token_aux(key: str, *, merge: MergeRule) -> str:
    """Declare `aux[key]` a per-token entry that every `gather` and `merge` moves (see `TOKEN_AUX`).

    Called once per key by the module that owns it, at import. Returns `key`.

    Raises:
        ValueError: an unknown rule, or the key registered before with another rule.
    """
    if merge not in ("drop", "keep", "mean", "sum"):
        raise ValueError(f"merge rule of aux[{key!r}] must be 'drop', 'keep', 'mean' or 'sum', got {merge!r}")
    if TOKEN_AUX.get(key, merge) != merge:
        raise ValueError(f"aux[{key!r}] is already a per-token entry with merge rule {TOKEN_AUX[key]!r}")
    TOKEN_AUX[key] = merge
    return key


for _record in (KEYS, CLS_ATTN, ATTN_RECEIVED):
    register_token_aux(_record, merge="drop")


class Inputs(NamedTuple):
    """What a forward pass was given besides the tokens (`aux[INPUTS]`), for reducers that learn from
    or select with it: the training hook (`Reducer.teach`, docs/design.md).

    Attributes:
        video: (B, T, C, H, W) the normalised clips.
        labels: (B,) class indices or (B, K) multi-hot targets; None when not given (evaluation of a
            plan that does not ask for them).
        teacher: reducer name -> what its `teach` returned from the frozen teacher (training only).
    """

    video: Tensor
    labels: Tensor | None = None
    teacher: Mapping[str, Any] = {}


Need = Literal["tokens", "frames", "grid", "windows"]
"""What a block (or reducer) needs of the tokens it is given: any tokens, ragged batches included
("tokens"); the same count in every frame of a dense batch ("frames": divided space-time attention);
a rectangular grid of tokens in every frame, in raster order: the whole frame or a crop of it
("grid": MViT's pooling attention; `Layout.frame_grid`); or such a grid, or one with holes the block
fills in (`Layout.holes`: "windows", Video Swin's window attention under STA)."""


class Layout(NamedTuple):
    """How the tokens are laid out at one place of a plan, known at `apply` time without data: what
    `Reducer.count` returns and what `schedule` checks against each block's `Need`.

    Attributes:
        tokens: patch tokens per clip; for a ragged batch the most a clip can hold.
        frames: the number of frames holding equal counts, frame-major (`TokenState.frames`); None when
            per-frame counts differ (always for a ragged batch).
        ragged: clips of a batch may hold different counts (a padding mask, `compact`).
        whole: every one of the `frames` frames holds its full H x W grid, in raster order.
        frame_grid: (h, w) when every one of the `frames` frames holds an h x w grid of tokens in raster
            order (`TokenState.frame_grid`): the patch grid, a crop of it (STTS's anchors) or a pooled
            grid (MViT); None when the frames are not such grids.
        budgets: per-clip budgets are set (an `adaptive` reducer ran): the keep-based selection next
            keeps a different share of each clip, and leaves the batch ragged.
        holes: (h, w) when every one of the `frames` frames holds the same number of cells of an h x w
            grid, the rest dropped (`Reducer.leaves_holes`: STA on Video Swin), which a block needing
            "windows" fills in (`backbones.swin.Holes`); None otherwise.
    """

    tokens: int
    frames: int | None = None
    ragged: bool = False
    whole: bool = False
    budgets: bool = False
    frame_grid: tuple[int, int] | None = None
    holes: tuple[int, int] | None = None

    @classmethod
    def of_grid(cls, grid: tuple[int, int, int]) -> Layout:
        """The layout the patch embedding makes: every cell of `grid`, frame by frame."""
        T, H, W = grid
        return cls(T * H * W, frames=T, whole=True, frame_grid=(H, W))

    @property
    def kind(self) -> str:
        """ "ragged", "frames" (equal per frame) or "dense" (the same count per clip, unequal frames)."""
        return "ragged" if self.ragged else "frames" if self.frames is not None else "dense"

    def fits(self, need: Need) -> bool:
        """Whether a block or reducer needing `need` can take tokens laid out like this."""
        if need == "tokens":
            return True
        if self.ragged or self.frames is None:
            return False
        if need == "windows" and self.holes is not None:
            return True
        return need == "frames" or self.frame_grid is not None

    def describe(self) -> str:
        if self.ragged:
            return f"a different number of tokens in each clip (up to {self.tokens})"
        if self.frames is None:
            return f"{self.tokens} tokens per clip, unequal between frames"
        whole = ", every frame whole" if self.whole else ""
        grid = f" ({self.frame_grid[0]}x{self.frame_grid[1]})" if self.frame_grid is not None else ""
        if self.holes is not None:
            grid = f" (cells of {self.holes[0]}x{self.holes[1]})"
        return f"{self.tokens} tokens per clip in {self.frames} frames of {self.tokens // self.frames}{grid}{whole}"


NEEDS: dict[str, str] = {
    "tokens": "tokens",
    "frames": "the same number of tokens in every frame of every clip",
    "grid": "a full (or cropped) grid of tokens in every frame",
    "windows": "a full (or cropped) grid of tokens in every frame, or one with holes its windows fill (STA)",
}
"""What each `Need` asks for, as error messages say it."""


@dataclass(frozen=True, eq=False)
class TokenState:
    """Tokens of a batch of clips and everything needed to interpret them.

    Attributes:
        x: (B, N, C) patch tokens, class token excluded.
        pos: (B, N) long, each token's index in the original grid (time-major), -1 for a token that
            is no grid cell (a learned token).
        grid: (T, H, W), the token grid right after patch embedding.
        cls: (B, 1, C) class token, or None for models without one. Reducers never drop it.
        size: (B, N) float, how many original patches a token stands for (merging), or None when
            every token is one patch.
        mask: (B, N) bool, True for real tokens when samples of a batch hold different counts (a
            ragged batch); None means every token is real. `compact` makes it, real tokens first.
        lengths: the real-token count of each sample as Python ints, when `mask` is set and `compact`
            made it: blocks pack the real tokens with it without reading the mask back from the device.
            None otherwise (a gather drops it).
        frames: number of frames the tokens are laid out in when every frame holds the same count,
            in order (frame-major: tokens `[j * n, (j + 1) * n)` belong to the j-th kept frame);
            None when per-frame counts differ. Divided space-time attention needs it.
        frame_grid: (h, w) when each of the `frames` frames holds an h x w grid of tokens in raster order
            (the patch grid, a rectangular crop of it, or MViT's pooled grid); None otherwise, and
            meaningless while `frames` is None. Pooling attention needs it; a `gather` sets it only when
            the caller says so.
        aux: side results recorded by a block for the next reducer (`KEYS`, `CLS_ATTN`) and state
            a method carries across layers. Entries named in `TOKEN_AUX` are per token.
    """

    x: Tensor
    pos: Tensor
    grid: tuple[int, int, int]
    cls: Tensor | None = None
    size: Tensor | None = None
    mask: Tensor | None = None
    frames: int | None = None
    aux: Mapping[str, Any] = field(default_factory=dict)
    lengths: tuple[int, ...] | None = None
    frame_grid: tuple[int, int] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_grid(
        cls, x: Tensor, grid: tuple[int, int, int], *, cls_token: Tensor | None = None
    ) -> TokenState:
        """A state holding every cell of `grid` in time-major order, as the patch embedding makes it.

        Args:
            x: (B, T*H*W, C) tokens in time-major raster order.
            grid: (T, H, W).
            cls_token: (B, 1, C) or None.
        """
        B, N, _ = x.shape
        T, H, W = grid
        if N != T * H * W:
            raise ValueError(f"expected {T}*{H}*{W}={T * H * W} tokens for grid {grid}, got {N}")
        pos = torch.arange(N, device=x.device).expand(B, N)  # (B, N)
        return cls(x=x, pos=pos, grid=(T, H, W), cls=cls_token, frames=T, frame_grid=(H, W))

    def replace(self, **changes: Any) -> TokenState:
        """A copy with some fields changed (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def with_aux(self, **entries: Any) -> TokenState:
        """A copy whose `aux` also holds `entries` (the original dict is not modified)."""
        return dataclasses.replace(self, aux={**self.aux, **entries})

    def without_records(self) -> TokenState:
        """A copy without the per-token records of the tokens as they are now (`TOKEN_AUX` entries with
        merge rule "drop", such as the attention's side results), for a step that changes the tokens
        and so makes them stale: carrying them would only cost a gather."""
        return self.replace(aux={k: v for k, v in self.aux.items() if TOKEN_AUX.get(k) != "drop"})

    def add_loss(self, name: str, value: Tensor) -> TokenState:
        """A copy carrying one more extra training loss under `aux[LOSSES][name]` (names are unique)."""
        losses = dict(self.aux.get(LOSSES, {}))
        if name in losses:
            raise ValueError(f"a loss named {name!r} was already added to this state")
        losses[name] = value
        return self.with_aux(**{LOSSES: losses})

    def add_stat(self, name: str, value: Tensor) -> TokenState:
        """A copy carrying one more statistic under `aux[STATS][name]` (logged in training, not a loss)."""
        stats = dict(self.aux.get(STATS, {}))
        stats[name] = value
        return self.with_aux(**{STATS: stats})

    # ------------------------------------------------------------------ views
    @property
    def num_tokens(self) -> Tensor:
        """(B,) long: real patch tokens per sample (class token not counted)."""
        B, N, _ = self.x.shape
        if self.mask is None:
            return torch.full((B,), N, dtype=torch.long, device=self.x.device)
        return self.mask.sum(1)

    @property
    def tokens_per_frame(self) -> int:
        """Tokens in each frame; raises when per-frame counts differ."""
        if self.frames is None:
            raise ValueError(
                "this state does not hold the same number of tokens in every frame (frames=None); "
                "use a reduction that keeps per-frame counts equal"
            )
        return self.x.shape[1] // self.frames

    def per_frame(self) -> Tensor:
        """(B, F, n, C) view of `x`, F = `frames` kept frames of n tokens each.

        Raises:
            ValueError: if the tokens are not laid out with equal counts per frame.
        """
        n = self.tokens_per_frame  # raises when per-frame counts differ
        B, _, C = self.x.shape
        return self.x.view(B, -1, n, C)  # (B, F, n, C)

    # ------------------------------------------------------------------ index ops
    def gather(
        self, idx: Tensor, *, frames: int | None = None, frame_grid: tuple[int, int] | None = None
    ) -> TokenState:
        """Keep tokens by index; every per-token field follows.

        Args:
            idx: (B, K) long indices into the token axis (0 <= idx < N).
            frames: the frame layout of the result (`frames` of the output state). None unless the
                caller guarantees K/frames tokens per frame in frame order.
            frame_grid: the (h, w) grid each of those frames holds in raster order (`frame_grid` of
                the output state); None unless the caller guarantees it.

        Returns:
            A state with K tokens.
        """
        B = self.x.shape[0]
        if idx.dim() != 2 or idx.shape[0] != B:
            raise ValueError(f"gather expects indices of shape (B={B}, K), got {tuple(idx.shape)}")
        aux = {k: (take(v, idx) if k in TOKEN_AUX and v is not None else v) for k, v in self.aux.items()}
        if SOURCE_MAP in aux:  # tracking: cells of the tokens left out now belong to none
            aux[SOURCE_MAP] = _follow(aux[SOURCE_MAP], _renumbering(idx, self.x.shape[1]))
        return dataclasses.replace(
            self,
            x=take(self.x, idx),  # (B, K, C)
            pos=take(self.pos, idx),  # (B, K)
            size=None if self.size is None else self.size.gather(1, idx),
            mask=None if self.mask is None else self.mask.gather(1, idx),
            frames=frames,
            aux=aux,
            lengths=None,
            frame_grid=frame_grid if frames is not None else None,
        )

    def merge(
        self,
        keep_idx: Tensor,
        into_idx: Tensor,
        src_idx: Tensor,
        dst_idx: Tensor,
        *,
        frames: int | None = None,
        frame_grid: tuple[int, int] | None = None,
    ) -> TokenState:
        """Merge tokens size-weighted; every per-token field follows, as in `gather`.

        The result holds the tokens of `keep_idx` as they are, then those of `into_idx`, each the
        size-weighted mean of itself and the tokens of `src_idx` merged into it:

            x_d <- (s_d x_d + sum_{src -> d} s_src x_src) / (s_d + sum_{src -> d} s_src)
            s_d <- s_d + sum_{src -> d} s_src

        with sizes from `size` (1 per token when None). A destination keeps its own `pos` and `mask`;
        per-token `aux` entries follow their registered rule (`TOKEN_AUX`: dropped, kept by the
        destination, size-weighted mean or sum); with a source map, a merged token's patches now belong
        to its destination. A token in none of the three index sets is dropped.
        Bipartite matching (ToMe) gives the sets directly: keep = the unmerged A tokens, into = all
        of B, src = the merged A tokens, dst = their partners in B.

        Args:
            keep_idx: (B, U) indices of tokens kept unchanged.
            into_idx: (B, D) indices of the tokens merges go into (kept after `keep_idx`'s).
            src_idx: (B, r) indices of the tokens merged away.
            dst_idx: (B, r) for each of `src_idx`, the position in `into_idx` (0 <= . < D) of the
                token it merges into; several may share one.
            frames, frame_grid: the frame layout of the result, as in `gather`.

        Returns:
            A state of U + D tokens.
        """
        B, N, _ = self.x.shape
        U, D = keep_idx.shape[1], into_idx.shape[1]
        kept = torch.cat([keep_idx, into_idx], 1)  # (B, U + D)
        out = self.without_records().gather(kept, frames=frames, frame_grid=frame_grid)  # records not carried
        size = self.size if self.size is not None else self.x.new_ones(B, N)
        src_s = size.gather(1, src_idx)  # (B, r)
        dst_s = size.gather(1, into_idx)  # (B, D)
        merged_s = dst_s.scatter_add(1, dst_idx, src_s)  # (B, D)
        rows = (U + dst_idx + torch.arange(0, B * (U + D), U + D, device=kept.device).unsqueeze(1)).view(-1)
        x = _merge_rows(out.x, self.x, U, rows, src_idx, dst_s, src_s, merged_s)  # (B, U + D, C)
        aux = dict(out.aux)
        for k, rule in TOKEN_AUX.items():
            if rule in ("mean", "sum") and aux.get(k) is not None:
                weights = (dst_s, src_s, merged_s) if rule == "mean" else (None, None, None)
                aux[k] = _merge_rows(aux[k], self.aux[k], U, rows, src_idx, *weights)
        if SOURCE_MAP in self.aux:  # tracking: a merged token's patches go to its destination
            index = _renumbering(kept, N).scatter(1, src_idx, U + dst_idx)  # (B, N): new index of each
            aux[SOURCE_MAP] = _follow(self.aux[SOURCE_MAP], index)
        return out.replace(x=x, size=torch.cat([size.gather(1, keep_idx), merged_s], 1), aux=aux)

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """Validate the invariants; raises `AssertionError` naming the one that fails.

        Tests call this; the forward pass does not (it synchronises and costs time).
        """
        x = self.x
        assert x.dim() == 3, f"x must be (B, N, C), got {tuple(x.shape)}"
        B, N, C = x.shape
        T, H, W = self.grid
        assert self.pos.shape == (B, N), f"pos must be (B, N)=({B}, {N}), got {tuple(self.pos.shape)}"
        assert self.pos.dtype == torch.long, f"pos must be long, got {self.pos.dtype}"
        assert bool(((self.pos >= -1) & (self.pos < T * H * W)).all()), "pos outside the grid"
        real = self.pos >= 0
        if self.mask is not None:
            real = real & self.mask
        # A grid cell is held by at most one real token of a sample.
        cells = torch.where(real, self.pos, -1).sort(1).values
        dup = (cells[:, 1:] == cells[:, :-1]) & (cells[:, 1:] >= 0)
        assert not bool(dup.any()), "a grid position is held by two tokens"
        if self.cls is not None:
            assert self.cls.shape == (B, 1, C), (
                f"cls must be (B, 1, C)=({B}, 1, {C}), got {tuple(self.cls.shape)}"
            )
        if self.size is not None:
            assert self.size.shape == (B, N), f"size must be (B, N), got {tuple(self.size.shape)}"
            assert bool((self.size > 0).all()), "token sizes must be positive"
        if self.mask is not None:
            assert self.mask.shape == (B, N) and self.mask.dtype == torch.bool, "mask must be (B, N) bool"
            assert bool(self.mask.any(1).all()), "a sample holds no real token"
            assert self.frames is None, "a ragged state (mask set) has no equal-frame layout"
        if self.lengths is not None:
            assert self.mask is not None, "lengths are only kept for a ragged state (mask set)"
            assert list(self.lengths) == self.mask.sum(1).tolist(), "lengths disagree with the mask"
            assert bool(
                (self.mask == (torch.arange(N, device=x.device) < self.mask.sum(1, keepdim=True))).all()
            ), "with lengths, the real tokens come first in every row"
        if self.frames is not None:
            assert N % self.frames == 0, f"{N} tokens cannot fill {self.frames} equal frames"
            frame_of = (self.pos // (H * W)).view(B, self.frames, N // self.frames)  # (B, F, n)
            grid_cells = self.pos.view(B, self.frames, -1) >= 0
            first = frame_of[:, :, :1].expand_as(frame_of)
            assert bool(((frame_of == first) | ~grid_cells).all()), (
                "a frame slot mixes tokens of several frames"
            )
        if self.frame_grid is not None and self.frames is not None:  # meaningless without frames
            h, w = self.frame_grid
            assert N == self.frames * h * w, f"{N} tokens are not {self.frames} frames of {h}x{w}"
        for k, v in self.aux.items():
            if k in TOKEN_AUX and v is not None:
                assert v.shape[:2] == (B, N), (
                    f"aux[{k!r}] must be per token (B, N, ...), got {tuple(v.shape)}"
                )
        sources = self.aux.get(SOURCE_MAP)
        if sources is not None:
            assert sources.shape == (B, T * H * W) and sources.dtype == torch.long, (
                f"aux[{SOURCE_MAP!r}] must be (B, T*H*W)=({B}, {T * H * W}) long, got {tuple(sources.shape)}"
            )
            assert bool(((sources >= -1) & (sources < N)).all()), (
                "the source map names a token that is not there"
            )
            own = sources.gather(1, self.pos.clamp_min(0))  # (B, N): the token holding each one's own cell
            mine = own == torch.arange(N, device=own.device)
            assert bool((mine | ~(real & (self.pos >= 0))).all()), "a token does not stand for its own cell"


def take(t: Tensor, idx: Tensor) -> Tensor:
    """Rows of the token axis (1) of a (B, N, ...) tensor at (B, K) indices: (B, K, ...).

    One `index_select` on the flattened batch: several times faster on CPU than `gather` with an
    index expanded over the trailing dimensions.
    """
    B, N = t.shape[:2]
    if B == 1:  # fewer ops: the per-call overhead matters for reducers that run in every block
        return t[0].index_select(0, idx[0]).unsqueeze(0)
    flat = (idx + torch.arange(0, B * N, N, device=idx.device).unsqueeze(1)).view(-1)  # (B*K,)
    return t.flatten(0, 1).index_select(0, flat).view(*idx.shape, *t.shape[2:])


def compact(
    state: TokenState,
    chosen: Tensor,
    *,
    frames: int | None = None,
    invalid: tuple[Tensor, str] | None = None,
) -> TokenState:
    """Keep the `chosen` tokens of each sample, however many each has: a ragged batch.

    The chosen tokens come first in every row, in their current order, and the rows are trimmed to the
    largest count; `mask` marks them and `lengths` holds the counts. When every sample keeps the same
    count the result is dense (no mask), laid out in `frames` equal frames if the caller says so.
    Padding tokens of the input (`mask` False) are never chosen. A clip may keep no patch token only
    when the state has a class token (HaltingVT: every patch token halted, the class token runs on).

    This is the one place a forward pass reads data back to the host (the counts, once, to size the
    output): the documented exception to the rule of no synchronisation in a forward pass.

    Args:
        chosen: (B, N) bool, the tokens to keep.
        frames: the frame layout of the result when it is dense (see `TokenState.gather`).
        invalid: (flags, message): (B,) bool flags of clips whose input was bad (a per-clip budget out
            of range, say), read back in the same synchronisation; any set raises `message`.

    Raises:
        InputError: a sample with no token chosen and no class token (a model needs at least one real
            token per clip), or a flag of `invalid` set.
    """
    if state.mask is not None:
        chosen = chosen & state.mask
    B, N = chosen.shape
    counts = chosen.sum(1)  # (B,)
    if invalid is None:
        lengths = tuple(counts.tolist())  # the one host synchronisation
    else:
        read = torch.cat([counts, invalid[0].long()]).tolist()  # the one host synchronisation
        lengths, flags = tuple(read[:B]), read[B:]
        if any(flags):
            raise InputError(f"{invalid[1]}; clip {flags.index(1)} of the batch is not")
    if min(lengths) < 1 and state.cls is None:
        raise InputError(
            f"a reduction kept no token of clip {lengths.index(0)} of the batch (counts {list(lengths)}); "
            "every clip needs at least one real token"
        )
    longest = max(lengths)
    if min(lengths) == N:  # every token of every sample: nothing to move
        return state if state.mask is None else state.replace(mask=None, lengths=None, frames=frames)
    with torch.no_grad():
        idx = (
            (~chosen).to(torch.int8).argsort(dim=1, stable=True)[:, :longest]
        )  # (B, K): chosen first, in order
    if min(lengths) == longest:
        return state.gather(idx, frames=frames).replace(mask=None)
    out = state.gather(idx)
    mask = torch.arange(longest, device=chosen.device) < counts.unsqueeze(1)  # (B, K)
    return out.replace(mask=mask, lengths=lengths)


def track_sources(state: TokenState) -> TokenState:
    """`state` with a source map (`SOURCE_MAP`) started from its positions: from here on `gather` and
    `merge` keep track of which original patches each token stands for. Each real token starts with
    its own `pos` cell (so start at the patch embedding, before any merge)."""
    return state.with_aux(**{SOURCE_MAP: owners(state)})


def owners(state: TokenState) -> Tensor:
    """(B, T*H*W) long: for each cell of the original grid, the index of the real token standing for
    it, -1 for none. The source map when tracking sources (`track_sources`), else each real grid
    token's own `pos` cell only (exact for methods that only drop tokens)."""
    T, H, W = state.grid
    B, N = state.pos.shape
    real = state.pos >= 0
    if state.mask is not None:
        real = real & state.mask
    sources = state.aux.get(SOURCE_MAP)
    if sources is not None:
        if state.mask is None:
            return sources
        held = real.gather(1, sources.clamp_min(0))  # (B, T*H*W): the owner is a real token
        return torch.where((sources >= 0) & held, sources, -1)
    slot = torch.where(real, state.pos, T * H * W)  # (B, N), T*H*W = discard slot
    index = torch.arange(N, device=state.pos.device).expand(B, N)  # (B, N)
    return state.pos.new_full((B, T * H * W + 1), -1).scatter(1, slot, index)[:, :-1]  # (B, T*H*W)


def covered(state: TokenState) -> Tensor:
    """(B, T*H*W) bool: which cells of the original grid some real token stands for (a merged token
    covers every patch merged into it).

    Raises:
        InputError: for merged tokens (`size` set) without a source map: their `pos` names one of their
            patches only. Run the forward pass with `trace=True` (or `track_sources`).
    """
    if state.size is not None and SOURCE_MAP not in state.aux:
        raise InputError(
            "covered: this state holds merged tokens but no source map, so which patches they stand for "
            "is unknown; run the forward pass with trace=True (forward_features(video, trace=True))"
        )
    return owners(state) >= 0


def _merge_rows(
    out: Tensor,
    source: Tensor,
    U: int,
    rows: Tensor,
    src_idx: Tensor,
    dst_s: Tensor | None = None,
    src_s: Tensor | None = None,
    merged_s: Tensor | None = None,
) -> Tensor:
    """`out` (B, U + D, ...), tokens just gathered (a new tensor, changed in place), with the tokens
    `src_idx` of `source` (B, N, ...) merged into the destination rows `rows` (B*r,) of the flattened
    `out`: the size-weighted mean when sizes are given (`dst_s` (B, D), `src_s` (B, r), their sums
    `merged_s`), else the sum. Every destination goes through the multiply and divide, whether it
    receives a merge or not: one op each."""
    B, M = out.shape[:2]
    flat = out.view(B * M, -1)  # (B*(U + D), prod(...))
    src = take(source, src_idx)  # (B, r, ...)
    if dst_s is None:
        flat.index_add_(0, rows, src.reshape(rows.shape[0], flat.shape[1]))
        return out
    ones = (1,) * (out.dim() - 2)
    into = out[:, U:]  # (B, D, ...) view
    into.mul_(dst_s.view(*dst_s.shape, *ones))
    flat.index_add_(0, rows, (src * src_s.view(*src_s.shape, *ones)).reshape(rows.shape[0], flat.shape[1]))
    into.div_(merged_s.view(*merged_s.shape, *ones))
    return out


def _renumbering(idx: Tensor, num: int) -> Tensor:
    """(B, num) long: the new index of each of `num` tokens after keeping `idx` (B, K), -1 if left out."""
    B, K = idx.shape
    return idx.new_full((B, num), -1).scatter(1, idx, torch.arange(K, device=idx.device).expand(B, K))


def _follow(sources: Tensor, index: Tensor) -> Tensor:
    """A source map (B, T*H*W) after tokens moved: old token i is now token index[b, i] (-1: gone)."""
    return torch.where(sources >= 0, index.gather(1, sources.clamp_min(0)), -1)  # (B, T*H*W)
