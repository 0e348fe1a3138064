"""STTS: gradients reach the scorers, hand-checked temporal and anchor selections, the soft paths
against a re-statement of the released code's order (pool raw scores, then min-max), the Jacobian
choice, sigma decay, GFLOPs with the scorer counted, and the bad-input errors. (The contract suite
covers the rest.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tokensieve as ts
from conftest import tiny_video
from tokensieve import rng
from tokensieve.errors import InputError
from tokensieve.reducers.stts import Scorer, SpatioTemporalSelection, anchor_grid, min_max
from tokensieve.tokens import CLIP_KEY, TokenState


class FixedScores(nn.Module):
    """Stands in for a scorer: returns given scores (B, L) whatever the input."""

    def __init__(self, scores: Tensor) -> None:
        super().__init__()
        self.scores = scores

    def forward(self, q: Tensor) -> Tensor:
        return self.scores.expand(q.shape[0], -1)


def _embedded(model: ts.VideoBackbone, video: Tensor) -> TokenState:
    """The state the first reducer slot sees: embedded tokens plus the clip keys (`forward_features`)."""
    return model.embed(video, model.config.grid).with_aux(**{CLIP_KEY: rng.clip_keys(video)})


def _noise(video: Tensor, rows: int, samples: int, L: int, *, stage: int = 0, step: int = 0) -> Tensor:
    """The perturbation noise STTS draws for `video` in training: keyed by clip, stream (seed 0,
    stage, step), `rows` score rows per clip; (B*rows, samples, L)."""
    keys = rng.clip_keys(video)
    return rng.normal(keys, (rows, samples, L), stream=rng.stream(0, stage, step), dtype=video.dtype).view(
        -1, samples, L
    )


def _stts(model: ts.VideoBackbone) -> SpatioTemporalSelection:
    (reducer,) = model.plan
    assert isinstance(reducer, SpatioTemporalSelection)
    return reducer


@pytest.mark.parametrize(
    "spec", ["stts:T0=0.5,samples=64", "stts:S1=0.6,samples=64", "stts:T0=0.5,S1=0.6,pool=meanmax"]
)
def test_gradients_reach_the_scorers_in_training(spec: str) -> None:
    model = ts.apply(ts.build("joint-tiny").train(), spec).model
    model(tiny_video("joint-tiny")).logsumexp(-1).sum().backward()
    for selection in _stts(model).selections:
        grads = [p.grad for p in selection.scorer.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, selection.kind


def test_no_gradient_to_the_scorer_in_eval_or_at_sigma_zero() -> None:
    model = ts.apply(ts.build("joint-tiny").train(), "stts:T0=0.5").model
    _stts(model).on_train_step(100, 100)  # sigma decayed to 0: hard selection
    model(tiny_video("joint-tiny")).sum().backward()
    assert all(p.grad is None for p in _stts(model).selections.parameters())


def test_sigma_decays_linearly_to_zero() -> None:
    reducer = ts.plan("stts:T0=0.5,sigma=0.1")[0]
    values = []
    for step in (0, 25, 50, 100):
        reducer.on_train_step(step, 100)
        values.append(reducer.current_sigma)
    assert values == pytest.approx([0.1, 0.075, 0.05, 0.0])


def test_temporal_selection_keeps_the_top_frames_in_time_order() -> None:
    model = ts.apply(ts.build("joint-tiny").eval(), "stts:T0=0.5").model  # 4 frames of 4x4
    _stts(model).selections[0].scorer = FixedScores(torch.tensor([[0.9, 0.1, 0.0, 1.0]]))
    state = model.forward_features(tiny_video("joint-tiny"))
    assert state.frames == 2 and torch.equal(
        state.pos // 16, torch.tensor([0, 3]).repeat_interleave(16).expand(2, -1)
    )


def test_soft_temporal_selection_mixes_frames_with_the_perturbed_indicator() -> None:
    model = ts.apply(ts.build("joint-tiny").train(), "stts:T0=0.5,samples=200,sigma=0.5").model
    reducer = _stts(model)
    scores = torch.tensor([[0.9, 0.1, 0.0, 1.0]])
    reducer.selections[0].scorer = FixedScores(scores)
    video = tiny_video("joint-tiny")
    state = _embedded(model, video)
    out = model.reducers[0](state)
    noise = _noise(video, 1, 200, 4)  # (2, 200, 4)
    Y = ts.ops.perturbed_topk(min_max(scores.expand(2, -1)), 2, num_samples=200, sigma=0.5, noise=noise)
    expected = torch.einsum("bkf,bfnc->bknc", Y, state.per_frame()).reshape(2, 32, -1)
    torch.testing.assert_close(out.x, expected)
    assert out.pos.tolist() == [list(range(16)) + list(range(48, 64))] * 2  # positions: the hard choice


def test_anchor_selection_keeps_the_best_window() -> None:
    assert anchor_grid(4, 4, 0.6, None) == (3, 1, 2, 2)  # P = floor(sqrt(9.6)) = 3, 4 anchors
    assert anchor_grid(14, 14, 0.7367, None) == (12, 1, 3, 3)  # the released config: 9 anchors
    assert anchor_grid(14, 14, 0.5, None) == (9, 2, 3, 3)  # stride max((14 - 9) // 2, 1)
    model = ts.apply(ts.build("joint-tiny").eval(), "stts:S0=0.6").model
    scores = torch.zeros(1, 16)
    scores[0, 15] = 1.0  # the bottom-right token: only the bottom-right 3x3 anchor holds it
    _stts(model).selections[0].scorer = FixedScores(scores)
    state = model.forward_features(tiny_video("joint-tiny"))
    window = [r * 4 + c for r in (1, 2, 3) for c in (1, 2, 3)]
    assert state.frames == 4 and state.pos[0].tolist() == [f * 16 + w for f in range(4) for w in window]


def test_scorer_gives_raw_scores_and_min_max_normalises_them_per_sample() -> None:
    torch.manual_seed(0)
    raw = Scorer(dim=8)(torch.randn(3, 5, 8) * 10)
    assert raw.shape == (3, 5)
    assert not bool((raw.amin(1) == 0).all())  # the scorer itself does not normalise
    scores = min_max(raw)
    torch.testing.assert_close(scores.amin(1), torch.zeros(3), atol=1e-6, rtol=0)
    assert bool((scores.amax(1) > 0.99).all())
    golden = min_max(torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]]))
    torch.testing.assert_close(golden, torch.tensor([[0.0, 2 / (2 + 1e-5), 1 / (2 + 1e-5)], [0.0, 0.0, 0.0]]))


def _raw_scores(scorer: Scorer, q: Tensor) -> Tensor:
    """The scorer's MLP output before any normalisation, spelled out: (B, L, D) -> (B, L)."""
    f_l = scorer.local(scorer.norm(q))  # (B, L, D/2)
    return scorer.score(torch.cat([f_l, f_l.mean(1, keepdim=True).expand_as(f_l)], -1)).squeeze(-1)  # (B, L)


def _released_order_anchor_scores(raw: Tensor, H: int, W: int, P: int, s: int, anchor_pool: str) -> Tensor:
    """The released code's anchor scores, restated: pool the raw token scores (B*F, H*W) over every
    P x P window at stride s (unfold), then min-max over the windows with 1e-5 in the denominator."""
    windows = F.unfold(raw.view(-1, 1, H, W), P, stride=s)  # (B*F, P*P, G)
    pooled = windows.mean(1) if anchor_pool == "mean" else windows.amax(1)  # (B*F, G)
    low, high = pooled.amin(1, keepdim=True), pooled.amax(1, keepdim=True)
    return (pooled - low) / (high - low + 1e-5)  # (B*F, G)


@pytest.mark.parametrize("anchor_pool", ["mean", "max"])
def test_soft_anchor_selection_pools_raw_scores_then_min_maxes(anchor_pool: str) -> None:
    # An untrained scorer (the backbone's init) on joint-tiny: its raw token scores span ~1e-5, the
    # regime where normalising before pooling (then again after) and the released order differ.
    # float64: dividing by a range of ~1e-5 amplifies rounding (avg_pool2d vs unfold) in float32.
    spec = f"stts:S0=0.6,samples=200,sigma=0.5,anchor_pool={anchor_pool}"
    model = ts.apply(ts.build("joint-tiny").train(), spec).model.double()
    scorer = _stts(model).selections[0].scorer
    video = tiny_video("joint-tiny", dtype=torch.float64)
    state = _embedded(model, video)
    x = state.per_frame()  # (B, F, n, C)
    B, F_, n, C = x.shape
    _, H, W = state.grid
    P, s, *_ = anchor_grid(H, W, 0.6, None)  # 3, 1: four anchors per 4x4 frame
    frames = x.reshape(B * F_, n, C)  # (B*F, n, C)

    raw = _raw_scores(scorer, frames)  # (B*F, n)
    anchors = _released_order_anchor_scores(raw, H, W, P, s, anchor_pool)  # (B*F, G)
    normalised_first = _released_order_anchor_scores(min_max(raw), H, W, P, s, anchor_pool)
    assert (anchors - normalised_first).abs().max() > 0.1  # the order matters here
    noise = _noise(video, F_, 200, anchors.shape[1])  # (B*F, 200, G): one draw per frame
    Y = ts.ops.perturbed_topk(anchors, 1, num_samples=200, sigma=0.5, noise=noise)  # (B*F, 1, G)
    windows = F.unfold(frames.transpose(1, 2).reshape(B * F_, C, H, W), P, stride=s)  # (B*F, C*P*P, G)
    mixed = torch.einsum("bg,bdg->bd", Y[:, 0], windows).view(B * F_, C, P * P)  # (B*F, C, P*P)
    expected = mixed.transpose(1, 2).reshape(B, F_ * P * P, C)  # (B, F*P*P, C)
    _assert_same_tokens_and_scorer_gradients(model.reducers[0](state).x, expected, scorer)


def _assert_same_tokens_and_scorer_gradients(got: Tensor, expected: Tensor, scorer: nn.Module) -> None:
    """The reducer's tokens equal the re-statement's, and so do the gradients both send to the scorer."""
    torch.testing.assert_close(got, expected)
    params = list(scorer.parameters())
    grads = torch.autograd.grad(got.square().sum(), params, retain_graph=True)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_soft_temporal_selection_min_maxes_the_scorer_output_then_selects() -> None:
    # The temporal path already followed the released order (score, min-max over frames, top-K);
    # pinned here with the real scorer, its gradients, and both Jacobian estimators.
    video = tiny_video("joint-tiny")
    for jacobian in ("diagonal", "full"):
        model = ts.apply(
            ts.build("joint-tiny").train(), f"stts:T0=0.5,samples=100,sigma=0.5,jacobian={jacobian}"
        ).model
        scorer = _stts(model).selections[0].scorer
        state = _embedded(model, video)
        x = state.per_frame()  # (B, F, n, C)
        B, F_, n, C = x.shape
        Y = ts.ops.perturbed_topk(
            min_max(_raw_scores(scorer, x.amax(2))),
            2,
            num_samples=100,
            sigma=0.5,
            jacobian=jacobian,
            noise=_noise(video, 1, 100, F_),
        )  # (B, 2, F)
        expected = (Y @ x.reshape(B, F_, n * C)).view(B, 2 * n, C)  # (B, 2n, C)
        _assert_same_tokens_and_scorer_gradients(model.reducers[0](state).x, expected, scorer)


def test_training_noise_is_keyed_by_clip_and_step() -> None:
    model = ts.apply(ts.build("joint-tiny").train(), "stts:T0=0.5,S1=0.6,samples=64,sigma=0.5").model
    video = tiny_video("joint-tiny", batch=3)
    together = model.forward_features(video).x
    apart = torch.cat([model.forward_features(video[i : i + 1]).x for i in (0, 1, 2)])
    torch.testing.assert_close(together, apart)  # a clip's soft selection ignores the rest of its batch
    model.plan[0].on_train_step(1, 10)
    model.plan[0].current_sigma = 0.5  # the same sigma: only the step's noise differs
    assert not torch.allclose(model.forward_features(video).x, together)  # the next step draws anew


def test_jacobian_parameter() -> None:
    assert ts.plan("stts:T0=0.5")[0].jacobian == "diagonal"  # the released code's estimator
    reducer = ts.plan("stts:T0=0.5,jacobian=full")[0]
    assert reducer.jacobian == "full" and "jacobian=full" in repr(reducer)
    with pytest.raises(InputError, match="stts: jacobian must be one of diagonal, full; got 'exact'"):
        ts.plan("stts:T0=0.5,jacobian=exact")
    with pytest.raises(InputError, match="stts: jacobian must be one of diagonal, full; got 'exact'"):
        SpatioTemporalSelection(T0=0.5, jacobian="exact")  # type: ignore[arg-type]


def test_jacobian_choice_changes_only_the_scorer_gradient() -> None:
    video = tiny_video("joint-tiny")
    outputs, grads = {}, {}
    for jacobian in ("diagonal", "full"):
        torch.manual_seed(0)
        model = ts.apply(
            ts.build("joint-tiny").train(), f"stts:T0=0.5,S1=0.6,samples=64,jacobian={jacobian}"
        ).model
        torch.manual_seed(1)
        outputs[jacobian] = model(video)
        outputs[jacobian].logsumexp(-1).sum().backward()
        grads[jacobian] = torch.cat([p.grad.flatten() for p in _stts(model).selections.parameters()])
    torch.testing.assert_close(outputs["diagonal"], outputs["full"], rtol=0, atol=0)
    assert not torch.allclose(grads["diagonal"], grads["full"])


def test_gflops_of_half_the_slices_plus_the_scorer() -> None:
    with torch.device("meta"):
        stts = ts.apply(ts.build("videomae-b"), "stts:T0=0.5").model
        uniform = ts.apply(ts.build("videomae-b"), "uniform:keep=0.5").model
        count = ts.flops(stts, detail=True)
    D, F = 768, 8
    scorer = F * (5 * D + D * D // 2 + D * D // 2 + D // 2 * D // 4 + D // 4) / 1e9  # LN + four Linears
    assert count.gflops == pytest.approx(ts.flops(uniform) + scorer, abs=1e-6)
    assert count.gflops == pytest.approx(79.84, abs=1.0)  # 4 of 8 slices: 784 tokens
    reported = sum(v for k, v in count.by_module.items() if k.startswith("reducers.")) / 1e9
    assert reported == pytest.approx(scorer, rel=1e-6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("stts", "needs at least one selection"),
        ("stts:T0=0", r"T0 must be a ratio in \(0, 1\]"),
        ("stts:sigma=-1,T0=0.5", "sigma must be >= 0"),
        ("stts:X0=0.5", r"no parameter 'X0'; valid: stts: T<block>=<float>, S<block>=<float>"),
        ("stts:T0=0.5,T00=0.6", "two T selections before block 0"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ts.plan(spec)


@pytest.mark.parametrize(
    ("name", "spec", "message"),
    [
        ("videomae-tiny", "stts:T0=0.2", "keeps no frame"),
        ("videomae-tiny", "random:keep=0.5+stts:S1=0.5", "needs the same number of tokens in every frame"),
        (
            "videomae-tiny",
            "random:keep=0.5,per_frame=true+stts:S1=0.5",
            "needs a grid of tokens in every frame",
        ),
    ],
)
def test_bad_plans_fail_at_apply(name: str, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ts.apply(ts.build(name), spec)


def test_anchor_larger_than_the_grid() -> None:
    with pytest.raises(ValueError, match="anchor side of 4; it must be between 1 and 2"):
        anchor_grid(2, 8, 1.0, None)


def test_new_reducers_follow_the_model_mode() -> None:
    model = ts.apply(ts.build("videomae-tiny").eval(), "stts:T0=0.5").model
    assert not any(m.training for m in model.plan.modules())
