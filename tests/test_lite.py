"""LITE: the Grad-CAM oracle against a hand computation, the oracle plan, the selector's loss and
training, LITE's published GFLOPs, and LITE++'s per-clip budgets and their calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from conftest import tiny_video
from tokensieve.data import VideoDataset, make_synthetic, read_list
from tokensieve.data.clips import ClipDataset
from tokensieve.engine.calibrate import _choose, _set
from tokensieve.oracle import default_block
from tokensieve.reducers import parse
from tokensieve.reducers.base import keep_count, small_keep
from tokensieve.reducers.oracle import rank_with_ties
from tokensieve.tokens import LOSSES, Inputs


def _model(name: str = "videomae-tiny", **changes: object) -> ts.VideoBackbone:
    torch.manual_seed(0)
    return ts.build(name, num_classes=3, **changes).eval()


# ---------------------------------------------------------------------------------------- oracle
def test_oracle_equals_a_hand_computation_on_a_mean_pooled_model() -> None:
    """On a mean-pooled model, at the last block's output, the gradient of the class logit is the same
    for every token: d y_c / d a_i = J_fc_norm(mean a)^T w_c / N, so Grad-CAM's value of token i is
    ReLU(a_i . g), min-max normalised per clip (computed here from the head alone, without the oracle)."""
    model = _model(depth=2)
    video, labels = tiny_video("videomae-tiny"), torch.tensor([2, 0])
    with torch.no_grad():
        a = model.forward_features(video).x  # (B, N, C): the last block's output
    N = a.shape[1]
    pooled = a.mean(1).requires_grad_()
    score = model.head(model.fc_norm(pooled)).gather(1, labels[:, None]).sum()
    (g,) = torch.autograd.grad(score, pooled)  # (B, C) d y_c / d mean
    value = torch.relu(torch.einsum("bnc,bc->bn", a, g / N))
    low, high = value.amin(1, keepdim=True), value.amax(1, keepdim=True)
    expected = (value - low) / (high - low)
    torch.testing.assert_close(ts.oracle(model, video, labels), expected, rtol=1e-4, atol=1e-5)
    assert default_block(model) == 1


def test_a_class_token_model_reads_the_second_to_last_block_by_default() -> None:
    """The head reads only the class token, so the last block's patch outputs have no gradient: their
    Grad-CAM is 0 everywhere, and the default block is the one before."""
    model = _model("joint-tiny")
    video, labels = tiny_video("joint-tiny"), torch.tensor([1, 2])
    assert default_block(model) == len(model.blocks) - 2
    assert torch.equal(ts.oracle(model, video, labels, block=-1), torch.zeros(2, 64))
    values = ts.oracle(model, video, labels)
    assert values.shape == (2, 64) and values.amax(1).eq(1).all() and values.amin(1).eq(0).all()


@pytest.mark.parametrize("name", ["videomae-tiny", "timesformer-tiny", "joint-tiny"])
def test_predicted_label_is_the_oracle_of_the_top_class(name: str) -> None:
    model = _model(name)
    video = tiny_video(name)
    with torch.no_grad():
        top = model(video).argmax(-1)
    for tensor in ("output", "hidden", "embed"):
        torch.testing.assert_close(
            ts.oracle(model, video, label="pred", tensor=tensor), ts.oracle(model, video, top, tensor=tensor)
        )


def test_the_oracle_runs_bare_and_puts_back_the_plan_and_mode() -> None:
    model = _model()
    video, labels = tiny_video("videomae-tiny"), torch.tensor([0, 1])
    bare = ts.oracle(model, video, labels)
    installed = ts.apply(model, "random:keep=0.5")
    model.train()
    with torch.inference_mode():
        again = ts.oracle(model, video, labels, value="gradnorm")
    assert model.training and model.installed is installed and model.spec == "random:keep=0.5"
    assert torch.equal(ts.oracle(model, video, labels), bare)
    assert again.shape == bare.shape and not again.requires_grad


def test_the_oracle_needs_labels_and_valid_parameters() -> None:
    model, video = _model(), tiny_video("videomae-tiny")
    with pytest.raises(ts.InputError, match="needs the true labels"):
        ts.oracle(model, video)
    with pytest.raises(ts.InputError, match=r"class indices in \[0, 2\]"):
        ts.oracle(model, video, torch.tensor([0, 3]))
    with pytest.raises(ts.InputError, match="block must be in"):
        ts.oracle(model, video, torch.tensor([0, 1]), block=9)
    with pytest.raises(ts.InputError, match="value must be one of"):
        ts.apply(model, "oracle:value=saliency")


def test_ties_are_broken_by_the_random_order() -> None:
    values = torch.tensor([[0.5, 0.0, 0.0, 1.0, 0.0]])
    ties = torch.tensor([[0, 30, 10, 0, 20]])  # among the zeros: token 2, then 4, then 1
    scores = rank_with_ties(values, ties)
    assert scores.argsort(1, descending=True).tolist() == [[3, 0, 2, 4, 1]]


def test_the_oracle_plan_keeps_the_most_valuable_tokens_and_its_pass_is_not_counted() -> None:
    model = _model()
    video, labels = tiny_video("videomae-tiny"), torch.tensor([2, 1])
    values = ts.oracle(model, video, labels, value="gradnorm", tensor="embed")  # no ties: a norm
    ts.apply(model, "oracle:keep=0.25,value=gradnorm,tensor=embed")
    with torch.no_grad():
        kept = model.forward_features(video, inputs=Inputs(video, labels)).pos
    assert kept.tolist() == values.topk(8, 1).indices.sort(1).values.tolist()
    oracle_gflops = ts.flops(model)
    ts.apply(model, "random:keep=0.25")
    assert oracle_gflops == ts.flops(model)  # the backbone on the kept tokens, nothing more


# ---------------------------------------------------------------------------------------- LITE
def test_lite_gflops_on_videomae_b_are_the_papers() -> None:
    """LITE Table 1: 159 / 118 / 80 / 46 GFLOPs at P = 0.9 / 0.7 / 0.5 / 0.3 (the selector counted)."""
    with torch.device("meta"):
        model = ts.build("videomae-b")
    for keep, published in ((0.9, 159), (0.7, 118), (0.5, 80), (0.3, 46)):
        ts.apply(model, f"lite:keep={keep}")
        counted = ts.flops(model)
        assert round(counted) == published and abs(counted - published) < 1
        assert ts.flops(model, detail=True).by_module["reducers.0"] == 1568 * (768 * 256 + 256 * 128 + 128)


def test_lite_loss_is_bce_against_the_teachers_oracle() -> None:
    model = _model()
    video, labels = tiny_video("videomae-tiny"), torch.tensor([0, 2])
    lite = ts.apply(model, "lite:keep=0.5").reducers[0]
    targets = lite.teach(_model(), Inputs(video, labels))
    torch.testing.assert_close(targets, ts.oracle(_model(), video, labels))
    model.train()
    state = model.forward_features(video, inputs=Inputs(video, labels, {"lite": targets}))
    with torch.no_grad():
        logits = lite.selector(model.embed(video, model.config.grid).x)
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    torch.testing.assert_close(state.aux[LOSSES]["lite"], expected)
    with pytest.raises(ts.InputError, match=r"model\.eval"):  # training mode without the teacher's pass
        model.forward_features(video)


def test_lite_without_positions_scores_the_projection_alone() -> None:
    for name in ("videomae-tiny", "joint-tiny", "vivit-tiny"):  # sin-cos, spatial + time, learned positions
        model = _model(name)
        video = tiny_video(name)
        lite = ts.apply(model, "lite:keep=0.5,pos=false").reducers[0]
        state = model.embed(video, model.config.grid)
        with torch.no_grad():
            if name != "joint-tiny":  # Conv3d tubelets
                projection = model.embed.proj(video.transpose(1, 2)).flatten(2).transpose(1, 2)
            else:
                B = video.shape[0]
                projection = (
                    model.embed.proj(video.flatten(0, 1)).flatten(2).transpose(1, 2).reshape(B, -1, 32)
                )
            torch.testing.assert_close(lite.scores(state), lite.selector(projection), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, videos=8, classes=3, frames=4, size=32, patch=8, tubelet=2, partial=True)
    return root


def _clips(root: Path) -> ClipDataset:
    return ClipDataset(read_list(root / "list.txt"), frames=4, size=32, stride=1, num_classes=3)


def test_training_lite_trains_the_selector_alone_against_the_oracle(synthetic: Path) -> None:
    model = _model()
    ts.apply(model, "lite:keep=0.5")
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("plan.")}
    data = _clips(synthetic)
    video = torch.stack([data[i][0] for i in range(4)])
    video = ts.data.transforms.normalize(video, model.config.mean, model.config.std)
    labels = torch.tensor([data[i][1] for i in range(4)])
    lite, teacher = model.plan[0], _model()

    def bce() -> float:
        with torch.no_grad():
            logits = lite.selector(model.embed(video, model.config.grid).x)
        return float(F.binary_cross_entropy_with_logits(logits, lite.teach(teacher, Inputs(video, labels))))

    before = bce()
    ts.train(model, data, epochs=6, batch_size=4, lr=1e-3, reducer_lr=1e-2, workers=0)  # no freeze flag
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())  # the backbone is frozen
    assert bce() < before


# ---------------------------------------------------------------------------------------- LITE++
def test_the_small_budget_is_the_papers() -> None:
    assert [small_keep(p, 0.3) for p in (0.9, 0.7, 0.5)] == [0.3, 0.3, 0.3]
    assert small_keep(0.3, 0.3) == pytest.approx(0.2)
    assert small_keep(0.1, 0.3) == pytest.approx(0.05)  # never above the base budget


def test_the_shorthand_expands_to_adaptive_budgets() -> None:
    assert parse("lite++:keep=0.7,high=0.8,hidden=16") == [
        ("adaptive", {"high": 0.8}), ("lite", {"keep": 0.7, "hidden": 16})
    ]  # fmt: skip
    assert parse("random++:seed=2+tome:r=3")[:2] == [("adaptive", {}), ("random", {"seed": 2})]
    with pytest.raises(ts.InputError, match="unknown method 'tome\\+\\+'"):
        parse("tome++:r=3")
    with pytest.raises(ts.InputError, match="lite\\+\\+ has no parameter 'r'"):
        parse("lite++:r=3")
    model = _model()
    for spec in ("adaptive", "adaptive+tome:r=2", "adaptive+uniform:keep=0.5"):
        with pytest.raises(ts.InputError, match="budgets"):
            ts.apply(model, spec)


class _Judge(torch.nn.Module):
    """A confidence model with a fixed confidence per clip (found by its first value, so in any batch):
    logits over 10 classes whose softmax is the confidence for the first, an equal share for the rest."""

    def __init__(self, video: torch.Tensor, confidence: list[float]) -> None:
        super().__init__()
        self.keys, self.confidence = video[:, 0, 0, 0, 0], torch.tensor(confidence)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        c = self.confidence[(video[:, 0, 0, 0, 0, None] == self.keys).float().argmax(1)]  # (B,)
        return torch.cat([c.log()[:, None], ((1 - c) / 9).log()[:, None].expand(-1, 9)], 1)


@pytest.mark.parametrize(
    ("hard", "small"), [("small", [True, False, True, False]), ("base", [False, False, True, False])]
)
def test_each_clip_keeps_its_budget(hard: str, small: list[bool]) -> None:
    """Confidence above `high`: the small budget; below `low`: small too (hard=small) or the base
    budget (hard=base); in between, the base budget. Each clip keeps keep_count of its budget."""
    model = _model("videomae-tiny", frames=8)  # 64 tokens: 4 slices of 4 x 4
    video = torch.randn(4, 8, 3, 32, 32)
    installed = ts.apply(model, f"lite++:keep=0.7,low=0.3,high=0.8,hard={hard}")
    installed.reducers[0].set_judge(_Judge(video, [0.2, 0.5, 0.9, 0.79]))
    with torch.no_grad():
        state = model.forward_features(video)
    N = model.config.grid[0] * model.config.grid[1] * model.config.grid[2]
    want = [keep_count(0.3 if s else 0.7, N) for s in small]
    assert state.num_tokens.tolist() == want
    per_clip = ts.flops(model, video=video, detail=True).per_clip
    assert [c < max(per_clip) for c in per_clip] == small  # each clip costs what it keeps


def test_the_glance_is_counted_in_the_gflops() -> None:
    """With every clip on the base budget, LITE++ costs LITE plus the glance: the blocks and head on a
    tenth of the tokens (the patch embedding is shared)."""
    model = _model()
    ts.apply(model, "lite++:keep=0.5,low=0,high=1")
    video = tiny_video("videomae-tiny")
    adaptive = ts.flops(model, video=video, detail=True)
    ts.apply(model, "lite:keep=0.5")
    lite = ts.flops(model, detail=True)
    ts.apply(model, "random:keep=0.1")
    glance = ts.flops(model, detail=True)
    assert adaptive.macs / 2 == lite.macs + glance.macs - glance.by_module["embed"]


def test_calibration_keeps_the_best_thresholds_within_the_target() -> None:
    """Four one-view videos, confidences 0.2 / 0.5 / 0.8 / 0.95; the base budget gets all right, the small
    one only the two confident ones. At 7.5 GFLOPs (two views small) the best is to put exactly those
    two on the small budget: high between 0.5 and 0.8, nothing below low."""
    confidence = torch.tensor([0.2, 0.5, 0.8, 0.95])
    labels = torch.tensor([0, 1, 2, 0])
    base = F.one_hot(labels, 3).float()
    small = F.one_hot(torch.tensor([1, 2, 2, 0]), 3).float()  # wrong on the first two
    owner = torch.arange(4)
    cal = _choose("lite++:keep=0.5,high=0.9", confidence, base, small, owner, labels, {"base": 10.0, "small": 5.0},
                  7.5, hard="small")  # fmt: skip
    assert cal.top1 == 1.0 and cal.gflops == 7.5 and cal.small_share == 0.5
    assert 0.5 <= cal.high < 0.8 and cal.low <= 0.2
    assert (cal.base_top1, cal.small_top1) == (1.0, 0.5)
    assert cal.spec == f"lite++:keep=0.5,low={cal.low:g},high={cal.high:g}"
    with pytest.raises(ts.InputError, match="no thresholds reach 4"):
        _choose(
            "lite++", confidence, base, small, owner, labels, {"base": 10.0, "small": 5.0}, 4.0, hard="small"
        )
    assert _set("adaptive:high=0.9+random:keep=0.5", low=0.1) == "adaptive:high=0.9,low=0.1+random:keep=0.5"


def test_calibrate_runs_end_to_end_and_meets_its_target(synthetic: Path) -> None:
    model = _model()
    data = VideoDataset(read_list(synthetic / "list.txt"), frames=4, size=32, stride=1, num_classes=3)
    base, small = 0.0, 0.0
    for spec in ("lite:keep=0.5", "lite:keep=0.3"):
        ts.apply(model, spec)
        base, small = (ts.flops(model), base) if spec.endswith("0.5") else (base, ts.flops(model))
    trained = ts.apply(model, "lite:keep=0.5").reducers[0]  # a "trained" selector: its weights changed
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(0.5)
    weights = {k: v.clone() for k, v in trained.state_dict().items()}
    target = (base + small) / 2 + 0.4 * (base - small)
    cal = ts.calibrate(model, data, "lite++:keep=0.5", gflops=target)
    assert model.spec == "lite:keep=0.5" and model.plan[0] is trained  # the plan is put back
    assert cal.videos == 8 and cal.views == 8 and cal.small_gflops <= cal.gflops <= target
    assert cal.top1 >= max(cal.small_top1, cal.base_top1) or cal.gflops < cal.base_gflops
    cal.install(model)  # the calibrated plan, with the selector it was calibrated with
    assert model.spec == cal.spec and all(
        torch.equal(v, model.plan[1].state_dict()[k]) for k, v in weights.items()
    )
