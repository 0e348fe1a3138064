"""Random numbers keyed by clip: the same clip gets the same draws in any batch, on any process.

A random method must select the same tokens for a clip whatever else shares its batch, however the
batch is split across `torchrun` processes, whatever DataLoader workers decoded it, and whatever
else (a FLOP count, a validation pass) ran before. A stateful generator gives none of that: its
draws depend on the order of calls and on the batch layout. So draws here are a pure function of

    (clip key, stream, index)

- the **clip key** (`clip_keys`): a 64-bit hash of the exact bytes of the clip the model was given
  (computed by the backbone when its plan asks for it, stored in `TokenState.aux[CLIP_KEY]`);
- the **stream** (`stream`): a 64-bit number a method derives from its `seed`, where it runs (its
  stage) and, in training, the step (so a clip seen again in a later step gets new draws);
- the **index** of the number within the draw.

Counter-based generation (the idea of Philox/Threefry, Salmon et al. 2011, with the SplitMix64
finaliser of Steele et al. 2014 as the mixing function): each output is `mix(key ^ stream, index)`,
computed with integer tensor ops on the clip's device. No generator object, no host round trip, no
copy between devices, and `torch.compile(fullgraph=True)` traces it.

int64 arithmetic wraps modulo 2^64 here (two's complement), which is what the hash relies on; the
logical right shifts are written with masks because `>>` on int64 is arithmetic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["clip_keys", "normal", "stream", "uniform", "uniform_bits"]

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 value with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: the SplitMix64 increment
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 values (`>>` on a signed tensor is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(x: Tensor) -> Tensor:
    """The SplitMix64 finaliser: a bijection of int64 in which every input bit affects every output bit."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def _mix_int(x: int) -> int:
    """`_mix` of one Python integer (for streams, computed once per call on the host)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return _signed(x ^ (x >> 31))


def stream(*parts: int) -> int:
    """One int64 stream id from a tuple of integers (a seed, a stage, a step, a purpose...).

    Different tuples give unrelated streams: `stream(0, 1)` and `stream(1, 0)` differ.
    """
    value = 0
    for part in parts:
        value = _mix_int(value * 0x100000001B3 + int(part) + 0x9E3779B9)
    return value


_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _position_sum(values: Tensor) -> Tensor:
    """(B, n) int64 -> (B,): each value mixed with its position, summed (wrapping)."""
    position = torch.arange(1, values.shape[1] + 1, device=values.device, dtype=torch.int64) * _GOLDEN
    return _mix(values + position).sum(1)


def clip_keys(video: Tensor) -> Tensor:
    """(B,) int64: a hash of the exact bytes of each clip of a batch.

    The clip's bytes, read as 64-bit integers and laid out as rows along its last axis, are summed
    along the rows and along the columns (two reductions: no pass that writes a clip-sized tensor,
    so it costs about as much as reading the clip twice); the row sums and column sums are then
    hashed with their positions. Changing any value, or swapping two different values, changes a row
    sum or a column sum, hence the key. The key depends only on the clip's bytes, shape and dtype:
    the same clip gives the same key in a batch of any size or composition, on any device.

    Args:
        video: (B, ...) any dtype.
    """
    B = video.shape[0]
    data = video.detach().contiguous()
    data = data.reshape(B, -1, data.shape[-1] if data.dim() > 1 else 1)  # (B, R, W)
    if (data.shape[-1] * data.element_size()) % 8 == 0:
        wide = data.view(torch.int64)  # the same bytes, 8 at a time: (B, R, W')
    else:  # an odd row length: widen element by element (slower, same meaning)
        wide = data.view(_BITS_VIEW[data.element_size()]).to(torch.int64)
    rows, columns = wide.sum(2), wide.sum(1)  # (B, R), (B, W'), wrapping modulo 2^64
    shape = stream(*video.shape[1:], video.element_size())
    return _mix(_position_sum(rows) ^ _mix(_position_sum(columns) + shape))


def uniform_bits(keys: Tensor, n: int, *, stream: int) -> Tensor:
    """(B, n) int64: n independent uniform 64-bit numbers per clip of stream `stream`.

    Usable directly as random scores to rank (no ties in practice), or turned into floats.

    Args:
        keys: (B,) int64 clip keys (`clip_keys`).
        n: numbers per clip.
        stream: the stream id (`stream(...)`): different streams give unrelated numbers.
    """
    base = _mix(keys ^ stream).unsqueeze(1)  # (B, 1)
    counter = torch.arange(1, n + 1, device=keys.device, dtype=torch.int64) * _GOLDEN  # (n,)
    return _mix(base + counter)  # (B, n)


def uniform(keys: Tensor, n: int, *, stream: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, n) uniform floats in [0, 1) per clip, multiples of 2^-24 (every float32 of that grid)."""
    return _shr(uniform_bits(keys, n, stream=stream), 40).to(dtype) * (1.0 / (1 << 24))


def _unit(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """Uniform floats in (0, 1] from the top 24 bits of 64-bit numbers."""
    return (_shr(bits, 40) + 1).to(dtype) * (1.0 / (1 << 24))


def normal(
    keys: Tensor, shape: tuple[int, ...], *, stream: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(B, *shape) standard normal numbers per clip (Box-Muller on two 24-bit uniforms per number).

    Args:
        keys: (B,) int64 clip keys.
        shape: the shape of each clip's draw, e.g. (samples, N).
        stream: the stream id.
        dtype: of the result (computed in float32, or float64 when asked).
    """
    n = math.prod(shape)
    bits = uniform_bits(keys, n, stream=stream)  # (B, n)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    radius = torch.sqrt(-2.0 * torch.log(_unit(bits, work)))  # (B, n)
    angle = _unit(bits << 24, work) * (2 * math.pi)  # the next 24 bits, (B, n)
    return (radius * torch.cos(angle)).to(dtype).view(keys.shape[0], *shape)
