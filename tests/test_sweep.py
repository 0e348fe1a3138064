"""`ts.sweep`: budgets to settings by hand, the random baseline at matched GFLOPs, one decoding pass,
records per (video, setting) against a plain evaluation, a killed sweep resuming to the same report,
refused settings, and the report it writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import tokensieve as ts
from tokensieve.data import VideoDataset, make_synthetic, read_list
from tokensieve.engine import sweep as sweep_module
from tokensieve.engine.results import read_done, read_results
from tokensieve.engine.sweep import (
    MATCH_TOLERANCE,
    canonical,
    matched_random,
    plan_settings,
    spec_at_budget,
    sweep,
    token_ratio,
)
from tokensieve.errors import InputError
from tokensieve.reducers.plan import parse, weights_key


def _model(**changes: object) -> ts.VideoBackbone:
    torch.manual_seed(0)
    return ts.build("videomae-tiny", num_classes=4, **changes).eval()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, videos=6, classes=4, frames=4, size=32, patch=8, tubelet=2, partial=True)
    return root


def _dataset(root: Path) -> VideoDataset:
    return VideoDataset(read_list(root / "list.txt"), frames=4, size=32, stride=1, num_classes=4)


# ---------------------------------------------------------------------------------------- budgets
def test_token_ratio_by_hand() -> None:
    model = _model(depth=4)  # 2 x 4 x 4 = 32 tokens, 4 blocks
    assert token_ratio(model, None) == 1.0
    assert token_ratio(model, "random:keep=0.5") == 0.5  # 16 tokens in every block
    assert token_ratio(model, "random:keep=0.5,at=2") == (32 + 32 + 16 + 16) / (4 * 32)
    # EViT-style, inside block 1: its attention sees 32 tokens, its MLP 8 (that block counts 20)
    assert token_ratio(model, "attention:keep=0.25,at=1") == (32 + 20 + 8 + 8) / (4 * 32)
    # ToMe merges r inside every block: 32 -> 28 in block 0 (30 on average), ...
    assert token_ratio(model, "tome:r=4") == (30 + 26 + 22 + 18) / (4 * 32)
    assert token_ratio(model, "uniform:keep=0.5") == 0.5  # 1 of 2 slices


def test_spec_at_budget_picks_the_nearest_setting() -> None:
    model = _model(depth=4)
    assert spec_at_budget(model, "random", 0.5) == ("random:keep=0.5", 0.5)
    spec, ratio = spec_at_budget(model, "tome", 0.6)  # r=6: (29+23+17+11)/128 = 0.625; r=7: 0.5625
    assert (spec, ratio) == ("tome:r=6", 0.625)
    spec, ratio = spec_at_budget(model, "attention:per_frame=true", 0.69)  # fixed parameters stay
    assert (spec, ratio) == ("attention:per_frame=true,keep=0.5", (32 + 24 + 16 + 16) / 128)
    with pytest.raises(InputError, match=r"cannot come near a token ratio of 0\.1"):
        spec_at_budget(model, "uniform", 0.1)  # one of two slices is the least: 0.5
    with pytest.raises(InputError, match="leave keep out"):
        spec_at_budget(model, "random:keep=0.3", 0.5)
    with pytest.raises(InputError, match="no budget parameter"):
        spec_at_budget(model, "none", 0.5)


def test_matched_random_is_within_half_a_percent() -> None:
    """The random baseline of every setting costs the setting's GFLOPs within 0.5%."""
    model = _model(frames=8, size=64, depth=4)  # 4 x 8 x 8 = 256 tokens
    settings = plan_settings(model, ["attention", "tome", "sta", "uniform", "random_frames"], [0.35, 0.6])
    ran = [s for s in settings if s.spec and s.method != "none"]
    assert len(ran) >= 6
    for s in ran:
        assert s.random_gflops is not None and s.gflops is not None
        assert abs(s.random_gflops - s.gflops) <= MATCH_TOLERANCE * s.gflops, s
        apply_flops = ts.flops(
            ts.apply(model, f"{s.random},seed=1").model
        )  # the seeds cost the same, counted live
        assert apply_flops == pytest.approx(s.random_gflops, rel=1e-9)
        assert s.seeds == [f"{s.random},seed={i}" for i in range(3)]
    ts.apply(model, None)


def test_matched_random_counts_by_frame_on_divided_attention() -> None:
    torch.manual_seed(0)
    model = ts.build("timesformer-tiny", num_classes=4).eval()
    target = ts.flops(ts.apply(model, "uniform:keep=0.5").model)
    ts.apply(model, None)
    spec = matched_random(model, target, lambda s: ts.flops(ts.apply(model, s).model))
    assert "per_frame=true" in spec
    ts.apply(model, None)


def test_learned_methods_need_trained_weights() -> None:
    model = _model()
    settings = plan_settings(model, ["stts"], [0.5])
    assert "no trained stts weights" in settings[1].refused
    ts.apply(model, "stts:T0=0.5")
    trained = {"stts": model.plan[0].state_dict()}
    ts.apply(model, None)
    settings = plan_settings(model, ["stts"], [0.5], selectors=trained)
    assert settings[1].spec == "stts:T0=0.5" and settings[1].refused is None
    # weights of another selection (two scorers) do not fit a one-selection plan: refused, not crashed
    ts.apply(model, "stts:T0=0.5,S1=0.5")
    two = {"stts": model.plan[0].state_dict()}
    ts.apply(model, None)
    (_, item) = plan_settings(model, ["stts"], [0.5], selectors=two)
    assert item.spec is None and "weights do not fit stts:T0=0.5" in item.refused


def test_canonical_fills_defaults() -> None:
    assert canonical("random:keep=0.5") == canonical("random:seed=0,at=0,keep=0.5,per_frame=false")
    assert canonical("none") == "none"


# ---------------------------------------------------------------------------------------- running
def test_records_equal_a_plain_evaluation(synthetic: Path, tmp_path: Path) -> None:
    """Each (video, setting) record is what `ts.evaluate` gives for that plan alone."""
    model = _model()
    report = sweep(model, _dataset(synthetic), out=tmp_path, methods=["attention", "random"], budgets=[0.6],
                   workers=0, batch_size=4, speed=False, seeds=2)  # fmt: skip
    _, records = read_results(tmp_path / "results.jsonl")
    for setting in report.settings:
        model_copy = ts.apply(_model(), None if setting.spec == "none" else setting.spec).model
        alone = ts.evaluate(model_copy, _dataset(synthetic), workers=0, batch_size=3)
        mine = [r for r in records if r["setting"] == canonical(setting.spec)]
        assert len(mine) == 6
        assert setting.top1 == pytest.approx(alone.top1)
    assert model.spec is None  # the plan it had is back
    assert (tmp_path / "report.md").is_file() and (tmp_path / "pareto.png").is_file()


def test_killed_sweep_resumes_to_the_same_report(synthetic: Path, tmp_path: Path) -> None:
    kwargs = dict(methods=["attention", "tome"], budgets=[0.6], workers=0, batch_size=2, speed=False, seeds=2)
    whole = sweep(_model(), _dataset(synthetic), out=tmp_path / "whole", **kwargs)

    calls = []

    def die(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(_model(), _dataset(synthetic), out=tmp_path / "killed", progress=die, **kwargs)
    recorded = len(read_done(tmp_path / "killed" / "results.jsonl"))
    assert recorded > 0
    seen = []
    resumed = sweep(_model(), _dataset(synthetic), out=tmp_path / "killed",
                    progress=lambda d, t: seen.append(t), **kwargs)  # fmt: skip
    assert resumed.settings == whole.settings
    _, a = read_results(tmp_path / "whole" / "results.jsonl")
    assert seen[0] == len(a) - recorded  # the rerun did only what was missing
    _, b = read_results(tmp_path / "killed" / "results.jsonl")
    key = lambda r: (r["setting"], r["id"])  # noqa: E731
    assert sorted(a, key=key) == sorted(b, key=key)  # nothing lost, nothing twice
    assert len({key(r) for r in b}) == len(b)


def test_another_model_is_refused(synthetic: Path, tmp_path: Path) -> None:
    kwargs = dict(methods=["random"], budgets=[0.5], workers=0, speed=False, seeds=1)
    sweep(_model(), _dataset(synthetic), out=tmp_path, **kwargs)
    other = _model()
    with torch.no_grad():
        other.head.weight.add_(1)
    with pytest.raises(InputError, match="model weights"):
        sweep(other, _dataset(synthetic), out=tmp_path, **kwargs)


def test_bad_budgets_are_refused(synthetic: Path, tmp_path: Path) -> None:
    for budgets in ([0.0], [1.0], [1.5], []):
        with pytest.raises(InputError, match="budgets must be token ratios"):
            sweep(_model(), _dataset(synthetic), out=tmp_path, budgets=budgets)
    with pytest.raises(InputError, match="unknown method 'nope'"):
        sweep(_model(), _dataset(synthetic), out=tmp_path, methods=["nope"], budgets=[0.5])


def test_recall_counts_what_was_kept(synthetic: Path, tmp_path: Path) -> None:
    """With all tokens the foreground recall is 1; with random tokens it is below."""
    report = sweep(_model(), _dataset(synthetic), out=tmp_path, methods=["random"], budgets=[0.25],
                   workers=0, speed=False, seeds=1, truth=synthetic)  # fmt: skip
    none, random = report.settings
    assert none.recall == 1.0
    assert random.recall is not None and random.recall < 1.0
    summary = json.loads(json.dumps([s.recall for s in report.settings]))
    assert summary[0] == 1.0


def test_decode_once(synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every view is decoded once, whatever the number of settings."""
    loads = []
    original = VideoDataset.__getitem__

    def counting(self, index):  # type: ignore[no-untyped-def]
        loads.append(index)
        return original(self, index)

    monkeypatch.setattr(VideoDataset, "__getitem__", counting)
    sweep(_model(), _dataset(synthetic), out=tmp_path, methods=["random", "attention", "tome"],
          budgets=[0.5, 0.7], workers=0, speed=False, seeds=2)  # fmt: skip
    assert sorted(loads) == list(range(6))
    assert sweep_module.SEEDS == 3


def test_a_models_own_trained_plan_is_swept_and_put_back(synthetic: Path, tmp_path: Path) -> None:
    """A model that comes with a learned plan (a training run) sweeps that method with its weights at
    every budget, and keeps its plan."""
    model = ts.apply(_model(), "stts:T0=0.5").model
    with torch.no_grad():
        for p in model.plan.parameters():
            p.normal_()  # "trained": anything but the fresh initialisation
    scorer = {k: v.clone() for k, v in model.plan[0].state_dict().items()}
    report = sweep(model, _dataset(synthetic), out=tmp_path, methods=["stts"], budgets=[0.5], workers=0,
                   speed=False, seeds=1)  # fmt: skip
    (item,) = [s for s in report.settings if s.method == "stts"]
    assert item.refused is None and item.spec == "stts:T0=0.5"
    alone = ts.evaluate(model, _dataset(synthetic), workers=0)  # its own plan, its own weights
    assert item.top1 == pytest.approx(alone.top1)
    assert model.spec == "stts:T0=0.5"
    for k, v in model.plan[0].state_dict().items():
        torch.testing.assert_close(v, scorer[k], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- adaptive
def test_an_adaptive_method_is_measured_and_matched_to_random(synthetic: Path, tmp_path: Path) -> None:
    """`attention:mass` has no budget to set: it runs as one setting whose budget (token ratio) and
    GFLOPs are means measured per video as it ran, and random is matched to that mean in a second
    pass; the records hold each video's measurement, so a resumed sweep gives the same report."""
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)  # sharper attention: the clips keep different counts
    kwargs = dict(methods=["attention:mass=0.6,at=0"], budgets=[0.6], workers=0, batch_size=4, speed=False,
                  seeds=2)  # fmt: skip
    report = sweep(model, _dataset(synthetic), out=tmp_path, **kwargs)
    (adaptive,) = [s for s in report.settings if s.method == "attention:mass=0.6,at=0"]
    _, records = read_results(tmp_path / "results.jsonl")
    mine = [r for r in records if r["setting"] == canonical("attention:mass=0.6,at=0")]
    assert len(mine) == 6 and len({r["gflops"] for r in mine}) > 1  # each video its own cost
    views = torch.cat([_dataset(synthetic)[i].views for i in range(6)])
    x = ts.data.transforms.normalize(views.float().div(255), model.config.mean, model.config.std)
    installed = ts.apply(model, "attention:mass=0.6,at=0")
    per_clip = ts.flops(model, video=x, detail=True).per_clip
    installed.remove()
    assert adaptive.gflops == pytest.approx(sum(per_clip) / 6, rel=1e-9) and adaptive.views == 6
    assert adaptive.budget == pytest.approx(sum(r["ratio"] for r in mine) / 6, abs=0.005)
    assert 0 < adaptive.budget < 1
    assert (
        abs(adaptive.random_gflops / adaptive.gflops - 1) <= MATCH_TOLERANCE + 0.05
    )  # a token is a coarse step
    seeds = [r for r in records if r["setting"].startswith("random:") and "seed=1" in r["setting"]]
    assert len(seeds) == 6 and adaptive.verdict is not None
    assert "‡" in (tmp_path / "report.md").read_text()  # the report says the budget was measured
    again = sweep(model, _dataset(synthetic), out=tmp_path, **kwargs)  # everything recorded: nothing to run
    assert again.settings == report.settings


# ---------------------------------------------------------------------------------------- LITE
def test_the_oracle_reads_the_labels_and_adaptive_budgets_run_at_every_budget(
    synthetic: Path, tmp_path: Path
) -> None:
    """The oracle's records equal an evaluation that passes the labels; `random++` runs at each budget
    with the keep that budget gives `random`, and is measured per video like any adaptive setting."""
    model = _model()
    report = sweep(model, _dataset(synthetic), out=tmp_path, methods=["oracle", "random++:high=0.3"],
                   budgets=[0.5], workers=0, batch_size=4, speed=False, seeds=1)  # fmt: skip
    by = {s.method: s for s in report.settings}
    assert by["oracle"].spec == "oracle:keep=0.5"
    summary = ts.evaluate(ts.apply(_model(), "oracle:keep=0.5").model, _dataset(synthetic), workers=0)
    assert by["oracle"].top1 == pytest.approx(summary.top1)
    plus = by["random++:high=0.3"]
    assert plus.spec == "random++:keep=0.5,high=0.3" and plus.views == 6 and plus.random_spec is not None
    assert plus.budget is not None and plus.budget <= 0.5 + 1e-9  # some clips on the small budget


def test_trained_weights_are_filed_by_what_they_learned() -> None:
    """A selector trained against one oracle never runs under another's name: `lite` weights do not serve
    `lite:value=gradnorm,tensor=embed`, which is refused as untrained; the budget and training settings
    do not matter."""
    model = _model()
    lite = ts.apply(_model(), "lite:keep=0.5").reducers[0]
    settings = plan_settings(model, ["lite", "lite:value=gradnorm,tensor=embed"], [0.5],
                             selectors={"lite": lite.state_dict()}, seeds=1)  # fmt: skip
    by = {s.method: s for s in settings}
    assert by["lite"].spec == "lite:keep=0.5" and by["lite"].refused is None
    assert (
        "no trained lite:tensor=embed,value=gradnorm weights"
        in by["lite:value=gradnorm,tensor=embed"].refused
    )


def test_foreground_recall_needs_clips_that_are_their_videos(synthetic: Path) -> None:
    """The truth masks describe each video's frames in order: clips that skip or loop frames (stride 4 on
    these 4-frame videos) would be scored against the wrong frames, so recall is not measured then."""
    from tokensieve.engine.sweep import _truth_fits

    model = _model()
    assert _truth_fits(model, _dataset(synthetic), synthetic)
    strided = VideoDataset(read_list(synthetic / "list.txt"), frames=4, size=32, stride=4, num_classes=4)
    assert not _truth_fits(model, strided, synthetic)


# ---------------------------------------------------------------------------------------- HaltingVT
def test_a_method_trained_with_its_model_runs_on_those_weights_against_random_on_the_model(
    tmp_path: Path,
) -> None:
    """HaltingVT's trained weights are a whole model's (`trains_backbone`): its setting runs on a copy
    holding them, measured per video, while random is matched on the swept model; without those weights
    it is refused, and weights of another model are refused by name."""
    root = tmp_path / "set"
    make_synthetic(root, videos=6, classes=4, frames=4, size=32, patch=8, tubelet=1, partial=True)
    data = VideoDataset(read_list(root / "list.txt"), frames=4, size=32, stride=1, num_classes=4)
    torch.manual_seed(0)
    model = ts.build("haltingvt-tiny", num_classes=4).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = ts.build("haltingvt-tiny", num_classes=4).eval()  # other weights: "the fine-tuned model"
    ts.apply(tuned, "halting:beta=0,motion=0")
    weights = {k: v.clone() for k, v in tuned.state_dict().items()}
    kwargs = dict(methods=["halting:beta=0,motion=0"], budgets=[0.6], workers=0, batch_size=4, speed=False,
                  seeds=1)  # fmt: skip
    refused = sweep(model, data, out=tmp_path / "none", **kwargs)
    assert "no trained halting:beta=0.0,motion=0.0 weights" in refused.settings[-1].refused
    report = sweep(
        model, data, out=tmp_path / "run", selectors={"halting:beta=0.0,motion=0.0": weights}, **kwargs
    )
    (halting,) = [s for s in report.settings if s.method.startswith("halting")]
    assert halting.refused is None and 0 < halting.budget < 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())  # the swept model is untouched
    _, records = read_results(tmp_path / "run" / "results.jsonl")
    mine = {r["id"]: r for r in records if r["setting"] == canonical(halting.spec)}
    alone = ts.evaluate(tuned, data, workers=0, batch_size=1, out=tmp_path / "alone.jsonl")
    _, evaluated = read_results(tmp_path / "alone.jsonl")
    for r in evaluated:  # the tuned model's predictions
        assert dict(mine[r["id"]]["top5"]) == pytest.approx(dict(r["top5"]), abs=1e-5)
    assert sum(r["gflops"] for r in mine.values()) / 6 == pytest.approx(alone.gflops_per_view, rel=1e-6)
    assert halting.random_gflops is not None and halting.verdict is not None  # random on the swept model
    other = {**weights, "head.weight": torch.zeros(3, 32)}
    misfit = sweep(
        model, data, out=tmp_path / "misfit", selectors={"halting:beta=0.0,motion=0.0": other}, **kwargs
    )
    assert "are not this model's (head.weight differ)" in misfit.settings[-1].refused


def test_a_method_without_budget_whose_cost_is_fixed_runs_once_at_its_own_gflops(tmp_path: Path) -> None:
    """Halting with the released zeroed-but-attended tokens (`halted=zero`) costs the same on every clip:
    one setting at that cost (the Glimpser's), its budget the token ratio, against random matched to it;
    a spec that cannot run on the model is one refused row saying why."""
    root = tmp_path / "set"
    make_synthetic(root, videos=4, classes=4, frames=4, size=32, patch=8, tubelet=1, partial=True)
    data = VideoDataset(read_list(root / "list.txt"), frames=4, size=32, stride=1, num_classes=4)
    torch.manual_seed(0)
    model = ts.build("haltingvt-tiny", num_classes=4).eval()
    spec = "halting:beta=0,motion=0,glimpser=0.5,halted=zero"
    tuned = copy.deepcopy(model)
    ts.apply(tuned, spec)
    report = sweep(model, data, out=tmp_path / "run", methods=[spec, "halting:glimpser=0.5,halted=zero,at=9"],
                   selectors={weights_key(*parse(spec)[-1]): tuned.state_dict()}, budgets=[0.5], workers=0,
                   batch_size=4, speed=False, seeds=1)  # fmt: skip
    zero, bad = report.settings[1:]
    with ts.apply(model, "glimpser:keep=0.5"):
        glimpser = float(ts.flops(model))
    assert (
        zero.refused is None and zero.gflops == pytest.approx(glimpser) and glimpser < float(ts.flops(model))
    )
    assert zero.budget == round(token_ratio(model, "glimpser:keep=0.5"), 2) and zero.random_gflops is not None
    assert zero.views is None and zero.verdict is not None  # measured once, not per clip
    assert bad.spec is None and bad.refused == "halting: at=9 is not a block of this 4-block model"


def test_a_sweep_at_another_input_size_plans_for_its_clips(synthetic: Path, tmp_path: Path) -> None:
    """Clips of 48x48 (6x6 = 36 tokens per frame on a model built for 32x32, 16 per frame): the settings
    are chosen, counted, checked and timed on the clips' grid, so STA's r may exceed what a frame of the
    model's own size holds; each record equals a plain evaluation at that size."""
    model = _model()
    dataset = VideoDataset(read_list(synthetic / "list.txt"), frames=4, size=48, stride=1, num_classes=4)
    report = sweep(model, dataset, out=tmp_path, methods=["sta"], budgets=[0.6], workers=0, batch_size=4,
                   speed=True, seeds=1)  # fmt: skip
    (sta,) = [s for s in report.settings if s.method == "sta"]
    r = int(sta.spec.split("r=")[1].split(",")[0])
    assert sta.refused is None and r >= 16  # too many for a 4x4 frame: refused at the model's own grid
    with pytest.raises(InputError, match="not smaller than the 16 tokens"):
        ts.apply(_model(), sta.spec)
    alone = ts.evaluate(ts.apply(_model(), sta.spec, grid=(2, 6, 6)).model, dataset, workers=0, batch_size=3)
    assert sta.top1 == pytest.approx(alone.top1) and sta.speedup is not None
    assert sta.gflops == pytest.approx(ts.flops(ts.apply(_model(), sta.spec, grid=(2, 6, 6)).model, size=48))
