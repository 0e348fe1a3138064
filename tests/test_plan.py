from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal

import pytest
import torch
from torch import nn

import tokensieve as ts
from conftest import tiny_video
from tokensieve.errors import InputError
from tokensieve.reducers import REGISTRY, Reducer, Site, parse, register
from tokensieve.reducers.none import NoReduction
from tokensieve.tokens import KEYS, Layout, TokenState


@pytest.fixture
def probe() -> Iterator[type[Reducer]]:
    """A throwaway reducer that records what it saw, registered for one test."""

    @register("probe")
    class Probe(Reducer):
        needs = frozenset({KEYS})

        def __init__(
            self, *, at: int = 1, scale: float = 1.0, hard: bool = False, mode: Literal["a", "b"] = "a"
        ):
            super().__init__()
            self.at, self.scale, self.hard, self.mode = at, scale, hard, mode
            self.seen: list[TokenState] = []

        def positions(self, depth: int) -> tuple[int, ...]:
            return (self.at,)

        def count(self, layout: Layout, site: Site) -> Layout:
            return layout

        def forward(self, state: TokenState, site: Site) -> TokenState:
            self.seen.append(state)
            return state

    yield Probe
    del REGISTRY["probe"]


def test_none_equals_the_bare_backbone_exactly() -> None:
    model = ts.build("videomae-tiny").eval()
    video = tiny_video()
    with torch.no_grad():
        bare = model(video)
        ts.apply(model, "none")
        assert all(isinstance(r, nn.Identity) for r in model.reducers)
        assert torch.equal(model(video), bare)
    assert [type(r) for r in ts.plan("none")] == [NoReduction]


def test_parse_converts_to_annotated_types(probe: type[Reducer]) -> None:
    assert parse("probe:at=2,scale=0.5,hard=true,mode=b") == [
        ("probe", {"at": 2, "scale": 0.5, "hard": True, "mode": "b"})
    ]
    assert parse("none+probe") == [("none", {}), ("probe", {})]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "nope",
            "valid methods: adaptive, attention, glimpser, halting, lite, none, oracle, probe, random, random_frames, resize, sta, stts, tokenlearner, tome, uniform",
        ),
        ("probe:depth=3", r"no parameter 'depth'; valid: probe: at=1, scale=1.0, hard=False, mode='a'"),
        ("probe:at", "expected key=value"),
        ("probe:at=two", "at expects a int"),
        ("probe:hard=maybe", "hard expects a bool"),
        ("probe:mode=c", "mode must be one of a, b"),
        ("", "non-empty string"),
    ],
)
def test_bad_specs_name_the_valid_choices(probe: type[Reducer], spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ts.plan(spec)


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("random:keep=0.5,keep=0.3", "keep"),
        ("random:keep=0.5,at=0,keep=0.5", "keep"),  # the same value twice is still a typo somewhere
        ("stts:T0=0.5,T0=0.6", "T0"),  # a pattern parameter
        ("none+random:keep=0.5,keep=0.3", "keep"),  # in any term of a plan
    ],
)
def test_a_parameter_given_twice_is_refused(spec: str, key: str) -> None:
    with pytest.raises(InputError, match=rf"{key} is given twice in '{re.escape(spec)}'"):
        parse(spec)


def test_a_method_twice_in_one_plan_is_not_a_repeated_key(probe: type[Reducer]) -> None:
    assert parse("probe:at=1+probe:at=2") == [("probe", {"at": 1}), ("probe", {"at": 2})]


def test_apply_installs_and_tells_the_block_before_to_record(probe: type[Reducer]) -> None:
    model = ts.build("videomae-tiny").eval()
    ts.apply(model, "probe:at=2")
    (reducer,) = model.plan
    assert isinstance(reducer, probe) and model.reducers[2].reducer is reducer
    assert [b.record for b in model.blocks] == [frozenset(), frozenset({KEYS}), frozenset()]
    model(tiny_video())
    (seen,) = reducer.seen
    assert seen.aux[KEYS].shape == (2, 32, 16)  # head-mean keys of block 1: (B, N, hd)

    ts.apply(model, None)
    assert all(isinstance(r, nn.Identity) for r in model.reducers)
    assert all(b.record == frozenset() for b in model.blocks)
    assert len(model.plan) == 0 and model.spec is None


def test_two_reducers_at_one_position_compose(probe: type[Reducer]) -> None:
    model = ts.build("videomae-tiny")
    ts.apply(model, "probe:at=1+probe:at=1")
    assert isinstance(model.reducers[1], nn.Sequential) and len(model.reducers[1]) == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [("probe:at=0", "cannot run at position 0"), ("probe:at=4", r"valid positions: 1..3")],
)
def test_bad_positions(probe: type[Reducer], spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ts.apply(ts.build("videomae-tiny"), spec)


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register("none")(NoReduction)


@pytest.fixture
def maxpool() -> Iterator[type[Reducer]]:
    """A reducer that replaces the readout with a max over tokens, registered for one test."""

    @register("maxpool")
    class MaxPool(Reducer):
        overrides_readout = True

        def positions(self, depth: int) -> tuple[int, ...]:
            return ()

        def count(self, layout: Layout, site: Site) -> Layout:
            return layout

        def readout(self, state: TokenState, model: ts.VideoBackbone) -> torch.Tensor:
            return model.fc_norm(state.x.amax(1))

    yield MaxPool
    del REGISTRY["maxpool"]


def test_a_reducer_can_replace_the_readout(maxpool: type[Reducer]) -> None:
    model = ts.build("videomae-tiny").eval()
    video = tiny_video()
    with torch.no_grad():
        features = model.forward_features(video)
        ts.apply(model, "maxpool")
        assert torch.equal(model(video), model.head(model.fc_norm(features.x.amax(1))))
        ts.apply(model, None)
        assert model.readout_by is None
        assert torch.equal(model(video), model.forward_head(features))
    with pytest.raises(ValueError, match="only one method of a plan can replace the readout"):
        ts.apply(model, "maxpool+maxpool")
