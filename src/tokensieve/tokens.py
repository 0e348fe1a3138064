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
from typing import Any

import torch
from torch import Tensor

from .errors import InputError

__all__ = [
    "ATTN_RECEIVED",
    "CLIP_KEY",
    "CLS_ATTN",
    "KEYS",
    "LOSSES",
    "PROP_ATTN",
    "SOURCE_MAP",
    "STA_ORDER",
    "TOKEN_AUX",
    "TokenState",
    "covered",
    "owners",
    "take",
    "track_sources",
]

# `aux` keys a block records when a reducer asks for them (`Reducer.needs`).
KEYS = "keys"
"""Keys of the block's attention, averaged over heads: (B, N, hd), class token excluded."""
CLS_ATTN = "cls_attn"
"""Attention paid by the class token to each patch token, averaged over heads: (B, N)."""

ATTN_RECEIVED = "attn_received"
"""Attention each patch token receives, averaged over heads and queries: (B, N). The importance
signal for models without a class token."""
PROP_ATTN = "prop_attn"
"""Flag (not per token): attention adds log(size) of each key to its logits (ToMe's proportional
attention). Set by a merging reducer; read by `backbones.layers.attention_mask`."""

CLIP_KEY = "clip_key"
"""(B,) int64: a hash of each clip's input (`rng.clip_keys`), put there by the backbone when the plan
draws random numbers. Random methods draw from it, so a clip gets the same draws in any batch."""

LOSSES = "losses"
"""Extra training losses reducers add along the forward pass: a dict name -> scalar tensor (not per
token). The training loop adds them to the task loss; `add_loss` is the way to put one in."""

STA_ORDER = "sta_order"
"""STA's running state: (B, N) long, each token's place in the sequence the released STA code would
store after the last STA stage (tokens themselves stay in their current order). The next stage
processes each group in this order, which decides its first group's even/odd split."""

SOURCE_MAP = "source_map"
"""(B, T*H*W) long, only while tracking sources (`track_sources`): for each cell of the original grid
(time-major, as `pos`), the index of the token that stands for it now, -1 when no token does. Not per
token: `gather` and `merge` renumber it. A token's patches are the cells holding its index."""

TOKEN_AUX = frozenset({KEYS, CLS_ATTN, ATTN_RECEIVED, STA_ORDER})
"""`aux` entries laid out per token (token axis 1); `gather` moves them with the tokens. A method
that keeps its own per-token running state adds its key here."""


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
        mask: (B, N) bool, True for real tokens when samples of a batch hold different counts;
            None means every token is real.
        frames: number of frames the tokens are laid out in when every frame holds the same count,
            in order (frame-major: tokens `[j * n, (j + 1) * n)` belong to the j-th kept frame);
            None when per-frame counts differ. Divided space-time attention needs it.
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
        return cls(x=x, pos=pos, grid=(T, H, W), cls=cls_token, frames=T)

    def replace(self, **changes: Any) -> TokenState:
        """A copy with some fields changed (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def with_aux(self, **entries: Any) -> TokenState:
        """A copy whose `aux` also holds `entries` (the original dict is not modified)."""
        return dataclasses.replace(self, aux={**self.aux, **entries})

    def add_loss(self, name: str, value: Tensor) -> TokenState:
        """A copy carrying one more extra training loss under `aux[LOSSES][name]` (names are unique)."""
        losses = dict(self.aux.get(LOSSES, {}))
        if name in losses:
            raise ValueError(f"a loss named {name!r} was already added to this state")
        losses[name] = value
        return self.with_aux(**{LOSSES: losses})

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
    def gather(self, idx: Tensor, *, frames: int | None = None) -> TokenState:
        """Keep tokens by index; every per-token field follows.

        Args:
            idx: (B, K) long indices into the token axis (0 <= idx < N).
            frames: the frame layout of the result (`frames` of the output state). None unless the
                caller guarantees K/frames tokens per frame in frame order.

        Returns:
            A state with K tokens.
        """
        B = self.x.shape[0]
        if idx.dim() != 2 or idx.shape[0] != B:
            raise ValueError(f"gather expects indices of shape (B={B}, K), got {tuple(idx.shape)}")
        aux = {
            k: (take(v, idx) if k in TOKEN_AUX and isinstance(v, Tensor) else v) for k, v in self.aux.items()
        }
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
        )

    def merge(
        self,
        keep_idx: Tensor,
        into_idx: Tensor,
        src_idx: Tensor,
        dst_idx: Tensor,
        *,
        frames: int | None = None,
    ) -> TokenState:
        """Merge tokens size-weighted; every per-token field follows, as in `gather`.

        The result holds the tokens of `keep_idx` as they are, then those of `into_idx`, each the
        size-weighted mean of itself and the tokens of `src_idx` merged into it:

            x_d <- (s_d x_d + sum_{src -> d} s_src x_src) / (s_d + sum_{src -> d} s_src)
            s_d <- s_d + sum_{src -> d} s_src

        with sizes from `size` (1 per token when None). A destination keeps its own `pos`, `mask` and
        per-token `aux` entries (they move as in `gather`); with a source map, a merged token's
        patches now belong to its destination. A token in none of the three index sets is dropped.
        Bipartite matching (ToMe) gives the sets directly: keep = the unmerged A tokens, into = all
        of B, src = the merged A tokens, dst = their partners in B.

        Args:
            keep_idx: (B, U) indices of tokens kept unchanged.
            into_idx: (B, D) indices of the tokens merges go into (kept after `keep_idx`'s).
            src_idx: (B, r) indices of the tokens merged away.
            dst_idx: (B, r) for each of `src_idx`, the position in `into_idx` (0 <= . < D) of the
                token it merges into; several may share one.
            frames: the frame layout of the result, as in `gather`.

        Returns:
            A state of U + D tokens.
        """
        B, N, C = self.x.shape
        U, D = keep_idx.shape[1], into_idx.shape[1]
        kept = torch.cat([keep_idx, into_idx], 1)  # (B, U + D)
        out = self.gather(kept, frames=frames)  # (B, U + D, ...)
        size = self.size if self.size is not None else self.x.new_ones(B, N)
        src_s = size.gather(1, src_idx)  # (B, r)
        dst_s = size.gather(1, into_idx)  # (B, D)
        merged_s = dst_s.scatter_add(1, dst_idx, src_s)  # (B, D)
        # In place on the destinations' rows of `out.x` (a new tensor `gather` made). Every destination
        # goes through the multiply and divide, whether it receives a merge or not: one op each.
        x = out.x  # (B, U + D, C)
        into_x = x[:, U:]  # (B, D, C) view
        into_x.mul_(dst_s.unsqueeze(-1))
        rows = U + dst_idx + torch.arange(0, B * (U + D), U + D, device=x.device).unsqueeze(1)  # (B, r)
        x.view(-1, C).index_add_(0, rows.view(-1), (take(self.x, src_idx) * src_s.unsqueeze(-1)).view(-1, C))
        into_x.div_(merged_s.unsqueeze(-1))
        aux = out.aux
        if SOURCE_MAP in self.aux:  # tracking: a merged token's patches go to its destination
            index = _renumbering(kept, N).scatter(1, src_idx, U + dst_idx)  # (B, N): new index of each
            aux = {**aux, SOURCE_MAP: _follow(self.aux[SOURCE_MAP], index)}
        return out.replace(size=torch.cat([size.gather(1, keep_idx), merged_s], 1), aux=aux)  # (B, U + D)

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
        if self.frames is not None:
            assert N % self.frames == 0, f"{N} tokens cannot fill {self.frames} equal frames"
            frame_of = (self.pos // (H * W)).view(B, self.frames, N // self.frames)  # (B, F, n)
            grid_cells = self.pos.view(B, self.frames, -1) >= 0
            first = frame_of[:, :, :1].expand_as(frame_of)
            assert bool(((frame_of == first) | ~grid_cells).all()), (
                "a frame slot mixes tokens of several frames"
            )
        for k, v in self.aux.items():
            if k in TOKEN_AUX and isinstance(v, Tensor):
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


def _renumbering(idx: Tensor, num: int) -> Tensor:
    """(B, num) long: the new index of each of `num` tokens after keeping `idx` (B, K), -1 if left out."""
    B, K = idx.shape
    return idx.new_full((B, num), -1).scatter(1, idx, torch.arange(K, device=idx.device).expand(B, K))


def _follow(sources: Tensor, index: Tensor) -> Tensor:
    """A source map (B, T*H*W) after tokens moved: old token i is now token index[b, i] (-1: gone)."""
    return torch.where(sources >= 0, index.gather(1, sources.clamp_min(0)), -1)  # (B, T*H*W)
