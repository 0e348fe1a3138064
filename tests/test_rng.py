"""Keyed random numbers (`tokensieve.rng`): what the random methods' reproducibility rests on."""

from __future__ import annotations

import pytest
import torch

from tokensieve import rng
from tokensieve.rng import _mix, _mix_int, _signed


def test_the_mixer_is_splitmix64() -> None:
    # SplitMix64 seeded with 0 (Steele et al. 2014; the generator recommended to seed xoshiro):
    # its first three outputs are the finaliser of 1, 2 and 3 times the golden increment.
    golden = 0x9E3779B97F4A7C15
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [_mix_int(i * golden) for i in (1, 2, 3)] == [_signed(e) for e in expected]
    values = torch.tensor([_signed(i * golden) for i in (1, 2, 3)])
    assert _mix(values).tolist() == [_signed(e) for e in expected]  # the tensor version agrees


def test_clip_keys_depend_only_on_the_clip() -> None:
    video = torch.randn(5, 4, 3, 32, 32)
    keys = rng.clip_keys(video)
    assert keys.dtype == torch.int64 and keys.shape == (5,) and len(set(keys.tolist())) == 5
    assert torch.equal(rng.clip_keys(video[[3, 1]]), keys[[3, 1]])  # any batch, any order
    assert torch.equal(rng.clip_keys(video[2:3].clone()), keys[2:3])
    nudged = video.clone()
    nudged[0, 3, 2, 31, 31] = torch.nextafter(nudged[0, 3, 2, 31, 31], torch.tensor(9.0))  # one bit
    swapped = video.clone()
    swapped[0, 0, 0, 0, :2] = video[0, 0, 0, 0, :2].flip(0)  # two values trade places
    assert rng.clip_keys(nudged)[0] != keys[0] and rng.clip_keys(swapped)[0] != keys[0]
    assert torch.equal(rng.clip_keys(nudged)[1:], keys[1:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16, torch.uint8])
def test_clip_keys_for_other_dtypes_and_odd_sizes(dtype: torch.dtype) -> None:
    video = (torch.rand(3, 2, 3, 9, 7) * 200).to(dtype)  # an odd last axis takes the slow path
    keys = rng.clip_keys(video)
    assert len(set(keys.tolist())) == 3 and torch.equal(rng.clip_keys(video[1:]), keys[1:])
    assert not torch.equal(keys, rng.clip_keys(video.float()))  # other bytes, other keys


def test_streams_are_unrelated() -> None:
    assert len({rng.stream(0, 1), rng.stream(1, 0), rng.stream(0, 1, 0), rng.stream(1), rng.stream()}) == 5
    keys = rng.clip_keys(torch.randn(2, 8))
    a, b = rng.uniform_bits(keys, 64, stream=rng.stream(0)), rng.uniform_bits(keys, 64, stream=rng.stream(1))
    assert torch.equal(a, rng.uniform_bits(keys, 64, stream=rng.stream(0)))  # pure
    assert not (a == b).any() and not (a[0] == a[1]).any()


def test_uniform_and_normal_statistics() -> None:
    keys = rng.clip_keys(torch.randn(4, 10))
    bits = rng.uniform_bits(keys, 100_000, stream=7)  # (4, 100000)
    unit = rng._unit(bits, torch.float64)  # (0, 1]
    assert unit.min() > 0 and unit.max() <= 1
    assert abs(float(unit.mean()) - 0.5) < 0.005 and abs(float(unit.var()) - 1 / 12) < 0.002
    counts = torch.bincount((unit.flatten() * 10).ceil().long() - 1, minlength=10).double()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 27.9  # 9 degrees of freedom, p = 0.001
    z = rng.normal(keys, (500, 200), stream=3)  # (4, 500, 200)
    assert z.shape == (4, 500, 200) and z.dtype == torch.float32
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z.abs() < 1.96).double().mean()) - 0.95) < 0.003
    assert rng.normal(keys, (3,), stream=3, dtype=torch.float64).dtype == torch.float64


def test_keyed_draws_trace_and_run_on_meta() -> None:
    video = torch.randn(2, 4, 3, 8, 8)

    def draw(x: torch.Tensor) -> torch.Tensor:
        return rng.normal(rng.clip_keys(x), (5, 3), stream=11)

    compiled = torch.compile(draw, fullgraph=True, backend="eager")
    assert torch.equal(compiled(video), draw(video))
    with torch.device("meta"):
        assert rng.normal(rng.clip_keys(torch.empty(2, 4, 3, 8, 8)), (5, 3), stream=1).shape == (2, 5, 3)
