"""`TokenState`: the one structure that flows from the patch embedding, through every block and
reducer, to the head.

Every reducer takes a `TokenState` and returns one; nothing else is threaded through a forward pass.
Index-driven operations go through `TokenState.gather`, so every per-token field (`x`, `pos`,
`size`, `mask` and the per-token entries of `aux`) moves together.

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

__all__ = [
    "ATTN_RECEIVED",
    "CLIP_KEY",
    "CLS_ATTN",
    "KEYS",
    "LOSSES",
    "PROP_ATTN",
    "STA_ORDER",
    "TOKEN_AUX",
    "TokenState",
    "take",
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
        return dataclasses.replace(
            self,
            x=take(self.x, idx),  # (B, K, C)
            pos=take(self.pos, idx),  # (B, K)
            size=None if self.size is None else self.size.gather(1, idx),
            mask=None if self.mask is None else self.mask.gather(1, idx),
            frames=frames,
            aux=aux,
        )

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
