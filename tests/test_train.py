"""`ts.train` and `ClipDataset`: learning, exact resume, torchrun against one process, parameter
groups and reducer hooks, the schedule, bad input, and the `train` command."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import tokensieve as ts
from test_datasets import write_video
from tokensieve.cli import app
from tokensieve.data.clips import MAX_ATTEMPTS, ClipDataset, collate_clips
from tokensieve.data.datasets import VideoDataset, VideoRecord
from tokensieve.engine.distributed import World
from tokensieve.engine.evaluate import model_checksum
from tokensieve.engine.results import read_results
from tokensieve.engine.train import StepInfo, TrainConfig, epoch_batches, lr_factor, param_groups
from tokensieve.errors import InputError
from tokensieve.reducers.base import REGISTRY, Reducer, Site
from tokensieve.tokens import INPUTS, Inputs, Layout, TokenState


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> list[VideoRecord]:
    """Eight real videos (12 frames of 48x40) with labels 0, 1, 2, 0, ..., and a list file next to them."""
    root = tmp_path_factory.mktemp("train-videos")
    records = []
    for i in range(8):
        write_video(root / f"v{i}.mp4", frames=12, seed=i)
        records.append(VideoRecord(f"v{i}", root / f"v{i}.mp4", (i % 3,)))
    (root / "list.txt").write_text("".join(f"v{i}.mp4 {i % 3}\n" for i in range(8)))
    return records


def _write_flat(path: Path, level: int, seed: int) -> None:
    """A video of noisy frames around one grey level: its class is learnable from any crop or flip."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
        for _ in range(8):
            picture = np.clip(level + rng.integers(-12, 13, size=(40, 48, 3)), 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())


def _data(records: list[VideoRecord], **kwargs: object) -> ClipDataset:
    return ClipDataset(records, frames=4, size=32, stride=2, num_classes=3, **kwargs)


def _model(**changes: object) -> ts.VideoBackbone:
    torch.manual_seed(0)
    return ts.build("videomae-tiny", num_classes=3, **changes)


# ---------------------------------------------------------------------------------------- clips
def test_clips_are_a_pure_function_of_seed_epoch_and_index(videos: list[VideoRecord]) -> None:
    data = _data(videos)
    clip = data[3]
    assert clip.video.shape == (4, 3, 32, 32) and clip.video.dtype == torch.float32
    assert 0 <= clip.video.min() and clip.video.max() <= 1 and clip.label == 0 and clip.failed == ()
    assert torch.equal(_data(videos)[3].video, clip.video)  # another object, same clip
    data.set_epoch(1)
    assert not torch.equal(data[3].video, clip.video)  # a new epoch draws new augmentations
    assert not torch.equal(_data(videos, seed=1)[3].video, clip.video)
    batch = collate_clips([data[0], data[1]])
    assert batch.videos.shape == (2, 4, 3, 32, 32) and batch.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("names", "flips"),
    [
        (["moving left", "moving right", "staying"], False),
        (["Pushing something from left to right", "Dropping something"], False),
        (["Turning RIGHT"], False),
        (["cat", "upright piano", "bright light"], True),  # no direction word
        (None, True),
    ],
)
def test_direction_classes_turn_flips_off(
    videos: list[VideoRecord], names: list[str] | None, flips: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tokensieve.data.clips"):
        data = _data(videos, class_names=names)
    assert data.flip is flips
    assert ("random horizontal flips are off" in caplog.text) is not flips
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokensieve.data.clips"):
        assert _data(videos, class_names=names, flip=False).flip is False
    assert not caplog.text  # asked for no flips: nothing to say


def test_multilabel_clips_have_multi_hot_labels(videos: list[VideoRecord]) -> None:
    records = [VideoRecord(r.id, r.path, (0, 2) if i % 2 else (1,)) for i, r in enumerate(videos)]
    data = _data(records)
    assert (
        data.multilabel and data[1].label.tolist() == [1.0, 0.0, 1.0] and data[0].label.tolist() == [0, 1, 0]
    )
    with pytest.raises(ValueError, match="num_classes"):
        ClipDataset(records, frames=4, size=32)
    with pytest.raises(ValueError, match="labelled"):
        ClipDataset([VideoRecord("x", videos[0].path, ())], frames=4, size=32)


def test_an_unreadable_video_is_replaced_deterministically(
    videos: list[VideoRecord], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "broken.mp4").write_bytes(os.urandom(3000))
    records = [*videos, VideoRecord("broken", tmp_path / "broken.mp4", (1,))]
    with caplog.at_level(logging.WARNING, logger="tokensieve.data.clips"):
        clip = _data(records)[8]
    assert clip.failed and clip.failed[0].startswith("broken: ") and "broken" in caplog.text
    again = _data(records)[8]
    assert torch.equal(again.video, clip.video) and again.label == clip.label  # the same substitute
    everything_broken = [VideoRecord(f"b{i}", tmp_path / "missing.mp4", (0,)) for i in range(3)]
    with pytest.raises(InputError, match=f"{MAX_ATTEMPTS} videos in a row"):
        _data(everything_broken)[0]


def test_training_stops_when_too_many_videos_are_unreadable(
    videos: list[VideoRecord], tmp_path: Path
) -> None:
    records = [*videos[:6], *(VideoRecord(f"gone{i}", tmp_path / f"gone{i}.mp4", (0,)) for i in range(2))]
    with pytest.raises(InputError, match="could not be loaded"):
        ts.train(_model(), _data(records), epochs=3, batch_size=8, workers=0)


# ---------------------------------------------------------------------------------------- learning
def test_a_few_steps_learn_brightness(tmp_path: Path) -> None:
    records = []
    for i in range(6):
        _write_flat(tmp_path / f"b{i}.mp4", level=(40, 128, 215)[i % 3], seed=i)
        records.append(VideoRecord(f"b{i}", tmp_path / f"b{i}.mp4", (i % 3,)))
    result = ts.train(_model(), _data(records), epochs=12, batch_size=6, lr=1e-2, weight_decay=0.0, workers=0)
    losses = [e.loss for e in result.epochs]  # one step per epoch
    assert result.steps == result.total_steps == 12
    assert losses[0] == pytest.approx(math.log(3), abs=0.1)  # chance at the start
    assert sum(losses[-3:]) / 3 < 0.3 * losses[0], losses  # about 0.19 in 12 steps


def test_bfloat16_multilabel_and_label_smoothing_run(videos: list[VideoRecord]) -> None:
    records = [VideoRecord(r.id, r.path, (0, 2) if i % 2 else (1,)) for i, r in enumerate(videos)]
    seen: list[StepInfo] = []
    ts.train(_model(), _data(records), epochs=1, batch_size=4, dtype="bfloat16", label_smoothing=0.1,
             clip_grad=1.0, workers=0, progress=seen.append)  # fmt: skip
    assert len(seen) == 2 and all(math.isfinite(s.loss) and s.loss > 0 for s in seen)


def test_tensorboard_gets_scalars_when_it_imports(
    videos: list[VideoRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[tuple] = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is optional)
        def __init__(self, log_dir: str) -> None:
            written.append(("dir", log_dir))

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            written.append((tag, step))

        def close(self) -> None:
            written.append(("closed",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    val = VideoDataset(videos[:2], frames=4, size=32, stride=2, num_classes=3)
    ts.train(_model(), _data(videos), val=val, out=tmp_path, batch_size=4, log_every=1, workers=0)
    assert written[0] == ("dir", str(tmp_path / "tensorboard")) and written[-1] == ("closed",)
    assert {("train/loss", 1), ("train/loss", 2), ("lr/backbone.decay", 2), ("val/top1", 0)} <= set(written)


# ---------------------------------------------------------------------------------------- resume
def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_equal_tensors(a: object, b: object) -> None:
    """Recursive `torch.equal` over nested dicts / lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_equal_tensors(x, y)
    else:
        assert a == b


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(
    videos: list[VideoRecord], tmp_path: Path
) -> None:
    # Dropout, drop-path and a random reducer (its own generator): every RNG a run has.
    def model() -> ts.VideoBackbone:
        return ts.apply(_model(drop=0.1, drop_path=0.2), "random:keep=0.5").model

    settings = dict(
        epochs=3, batch_size=3, warmup_epochs=1, checkpoint_every=3, workers=0
    )  # 2 steps per epoch
    whole = model()
    expected = ts.train(whole, _data(videos), out=tmp_path / "whole", **settings)

    class Killed(Exception):
        pass

    def kill_at(step: int) -> Callable[[StepInfo], None]:
        def progress(info: StepInfo) -> None:
            if info.step == step:
                raise Killed

        return progress

    out = tmp_path / "resumed"
    with pytest.raises(Killed):  # killed in epoch 1 after step 4; the last checkpoint is step 3, mid-epoch
        ts.train(model(), _data(videos), out=out, progress=kill_at(4), **settings)
    assert _state(out / "last.pt")["step"] == 3
    with pytest.raises(Killed):  # resumed (DataLoader workers now), killed again after step 5
        ts.train(
            model(), _data(videos), out=out, resume=True, progress=kill_at(5), **{**settings, "workers": 1}
        )
    resumed = model()
    result = ts.train(resumed, _data(videos), out=out, resume=True, **settings)
    assert result.resumed_from == 4 and result.steps == expected.steps == 6
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    a, b = _state(tmp_path / "whole" / "last.pt"), _state(out / "last.pt")
    _assert_equal_tensors(a["optimizer"], b["optimizer"])
    _assert_equal_tensors(a["rng"], b["rng"])
    assert [e.loss for e in result.epochs] == [e.loss for e in expected.epochs]
    assert {
        "model",
        "spec",
        "optimizer",
        "scheduler",
        "step",
        "epoch",
        "rng",
        "config",
        "history",
    } <= a.keys()
    assert a["spec"] == "random:keep=0.5" and a["config"]["batch_size"] == 3 and a["epoch"] == 3


def test_each_epochs_evaluation_starts_afresh(videos: list[VideoRecord], tmp_path: Path) -> None:
    # What a run killed during an epoch's evaluation leaves, from weights that (on a GPU) may differ
    # in their last bits from the resumed run's: the epoch's records are redone, not resumed.
    val = VideoDataset(videos[:4], frames=4, size=32, stride=2, num_classes=3)
    stale = tmp_path / "run" / "eval" / "epoch-0.jsonl"
    ts.evaluate(_model(drop=0.0, depth=2).eval(), val, workers=0, out=stale)  # another model's records
    result = ts.train(
        _model(), _data(videos), val=val, out=tmp_path / "run", epochs=1, batch_size=4, workers=0
    )
    provenance, records = read_results(stale)
    assert provenance.checksum == model_checksum(result_model := ts.load(tmp_path / "run"))
    assert len(records) == 4 and result.epochs[0].eval.evaluated == 4 and result_model.spec is None


# ---------------------------------------------------------------------------------------- torchrun
_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
import tokensieve as ts
from tokensieve.data.clips import ClipDataset
from tokensieve.data.datasets import VideoDataset, VideoRecord

root, out, spec = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
records = [VideoRecord(f"v{i}", root / f"v{i}.mp4", (i % 3,)) for i in range(8)]
torch.manual_seed(0)
model = ts.apply(ts.build("videomae-tiny", num_classes=3), spec).model
data = ClipDataset(records, frames=4, size=32, stride=2, num_classes=3)
val = VideoDataset(records[:4], frames=4, size=32, stride=2, num_classes=3)
losses = []
result = ts.train(model, data, val=val, out=out, epochs=2, batch_size=2, workers=0, lr=1e-3,
                  progress=lambda info: losses.append(info.loss))
if int(os.environ["RANK"]) == 0:
    torch.save({"losses": losses, "model": model.state_dict(), "top1": [e.eval.top1 for e in result.epochs]},
               out / "result.pt")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A learned plan whose training draws perturbation noise, composed with a random selection: both
# draw keyed by clip and step, so how the global batch is split across processes changes nothing.
@pytest.mark.parametrize("spec", ["none", "stts:T0=0.5,samples=50+random:keep=0.5,at=1"])
def test_torchrun_two_gloo_processes_match_one(videos: list[VideoRecord], tmp_path: Path, spec: str) -> None:
    losses: list[float] = []
    model = ts.apply(_model(), spec).model
    val = VideoDataset(videos[:4], frames=4, size=32, stride=2, num_classes=3)
    one = ts.train(model, _data(videos), val=val, out=tmp_path / "one", epochs=2, batch_size=4, workers=0,
                   lr=1e-3, progress=lambda info: losses.append(info.loss))  # fmt: skip
    script = tmp_path / "ddp.py"
    script.write_text(_SCRIPT)
    args = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
            str(script), str(videos[0].path.parent), str(tmp_path / "two"), spec]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=True)
    assert len(losses) == len(two["losses"]) == 4  # 8 videos, global batch 4: 2 steps x 2 epochs
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(losses), atol=1e-5, rtol=0)
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(two["model"][name], weight, atol=1e-5, rtol=0, msg=name)
    assert two["top1"] == [e.eval.top1 for e in one.epochs]


def test_ranks_take_interleaved_rows_of_each_global_batch() -> None:
    one = epoch_batches(10, batch_size=4, world=World(), seed=3, epoch=2)  # (2, 4): the last 2 dropped
    assert one.shape == (2, 4) and len(set(one.flatten().tolist())) == 8
    ranks = [epoch_batches(10, batch_size=2, world=World(rank=r, size=2), seed=3, epoch=2) for r in (0, 1)]
    assert torch.equal(ranks[0], one[:, 0::2]) and torch.equal(ranks[1], one[:, 1::2])
    assert not torch.equal(epoch_batches(10, batch_size=4, world=World(), seed=3, epoch=3), one)


# ---------------------------------------------------------------------------------------- reducer hooks
@pytest.fixture
def pull(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Reducer]]:
    """A throwaway reducer with one parameter, which only enters an extra loss pulling it to 2."""

    class Pull(Reducer):
        name = "pull"

        def __init__(self, *, weight: float = 1.0) -> None:
            super().__init__()
            self.weight = weight
            self.gain = nn.Parameter(torch.ones(()))
            self.calls: list[tuple[int, int]] = []

        def positions(self, depth: int) -> tuple[int, ...]:
            return (1,)

        def count(self, layout: Layout, site: Site) -> Layout:
            return layout

        def on_train_step(self, step: int, total_steps: int) -> None:
            self.calls.append((step, total_steps))

        def forward(self, state: TokenState, site: Site) -> TokenState:
            return state.add_loss("pull", self.weight * (self.gain - 2) ** 2)

    monkeypatch.setitem(REGISTRY, "pull", Pull)
    yield Pull


def test_parameter_groups_take_their_learning_rates(pull: type[Reducer]) -> None:
    model = ts.apply(_model(), "pull").model
    groups = {
        g["name"]: g for g in param_groups(model, TrainConfig(lr=1e-3, reducer_lr=0.5, weight_decay=0.1))
    }
    assert set(groups) == {"backbone.decay", "backbone.no_decay", "reducer.no_decay"}
    assert groups["reducer.no_decay"]["params"] == [model.plan[0].gain]
    assert (groups["reducer.no_decay"]["lr"], groups["reducer.no_decay"]["weight_decay"]) == (0.5, 0.0)
    assert (groups["backbone.decay"]["lr"], groups["backbone.decay"]["weight_decay"]) == (1e-3, 0.1)
    decayed = {id(p) for p in groups["backbone.decay"]["params"]}
    assert id(model.head.weight) in decayed and id(model.head.bias) not in decayed
    assert all(p.ndim <= 1 for p in groups["backbone.no_decay"]["params"])


def test_frozen_backbone_hooks_and_extra_losses(pull: type[Reducer], videos: list[VideoRecord]) -> None:
    model = ts.apply(_model(), "pull").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[StepInfo] = []
    ts.train(model, _data(videos), epochs=2, batch_size=4, lr=1e-3, reducer_lr=0.1, freeze_backbone=True,
             workers=0, progress=seen.append)  # fmt: skip
    reducer = model.plan[0]
    assert reducer.calls == [(0, 4), (1, 4), (2, 4), (3, 4)]  # before every step, with the total
    for name, value in model.state_dict().items():
        if name != "plan.0.gain":
            assert torch.equal(value, before[name]), name  # the frozen backbone did not move
    assert 1.2 < float(reducer.gain.detach()) < 2  # the extra loss's gradient reached it (its only source)
    assert all(p.requires_grad for p in model.parameters())  # flags restored after the run
    first = seen[0]
    assert set(first.losses) == {"task", "pull"} and first.losses["pull"] == pytest.approx(1.0)
    assert first.loss == pytest.approx(first.losses["task"] + first.losses["pull"])
    assert first.lr == {"reducer.no_decay": 0.1}  # only the reducer is in the optimizer


@pytest.fixture
def distil(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Reducer]]:
    """A throwaway reducer using the training hook: it asks for a teacher pass (the teacher's logits on
    the step's clips), reads the labels, and adds a loss pulling the student's features to the
    teacher's through one parameter. It records what it saw."""

    class Distil(Reducer):
        name = "distil"
        wants_teacher = True

        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(()))
            self.taught: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
            self.seen: list[Inputs] = []

        def positions(self, depth: int) -> tuple[int, ...]:
            return (depth,)  # the slot after the last block

        def count(self, layout: Layout, site: Site) -> Layout:
            return layout

        def teach(self, teacher: ts.VideoBackbone, inputs: Inputs) -> torch.Tensor:
            self.taught.append((teacher, inputs.video, inputs.labels))
            with torch.no_grad():
                return teacher(inputs.video)

        def forward(self, state: TokenState, site: Site) -> TokenState:
            given = state.aux[INPUTS]
            self.seen.append(given)
            if not self.training:
                return state
            target = given.teacher[self.name]  # (B, K) the teacher's logits
            return state.add_loss("distil", ((self.gain - 1.5) ** 2) * target.shape[0] / given.labels.numel())

    monkeypatch.setitem(REGISTRY, "distil", Distil)
    yield Distil


def test_the_training_hook_gives_reducers_labels_clips_and_a_frozen_teacher(
    distil: type[Reducer], videos: list[VideoRecord]
) -> None:
    model = ts.apply(_model(), "distil").model
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("plan.")}
    seen: list[StepInfo] = []
    ts.train(model, _data(videos), epochs=1, batch_size=4, lr=1e-2, reducer_lr=0.1, workers=0,
             progress=seen.append)  # fmt: skip
    reducer = model.plan[0]
    assert len(reducer.taught) == len(seen) == 2  # one teacher pass before every step (8 clips, batch 4)
    teacher = reducer.taught[0][0]
    assert all(t is teacher for t, _, _ in reducer.taught)  # one teacher for the run
    assert teacher is not model and len(teacher.plan) == 0 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():  # the weights the run began with, not the trained ones
        assert torch.equal(value, before[name]), name
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the model did train
    for (_, video, labels), given in zip(reducer.taught, reducer.seen, strict=True):
        assert given.video is video and given.labels is labels  # the step's own clips and labels
        assert labels.shape == (4,) and labels.dtype == torch.long
        assert given.teacher["distil"].shape == (4, 3)
    assert seen[0].losses["distil"] == pytest.approx(0.25)  # (1 - 1.5)^2: the hook's loss was added


def test_an_explicit_teacher_is_used_and_frozen(distil: type[Reducer], videos: list[VideoRecord]) -> None:
    model = ts.apply(_model(), "distil").model
    teacher = _model(depth=2)
    ts.train(model, _data(videos), epochs=1, batch_size=4, workers=0, teacher=teacher)
    assert all(t is teacher for t, _, _ in model.plan[0].taught)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_warmup_and_cosine_learning_rates(videos: list[VideoRecord]) -> None:
    seen: list[StepInfo] = []
    ts.train(_model(), _data(videos), epochs=2, batch_size=2, lr=1e-2, reducer_lr=0.0, warmup_epochs=0.5,
             min_lr_ratio=0.1, workers=0, progress=seen.append)  # fmt: skip
    total, warmup = 8, 2  # 4 steps per epoch

    def expected(s: int) -> float:
        if s < warmup:
            return 1e-2 * (s + 1) / warmup
        return 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))

    lrs = [info.lr["backbone.decay"] for info in seen]
    assert lrs == pytest.approx([expected(s) for s in range(total)], rel=1e-12)
    assert lrs[0] == pytest.approx(5e-3) and lrs[2] == pytest.approx(1e-2) and lrs[5] == pytest.approx(5.5e-3)
    assert lr_factor(7, total=8, warmup=0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("change", "name"), [({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"), ({"lr": -1.0}, "lr")]
)
def test_bad_settings_name_the_parameter(change: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        TrainConfig(**change)


def test_bad_runs_fail_clearly(videos: list[VideoRecord], tmp_path: Path) -> None:
    data = _data(videos)
    with pytest.raises(ValueError, match="nothing to train"):
        ts.train(ts.apply(_model(), "random:keep=0.5").model, data, freeze_backbone=True, workers=0)
    with pytest.raises(TypeError):
        ts.train(_model(), data, epoch=2)  # a typo is not swallowed
    with pytest.raises(InputError, match="no checkpoint"):
        ts.train(_model(), data, out=tmp_path / "nothing", resume=True, workers=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ts.train(_model(), data, batch_size=9, workers=0)
    out = tmp_path / "run"
    ts.train(ts.apply(_model(), "random:keep=0.5").model, data, out=out, batch_size=8, workers=0)
    with pytest.raises(ValueError, match=r"plan 'random:keep=0\.5'.*plan 'none'"):
        ts.train(_model(), data, out=out, resume=True, batch_size=8, workers=0)
    with pytest.raises(ValueError, match="already holds"):
        ts.train(_model(), data, out=out, batch_size=8, workers=0)


# ---------------------------------------------------------------------------------------- CLI
def test_cli_trains_checkpoints_and_resumes(videos: list[VideoRecord], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["train", "--model", "videomae-tiny", "--data", str(videos[0].path.parent / "list.txt"),
            "--plan", "random:keep=0.5", "--out", str(out), "--batch-size", "4", "--workers", "0",
            "--num-classes", "3", "--stride", "2", "--keep-checkpoints", "--json"]  # fmt: skip
    first = runner.invoke(app, [*args, "--epochs", "1"])
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert (doc["steps"], doc["plan"], doc["resumed_from"]) == (2, "random:keep=0.5", 0)
    assert (out / "last.pt").exists() and json.loads((out / "result.json").read_text())["steps"] == 2
    again = runner.invoke(app, [*args, "--epochs", "1"])
    assert again.exit_code == 2 and "already holds" in again.stderr
    human = [a for a in args if a != "--json"]
    resumed = runner.invoke(
        app, [*human, "--epochs", "2", "--resume", "--val", args[4]], env={"COLUMNS": "200"}
    )
    assert resumed.exit_code == 0, resumed.output
    assert "changed settings" in resumed.stderr and "epochs: 1 -> 2" in resumed.stderr  # warned, not silent
    assert "top-1" in resumed.stdout and "checkpoint:" in resumed.stderr
    doc = json.loads((out / "result.json").read_text())
    assert (doc["steps"], doc["resumed_from"], len(doc["epochs"])) == (4, 2, 2)
    assert doc["epochs"][0]["eval"] is None and doc["epochs"][1]["eval"]["videos"] == 8
    assert (out / "step-00000002.pt").exists() and (out / "step-00000004.pt").exists()
    bad = runner.invoke(app, [*args, "--lr", "-1"])
    assert bad.exit_code == 2
