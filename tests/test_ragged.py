"""Ragged batches (clips of one batch holding different numbers of tokens) and their packed execution.

Covers: packed blocks equal the padded reference and the clips run one at a time, in evaluation (float32
and float64) and in training with stochastic depth (outputs and gradients); the `varlen_attention`
kernels against SDPA clip by clip; the side results a packed block records; `compact`; `keep_top` with
per-clip ratios and on ragged inputs; `mass_chosen` and `attention:mass`; `InstalledPlan` (remove,
install, `with`); bad input.

Randomly initialised tiny models attend almost uniformly, so an adaptive budget keeps about as many
tokens in every clip. The models here are sharpened (every parameter times 4) and each test asserts its
batch really is ragged, so none can pass on a dense batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from conftest import reducer_outputs, tiny_video
from tokensieve.backbones import base, layers
from tokensieve.backbones.layers import RAGGED, DropPath, pack, varlen_attention
from tokensieve.reducers.attention import mass_chosen
from tokensieve.reducers.base import keep_top
from tokensieve.tokens import ATTN_RECEIVED, CLS_ATTN, KEYS, PROP_ATTN, TOKEN_AUX, TokenState, compact

BATCH = 4
JOINT = ["videomae-tiny", "joint-tiny", "vivit-tiny"]  # no class token (mean pooling); class token (2x)
# Plans that make ragged batches; position 3 is the slot after the last of the 3 blocks.
RAGGED_PLANS = [
    "attention:mass=0.6,at=0",
    "attention:mass=0.5,at=0+random:keep=0.5,at=2",
    "attention:mass=0.5,at=0+attention:keep=0.5,at=2",  # attention (and its records) on a ragged batch
    "attention:mass=0.6,at=0+attention:mass=0.7,at=2",
    "tome:r=3/0/0+attention:mass=0.6,at=1",  # merged sizes: proportional attention in packed block 2
    "tome:r=3/0/0+attention:mass=0.6,at=1+attention:mass=0.7,at=2",  # ... and what it records there
    "attention:mass=0.6,at=0+random:keep=0.5,at=3",
]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


# ------------------------------------------------------------------------------------------- helpers
def _sharp(name: str, spec: str | None = None, **config: object) -> ts.VideoBackbone:
    """A tiny model in evaluation mode with every parameter times 4 (peaked attention), plan installed."""
    torch.manual_seed(0)
    model = ts.build(name, **config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return ts.apply(model, spec).model if spec else model


def _is_ragged(state: TokenState) -> bool:
    return state.mask is not None and len(set(state.lengths)) >= 2


def _assert_ragged_where_planned(model: ts.VideoBackbone, outputs: list[TokenState]) -> None:
    """The plan's first step laid out ragged made a batch whose clips really hold different counts (a
    later one may happen to leave equal counts: then its result is dense); every result is valid."""
    steps = model.installed.steps
    assert len(outputs) == len(steps)
    first = next(i for i, step in enumerate(steps) if step.after.ragged)
    assert _is_ragged(outputs[first]), f"{steps[first].reducer.name} ({steps[first].where}) left equal counts"
    for out in outputs:
        out.check()


@pytest.fixture
def varlen_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the packed attention calls of the blocks (one entry per call)."""
    calls: list[int] = []
    real = layers.varlen_attention

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "varlen_attention", counting)
    return calls


def _state(x: torch.Tensor, grid: tuple[int, int, int], **fields: object) -> TokenState:
    return TokenState.from_grid(x, grid).replace(**fields)


def _kept_pos(state: TokenState) -> list[list[int]]:
    """Each clip's real tokens' positions, in order."""
    if state.mask is None:
        return state.pos.tolist()
    return [row[:n] for row, n in zip(state.pos.tolist(), state.lengths, strict=True)]


# --------------------------------------------------------------- packed = padded = one clip at a time
@pytest.fixture(params=[None, 7], ids=["one-tile", "tiles-of-7-rows"])
def tiles(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int | None:
    """The packed blocks' tile size: the default (every tiny batch fits one tile) or 7 rows, so runs of
    clips and single clips each go through the block on their own (`layers.TILE_ROWS`)."""
    if request.param is not None:
        monkeypatch.setattr(layers, "TILE_ROWS", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", RAGGED_PLANS)
@pytest.mark.parametrize("name", JOINT)
def test_packed_equals_padded_equals_one_clip_at_a_time(
    name: str, spec: str, dtype: torch.dtype, varlen_calls: list[int], tiles: int | None
) -> None:
    model = _sharp(name, spec).to(dtype)
    video = tiny_video(name, BATCH).to(dtype)  # the same clips in both precisions
    outputs = reducer_outputs(model)
    with torch.no_grad():
        assert model.ragged == "packed"  # the default
        packed = model(video)
        _assert_ragged_where_planned(model, outputs)
        assert varlen_calls  # the ragged blocks ran packed
        calls = len(varlen_calls)
        model.ragged = "padded"
        padded = model(video)
        assert len(varlen_calls) == calls  # ... and the reference did not
        alone = torch.cat([model(video[b : b + 1]) for b in range(BATCH)])
    tol = TOLERANCE[dtype]
    assert packed.dtype == dtype
    torch.testing.assert_close(packed, padded, rtol=tol, atol=tol)
    torch.testing.assert_close(packed, alone, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", JOINT)
def test_training_with_stochastic_depth_draws_the_same_per_clip_packed_or_padded(
    name: str, tiles: int | None
) -> None:
    model = _sharp(name, "attention:mass=0.6,at=0+attention:keep=0.5,at=2", drop_path=0.5).train()
    assert isinstance(model.blocks[-1].drop_path, DropPath)
    video = tiny_video(name, BATCH)
    outputs = reducer_outputs(model)
    logits, grads = {}, {}
    for how in RAGGED:
        model.ragged = how
        model.zero_grad()
        torch.manual_seed(7)  # the same stochastic-depth draws on both paths
        logits[how] = model(video)
        logits[how].sum().backward()
        grads[how] = model.embed.proj.weight.grad.clone()
    _assert_ragged_where_planned(model, outputs[:2])  # the packed run's
    _assert_ragged_where_planned(model, outputs[2:])  # the padded run's
    torch.testing.assert_close(logits["packed"], logits["padded"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["packed"], grads["padded"], rtol=1e-5, atol=1e-5)
    assert grads["packed"].abs().sum() > 0
    torch.manual_seed(8)
    with torch.no_grad():
        other = model(video)
    assert not torch.allclose(other, logits["padded"], atol=1e-3)  # the draws matter: the check has teeth


def test_drop_path_shows_its_rate() -> None:
    # Regression: `extra_repr` had slipped below `_drop`'s return, so the module lost its repr.
    assert repr(DropPath(0.25)) == "DropPath(p=0.25)"
    assert "DropPath(p=0.5)" in repr(ts.build("videomae-tiny", drop_path=0.5).blocks[-1])


# ---------------------------------------------------------------------------------- varlen_attention
def _packed_rows(lengths: tuple[int, ...]) -> layers.Packed:
    """Where the real rows of a ragged batch of these per-clip counts are (no class token)."""
    B, L = len(lengths), max(lengths)
    mask = torch.arange(L) < torch.tensor(lengths).unsqueeze(1)
    state = TokenState(x=torch.zeros(B, L, 1), pos=torch.zeros(B, L, dtype=torch.long), grid=(1, 1, L))
    return pack(state.replace(mask=mask, lengths=lengths))


def _per_clip(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: tuple[int, ...],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: SDPA on every clip's rows alone, (M, nh, hd)."""
    out, start = [], 0
    for n in lengths:
        rows = slice(start, start + n)
        mask = None if bias is None else bias[rows].view(1, 1, 1, n)
        qc, kc, vc = (t[rows].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, nh, n, hd)
        out.append(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask)[0].transpose(0, 1))
        start += n
    return torch.cat(out)


LENGTHS = (5, 3, 5, 1)  # two clips of one length (a batched group) and single-clip slices


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_varlen_kernels_equal_attention_clip_by_clip() -> None:
    packed = _packed_rows(LENGTHS)
    single = {n: isinstance(where, int) for n, where in layers.length_groups(packed.lengths)}
    assert single == {5: False, 3: True, 1: True}  # clips 0 and 2 run as one batched group
    q, k, v = (torch.randn(sum(LENGTHS), 2, 4) for _ in range(3))
    reference = _per_clip(q, k, v, LENGTHS)
    groups = varlen_attention(q, k, v, packed.lengths, kernel="groups")
    nested = varlen_attention(q, k, v, packed.lengths, kernel="nested")
    torch.testing.assert_close(groups, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nested, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(groups, nested, rtol=1e-5, atol=1e-5)
    # Not one attention over all rows: clips do not see each other.
    everything = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
    assert not torch.allclose(groups, everything, atol=1e-3)


def test_varlen_bias_goes_to_the_groups_kernel_only() -> None:
    packed = _packed_rows(LENGTHS)
    q, k, v = (torch.randn(sum(LENGTHS), 2, 4) for _ in range(3))
    bias = torch.rand(sum(LENGTHS)) * 3  # log-sizes
    out = varlen_attention(q, k, v, packed.lengths, bias=bias, kernel="groups")
    torch.testing.assert_close(out, _per_clip(q, k, v, LENGTHS, bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, _per_clip(q, k, v, LENGTHS), atol=1e-3)  # the bias counts
    with pytest.raises(ValueError, match="nested varlen kernel takes no attention bias"):
        varlen_attention(q, k, v, packed.lengths, bias=bias, kernel="nested")
    with pytest.raises(ValueError, match="kernel must be one of groups, nested"):
        varlen_attention(q, k, v, packed.lengths, kernel="flash")


# -------------------------------------------------------------------------- records of a packed block
@pytest.mark.parametrize("prop", [False, True], ids=["plain", "size-bias"])
@pytest.mark.parametrize(
    ("name", "records"), [("joint-tiny", {KEYS, CLS_ATTN}), ("videomae-tiny", {KEYS, ATTN_RECEIVED})]
)
def test_packed_block_records_what_the_padded_block_records(name: str, records: set[str], prop: bool) -> None:
    model = _sharp(name)
    state = model.embed(tiny_video(name, BATCH), model.config.grid)
    chosen = torch.rand(BATCH, state.x.shape[1]) < torch.tensor([0.2, 0.6, 0.9, 0.4]).unsqueeze(1)
    state = compact(state, chosen)
    assert _is_ragged(state)
    if prop:  # merged tokens: proportional attention adds log(size) of each key
        state = state.replace(size=torch.rand(state.pos.shape) * 4 + 1).with_aux(**{PROP_ATTN: True})
    block = model.blocks[0]
    block.record = frozenset(records)
    out = {}
    for how in RAGGED:
        block.ragged = how
        with torch.no_grad():
            out[how] = block(state)
    packed, padded, real = out["packed"], out["padded"], state.mask
    assert set(packed.aux) >= records and set(padded.aux) >= records
    torch.testing.assert_close(packed.x[real], padded.x[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed.x[real], state.x[real], atol=1e-3)  # the block did something
    if state.cls is not None:
        torch.testing.assert_close(packed.cls, padded.cls, rtol=1e-5, atol=1e-5)
    for key in records:
        torch.testing.assert_close(packed.aux[key][real], padded.aux[key][real], rtol=1e-5, atol=1e-5)
        if key != KEYS:  # attention paid to padding: none on either path
            assert not packed.aux[key][~real].any() and not padded.aux[key][~real].any()
            assert (packed.aux[key][real] > 0).all()


def test_received_attention_averages_over_real_queries_with_an_additive_mask() -> None:
    # Regression: with proportional attention (an additive mask, -inf at padding) the padded path also
    # averaged the attention of the padding queries, so it disagreed with the packed path.
    q, k = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    real = torch.tensor([[True, True, True, False, False], [True] * 5])[:, None, None, :]  # (B, 1, 1, N)
    log_size = torch.rand(2, 1, 1, 5)
    additive = log_size.masked_fill(~real, float("-inf"))
    got = layers.received_attention(q, k, additive)
    clip = layers.received_attention(q[:1, :, :3], k[:1, :, :3], log_size[:1, :, :, :3])  # without padding
    torch.testing.assert_close(got[:1, :3], clip, rtol=1e-6, atol=1e-7)
    assert not got[0, 3:].any()
    torch.testing.assert_close(got[1:], layers.received_attention(q[1:], k[1:], log_size[1:]))
    torch.testing.assert_close(  # a zero bias is the boolean mask
        layers.received_attention(q, k, torch.zeros_like(log_size).masked_fill(~real, float("-inf"))),
        layers.received_attention(q, k, real),
    )


# ------------------------------------------------------------------------------------------- compact
def test_compact_keeps_the_chosen_tokens_first_in_order() -> None:
    x = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    state = _state(x, (5, 1, 1), size=torch.arange(1.0, 11.0).view(2, 5))
    state = state.with_aux(**{KEYS: x * 10, CLS_ATTN: x[..., 0] / 100, "other": "untouched"})
    assert TOKEN_AUX[KEYS] and TOKEN_AUX[CLS_ATTN] and "other" not in TOKEN_AUX
    chosen = torch.tensor([[True, False, True, False, True], [False, False, False, True, False]])
    out = compact(state, chosen)
    out.check()
    assert out.x.shape == (2, 3, 2)  # trimmed to the most a clip keeps
    assert out.mask.tolist() == [[True, True, True], [True, False, False]]
    assert out.lengths == (3, 1) and out.frames is None
    assert out.pos[0].tolist() == [0, 2, 4] and out.pos[1, 0].item() == 3
    for b, idx in ((0, [0, 2, 4]), (1, [3])):
        n = len(idx)
        assert torch.equal(out.x[b, :n], x[b, idx])
        assert torch.equal(out.size[b, :n], state.size[b, idx])
        assert torch.equal(out.aux[KEYS][b, :n], state.aux[KEYS][b, idx])
        assert torch.equal(out.aux[CLS_ATTN][b, :n], state.aux[CLS_ATTN][b, idx])
    assert out.aux["other"] == "untouched"


def test_compact_with_equal_counts_is_dense_in_the_frames_given() -> None:
    state = _state(torch.randn(2, 6, 3), (3, 1, 2))
    chosen = torch.tensor([[True, False, False, True, True, False], [False, True, True, False, False, True]])
    out = compact(state, chosen, frames=3)  # one token of each frame in each clip
    out.check()
    assert out.mask is None and out.lengths is None and out.frames == 3
    assert out.pos.tolist() == [[0, 3, 4], [1, 2, 5]]
    assert compact(state, torch.ones(2, 6, dtype=torch.bool)) is state  # everything: nothing moves


def test_compact_never_chooses_input_padding() -> None:
    chosen = torch.zeros(3, 6, dtype=torch.bool)
    for b, idx in enumerate(([1, 4], [0, 2, 3, 5], range(6))):
        chosen[b, list(idx)] = True
    state = compact(_state(torch.randn(3, 6, 2), (1, 2, 3)), chosen)
    assert state.lengths == (2, 4, 6)
    out = compact(state, torch.ones(3, 6, dtype=torch.bool))  # padding "chosen" too
    assert out.lengths == (2, 4, 6) and torch.equal(out.mask, state.mask)
    assert _kept_pos(out) == _kept_pos(state)
    # Only padding chosen in clip 0: it keeps nothing.
    with pytest.raises(ts.InputError, match=r"kept no token of clip 0 of the batch \(counts \[0, 4, 6\]\)"):
        compact(state, ~state.mask | torch.tensor([[False], [True], [True]]))


def test_compact_refuses_a_clip_left_with_no_token() -> None:
    state = _state(torch.randn(3, 4, 2), (1, 2, 2))
    chosen = torch.tensor([[True, False, True, True], [True, True, True, True], [False] * 4])
    with pytest.raises(ts.InputError, match=r"clip 2 of the batch.*every clip needs at least one real token"):
        compact(state, chosen)


# ------------------------------------------------------------------------------------------ keep_top
SCORES = torch.tensor([
    [0.0, 9, 1, 8, 2, 7, 3, 6, 4, 5],
    [5, 4, 3, 2, 1, 0, 9, 8, 7, 6],
    [3, 1, 4, 1, 5, 9, 2, 6, 5, 3],
])  # fmt: skip


def test_keep_top_with_a_ratio_per_clip() -> None:
    state = _state(torch.randn(3, 10, 4), (1, 2, 5))
    out = keep_top(state, SCORES, torch.tensor([0.5, 1.0, 0.2]))
    out.check()
    assert out.lengths == (5, 10, 2)  # round(0.5 * 10), all 10, round(0.2 * 10)
    # The highest scores, in their original order.
    assert _kept_pos(out) == [[1, 3, 5, 7, 9], list(range(10)), [5, 7]]
    assert torch.equal(out.x[0, :5], state.x[0, [1, 3, 5, 7, 9]])


def test_keep_top_with_a_ratio_per_clip_per_frame() -> None:
    state = _state(torch.randn(3, 10, 4), (2, 1, 5))  # 2 frames of 5 tokens
    out = keep_top(state, SCORES, torch.tensor([0.4, 1.0, 0.2]), per_frame=True)
    out.check()
    assert out.lengths == (4, 10, 2) and out.frames is None  # 2, 5 and 1 of each frame
    assert _kept_pos(out) == [[1, 3, 5, 7], list(range(10)), [4, 5]]
    dense = keep_top(state, SCORES, torch.tensor([0.4, 0.4, 0.4]), per_frame=True)  # equal counts
    dense.check()
    assert dense.mask is None and dense.frames == 2
    assert dense.pos.tolist() == [[1, 3, 5, 7], [0, 1, 6, 7], [2, 4, 5, 7]]


def test_keep_top_with_a_fixed_ratio_on_a_ragged_batch_keeps_real_tokens_only() -> None:
    state = _state(torch.randn(3, 10, 4), (1, 1, 10))
    chosen = torch.zeros(3, 10, dtype=torch.bool)
    for b, idx in enumerate(([0, 2, 3, 5, 7, 9], [1, 4, 8], [6])):
        chosen[b, idx] = True
    state = compact(state, chosen)
    assert state.lengths == (6, 3, 1)
    high = 100.0  # padding would win on its score
    scores = torch.tensor(
        [[1.0, 5, 2, 6, 3, 4], [3, 1, 2, high, high, high], [0, high, high, high, high, high]]
    )
    out = keep_top(state, scores, 0.5)
    out.check()
    assert out.lengths == (3, 2, 1)  # round(0.5 * 6), round(0.5 * 3) (to even), at least one
    assert _kept_pos(out) == [[2, 5, 9], [1, 8], [6]]


@pytest.mark.parametrize("bad", [0.0, 1.5, math.nan])
def test_keep_top_refuses_a_ratio_outside_zero_one(bad: float) -> None:
    state = _state(torch.randn(3, 10, 4), (1, 2, 5))
    with pytest.raises(ts.InputError, match=r"\(0, 1\]; clip 1 of the batch is not"):
        keep_top(state, SCORES, torch.tensor([0.5, bad, 1.0]))


def test_keep_top_refuses_ratios_of_the_wrong_shape() -> None:
    state = _state(torch.randn(3, 10, 4), (1, 2, 5))
    with pytest.raises(ValueError, match=r"per-clip keep ratios must be \(B=3,\)"):
        keep_top(state, SCORES, torch.tensor([0.5, 0.5]))


# --------------------------------------------------------------------------------------- mass_chosen
@pytest.mark.parametrize(
    ("scores", "mass", "chosen"),
    [
        ([0.5, 0.1, 0.3, 0.1], 0.75, [1, 0, 1, 0]),  # 0.5 then 0.3; before the next, 0.8 >= 0.75
        ([0.5, 0.1, 0.3, 0.1], 1.0, [1, 1, 1, 1]),
        ([0.5, 0.0, 0.25, 0.0], 1.0, [1, 0, 1, 0]),  # zero scores: what comes before them is the total
        ([0.25, 0.25, 0.25, 0.25], 0.5, [1, 1, 0, 0]),  # ties: current order first
        ([0.1, 0.7, 0.1, 0.1], 0.5, [0, 1, 0, 0]),  # the crossing token is kept, nothing after it
    ],
)
def test_mass_chosen_by_hand(scores: list[float], mass: float, chosen: list[int]) -> None:
    assert mass_chosen(torch.tensor([scores]), mass).long().tolist() == [chosen]


def test_mass_chosen_never_chooses_padding() -> None:
    scores = torch.tensor([[0.125, 0.5, 0.25, 0.5], [0.125, 0.5, 0.25, 0.5]])
    mask = torch.tensor([[True, False, True, True], [True, True, True, True]])
    # Clip 0: real total 0.875, half is 0.4375: token 3 alone; token 1 (0.5) is padding.
    assert mass_chosen(scores, 0.5, mask).tolist() == [
        [False, False, False, True],
        [False, True, False, True],
    ]
    assert mass_chosen(scores, 1.0, mask).tolist() == [[True, False, True, True], [True] * 4]


@pytest.mark.parametrize("name", JOINT)
def test_attention_mass_keeps_the_fewest_tokens_holding_the_share(name: str) -> None:
    mass = 0.6
    model = _sharp(name, f"attention:mass={mass},at=0")
    seen: list[tuple[TokenState, TokenState]] = []
    (slot,) = model.installed.slots
    slot.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        model(tiny_video(name, BATCH))
    (before, after), key = seen[0], CLS_ATTN if model.config.has_cls else ATTN_RECEIVED
    assert _is_ragged(after)
    for b, kept in enumerate(_kept_pos(after)):
        scores = before.aux[key][b].double()
        ranked = scores.sort(descending=True)
        k, total = len(kept), scores.sum()
        assert ranked.values[: k - 1].sum() < mass * total <= ranked.values[:k].sum()  # fewest holding it
        assert kept == sorted(before.pos[b, ranked.indices[:k]].tolist())  # those with most attention


# ------------------------------------------------------------------------------------- InstalledPlan
def _logits(model: ts.VideoBackbone, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(video)


def test_installed_plan_removes_and_installs_the_same_reducers() -> None:
    model = _sharp("joint-tiny")
    video = tiny_video("joint-tiny", BATCH)
    bare = _logits(model, video)
    installed = ts.apply(model, "attention:mass=0.6,at=0+random:keep=0.5,at=2")
    assert installed.model is model and installed.installed
    reducers = list(model.plan)
    reduced = _logits(model, video)
    assert not torch.allclose(reduced, bare, atol=1e-3)
    installed.remove()
    assert not installed.installed and len(model.plan) == 0 and model.spec is None
    assert torch.equal(_logits(model, video), bare)
    assert installed.install() is installed
    assert model.plan is installed.reducers and list(model.plan) == reducers  # the same objects
    assert model.spec == installed.spec == "attention:mass=0.6,at=0+random:keep=0.5,at=2"
    assert torch.equal(_logits(model, video), reduced)


def test_with_block_puts_back_the_plan_installed_before() -> None:
    model = _sharp("joint-tiny")
    video = tiny_video("joint-tiny", BATCH)
    first = ts.apply(model, "tome:r=2")
    merged = _logits(model, video)
    with ts.apply(model, "random:keep=0.5") as outer:
        assert model.plan is outer.reducers and not first.installed
        dropped = _logits(model, video)
        assert not torch.allclose(dropped, merged, atol=1e-3)
        with ts.apply(model, "attention:mass=0.9") as inner:
            assert model.plan is inner.reducers and model.spec == "attention:mass=0.9"
        assert outer.installed and model.plan is outer.reducers
        assert torch.equal(_logits(model, video), dropped)
    assert first.installed and model.plan is first.reducers and model.spec == "tome:r=2"
    assert torch.equal(_logits(model, video), merged)
    bare = ts.build("joint-tiny")
    with ts.apply(bare, "random:keep=0.5"):
        assert len(bare.plan) == 1
    assert len(bare.plan) == 0 and bare.spec is None  # back to bare
    assert all(isinstance(slot, torch.nn.Identity) for slot in bare.reducers)


@pytest.mark.parametrize(
    ("spec", "ragged"),
    [
        ("attention:mass=0.9", [True]),
        ("random:keep=0.5", [False]),
        ("attention:mass=0.6,at=0+random:keep=0.5,at=2", [True, True]),  # ragged stays ragged
        ("random:keep=0.5,at=0+attention:keep=0.5,at=1", [False, False]),
    ],
)
def test_installed_plan_knows_where_it_is_adaptive(spec: str, ragged: list[bool]) -> None:
    installed = ts.apply(ts.build("videomae-tiny"), spec)
    assert [step.after.ragged for step in installed.steps] == ragged
    assert installed.adaptive == any(ragged)
    assert not installed.steps[0].before.ragged
    for earlier, later in zip(installed.steps, installed.steps[1:], strict=False):
        assert later.before == earlier.after
    if ragged[0]:
        assert installed.steps[0].after.tokens == 32 and installed.steps[0].after.frames is None


# ------------------------------------------------------------------------------------------ bad input
def test_an_unknown_ragged_mode_is_refused() -> None:
    model = ts.build("videomae-tiny")
    with pytest.raises(ts.InputError, match="ragged must be one of packed, padded, got 'sparse'"):
        model.ragged = "sparse"  # type: ignore[assignment]
    assert model.ragged == "packed" and all(block.ragged == "packed" for block in model.blocks)


def test_a_clip_without_real_tokens_is_refused_by_a_packed_block() -> None:
    block = ts.build("videomae-tiny").blocks[0]
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    state = _state(torch.randn(2, 4, 32), (1, 2, 2), mask=mask, frames=None)
    with pytest.raises(ts.InputError, match=r"holds no real token \(counts \[2, 0\]\)"):
        block(state)


def test_a_clip_of_its_class_token_alone_runs_as_on_its_own() -> None:
    """Every patch token of clip 1 halted (HaltingVT): its class token runs on, attending to itself."""
    block = ts.build("joint-tiny").blocks[0].eval()
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    state = _state(torch.randn(2, 4, 32), (1, 2, 2), cls=torch.randn(2, 1, 32), mask=mask, frames=None)
    with torch.no_grad():
        packed = block(state)
        block.ragged = "padded"
        padded = block(state)
        alone = block(TokenState(x=state.x[1:, :0], pos=state.pos[1:, :0], grid=(1, 2, 2), cls=state.cls[1:]))
    torch.testing.assert_close(packed.cls, padded.cls, atol=1e-6, rtol=0)
    torch.testing.assert_close(packed.cls[1:], alone.cls, atol=1e-6, rtol=0)


def test_tiles_hold_whole_clips_up_to_the_limit() -> None:
    packed = layers.Packed(torch.zeros(0, dtype=torch.long), (3, 5, 2, 9, 1, 1), torch.zeros(0), (6, 9))
    assert packed.tiles(7) == [(0, 3, (3,)), (3, 10, (5, 2)), (10, 19, (9,)), (19, 21, (1, 1))]
    assert packed.tiles(None) == [(0, 21, (3, 5, 2, 9, 1, 1))]


@pytest.mark.parametrize("name", JOINT)
def test_blocks_with_nothing_between_them_run_as_one_packed_run(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `attention:mass` inside block 0, blocks 1 and 2 go through packed together (one call of
    `run_packed`, the blocks themselves not called); a block watched by a hook runs on its own, so the
    hook sees it; the logits are the same either way."""
    model = _sharp(name, "attention:mass=0.6,at=0")
    video = tiny_video(name, BATCH)
    runs: list[int] = []
    real = base.run_packed

    def counting(blocks: list[torch.nn.Module], state: TokenState) -> TokenState:
        runs.append(len(blocks))
        return real(blocks, state)

    monkeypatch.setattr(base, "run_packed", counting)
    with torch.no_grad():
        together = model(video)
        assert runs == [2]
        seen: list[int] = []
        hook = model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].x.shape[1]))
        apart = model(video)
        hook.remove()
    assert runs == [2] and len(seen) == 1  # block 1 ran on its own (its hook saw it), block 2 alone too
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


def test_timesformer_runs_a_ragged_batch_after_its_last_divided_attention() -> None:
    """Divided attention never takes a ragged batch (`apply` refuses it), but the last block's MLP and
    the head do: `attention:mass` inside the last block leaves one, and packed = padded = one by one."""
    model = _sharp("timesformer-tiny", "attention:mass=0.6,at=2")
    video = tiny_video("timesformer-tiny", BATCH)
    with torch.no_grad():
        assert _is_ragged(model.forward_features(video))
        packed = model(video)
        model.ragged = "padded"
        padded = model(video)
        alone = torch.cat([model(video[b : b + 1]) for b in range(BATCH)])
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ts.InputError, match=r"TimeSformer block 2 \(divided space-time attention\)"):
        ts.apply(model, "attention:mass=0.6,at=1")
