"""`ts.save` and `ts.load` of saved models, training runs and their checkpoints: bit-identical
round trips (learned plans included), the folder format, refusing to overwrite, atomic writes, and
one-line errors for damaged or foreign files."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tokensieve as ts
from conftest import tiny_video
from test_datasets import write_video
from tokensieve.backbones.checkpoint import CheckpointMismatchError
from tokensieve.backbones.saved import CONFIG_FILE, FORMAT, WEIGHTS_FILE
from tokensieve.data.clips import ClipDataset
from tokensieve.data.datasets import VideoRecord
from tokensieve.errors import InputError

TINY = [name for name in ts.PRESETS if name.endswith("-tiny")]
# A training-free plan every backbone runs (divided attention needs equal per-frame counts) and that
# records a side result, so the blocks' `record` must come back too.
TRAINING_FREE = "attention:keep=0.5,at=1,per_frame=true"
# MViT's attention records nothing per token and its blocks need whole frames: it drops frames instead.
FRAMES_ONLY = "random_frames:keep=0.5,at=1"
LEARNED = "stts:T0=0.5"


def _training_free(name: str) -> str:
    try:
        ts.apply(ts.build(name), TRAINING_FREE)
    except InputError:
        return FRAMES_ONLY
    return TRAINING_FREE


ROUND_TRIPS = [(name, spec) for name in TINY for spec in ("none", _training_free(name), LEARNED)]


def _trained(name: str, spec: str) -> ts.VideoBackbone:
    """A model whose every parameter, the plan's included, has moved away from its initialisation."""
    torch.manual_seed(0)
    model = ts.apply(ts.build(name), spec).model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        loss = model(tiny_video(name)).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# ---------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(("name", "spec"), ROUND_TRIPS)
def test_save_and_load_give_bit_identical_logits(name: str, spec: str, tmp_path: Path) -> None:
    model = _trained(name, spec)
    if spec == LEARNED:  # the scorers trained: a fresh plan would not reproduce them
        fresh = ts.apply(ts.build(name), spec).model
        assert not torch.equal(model.plan[0].selections[0].scorer.norm.weight, fresh.plan[0].selections[0].scorer.norm.weight)  # fmt: skip
    video = tiny_video(name)
    loaded = ts.load(ts.save(model, tmp_path / "model"))
    assert type(loaded) is type(model) and loaded.config == model.config and loaded.spec == spec
    assert not loaded.training
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    with torch.no_grad():
        assert torch.equal(loaded(video), model(video))


def test_random_plans_restart_from_their_seed(tmp_path: Path) -> None:
    model = ts.apply(ts.build("videomae-tiny"), "random:keep=0.5,seed=3").model.eval()
    loaded = ts.load(ts.save(model, tmp_path / "model"))
    video = tiny_video()
    assert torch.equal(loaded(video), model(video))  # draws keyed by clip and seed: the same selection


def test_float64_weights_stay_float64(tmp_path: Path) -> None:
    model = ts.build("joint-tiny").double().eval()
    loaded = ts.load(ts.save(model, tmp_path / "model"))
    assert next(loaded.parameters()).dtype == torch.float64
    video = tiny_video("joint-tiny", dtype=torch.float64)
    assert torch.equal(loaded(video), model(video))


def test_the_folder_holds_config_spec_weights_and_versions(tmp_path: Path) -> None:
    model = ts.apply(ts.build("videomae-tiny", mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.1)), LEARNED).model
    folder = ts.save(model, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS_FILE, CONFIG_FILE]
    doc = json.loads((folder / CONFIG_FILE).read_text())
    assert (doc["format"], doc["tokensieve"], doc["spec"], doc["weights"]) == (
        FORMAT, ts.__version__, LEARNED, WEIGHTS_FILE,
    )  # fmt: skip
    assert doc["backbone"] == {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.config).items()
    }
    assert load_file(folder / WEIGHTS_FILE).keys() == model.state_dict().keys()  # scorers included
    assert ts.load(folder).config.mean == (0.5, 0.4, 0.3)
    # Any file of the folder names the model too.
    assert ts.load(folder / CONFIG_FILE).spec == ts.load(folder / WEIGHTS_FILE).spec == LEARNED


def test_a_converted_bare_videomae_without_fc_norm_round_trips(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.VideoMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_frames=4, tubelet_size=2,
    )  # fmt: skip
    model = ts.from_hf(transformers.VideoMAEModel(config).eval())
    assert isinstance(model.fc_norm, nn.Identity)  # its config alone would build a LayerNorm
    folder = ts.save(model, tmp_path / "model")
    assert json.loads((folder / CONFIG_FILE).read_text())["removed"] == ["fc_norm"]
    loaded = ts.load(folder)
    assert isinstance(loaded.fc_norm, nn.Identity)
    video = tiny_video()
    assert torch.equal(loaded(video), model(video))


def test_config_changes_apply_to_a_saved_model(tmp_path: Path) -> None:
    folder = ts.save(ts.build("videomae-tiny"), tmp_path / "model")
    assert ts.load(folder, frames=8).config.frames == 8  # fixed sin-cos positions: any clip length
    with pytest.raises(InputError, match="unknown backbone config field"):
        ts.load(folder, frame=8)


# ---------------------------------------------------------------------------------------- writing
def test_save_refuses_a_folder_holding_something_else(tmp_path: Path) -> None:
    model = ts.build("videomae-tiny")
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"refusing to save to .*results: it holds notes\.txt"):
        ts.save(model, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        ts.save(model, tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ts.load(ts.save(model, empty)).config == model.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "results"]  # no temporary left


def test_save_replaces_a_saved_model(tmp_path: Path) -> None:
    target = ts.save(ts.build("videomae-tiny"), tmp_path / "model")
    ts.save(ts.apply(ts.build("joint-tiny"), LEARNED).model, target)
    assert (ts.load(target).config.arch, ts.load(target).spec) == ("vit-cls", LEARNED)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_save_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = ts.save(ts.build("videomae-tiny"), tmp_path / "model")
    before = (target / WEIGHTS_FILE).read_bytes()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tokensieve.backbones.saved.save_file", disk_full)
    for where in (target, tmp_path / "new"):
        with pytest.raises(OSError, match="No space"):
            ts.save(ts.build("joint-tiny"), where)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no "new", no temporary folder
    assert (target / WEIGHTS_FILE).read_bytes() == before


def test_save_refuses_what_it_could_not_load(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="meta device"):
        with torch.device("meta"):
            ts.save(ts.build("videomae-tiny"), tmp_path / "model")
    changed = ts.build("videomae-tiny")
    changed.head = nn.Linear(32, 7)  # not what its config (10 classes) builds
    with pytest.raises(InputError, match=r"structure.*head\.weight"):
        ts.save(changed, tmp_path / "model")
    with pytest.raises(InputError, match="tokensieve backbone"):
        ts.save(nn.Linear(2, 2), tmp_path / "model")
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------------------------------- damaged saved models
def test_damaged_saved_models_fail_naming_the_file(tmp_path: Path) -> None:
    def saved(name: str) -> Path:
        return ts.save(ts.build("videomae-tiny"), tmp_path / name)

    folder = saved("newer")
    doc = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**doc, "format": FORMAT + 1}))
    with pytest.raises(InputError, match="newer tokensieve"):
        ts.load(folder)

    folder = saved("unknown-method")
    (folder / CONFIG_FILE).write_text(json.dumps({**doc, "spec": "bogus:keep=0.5"}))
    with pytest.raises(InputError, match=r"unknown-method/model\.safetensors: cannot install its plan 'bogus:keep=0\.5': unknown method"):  # fmt: skip
        ts.load(folder)

    folder = saved("outside")
    (folder / CONFIG_FILE).write_text(json.dumps({**doc, "weights": "../unknown-method/model.safetensors"}))
    with pytest.raises(InputError, match="'weights' must name a file in its folder"):
        ts.load(folder)

    folder = saved("bad-json")
    (folder / CONFIG_FILE).write_text("{")
    with pytest.raises(InputError, match=rf"{CONFIG_FILE} is not valid JSON"):
        ts.load(folder)

    folder = saved("no-weights")
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(InputError, match="incomplete saved model"):
        ts.load(folder)

    folder = saved("torn-weights")
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"cannot read .*torn-weights/{WEIGHTS_FILE}"):
        ts.load(folder)

    folder = saved("missing-key")
    tensors = load_file(folder / WEIGHTS_FILE)
    del tensors["head.bias"]
    tensors["extra"] = torch.zeros(1)
    save_file(tensors, folder / WEIGHTS_FILE)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)missing keys \(1\):\s+head\.bias.*unexpected keys \(1\):\s+extra"):  # fmt: skip
        ts.load(folder)

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"not a model folder: no tokensieve\.json"):
        ts.load(tmp_path / "empty")
    with pytest.raises(InputError, match="no such file or folder"):
        ts.load(tmp_path / "no" / "last.pt")


# ---------------------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ts.VideoBackbone]:
    """A two-step STTS training run (its folder, keeping step checkpoints) and the trained model."""
    root = tmp_path_factory.mktemp("saved-run")
    records = []
    for i in range(4):
        write_video(root / f"v{i}.mp4", frames=12, seed=i)
        records.append(VideoRecord(f"v{i}", root / f"v{i}.mp4", (i % 3,)))
    torch.manual_seed(0)
    model = ts.apply(ts.build("videomae-tiny", num_classes=3), LEARNED).model
    data = ClipDataset(records, frames=4, size=32, stride=2, num_classes=3)
    ts.train(
        model,
        data,
        out=root / "run",
        batch_size=2,
        workers=0,
        keep_checkpoints=True,
        checkpoint_every=1,
        tensorboard=False,
    )
    return root / "run", model.eval()


def test_a_run_folder_and_its_checkpoints_are_models(run: tuple[Path, ts.VideoBackbone]) -> None:
    folder, trained = run
    video = tiny_video()
    with torch.no_grad():
        expected = trained(video)
    for path in (folder, folder / "last.pt", folder / "step-00000002.pt", str(folder)):
        model = ts.load(path)
        assert model.spec == LEARNED and model.config == trained.config and not model.training
        for (key, a), b in zip(trained.state_dict().items(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b), key
        with torch.no_grad():
            assert torch.equal(model(video), expected)
    first = ts.load(folder / "step-00000001.pt")  # an earlier step is another model
    assert not torch.equal(first.head.weight, trained.head.weight)


def test_a_loaded_run_saves_as_a_model(run: tuple[Path, ts.VideoBackbone], tmp_path: Path) -> None:
    folder, trained = run
    loaded = ts.load(ts.save(ts.load(folder), tmp_path / "stts"))
    video = tiny_video()
    with torch.no_grad():
        assert torch.equal(loaded(video), trained(video))


class Foreign:
    """Not a tensor nor plain data: `torch.load(weights_only=True)` refuses it."""


def _damage(good: Path) -> dict[str, Callable[[Path], None]]:
    """Ways a `last.pt` can be broken or foreign, each writing the file at a path."""
    data = good.read_bytes()
    state = torch.load(good, weights_only=True)

    return {
        "truncated": lambda p: p.write_bytes(data[: len(data) // 2]),
        "empty": lambda p: p.write_bytes(b""),
        "text": lambda p: p.write_text("this is not a checkpoint\n"),
        "random bytes": lambda p: p.write_bytes(os.urandom(4096)),
        "python objects": lambda p: p.write_bytes(pickle.dumps({"model": Foreign()})),
        "a plain state dict": lambda p: torch.save(ts.build("videomae-tiny").state_dict(), p),
        "a tensor": lambda p: torch.save(torch.zeros(3), p),
        "bad weights": lambda p: torch.save({**state, "model": {"a": "b"}}, p),
        "no training state": lambda p: torch.save({k: state[k] for k in ("format", "model", "spec", "backbone")}, p),
        "bad config": lambda p: torch.save({**state, "backbone": {**state["backbone"], "dim": None}}, p),
    }  # fmt: skip


DAMAGES = ["truncated", "empty", "text", "random bytes", "python objects", "a plain state dict", "a tensor",
           "bad weights", "no training state", "bad config"]  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_or_foreign_checkpoint_is_one_input_error_naming_it(
    damage: str, run: tuple[Path, ts.VideoBackbone], tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "last.pt"
    _damage(run[0] / "last.pt")[damage](path)
    if damage != "no training state":  # what a model needs is all there
        for target in (folder, path):
            with pytest.raises(InputError) as err:
                ts.load(target)
            assert str(path) in str(err.value) and "\n" not in str(err.value)
    records = [VideoRecord(f"v{i}", run[0].parent / f"v{i}.mp4", (i % 3,)) for i in range(4)]
    data = ClipDataset(records, frames=4, size=32, stride=2, num_classes=3)
    model = ts.apply(ts.build("videomae-tiny", num_classes=3), LEARNED).model
    with pytest.raises(InputError) as err:
        ts.train(model, data, out=folder, resume=True, batch_size=2, workers=0)
    if damage != "bad config":  # that one is refused by comparing backbones: another message
        assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_a_checkpoint_cut_anywhere_is_one_input_error(
    run: tuple[Path, ts.VideoBackbone], tmp_path: Path
) -> None:
    data = (run[0] / "last.pt").read_bytes()
    path = tmp_path / "last.pt"
    for cut in [
        *range(0, len(data), len(data) // 23),
        len(data) - 1,
    ]:  # torch raises other types at other cuts
        path.write_bytes(data[:cut])
        with pytest.raises(InputError, match=f"cannot read {path}: truncated"):
            ts.load(path)


def test_resuming_into_another_backbone_is_refused(run: tuple[Path, ts.VideoBackbone]) -> None:
    folder, _ = run
    records = [VideoRecord(f"v{i}", folder.parent / f"v{i}.mp4", (i % 3,)) for i in range(4)]
    data = ClipDataset(records, frames=4, size=32, stride=2, num_classes=3)
    other = ts.apply(ts.build("videomae-tiny", num_classes=3, dim=64, mlp_dim=128), LEARNED).model
    with pytest.raises(InputError, match=r"another backbone \(dim: 32 -> 64; mlp_dim: 64 -> 128\)"):
        ts.train(other, data, out=folder, resume=True, batch_size=2, workers=0, epochs=2)
