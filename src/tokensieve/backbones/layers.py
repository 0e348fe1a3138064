"""Layers shared by every backbone: attention over SDPA, MLP, pre-norm block, patch embeddings,
sinusoid positions and stochastic depth. No method re-declares them.

Submodule names follow the original (timm-style) checkpoints -- `attn.qkv`, `attn.proj`, `norm1`,
`mlp.fc1` -- so every converter is a short key map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..errors import InputError
from ..tokens import ATTN_RECEIVED, CLS_ATTN, CLS_UPDATE, KEYS, PROP_ATTN, VECTOR_ATTN, TokenState

__all__ = [
    "ACTS",
    "RAGGED",
    "Act",
    "Attention",
    "Block",
    "DropPath",
    "Linear",
    "Mlp",
    "Packed",
    "QkvBias",
    "attention_mask",
    "pack",
    "received_attention",
    "run_packed",
    "sinusoid_table",
    "split_cls",
    "varlen_attention",
    "with_cls",
]

QkvBias = Literal["qkv", "qv", "none"]
Act = Literal["gelu", "gelu_tanh"]
ACTS = ("gelu", "gelu_tanh")
"""The MLP's activations: exact (erf) GELU, or its tanh approximation
0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (ViViT's; transformers' "gelu_fast", "gelu_new",
"gelu_pytorch_tanh")."""

RAGGED = ("packed", "padded")
"""How blocks run a ragged batch (`VideoBackbone.ragged`): "packed" (the default) runs the projections
and the MLP on the real tokens only and attention per clip over its own tokens, so a clip costs what
it keeps; "padded" runs every row, padding included, with a padding mask (the reference: the two give
equal outputs)."""

TILE_ROWS = 2048
"""On CPU a packed block runs its rows in tiles of consecutive whole clips of at most this many rows
(one clip if longer): the intermediates of a tile (qkv, the MLP's hidden layer) stay in cache, where
those of all the rows of a batch of videos would not (measured: bias copies and GELU run at a third of
the speed on 7.5k rows of videomae-s than on 1.5k). On other devices one tile holds every row.

A dense (not ragged) batch runs its MLP half (norm, fc1, GELU, fc2, residual) in equal row tiles of at
most this many rows in CPU inference, for the same reason: videomae-s at batch 8 (12544 rows) runs 20%
faster in bfloat16 (1233 -> 993 ms) and 11% in float32 (3920 -> 3499 ms), batch 1 (1568 rows) the same;
tiles of 784 to 2048 rows were measured, 1280 and 2048 best."""


def _can_pack_bf16() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's operators
        return False


PACK_BF16 = _can_pack_bf16()
"""Whether `Linear` may run bfloat16 inference on CPU with its weight packed once (oneDNN with bfloat16
support; `tokensieve.backbones.layers.PACK_BF16 = False` turns it off)."""


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state-dict keys) that runs bfloat16 inference on CPU with its
    weight packed once, in oneDNN's blocked layout, instead of at every call.

    Why: `F.linear` in bfloat16 has oneDNN reorder the weight on every call, a cost that does not shrink
    with the tokens. On this machine (AMX, 2 threads) the qkv product of videomae-s costs 0.48 µs per token
    row at 784 rows and 0.32 packed (0.32 both ways at 6272 rows): the fixed cost is what took a fifth of
    `random:keep=0.5`'s saving at batch 1 (`benchmarks/bf16_gemm.py`, docs/design.md). The packed product
    gives the same numbers (the same kernel, tested bit for bit). The packed copy is made at the first
    such call and made again when the weight changes (another tensor, or written in place: its version);
    it is not saved, copied or pickled. Only under `torch.no_grad`/`inference_mode`, bfloat16 weights
    and input, not under `torch.compile` (inductor packs on its own) and not under a dispatch mode (the
    FLOP and memory counters see the plain product)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.project(x, self.bias)

    def project(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x W^T + `bias`: this layer's weight with any bias (Attention's q and v biases)."""
        weight = self.weight
        if (
            PACK_BF16 and x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None
        ):  # fmt: skip
            key = (weight.data_ptr(), weight._version)
            packed = self.__dict__.get("_packed")
            if packed is None or packed[0] != key:
                packed = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
                self.__dict__["_packed"] = packed
            return torch.ops.mkldnn._linear_pointwise(x, packed[1], bias, "none", [], "")
        return F.linear(x, weight, bias)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k != "_packed"}  # oneDNN's tensor has no storage to copy


def patch_tokens(video: Tensor, proj: nn.Conv2d | nn.Conv3d) -> Tensor:
    """`proj`, a convolution whose stride is its kernel (non-overlapping patches, no padding), applied to
    `video` (B, T, C, H, W) as one matrix product over the patches: (B, T', H', W', D) tokens, time-major.

    The same sums as the convolution (its weight flattened in its (C, t, p, p) order), in another
    rounding order. Why: on CPU oneDNN's convolution runs these shapes far below its matrix product
    (videomae-s, 16x224: 6.8 ms against 1.6 at batch 1 in bfloat16, 51 against 13 at batch 8; 10.8
    against 8.2 ms at batch 1 in float32), and the embedding is a cost no token plan shrinks. Frames and
    sides that the kernel does not divide fall back to the convolution (which drops the remainder), and so
    does training (autograd recording the weight): a matrix product's rounding can depend on how many rows
    it has, the convolution's does not depend on the batch, and training on 2 processes must give the
    weights of training on one (tests/test_train.py)."""
    B, T, C, H, W = video.shape
    t = proj.kernel_size[0] if isinstance(proj, nn.Conv3d) else 1
    p, q = proj.kernel_size[-2:]
    trains = torch.is_grad_enabled() and (video.requires_grad or proj.weight.requires_grad)
    if (
        trains or T % t or H % p or W % q or tuple(proj.stride) != tuple(proj.kernel_size)
        or proj.padding_mode != "zeros" or any(proj.padding)
    ):  # fmt: skip
        if isinstance(proj, nn.Conv3d):
            return proj(video.transpose(1, 2)).permute(0, 2, 3, 4, 1)  # (B, T', H', W', D)
        out = proj(video.flatten(0, 1))  # (B*T, D, H', W')
        return out.unflatten(0, (B, T)).permute(0, 1, 3, 4, 2)
    patches = video.reshape(B, T // t, t, C, H // p, p, W // q, q).permute(0, 1, 4, 6, 3, 2, 5, 7)
    patches = patches.reshape(B * (T // t) * (H // p) * (W // q), C * t * p * q)  # one row per patch
    out = F.linear(patches, proj.weight.flatten(1), proj.bias)  # (rows, D)
    return out.view(B, T // t, H // p, W // q, -1)


RECEIVED_CHUNK = 2**20
"""Logits per chunk of `received_attention` (4 MB in float32): a clip's queries in chunks of this many
logits over all heads and keys. Chunks of 2^22 logits over the whole batch (before) left `attention:keep=0.5`
at efficiency 0.82 in float32 (videomae-s, batch 1; 0.83 on videomae-b at batch 8) and 36 MB per clip more
peak memory than the unreduced model at batch 1; per clip in chunks of 2^20 it is 0.98-1.06, and the peak
is the unreduced model's (docs/design.md, performance)."""

VARLEN = ("groups", "nested")
"""Kernels of `varlen_attention`: "groups" (SDPA once per set of clips of one length: a slice per clip,
a batched call where lengths repeat; the fast one on CPU) or "nested" (one SDPA call on a jagged
nested tensor: fused varlen kernels on CUDA; without a bias only)."""


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

    Recomputes the attention logits clip by clip in query chunks of `RECEIVED_CHUNK` logits, so memory
    stays at (1, nh, chunk, N) instead of the full (B, nh, N, N) map that the fused SDPA kernel never
    materialises, and the products stay large at any batch size.

    Args:
        q, k: (B, nh, N, hd) queries and keys.
        mask: the block's SDPA mask (bool or additive), broadcastable to (B, 1, 1, N), or None.
    """
    B, nh, N, hd = q.shape
    rows = None  # (B, N) 1 for the real queries: padding keys are False (bool) or -inf (additive)
    if mask is not None:
        rows = (mask[:, 0, 0, :] if mask.dtype == torch.bool else mask[:, 0, 0, :].isfinite()).to(q.dtype)
    total = q.new_zeros(B, nh, N)
    chunk = max(1, RECEIVED_CHUNK // (nh * N))
    # The scale on the queries (N x hd numbers) instead of the logits (N x N): N / hd times fewer products,
    # and for the usual head widths (64: 1/8, a power of two) the same bits.
    q = q * hd**-0.5
    for b in range(B):  # bounds memory; loops over clips and chunks of queries, not over tokens
        keys = k[b : b + 1].transpose(-2, -1)  # (1, nh, hd, N)
        for start in range(0, N, chunk):
            logits = q[b : b + 1, :, start : start + chunk] @ keys  # (1, nh, c, N)
            if mask is not None:
                m = mask[b : b + 1]  # (1, 1, 1, N)
                logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m
            probs = logits.softmax(-1)  # (1, nh, c, N)
            if rows is not None:
                probs = probs * rows[b : b + 1, None, start : start + chunk, None]
            total[b : b + 1] += probs.sum(2)
    real = N if rows is None else rows.sum(1).clamp_min(1.0)[:, None]  # (B, 1)
    return total.mean(1) / real  # (B, N)


class Packed(NamedTuple):
    """The real rows of a ragged batch laid end to end, clip after clip (class token first in each).

    Attributes:
        rows: (M,) long, the index of each real row in the flattened padded (B * L) layout.
        lengths: rows per clip (class token included), as Python ints: the host-side plan of the
            per-clip attention.
        sample: (M,) long, the clip each row belongs to.
        shape: (B, L) of the padded layout.
        padding: (B * L - M,) long, the index of each padding row (None when not needed).
    """

    rows: Tensor
    lengths: tuple[int, ...]
    sample: Tensor
    shape: tuple[int, int]
    padding: Tensor | None = None

    def take(self, padded: Tensor) -> Tensor:
        """(B, L, ...) padded rows -> (M, ...) real rows."""
        return padded.flatten(0, 1).index_select(0, self.rows)

    def put(self, rows: Tensor) -> Tensor:
        """(M, ...) real rows -> (B, L, ...), zeros at padding."""
        B, L = self.shape
        out = rows.new_zeros(B * L, *rows.shape[1:])
        return out.index_copy_(0, self.rows, rows).view(B, L, *rows.shape[1:])

    def laid_out(self, like: Tensor) -> Tensor:
        """An uninitialised (B * L, ...) buffer shaped like the rows `like`, its padding rows zeroed: real
        rows are written into it (`index_copy_` at `rows`), tile by tile, with no copy in between."""
        B, L = self.shape
        out = like.new_empty(B * L, *like.shape[1:])
        return out.index_fill_(0, self.padding, 0) if self.padding is not None else out.zero_()

    def tiles(self, rows: int | None) -> list[tuple[int, int, tuple[int, ...]]]:
        """(first row, end row, lengths) of runs of consecutive whole clips holding at most `rows` rows
        together (a longer clip alone); one run of everything when `rows` is None."""
        if rows is None:
            return [(0, sum(self.lengths), self.lengths)]
        out: list[tuple[int, int, tuple[int, ...]]] = []
        start, current, run = 0, 0, []
        for n in self.lengths:
            if run and current + n > rows:
                out.append((start, start + current, tuple(run)))
                start, current, run = start + current, 0, []
            run.append(n)
            current += n
        out.append((start, start + current, tuple(run)))
        return out


def length_groups(
    lengths: Sequence[int], device: torch.device | None = None
) -> list[tuple[int, int | Tensor]]:
    """(length, rows) of each set of packed clips of one length: the first row of a single clip (its
    rows are contiguous), or (G*n,) row indices of several, clip by clip."""
    starts, offset = [], 0
    for n in lengths:
        starts.append(offset)
        offset += n
    by_length: dict[int, list[int]] = {}
    for start, n in zip(starts, lengths, strict=True):
        by_length.setdefault(n, []).append(start)
    out: list[tuple[int, int | Tensor]] = []
    for n, firsts in by_length.items():
        if len(firsts) == 1:
            out.append((n, firsts[0]))
        else:
            base = torch.tensor(firsts, device=device).unsqueeze(1)  # (G, 1)
            out.append((n, (base + torch.arange(n, device=device)).view(-1)))  # (G*n,)
    return out


def pack(state: TokenState) -> Packed:
    """Where the real rows of a ragged `state` are, class token included (a row of its own per clip)."""
    mask = state.mask
    if state.cls is not None:
        mask = F.pad(mask, (1, 0), value=True)  # (B, L): the class token is always real
    B, L = mask.shape
    lengths = state.lengths
    if lengths is None:  # not made by `compact`: read the counts back (a synchronisation)
        lengths = tuple(state.mask.sum(1).tolist())
    first = int(state.cls is not None)
    if min(lengths) + first < 1:
        raise InputError(f"a clip of this batch holds no real token (counts {list(lengths)})")
    lengths = tuple(n + first for n in lengths)
    rows = torch.nonzero_static(mask.flatten(), size=sum(lengths)).squeeze(1)  # (M,), no synchronisation
    padding = torch.nonzero_static(~mask.flatten(), size=B * L - sum(lengths)).squeeze(1)  # (B*L - M,)
    return Packed(rows, lengths, torch.div(rows, L, rounding_mode="floor"), (B, L), padding)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Sequence[int],
    *,
    bias: Tensor | None = None,
    dropout: float = 0.0,
    kernel: str | None = None,
) -> Tensor:
    """Attention of each clip's rows over that clip's rows only, on packed rows.

    Args:
        q, k, v: (M, nh, hd) packed rows (`pack`), clip after clip.
        lengths: rows of each clip (summing to M).
        bias: (M,) additive bias of each row as a key (ToMe's log-size), or None.
        dropout: attention dropout probability (training).
        kernel: "groups" or "nested" (`VARLEN`); default "nested" on CUDA without a bias, else "groups".

    Returns:
        (M, nh, hd).
    """
    if kernel is None:
        kernel = "nested" if q.device.type == "cuda" and bias is None else "groups"
    if kernel == "nested":
        if bias is not None:
            raise ValueError("the nested varlen kernel takes no attention bias; use kernel='groups'")
        offsets = torch.tensor((0, *lengths), device=q.device).cumsum(0)
        jagged = [torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*jagged, dropout_p=dropout)  # (B, nh, j, hd) jagged
        return out.transpose(1, 2).values()  # (M, nh, hd)
    if kernel != "groups":
        raise ValueError(f"kernel must be one of {', '.join(VARLEN)}, got {kernel!r}")
    out = torch.empty_like(q)
    nh, hd = q.shape[1:]
    for n, where in length_groups(lengths, q.device):  # a handful of distinct lengths per batch
        if isinstance(where, int):
            parts = [t[where : where + n].unsqueeze(0) for t in (q, k, v)]  # (1, n, nh, hd) views
            mask = None if bias is None else bias[where : where + n].view(1, 1, 1, n)
        else:
            parts = [t.index_select(0, where).view(-1, n, nh, hd) for t in (q, k, v)]  # (G, n, nh, hd)
            mask = None if bias is None else bias.index_select(0, where).view(-1, 1, 1, n)
        qg, kg, vg = (t.transpose(1, 2) for t in parts)  # (G, nh, n, hd)
        y = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout).transpose(1, 2)
        if isinstance(where, int):
            out[where : where + n] = y[0]
        else:
            out.index_copy_(0, where, y.reshape(-1, nh, hd))
    return out


def _packed_records(
    q: Tensor, k: Tensor, lengths: Sequence[int], bias: Tensor | None, record: frozenset[str], has_cls: bool
) -> dict[str, Tensor]:
    """The side results a padded-mask block records (`Attention.forward`), from packed rows: per clip
    over its own rows, one value per row (`Packed.put` lays them out padded)."""
    per_row: dict[str, Tensor] = {}
    if KEYS in record:
        per_row[KEYS] = k.mean(1)  # (M, hd)
    if CLS_ATTN in record or ATTN_RECEIVED in record:
        if CLS_ATTN in record and not has_cls:
            raise ValueError("class-token attention was requested from a model without a class token")
        nh, hd = q.shape[1:]
        wanted = [key for key in (CLS_ATTN, ATTN_RECEIVED) if key in record]
        values = {key: q.new_zeros(q.shape[0]) for key in wanted}  # (M,) each
        for n, where in length_groups(lengths, q.device):
            rows = torch.arange(where, where + n, device=q.device) if isinstance(where, int) else where
            qg, kg = (t.index_select(0, rows).view(-1, n, nh, hd).transpose(1, 2) for t in (q, k))
            mask = None if bias is None else bias.index_select(0, rows).view(-1, 1, 1, n)
            if CLS_ATTN in record:
                logits = (qg[:, :, :1] @ kg.transpose(-2, -1)) * hd**-0.5  # (G, nh, 1, n)
                if mask is not None:
                    logits = logits + mask
                values[CLS_ATTN].index_copy_(0, rows, logits.softmax(-1)[:, :, 0].mean(1).reshape(-1))
            if ATTN_RECEIVED in record:
                values[ATTN_RECEIVED].index_copy_(0, rows, received_attention(qg, kg, mask).reshape(-1))
        per_row.update(values)
    return per_row


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

    def draw(self, batch: int, like: Tensor) -> Tensor | None:
        """The keep flags (B,) of one call, for packed rows (`_dropped`): the same draws as `forward`
        on a (B, ...) batch. None when nothing is dropped (eval, or p = 0)."""
        if not self.training or self.p == 0.0:
            return None
        return like.new_empty(batch).bernoulli_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _draw(module: nn.Module, batch: int, like: Tensor) -> Tensor | None:
    """`DropPath.draw` (None for `nn.Identity`, a rate of 0)."""
    return module.draw(batch, like) if isinstance(module, DropPath) else None


def _dropped(module: nn.Module, y: Tensor, keep: Tensor | None, sample: Tensor) -> Tensor:
    """Stochastic depth on packed rows `y` (M', C) of the clips `sample` (M',), with the flags `_draw`
    drew from `module` (None: nothing dropped)."""
    return y if keep is None else y * keep.index_select(0, sample).unsqueeze(1) / (1.0 - module.p)


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
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias == "qkv")
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = Linear(dim, dim)

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
        vector: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """
        Args:
            x: (B, N, C) normalised tokens (class token first when `has_cls`).
            mask: SDPA attention mask broadcastable to (B, nh, N, N): bool (True = attend) or an
                additive float bias.
            record: which side results to return (`KEYS`, `CLS_ATTN`, `ATTN_RECEIVED`); empty costs
                nothing extra.
            has_cls: whether token 0 is a class token (it is left out of recorded per-token results).
            vector: TokenLearner's vector attention (`VECTOR_ATTN`): one head per channel, no scaling.

        Returns:
            (B, N, C) output and a dict with the requested side results (patch tokens only).
        """
        B, N, C = x.shape
        qkv = self.qkv.project(x, self._qkv_bias())  # (B, N, 3C)
        heads, hd = (C, 1) if vector else (self.heads, self.head_dim)
        q, k, v = qkv.view(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hd)
        drop = self.attn_drop if self.training else 0.0
        scale = 1.0 if vector else None
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=drop, scale=scale
        )  # (B, nh, N, hd)
        if vector and record:
            raise ValueError(
                "side results are not recorded from vector attention (TokenLearner's learned tokens)"
            )
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

    def forward_packed(
        self,
        x: Tensor,
        lengths: Sequence[int],
        *,
        bias: Tensor | None = None,
        record: frozenset[str] = frozenset(),
        has_cls: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`forward` on the packed rows of a ragged batch: the projections on real rows only, attention
        per clip over its own rows (`varlen_attention`).

        Args:
            x: (M, C) normalised packed rows (`pack`), clip after clip.
            lengths: rows of each clip.
            bias: (M,) additive bias of each row as a key, or None.

        Returns:
            (M, C) output rows, and the requested side results, one value per row.
        """
        M, C = x.shape
        qkv = self.qkv.project(x, self._qkv_bias())  # (M, 3C)
        q, k, v = qkv.view(M, 3, self.heads, self.head_dim).unbind(1)  # 3 x (M, nh, hd)
        drop = self.attn_drop if self.training else 0.0
        out = self.proj(varlen_attention(q, k, v, lengths, bias=bias, dropout=drop).reshape(M, C))  # (M, C)
        return out, (_packed_records(q, k, lengths, bias, record, has_cls) if record else {})


class Mlp(nn.Module):
    """Linear -> GELU (exact, or `act="gelu_tanh"` its tanh approximation) -> Linear, with optional
    dropout. Its output has `out` channels (default `dim`: MViT's widens the tokens at a stage's end)."""

    def __init__(
        self, *, dim: int, hidden: int, act: Act = "gelu", drop: float = 0.0, out: int | None = None
    ) -> None:
        super().__init__()
        if act not in ACTS:
            raise InputError(f"act must be one of {', '.join(ACTS)}, got {act!r}")
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
        self.fc2 = Linear(hidden, dim if out is None else out)
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
        act: Act = "gelu",
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim=dim, heads=heads, qkv_bias=qkv_bias, attn_drop=attn_drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim=dim, hidden=mlp_dim, act=act, drop=drop)
        self.drop_path = drop_path(drop_path_rate)
        self.inner: nn.Module = nn.Identity()
        self.record: frozenset[str] = frozenset()
        self.ragged = (
            "packed"  # how a ragged batch runs (`RAGGED`); set for all blocks by `VideoBackbone.ragged`
        )

    def forward(self, state: TokenState) -> TokenState:
        if state.mask is not None and self.ragged == "packed":
            return self._forward_packed(state)
        has_cls = state.cls is not None
        x = with_cls(state)  # (B, [1 +] N, C)
        y, recorded = self.attn(
            self.norm1(x), mask=attention_mask(state), record=self.record, has_cls=has_cls,
            vector=state.aux.get(VECTOR_ATTN, False),
        )  # fmt: skip
        y = self.drop_path(y)
        if CLS_UPDATE in self.record and has_cls:  # what the attention adds to the class token (Glimpser)
            recorded = {**recorded, CLS_UPDATE: y[:, :1]}
        state = split_cls(state, x + y, recorded)
        state = self.inner(state)
        return self.mlp_residual(state)

    def mlp_residual(self, state: TokenState) -> TokenState:
        """The second half of the block: x + MLP(norm2(x)) on every token, class token included (on the
        real rows only for a ragged batch run packed)."""
        if state.mask is not None and self.ragged == "packed":
            return run_packed([self], state, part="mlp")
        x = with_cls(state)  # (B, [1 +] N, C)
        rows = x.shape[0] * x.shape[1]
        if (
            x.device.type != "cpu" or rows <= TILE_ROWS or self.training or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
        ):  # fmt: skip
            return split_cls(state, x + self.drop_path(self.mlp(self.norm2(x))))
        flat = x.reshape(rows, -1)
        out = torch.empty_like(flat)
        tile = -(-rows // -(-rows // TILE_ROWS))  # equal tiles of at most TILE_ROWS rows
        for start in range(0, rows, tile):  # a loop over row tiles, not over tokens
            part = flat[start : start + tile]
            torch.add(part, self.mlp(self.norm2(part)), out=out[start : start + tile])
        return split_cls(state, out.view_as(x))

    def _forward_packed(self, state: TokenState) -> TokenState:
        """The block on the real rows of a ragged batch (`run_packed`); with a reducer between attention
        and MLP, the attention half packed, the reducer on the padded state, then the MLP half packed."""
        if isinstance(self.inner, nn.Identity):
            return run_packed([self], state)
        return self.mlp_residual(self.inner(run_packed([self], state, part="attention")))


def run_packed(
    blocks: Sequence[Block], state: TokenState, *, part: Literal["both", "attention", "mlp"] = "both"
) -> TokenState:
    """Consecutive blocks with nothing between them (no reducer slot, no records but the last block's)
    on the real rows of a ragged batch: packed once, each tile of whole clips (`TILE_ROWS`) through
    every block in turn, laid out padded once (padding rows are zeros). Equal to running the blocks one
    after the other (stochastic depth draws in the same order: per block, attention then MLP).

    Args:
        blocks: joint blocks; only the last may record side results.
        part: "both" halves of every block, or of a single block only its "attention" residual (a
            reducer runs next) or only its "mlp" residual (one ran between them).
    """
    if state.aux.get(VECTOR_ATTN, False):
        raise ValueError(
            "vector attention runs on TokenLearner's dense learned tokens, not on a ragged batch"
        )
    has_cls = state.cls is not None
    x = with_cls(state)  # (B, L, C), L = [1 +] N
    packed = pack(state)
    rows = packed.take(x)  # (M, C)
    bias = None
    if part != "mlp" and state.size is not None and state.aux.get(PROP_ATTN, False):
        bias = packed.take(attention_mask(state)[:, 0, 0, :].unsqueeze(-1)).squeeze(-1)  # (M,) log-sizes
    B = packed.shape[0]
    draws = [  # per block, attention then MLP: the padded path's order
        (
            _draw(b.drop_path, B, rows) if part != "mlp" else None,
            _draw(b.drop_path, B, rows) if part != "attention" else None,
        )
        for b in blocks
    ]
    last = blocks[-1]
    out = packed.laid_out(rows)  # (B*L, C)
    records: dict[str, list[Tensor]] = {}
    tile_rows = TILE_ROWS if rows.device.type == "cpu" else None
    for start, end, lengths in packed.tiles(tile_rows):
        tile, sample = rows[start:end], packed.sample[start:end]
        tile_bias = None if bias is None else bias[start:end]
        for block, (keep, keep_mlp) in zip(blocks, draws, strict=True):
            if part != "mlp":
                record = block.record if block is last else frozenset()
                y, recorded = block.attn.forward_packed(
                    block.norm1(tile), lengths, bias=tile_bias, record=record, has_cls=has_cls
                )
                tile = tile + _dropped(block.drop_path, y, keep, sample)
                for key, value in recorded.items():
                    records.setdefault(key, []).append(value)
            if part != "attention":
                tile = tile + _dropped(block.drop_path, block.mlp(block.norm2(tile)), keep_mlp, sample)
        out.index_copy_(0, packed.rows[start:end], tile)
    first = int(has_cls)
    laid_out = {key: packed.put(torch.cat(parts))[:, first:] for key, parts in records.items()}
    return split_cls(state, out.view(*packed.shape, -1), laid_out)


def with_cls(state: TokenState) -> Tensor:
    """(B, [1 +] N, C): the class token (if any) followed by the patch tokens."""
    return state.x if state.cls is None else torch.cat([state.cls, state.x], 1)


def split_cls(state: TokenState, x: Tensor, recorded: dict[str, Tensor] | None = None) -> TokenState:
    """`state` holding the tokens `x` laid out as `with_cls` makes them, plus recorded side results."""
    state = state.replace(x=x) if state.cls is None else state.replace(x=x[:, 1:], cls=x[:, :1])
    return state.with_aux(**recorded) if recorded else state
