"""Layers shared by every backbone: attention over SDPA, MLP, pre-norm block, patch embeddings,
sinusoid positions and stochastic depth. No method re-declares them.

Submodule names follow the original (timm-style) checkpoints -- `attn.qkv`, `attn.proj`, `norm1`,
`mlp.fc1` -- so every converter is a short key map.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..tokens import ATTN_RECEIVED, CLS_ATTN, KEYS, PROP_ATTN, TokenState

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "Mlp",
    "QkvBias",
    "attention_mask",
    "received_attention",
    "sinusoid_table",
    "split_cls",
    "with_cls",
]

QkvBias = Literal["qkv", "qv", "none"]


def sinusoid_table(num_positions: int, dim: int) -> Tensor:
    """Fixed sin-cos position table of VideoMAE, (num_positions, dim) float32.

    Computed in float64 with numpy, exactly as the reference (Vaswani et al.) table VideoMAE uses,
    then cast to float32, so the float32 values match the published models bit for bit.
    angle(p, j) = p / 10000^(2*floor(j/2)/dim); sin on even j, cos on odd j.
    """
    position = np.arange(num_positions, dtype=np.float64)[:, None]
    exponent = 2 * (np.arange(dim) // 2) / dim
    angle = position / np.power(10000, exponent)[None, :]  # (P, dim), float64
    table = np.empty_like(angle)
    table[:, 0::2] = np.sin(angle[:, 0::2])
    table[:, 1::2] = np.cos(angle[:, 1::2])
    return torch.from_numpy(table).float()


def attention_mask(state: TokenState) -> Tensor | None:
    """SDPA mask (B, 1, 1, [1 +] N) over the keys, or None for dense batches without size bias (so
    SDPA keeps its fastest kernel).

    Boolean (True = attend) when only padding is masked; additive float when proportional attention
    is on (`PROP_ATTN`): log(size) of each key, -inf for padding.
    """
    prop = state.size is not None and state.aux.get(PROP_ATTN, False)
    if state.mask is None and not prop:
        return None
    if prop:
        bias = state.size.log().to(state.x.dtype)  # (B, N)
        if state.mask is not None:
            bias = bias.masked_fill(~state.mask, float("-inf"))
        if state.cls is not None:
            bias = F.pad(bias, (1, 0), value=0.0)  # the class token stands for itself
        return bias[:, None, None, :]  # (B, 1, 1, N')
    mask = state.mask
    if state.cls is not None:
        mask = F.pad(mask, (1, 0), value=True)  # the class token is always real
    return mask[:, None, None, :]  # (B, 1, 1, N')


def received_attention(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """Attention each token receives, averaged over heads and over the (real) queries: (B, N).

    Recomputes the attention logits in query chunks, so memory stays at (B, nh, chunk, N) instead of
    the full (B, nh, N, N) map that the fused SDPA kernel never materialises.

    Args:
        q, k: (B, nh, N, hd) queries and keys.
        mask: the block's SDPA mask (bool or additive), broadcastable to (B, 1, 1, N), or None.
    """
    B, nh, N, hd = q.shape
    rows = None if mask is None or mask.dtype != torch.bool else mask[:, 0, 0, :].to(q.dtype)  # (B, N)
    total = q.new_zeros(B, nh, N)
    chunk = max(1, 2**22 // (B * nh * N))
    for start in range(0, N, chunk):  # bounds memory; not a loop over tokens one by one
        logits = (q[:, :, start : start + chunk] @ k.transpose(-2, -1)) * hd**-0.5  # (B, nh, c, N)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        probs = logits.softmax(-1)  # (B, nh, c, N)
        if rows is not None:
            probs = probs * rows[:, None, start : start + chunk, None]
        total += probs.sum(2)
    real = N if rows is None else rows.sum(1).clamp_min(1.0)[:, None]  # (B, 1)
    return total.mean(1) / real  # (B, N)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability `p` in
    training; identity in eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path(p: float) -> nn.Module:
    return DropPath(p) if p > 0 else nn.Identity()


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`.

    One fused `qkv` projection. `qkv_bias="qv"` is VideoMAE's layout: learned query and value biases,
    no key bias (kept as the separate parameters `q_bias` and `v_bias` of the original code).
    """

    def __init__(self, *, dim: int, heads: int, qkv_bias: QkvBias = "qkv", attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise InputError(f"dim {dim} is not divisible by heads {heads}")
        if qkv_bias not in ("qkv", "qv", "none"):
            raise InputError(f"qkv_bias must be 'qkv', 'qv' or 'none', got {qkv_bias!r}")
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias == "qkv")
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = nn.Linear(dim, dim)

    def _qkv_bias(self) -> Tensor | None:
        if self.q_bias is None:
            return self.qkv.bias
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        record: frozenset[str] = frozenset(),
        has_cls: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """
        Args:
            x: (B, N, C) normalised tokens (class token first when `has_cls`).
            mask: SDPA attention mask broadcastable to (B, nh, N, N): bool (True = attend) or an
                additive float bias.
            record: which side results to return (`KEYS`, `CLS_ATTN`, `ATTN_RECEIVED`); empty costs
                nothing extra.
            has_cls: whether token 0 is a class token (it is left out of recorded per-token results).

        Returns:
            (B, N, C) output and a dict with the requested side results (patch tokens only).
        """
        B, N, C = x.shape
        qkv = F.linear(x, self.qkv.weight, self._qkv_bias())  # (B, N, 3C)
        q, k, v = qkv.view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hd)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)  # (B, nh, N, hd)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))  # (B, N, C)
        recorded: dict[str, Tensor] = {}
        if record:
            first = 1 if has_cls else 0
            if KEYS in record:
                recorded[KEYS] = k[:, :, first:].mean(1)  # (B, N', hd)
            if CLS_ATTN in record:
                if not has_cls:
                    raise ValueError("class-token attention was requested from a model without a class token")
                logits = (q[:, :, :1] @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, nh, 1, N)
                if mask is not None:
                    logits = (
                        logits.masked_fill(~mask, float("-inf"))
                        if mask.dtype == torch.bool
                        else logits + mask
                    )
                recorded[CLS_ATTN] = logits.softmax(-1)[:, :, 0, 1:].mean(1)  # (B, N')
            if ATTN_RECEIVED in record:
                recorded[ATTN_RECEIVED] = received_attention(q, k, mask)[:, first:]  # (B, N')
        return out, recorded


class Mlp(nn.Module):
    """Linear -> exact (erf) GELU -> Linear, with optional dropout."""

    def __init__(self, *, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block with joint attention over all tokens of a clip.

    `record` is the set of side results (`KEYS`, `CLS_ATTN`, `ATTN_RECEIVED`) the reducers after
    this attention need; `inner` is a reducer slot between the attention and the MLP (ToMe merges
    there). `tokensieve.apply` sets both; a bare block records nothing and holds `nn.Identity()`.
    """

    def __init__(
        self,
        *,
        dim: int,
        heads: int,
        mlp_dim: int,
        qkv_bias: QkvBias = "qkv",
        eps: float = 1e-6,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim=dim, heads=heads, qkv_bias=qkv_bias, attn_drop=attn_drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim=dim, hidden=mlp_dim, drop=drop)
        self.drop_path = drop_path(drop_path_rate)
        self.inner: nn.Module = nn.Identity()
        self.record: frozenset[str] = frozenset()

    def forward(self, state: TokenState) -> TokenState:
        has_cls = state.cls is not None
        x = with_cls(state)  # (B, [1 +] N, C)
        y, recorded = self.attn(
            self.norm1(x), mask=attention_mask(state), record=self.record, has_cls=has_cls
        )
        state = split_cls(state, x + self.drop_path(y), recorded)
        state = self.inner(state)
        return self.mlp_residual(state)

    def mlp_residual(self, state: TokenState) -> TokenState:
        """The second half of the block: x + MLP(norm2(x)) on every token, class token included."""
        x = with_cls(state)  # (B, [1 +] N, C)
        return split_cls(state, x + self.drop_path(self.mlp(self.norm2(x))))


def with_cls(state: TokenState) -> Tensor:
    """(B, [1 +] N, C): the class token (if any) followed by the patch tokens."""
    return state.x if state.cls is None else torch.cat([state.cls, state.x], 1)


def split_cls(state: TokenState, x: Tensor, recorded: dict[str, Tensor] | None = None) -> TokenState:
    """`state` holding the tokens `x` laid out as `with_cls` makes them, plus recorded side results."""
    state = state.replace(x=x) if state.cls is None else state.replace(x=x[:, 1:], cls=x[:, :1])
    return state.with_aux(**recorded) if recorded else state
