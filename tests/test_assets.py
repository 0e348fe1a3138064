"""The built-in reference model: it loads, its held-out set renders on demand, and its accuracy, its
GFLOPs and its trained selector's accuracy are what its model card says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tokensieve as ts
from tokensieve import assets
from tokensieve.data import VideoDataset, read_list


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> VideoDataset:
    card = assets.card()
    listed = assets.heldout(cache=tmp_path_factory.mktemp("cache"))
    return VideoDataset(read_list(listed), frames=card["set"]["frames"], size=card["set"]["size"], stride=1,
                        num_classes=card["set"]["classes"])  # fmt: skip


def test_heldout_accuracy_is_the_cards(heldout: VideoDataset) -> None:
    card = assets.card()
    model = ts.load("builtin:synthetic")
    assert model.spec is None and not model.training
    assert len(heldout) == card["heldout"]["videos"]
    summary = ts.evaluate(model, heldout, batch_size=64, workers=0)
    assert summary.top1 == pytest.approx(card["heldout_top1"]["none"], abs=1.5 / len(heldout))
    assert summary.top1 >= 0.9  # what the sweep needs: clearly above chance (25%)
    assert float(ts.flops(model)) == pytest.approx(card["gflops"], rel=1e-5)
    assert model.num_params == card["parameters"]


def test_trained_selector_reproduces_the_cards_accuracy(heldout: VideoDataset) -> None:
    card = assets.card()
    spec = card["selectors"]["stts"]["spec"]
    model = ts.apply(ts.load("builtin:synthetic"), spec).model
    model.plan[0].load_state_dict(assets.selectors()["stts"])
    summary = ts.evaluate(model, heldout, batch_size=64, workers=0)
    assert summary.top1 == pytest.approx(card["heldout_top1"][spec], abs=1.5 / len(heldout))


def test_heldout_renders_once(tmp_path: Path) -> None:
    first = assets.heldout(cache=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert assets.heldout(cache=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert first.parent.parent == tmp_path


def test_unknown_builtin_is_refused() -> None:
    with pytest.raises(
        ts.InputError, match="unknown built-in model 'builtin:nope'; built-in models: builtin:synthetic"
    ):
        ts.load("builtin:nope")
    with pytest.raises(ts.InputError, match="hub ids only"):
        ts.load("builtin:synthetic", revision="main")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENSIEVE_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TOKENSIEVE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x" / "tokensieve"
    assert torch.is_tensor(next(iter(assets.selectors()["stts"].values())))


def test_the_cli_gives_a_built_in_model_its_trained_selector(heldout: VideoDataset, tmp_path: Path) -> None:
    """`tokensieve eval --model builtin:synthetic --plan stts:...` runs the shipped scorer, not a fresh one."""
    import json

    from typer.testing import CliRunner

    from tokensieve.cli import app

    card = assets.card()
    spec = card["selectors"]["stts"]["spec"]
    listed = assets.heldout(cache=tmp_path)
    args = ["eval", "--model", "builtin:synthetic", "--data", str(listed), "--plan", spec, "--stride", "1",
            "--workers", "0", "--batch-size", "64", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top1"] == pytest.approx(
        card["heldout_top1"][spec], abs=1.5 / len(heldout)
    )


def test_shipped_halting_model_reproduces_the_cards_accuracy_and_mean_gflops(heldout: VideoDataset) -> None:
    """`finetuned.safetensors` holds the whole model fine-tuned with HaltingVT's plan; installed on the
    built-in model (as the sweep and every --model builtin:synthetic do) it gives the card's top-1 at the
    card's mean GFLOPs per clip, below what the Glimpser alone costs (halting removes tokens)."""
    card = assets.card()
    spec = card["finetuned"]["halting"]["spec"]
    base = ts.load("builtin:synthetic")
    model = ts.apply(ts.load("builtin:synthetic"), spec).model
    assets.install_selectors(model)
    assert not torch.equal(model.head.weight, base.head.weight)  # the fine-tuned model's, not the base's
    summary = ts.evaluate(model, heldout, batch_size=64, workers=0)
    assert summary.top1 == pytest.approx(card["heldout_top1"][spec], abs=1.5 / len(heldout))
    assert summary.gflops_per_view == pytest.approx(card["heldout_gflops"][spec], rel=1e-4)
    with ts.apply(base, "glimpser:keep=0.5"):
        assert summary.gflops_per_view < float(ts.flops(base))


# The paper's 8 tokens at the middle (a fresh plan averages each slice: 95.2%); 4 tokens before block 0.
@pytest.mark.parametrize(("index", "gain"), [(0, 0.01), (3, 0.2)])
def test_shipped_tokenlearner_plans_reproduce_the_cards_accuracy_and_gflops(
    heldout: VideoDataset, index: int, gain: float, caplog: pytest.LogCaptureFixture
) -> None:
    """TokenLearner's plans learned on the frozen built-in model: installed from the shipped weights they
    give the card's top-1 at the card's GFLOPs (fixed per clip), which a fresh (untrained) plan does not;
    a setting the model ships no weights for is warned about."""
    card = assets.card()
    spec = card["selectors"]["tokenlearner"][index]["spec"]
    model = ts.apply(ts.load("builtin:synthetic"), spec).model
    fresh = ts.evaluate(model, heldout, batch_size=64, workers=0).top1
    assets.install_selectors(model)
    summary = ts.evaluate(model, heldout, batch_size=64, workers=0)
    assert summary.top1 == pytest.approx(card["heldout_top1"][spec], abs=1.5 / len(heldout))
    assert summary.gflops_per_view == pytest.approx(card["heldout_gflops"][spec], abs=1e-6)  # card: 6 places
    assert summary.top1 >= fresh + gain
    ts.apply(model, "tokenlearner:tokens=3")
    assets.install_selectors(model)
    assert "ships no trained tokenlearner:tokens=3 weights; tokenlearner runs untrained" in caplog.text
