"""The reducer contract, for every registered method on every backbone family, plus the golden cases
and bad-input errors of the simple selection methods (random, uniform, random_frames, attention).

A new method is added to `CONTRACT` (a setting that fits the tiny presets) and `IDENTITY` (its
setting that changes nothing); `test_every_registered_method_is_covered` fails until it is.
"""

from __future__ import annotations

import copy
import functools
import io
import math

import pytest
import torch
from torch import nn

import tokensieve as ts
from conftest import tiny_video
from tokensieve.backbones.layers import received_attention
from tokensieve.bench import host_syncs
from tokensieve.reducers import REGISTRY, parse, schedule
from tokensieve.reducers.base import At
from tokensieve.reducers.plan import spec_parameters
from tokensieve.reducers.uniform import uniform_frames
from tokensieve.tokens import (
    ATTN_RECEIVED,
    CLIP_KEY,
    CLS_ATTN,
    KEYS,
    LOSSES,
    TOKEN_AUX,
    Inputs,
    Layout,
    TokenState,
    compact,
)  # fmt: skip

# Settings that fit the tiny presets (32 or 64 tokens, 16 per frame, 3 blocks).
CONTRACT = {
    "none": ["none"],
    "random": ["random:keep=0.5", "random:keep=0.4,per_frame=true,at=1"],
    "uniform": ["uniform:keep=0.5"],
    "random_frames": ["random_frames:keep=0.5,at=1"],
    "resize": ["resize:keep=0.5", "resize:keep=0.3,mode=bicubic+random:keep=0.5,at=1"],
    "attention": ["attention:keep=0.5", "attention:keep=0.3,per_frame=true,at=0", "attention:mass=0.6,at=0"],
    "tome": ["tome:r=6", "tome:r=4,mode=drop", "tome:r=5,schedule=decreasing,prop_attn=false"],
    "sta": ["sta:r=4", "sta:r=6,balance=frame,order=BFB", "sta:r=3,first=grid", "sta:r=3,first=random"],
    "stts": [
        "stts:T0=0.5",
        "stts:T1=0.5,S2=0.6,pool=meanmax,anchor_pool=mean,scorer=released",
        "stts:S0=0.6,samples=50",
    ],
    # label=pred: the contract runs without labels (the true-label oracle: tests/test_lite.py)
    "oracle": [
        "oracle:keep=0.5,label=pred",
        "oracle:keep=0.3,label=pred,tensor=hidden,block=0,per_frame=true",
    ],
    "lite": ["lite:keep=0.5", "lite:keep=0.3,pos=false,hidden=8,per_frame=false"],
    # per-clip budgets: the untrained tiny models' confidences are about 1/K, so high=0.25 splits them
    "adaptive": [
        "adaptive:high=0.25+random:keep=0.5",
        "lite++:keep=0.7,high=0.25,glance=0.3",
        "attention++:keep=0.5,low=0.2,hard=base,at=1",
    ],
    # beta=0 halts about half the tokens at every joint block of the tiny models (h near 0.5)
    "halting": [
        "halting:beta=0",
        "halting:beta=-1,halted=zero,glimpser=0.6",
        "halting:glimpser=1,motion=0,at=0",
    ],
    "glimpser": ["glimpser:keep=0.5", "glimpser:keep=0.3,cls_skip=true,at=0"],
    "tokenlearner": [
        "tokenlearner:at=1,tokens=4",
        "tokenlearner:at=1,tokens=3,version=1,fuser=released",
        "tokenlearner:at=0.34,tokens=4,fuser=paper",
        "tokenlearner:at=2,tokens=2,version=1,pool=mean,vector=true",
    ],
}
# The setting of each method that must leave the backbone's output bit for bit unchanged.
IDENTITY: dict[str, str | None] = {
    "none": "none",
    "random": "random:keep=1,per_frame=true",
    "uniform": "uniform:keep=1",
    "random_frames": "random_frames:keep=1",
    "resize": "resize:keep=1",
    "attention": "attention:keep=1,per_frame=true",
    "tome": "tome:r=0",
    "sta": "sta:r=0,balance=frame",
    "stts": "stts:T0=1",
    "oracle": "oracle:keep=1,label=pred",
    "lite": "lite:keep=1",
    "adaptive": "adaptive:low=0,high=1+random:keep=1",
    "halting": "halting:beta=1000,glimpser=1",  # h = 0 until the last block, where the class token halts
    "glimpser": "glimpser:keep=1,cls_skip=true",
    # Every setting replaces the tokens by learned ones; a fuser's unit starts as the identity
    # (tests/test_tokenlearner.py).
    "tokenlearner": None,
}
BACKBONES = [name for name in ts.PRESETS if name.endswith("-tiny")]  # one per backbone family
CASES = [(spec, name) for specs in CONTRACT.values() for spec in specs for name in BACKBONES]


@functools.cache
def _runs_on(spec: str, name: str) -> bool:
    """Whether `apply` accepts the plan on the backbone (divided attention refuses unequal frames)."""
    try:
        ts.apply(ts.build(name), spec)
    except ts.InputError:
        return False
    return True


def _leaves_unequal_frames(spec: str) -> bool:
    """Whether some step of the plan leaves per-frame counts unequal (read from its layouts on a joint
    backbone, where nothing refuses it)."""
    return any(step.after.frames is None for step in ts.apply(ts.build("joint-tiny"), spec).steps)


RUNNABLE = [(spec, name) for spec, name in CASES if _runs_on(spec, name)]
SPECS = [spec for specs in CONTRACT.values() for spec in specs]


@pytest.mark.parametrize("spec", SPECS)
def test_divided_attention_refuses_exactly_the_plans_that_unbalance_frames(spec: str) -> None:
    model = ts.build("timesformer-tiny")
    reducers = ts.plan(spec)  # per frame where needed, unless per-clip budgets make the batch ragged
    adapts = any(getattr(r, "per_frame", False) is None for r in reducers) and not any(
        r.takes_budgets is False and not r.standalone for r in reducers
    )
    if "vector=true" in spec:  # TokenLearner's vector attention replaces a joint block's attention
        with pytest.raises(ts.InputError, match="vector=true replaces the attention of the blocks"):
            ts.apply(model, spec)
        return
    if adapts or not _leaves_unequal_frames(spec):
        ts.apply(model, spec)
        return
    with pytest.raises(
        ts.InputError, match=r"TimeSformer block \d \(divided space-time attention\) needs the same"
    ):
        ts.apply(model, spec)


def _is_random(spec: str) -> bool:
    """Whether the plan selects at random (STA only for a random first-frame drop; with adaptive budgets,
    whether the method after them does: the glance's draws only choose budgets)."""
    method, args = parse(spec)[-1]
    if method == "sta":
        return args.get("first") in ("random", "grid")
    if method == "oracle":  # its seed only orders tokens of equal value
        return False
    return "seed" in spec_parameters(REGISTRY[method])


def _model(name: str, spec: str | None = None) -> ts.VideoBackbone:
    torch.manual_seed(0)
    model = ts.build(name).eval()
    return ts.apply(model, spec).model if spec else model


def _trace(model: ts.VideoBackbone) -> list[tuple[TokenState, TokenState]]:
    """(input, output) of every reducer call, recorded by forward hooks on the reducer slots."""
    seen: list[tuple[TokenState, TokenState]] = []
    for module in model.modules():
        if isinstance(module, At):
            module.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    return seen


def test_every_registered_method_is_covered() -> None:
    assert set(CONTRACT) == set(REGISTRY) == set(IDENTITY)


def test_timesformer_runs_the_per_frame_methods() -> None:
    on_timesformer = {spec for spec, name in RUNNABLE if name == "timesformer-tiny"}
    assert on_timesformer >= {
        "random:keep=0.4,per_frame=true,at=1", "uniform:keep=0.5", "random_frames:keep=0.5,at=1",
        "attention:keep=0.3,per_frame=true,at=0", "sta:r=6,balance=frame,order=BFB",
    }  # fmt: skip


@pytest.mark.parametrize(("spec", "name"), RUNNABLE)
def test_states_are_valid_and_counts_as_declared(spec: str, name: str) -> None:
    model = _model(name, spec)
    seen = _trace(model)
    steps = schedule(model, list(model.plan))
    embedded = model.embed.register_forward_hook(lambda _m, _a, state: seen.append((None, state)))
    with torch.no_grad():
        logits = model(tiny_video(name))
    embedded.remove()
    assert logits.shape == (2, model.config.num_classes) and torch.isfinite(logits).all()
    state = seen[0][1]  # the embedding's tokens: on the grid a step on the clip (resize) leaves
    seen[:] = [(before, after) for before, after in seen if before is not None]  # (an oracle embeds again)
    resized = [step for step in steps if step.reducer.resizes_input]
    assert (
        state.num_tokens.tolist() == [resized[0].tokens_out if resized else math.prod(model.config.grid)] * 2
    )
    steps = [step for step in steps if not step.reducer.resizes_input]  # the others run on tokens, in slots
    assert len(seen) == len(steps)
    for (before, after), step in zip(seen, steps, strict=True):
        after.check()
        if step.before.ragged:  # the most a clip can hold
            assert before.x.shape[1] <= step.tokens_in
        else:
            assert before.x.shape[1] == step.tokens_in
        if step.after.ragged:  # the most a clip can hold; a batch whose clips all keep as many is dense
            assert after.x.shape[1] <= step.tokens_out and after.frames is None
        else:
            assert after.x.shape[1] == step.tokens_out and after.mask is None
            assert after.frames == step.frames_out
        if before.cls is not None and not step.reducer.changes_cls:  # never dropped, changed only if declared
            assert after.cls is before.cls
        assert after.grid == before.grid


@pytest.mark.parametrize(
    ("method", "name"),
    [(m, name) for m in sorted(IDENTITY) if IDENTITY[m] for name in BACKBONES if _runs_on(IDENTITY[m], name)],
)
def test_identity_setting_equals_the_bare_backbone(method: str, name: str) -> None:
    video = tiny_video(name)
    with torch.no_grad():
        bare = _model(name)(video)
        reduced = _model(name, IDENTITY[method])(video)
    assert torch.equal(reduced, bare)


def _keyed(spec: str) -> bool:
    """Whether the plan selects at random, keyed by clip (a pure function of the clip and seed).
    (STTS draws keyed noise too, in training only: tests/test_stts.py.)"""
    return _is_random(spec) and bool(ts.plan(spec)[0].keyed_random)


@pytest.mark.parametrize(("spec", "name"), [c for c in RUNNABLE if not _is_random(c[0]) or _keyed(c[0])])
def test_batch_of_two_equals_two_batches_of_one(spec: str, name: str) -> None:
    model = _model(name, spec)
    video = tiny_video(name)
    with torch.no_grad():
        together = model(video)
        apart = torch.cat([model(video[:1]), model(video[1:])])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


def _selected(model: ts.VideoBackbone, video: torch.Tensor) -> torch.Tensor:
    """The positions every reducer call of one forward leaves, side by side: (B, their total count). (The
    final state's alone would not do: Video Swin's merging fills the holes a selection left.)"""
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _args, out: seen.append(out.pos))
        for m in model.modules()
        if isinstance(m, At)
    ]
    model.forward_features(video)
    for hook in hooks:
        hook.remove()
    return torch.cat(seen, 1)


@pytest.mark.parametrize(("spec", "name"), [c for c in RUNNABLE if _keyed(c[0])])
def test_random_draws_are_keyed_by_clip(spec: str, name: str) -> None:
    video = tiny_video(name, batch=6)
    model = _model(name, f"{spec},seed=3")
    with torch.no_grad():
        first = _selected(model, video)
        ts.flops(model)  # counting FLOPs (or anything else run in between) draws nothing
        again = _selected(model, video)
        shuffled = _selected(model, video[[2, 0, 1, 5, 4, 3]])
        alone = _selected(model, video[1:2])
        other_seed = _selected(_model(name, f"{spec},seed=4"), video)
    assert torch.equal(first, again)  # the same clip, the same selection
    assert torch.equal(shuffled, first[[2, 0, 1, 5, 4, 3]]) and torch.equal(alone, first[1:2])  # any batch
    assert len({tuple(row) for row in first.tolist()}) > 1  # different clips draw differently
    assert not torch.equal(first, other_seed)  # another seed, another selection
    model.train()
    with torch.no_grad():
        drawn = []
        for step in (5, 6, 5):
            for reducer in model.plan:
                reducer.on_train_step(step, 10)
            drawn.append(_selected(model, video))
    assert not torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[0], drawn[2])  # new draws each step
    model.eval()
    with torch.no_grad():
        assert torch.equal(_selected(model, video), first)  # evaluation ignores the step


@pytest.mark.parametrize(("spec", "name"), RUNNABLE)
def test_gradients_reach_the_backbone_and_the_plan(spec: str, name: str) -> None:
    model = _model(name, spec).train()
    video = tiny_video(name)
    labels = torch.tensor([0, 1])
    teacher = {r.name: r.teach(_model(name), Inputs(video, labels)) for r in model.plan if r.wants_teacher}
    state = model.forward_features(video, inputs=Inputs(video, labels, teacher))  # as the training loop does
    (model.forward_head(state).sum() + sum(state.aux.get(LOSSES, {}).values())).backward()
    grad = model.embed.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    params = dict(model.plan.named_parameters())
    for pname, param in params.items():  # a learned method's every parameter is in the graph
        assert param.grad is not None, f"no gradient reaches plan.{pname}"
    if params:  # (one may get an exact zero: a bias followed by min-max normalisation, say)
        assert sum(float(p.grad.abs().sum()) for p in params.values()) > 0


# One setting per method (its first contract setting) on every backbone it runs on.
FIRST = [(specs[0], name) for specs in CONTRACT.values() for name in BACKBONES if _runs_on(specs[0], name)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("convert_first", [False, True], ids=["apply-then-to", "to-then-apply"])
@pytest.mark.parametrize(("spec", "name"), FIRST)
def test_runs_in_other_dtypes(spec: str, name: str, dtype: torch.dtype, convert_first: bool) -> None:
    torch.manual_seed(0)
    model = ts.build(name).eval()
    model = ts.apply(model.to(dtype), spec).model if convert_first else ts.apply(model, spec).model.to(dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}  # the plan's parameters follow the model
    seen = _trace(model)
    with torch.no_grad():
        logits = model(tiny_video(name, dtype=dtype))
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    for before, after in seen:
        assert after.x.dtype == dtype and after.x.shape[1] <= before.x.shape[1]


@pytest.mark.parametrize(("spec", "name"), FIRST)
def test_deepcopy_is_an_independent_equal_model(spec: str, name: str) -> None:
    model = _model(name, spec)
    twin = copy.deepcopy(model)
    video = tiny_video(name)
    with torch.no_grad():
        assert torch.equal(model(video), twin(video))
    slots = [m for m in twin.modules() if isinstance(m, At)]
    assert all(any(slot.reducer is r for r in twin.plan) for slot in slots)  # slots call the copy's plan
    assert not any(a is b for a in model.plan for b in twin.plan)
    for param in twin.parameters():
        param.data.add_(1.0)  # changing the copy leaves the original alone
    with torch.no_grad():
        assert torch.equal(model(video), _model(name, spec)(video))


@pytest.mark.parametrize(
    ("spec", "name"),
    [c for c in FIRST if not c[0].startswith("oracle") and not _model(c[1], c[0]).installed.adaptive],
)
def test_compiles_with_fullgraph(spec: str, name: str) -> None:
    """(Not the oracle, whose gradient pass inside the forward is an analysis tool's, nor per-clip budgets,
    whose ragged batch reads the counts back from the device.)"""
    model = _model(name, spec)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    video = tiny_video(name)
    with torch.no_grad():
        torch.testing.assert_close(compiled(video), model(video), rtol=1e-5, atol=1e-5)
        other = torch.randn_like(video)  # another batch of the same shape: the compiled graph is reused
        with torch.compiler.set_stance("fail_on_recompile"):
            torch.testing.assert_close(compiled(other), model(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("spec", "name"), RUNNABLE)
def test_a_fixed_budget_never_makes_the_host_wait(spec: str, name: str) -> None:
    """A GPU runs a fixed-budget plan without stalling its queue: no `.item()`, `.tolist()`, `nonzero`,
    boolean-mask indexing or other value-dependent shape in the forward. A per-clip budget reads its
    counts back once per step that makes the batch ragged (`tokens.compact`), and nothing else."""
    model = _model(name, spec)
    with torch.no_grad(), host_syncs() as seen:
        model(tiny_video(name))
    if not model.installed.adaptive:
        assert not seen, seen
    else:
        assert set(seen) <= {"tolist"} and seen["tolist"] <= len(model.installed.steps), seen


@pytest.mark.parametrize(("spec", "name"), FIRST)
def test_flops_are_counted_on_the_meta_device(spec: str, name: str) -> None:
    with torch.device("meta"):
        meta = ts.apply(ts.build(name), spec).model
    if meta.installed.adaptive:  # the cost depends on the content, which the meta device does not have
        with pytest.raises(ts.InputError, match="depends on each clip's content"):
            ts.flops(meta)
        return
    assert ts.flops(meta) == pytest.approx(ts.flops(_model(name, spec)), rel=1e-12)


@pytest.mark.parametrize("spec", [s for specs in CONTRACT.values() for s in specs])
def test_state_dict_round_trips_with_a_plan(spec: str) -> None:
    source = _model("joint-tiny", spec)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    target = ts.apply(ts.build("joint-tiny").eval(), spec).model
    target.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    video = tiny_video("joint-tiny")
    with torch.no_grad():
        assert torch.equal(source(video), target(video))


def test_apply_replaces_and_removes_plans() -> None:
    model = _model("videomae-tiny", "tome:r=4+random:keep=0.5,at=2")
    assert [type(r).__name__ for r in model.plan] == ["TokenMerging", "RandomSelection"]
    assert all(isinstance(b.inner, At) for b in model.blocks)  # ToMe in every block
    assert isinstance(model.reducers[2], At) and model.spec == "tome:r=4+random:keep=0.5,at=2"
    ts.apply(model, None)
    assert len(model.plan) == 0 and model.spec is None
    assert all(isinstance(b.inner, nn.Identity) and not b.record for b in model.blocks)
    assert all(isinstance(r, nn.Identity) for r in model.reducers)


def test_composed_plan_counts_follow_execution_order() -> None:
    # before block 1 (random), then inside blocks 1 and 2 (tome): 32 -> 16 -> 12 -> 8
    model = _model("videomae-tiny", "tome:r=4,schedule=constant+random:keep=0.5,at=1")
    steps = schedule(model, list(model.plan))
    assert [(s.reducer.name, s.site.position, s.inside, s.tokens_out) for s in steps] == [
        ("tome", 0, True, 28), ("random", 1, False, 14), ("tome", 1, True, 10), ("tome", 2, True, 6),
    ]  # fmt: skip


# ------------------------------------------------------------------------------ golden cases
def test_random_selects_independently_per_sample_and_per_frame() -> None:
    model = _model("joint-tiny", "random:keep=0.25,per_frame=true")
    state = model.forward_features(tiny_video("joint-tiny"))
    frame = state.pos // 16  # 4 frames of 4x4
    assert state.frames == 4 and state.x.shape[1] == 16
    assert torch.equal(frame, torch.arange(4).repeat_interleave(4).expand(2, -1))  # 4 per frame, in order
    assert not torch.equal(state.pos[0], state.pos[1])  # each sample its own draw
    assert bool((state.pos.diff(dim=1) > 0).all())  # original order kept


def test_uniform_takes_segment_centres() -> None:
    assert uniform_frames(8, 4).tolist() == [1, 3, 5, 7]
    assert uniform_frames(8, 3).tolist() == [1, 4, 6]
    assert uniform_frames(8, 8).tolist() == list(range(8))
    assert uniform_frames(8, 1).tolist() == [4]
    model = _model("joint-tiny", "uniform:keep=0.5")  # 4 frames -> frames 1 and 3
    state = model.forward_features(tiny_video("joint-tiny"))
    assert state.frames == 2
    assert torch.equal(state.pos // 16, torch.tensor([1, 3]).repeat_interleave(16).expand(2, -1))


def test_random_frames_keeps_whole_frames_in_time_order() -> None:
    model = _model("joint-tiny", "random_frames:keep=0.5,seed=1")
    pos = model.forward_features(tiny_video("joint-tiny", batch=8)).pos  # (8, 32)
    frames = (pos // 16).view(8, 2, 16)
    assert bool((frames == frames[..., :1]).all())  # whole frames
    assert bool((frames[:, 0, 0] < frames[:, 1, 0]).all())  # time order
    assert len({tuple(f[:, 0].tolist()) for f in frames}) > 1  # different frames for different samples
    assert torch.equal(pos % 16, torch.arange(16).repeat(2).expand(8, -1))  # every cell of each kept frame


def test_attention_keeps_the_most_attended_tokens() -> None:
    model = _model("joint-tiny", "attention:keep=0.25,at=0")
    captured = []
    model.blocks[0].inner.register_forward_hook(lambda m, args, out: captured.append((args[0], out)))
    model(tiny_video("joint-tiny"))
    ((before, after),) = captured
    scores = before.aux[CLS_ATTN]  # (B, 64)
    expected = scores.topk(16, dim=1).indices.sort(1).values
    assert torch.equal(after.pos, expected)


def test_recorded_class_attention_matches_a_manual_computation() -> None:
    model = _model("joint-tiny")
    block = model.blocks[0]
    block.record = frozenset({CLS_ATTN})
    state = model.embed(tiny_video("joint-tiny"), model.config.grid)
    out = block(state)
    x = block.norm1(torch.cat([state.cls, state.x], 1))
    B, N, C = x.shape
    q, k, _ = block.attn.qkv(x).view(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hd)
    attn = ((q @ k.transpose(-2, -1)) * (C // 2) ** -0.5).softmax(-1)  # (B, nh, N, N)
    torch.testing.assert_close(out.aux[CLS_ATTN], attn[:, :, 0, 1:].mean(1))


def test_received_attention_matches_the_full_attention_map() -> None:
    q, k = torch.randn(2, 3, 50, 8), torch.randn(2, 3, 50, 8)
    full = ((q @ k.transpose(-2, -1)) * 8**-0.5).softmax(-1)  # (B, nh, N, N)
    torch.testing.assert_close(received_attention(q, k, None), full.mean(2).mean(1))
    real = torch.ones(2, 50, dtype=torch.bool)
    real[1, 40:] = False  # padding: neither attended to nor averaged over as a query
    masked = (
        ((q @ k.transpose(-2, -1)) * 8**-0.5).masked_fill(~real[:, None, None], float("-inf")).softmax(-1)
    )
    expected = torch.stack([masked[0].mean(1).mean(0), masked[1, :, :40].mean(1).mean(0)])
    torch.testing.assert_close(received_attention(q, k, real[:, None, None]), expected)


def test_attention_without_class_token_ranks_by_received_attention() -> None:
    model = _model("videomae-tiny", "attention:keep=0.5,at=1")
    assert model.blocks[1].record == frozenset({ATTN_RECEIVED})
    captured = []
    model.blocks[1].inner.register_forward_hook(lambda m, args, out: captured.append((args[0], out)))
    model(tiny_video())
    ((before, after),) = captured
    assert torch.equal(after.pos, before.aux[ATTN_RECEIVED].topk(16, dim=1).indices.sort(1).values)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("random:keep=0", r"keep must be in \(0, 1\]"),
        ("random:keep=1.5", r"keep must be in \(0, 1\]"),
        ("uniform:keep=-0.1", r"keep must be in \(0, 1\]"),
        ("attention:keep=2", r"keep must be in \(0, 1\]"),
        ("random:keep=half", "keep expects a float"),
        ("tome:r=x", "r must be an integer or a per-block list"),
        ("tome:r=-1", "r must be >= 0"),
        ("tome:schedule=linear", "schedule must be one of constant, decreasing"),
        ("sta:order=FFX", "order gives the direction of the three stages"),
        ("sta:order=FB", "order gives the direction of the three stages"),
        ("sta:first=magic", "first must be one of tome, random, grid"),
        ("sta:balance=clip", "balance must be one of group, frame"),
        ("sta:r=-2", "r must be >= 0"),
        ("random:rate=0.5", r"valid: random: keep=0.5, at=0, per_frame=False, seed=0"),
    ],
)
def test_bad_parameters_fail_when_parsed(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ts.plan(spec)


@pytest.mark.parametrize(
    ("name", "spec", "message"),
    [
        ("timesformer-tiny", "random:keep=0.5", r"TimeSformer block 0 \(divided space-time attention\) needs the same number of tokens in every frame of every clip, but random \(before block 0\) leaves 32 tokens per clip, unequal between frames"),
        ("timesformer-tiny", "attention:keep=0.5", r"block 2 .* but attention \(inside block 1\) leaves"),
        ("timesformer-tiny", "tome:r=2", r"block 1 .* but tome \(inside block 0\) leaves 62 tokens"),
        ("timesformer-tiny", "sta:r=2", r"block 2 .* sta \(before block 2\) leaves .*balance=frame"),
        ("timesformer-tiny", "attention:mass=0.9", r"block 2 .* leaves a different number of tokens in each clip"),
        ("videomae-tiny", "attention:mass=0.9,at=0+uniform:keep=0.5,at=1", r"uniform \(before block 1\) cannot take a batch whose clips hold different numbers of tokens, which attention \(inside block 0\) leaves"),
        ("videomae-tiny", "attention:mass=0.9,at=0+tome:r=2", r"tome \(inside block 0\) cannot take a batch .* which attention \(inside block 0\)"),
        ("videomae-tiny", "attention:mass=0.9,at=0+sta:r=2", r"sta \(before block 1\) cannot take"),
        ("joint-tiny", "tome:r=3/3+attention:keep=0.5,at=1", r"attention \(inside block 1\) needs cls_attn recorded by the attention before it, but tome, which runs there first"),
        ("videomae-tiny", "attention:mass=0.9,at=0+stts:T2=0.5", r"stts \(before block 2\) cannot take"),
        ("videomae-tiny", "attention:mass=0.9,at=0+random_frames:at=2", r"random_frames \(before block 2\) cannot take"),
        ("videomae-tiny", "tome:r=17", r"r=17 in block 0 is more than half of the 32 tokens"),
        ("videomae-tiny", "tome:r=10", r"r=10 in block 2 is more than half of the 12 tokens"),
        ("videomae-tiny", "tome:r=1/1/1/1", "r lists 4 blocks but the model has 3"),
        ("videomae-tiny", "sta:r=16,first=random", "r=16 is not smaller than the 16 tokens of a frame"),
        ("videomae-tiny", "sta:r=9", "first=tome drops at most half"),
        ("videomae-tiny", "random:keep=0.5,at=4", r"position 4 is outside this model; valid positions: 0..3"),
        ("videomae-tiny", "attention:at=3", r"position 3 is outside this model; valid positions: 0..2"),
        ("videomae-tiny", "attention:at=5", r"position 5 is outside this model"),
        ("videomae-tiny", "random:keep=0.5,at=1+uniform:keep=0.5,at=2", "needs the same number of tokens in every frame"),
        ("videomae-tiny", "random:keep=0.5+sta:r=2", "needs all 2 temporal slices at its first stage"),
        ("videomae-tiny", "random:keep=0.5+sta:r=2,balance=frame", "needs the same number of tokens in every frame"),
    ],
)  # fmt: skip
def test_incompatible_backbone_position_or_budget_fails_at_apply(name: str, spec: str, message: str) -> None:
    model = ts.build(name)
    with pytest.raises(ValueError, match=message):
        ts.apply(model, spec)
    assert len(model.plan) == 0 and all(isinstance(r, nn.Identity) for r in model.reducers)  # untouched


def test_a_state_without_equal_frames_is_refused_with_a_message() -> None:
    reducer = ts.plan("uniform:keep=0.5")[0]
    state = TokenState(x=torch.randn(1, 5, 4), pos=torch.arange(5)[None], grid=(2, 2, 2))
    with pytest.raises(ValueError, match="needs the same number of tokens in every frame"):
        reducer(state, ts.reducers.Site(0, 0, 3, (2, 2, 2)))


# ------------------------------------------------------------------------------ ragged inputs
def _takes_ragged(spec: str) -> bool:
    """Whether every reducer of the plan accepts a ragged batch (per-frame modes need equal frames)."""
    try:
        return all(
            r.takes_ragged and r.count(Layout(64, ragged=True), ts.reducers.Site(0, 1, 3, (4, 4, 4)))
            for r in ts.plan(spec)
        )
    except ts.InputError:
        return False


TAKES_RAGGED = [spec for spec in SPECS if _takes_ragged(spec)]


def test_the_methods_that_take_ragged_batches_are_covered() -> None:
    assert (
        {spec.partition(":")[0] for spec in TAKES_RAGGED}
        == {name for name, cls in REGISTRY.items() if cls.takes_ragged}
        == {"random", "attention", "halting"}
    )


def _ragged_input(B: int = 4, frames: int = 4, per_frame: int = 16, C: int = 8) -> TokenState:
    """A ragged batch as a reduction would leave it: clips keeping 16..64 of 64 tokens (real tokens
    first), with a class token, every side result a reducer may read and clip keys."""
    torch.manual_seed(3)
    N = frames * per_frame
    state = TokenState.from_grid(torch.randn(B, N, C), (frames, 4, 4), cls_token=torch.randn(B, 1, C))
    chosen = torch.rand(B, N).argsort(1).argsort(1) < torch.tensor([16, 40, 64, 27]).unsqueeze(1)
    state = state.with_aux(**{
        ATTN_RECEIVED: torch.rand(B, N), CLS_ATTN: torch.rand(B, N), KEYS: torch.randn(B, N, 4),
        CLIP_KEY: torch.tensor([11, 22, 33, 44]),
    })  # fmt: skip
    ragged = compact(state, chosen)
    assert ragged.lengths == (16, 40, 64, 27)
    return ragged


def _alone(state: TokenState, b: int) -> TokenState:
    """Clip `b` of a ragged batch on its own: its real tokens, dense."""
    n = state.lengths[b]
    aux = {k: (v[b : b + 1, :n] if k in TOKEN_AUX else v[b : b + 1]) for k, v in state.aux.items()}
    cls = None if state.cls is None else state.cls[b : b + 1]
    return TokenState(
        x=state.x[b : b + 1, :n], pos=state.pos[b : b + 1, :n], grid=state.grid, cls=cls, aux=aux
    )


@pytest.mark.parametrize("spec", TAKES_RAGGED)
def test_a_ragged_batch_gives_each_clip_what_it_gets_alone(spec: str) -> None:
    """Every method that takes a ragged batch selects within each clip's real tokens only: the kept
    positions of each clip are those it keeps when run alone, padding is never kept, and the state
    is valid."""
    state = _ragged_input()
    for reducer in ts.plan(spec):
        reducer.eval()
        site = ts.reducers.Site(0, 1, 3, state.grid)
        out = reducer(state, site)
        out.check()
        for b in range(state.x.shape[0]):
            real = out.pos[b] if out.mask is None else out.pos[b][out.mask[b]]
            alone = reducer(_alone(state, b), site).pos[0]
            assert real.tolist() == alone.tolist(), f"clip {b}"
            assert set(real.tolist()) <= set(state.pos[b, : state.lengths[b]].tolist())  # no padding kept
