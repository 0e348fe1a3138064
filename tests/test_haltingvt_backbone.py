"""HaltingVT's backbone: TimeSformer with divided blocks first and joint blocks after
(`BackboneConfig.divided`), and the converter of the released mmaction2 checkpoints (`mmaction.py`).

The converter is checked three ways: the tensors of our own tiny model renamed to the released names
(read from the released `models/backbones/haltingvt_model.py`, `glimpser_helpers.py` and
`models/heads/haltingvt_head.py`) and saved in mmengine's wrapper come back bit for bit; a reference
forward pass written here over the released names, with the released token order (space-major,
`n*T + t`), gives the loaded model's logits; and a damaged state dict is one error listing everything.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import tokensieve as ts
from conftest import tiny_video
from tokensieve.backbones.checkpoint import CheckpointMismatchError
from tokensieve.backbones.config import HALF, PRESETS, preset
from tokensieve.backbones.layers import Block
from tokensieve.backbones.mmaction import config_from_state, halting_spec
from tokensieve.backbones.timesformer import DividedBlock
from tokensieve.errors import InputError

PREFIX = "backbone.model."


# --------------------------------------------------------------------------- 1. the hybrid backbone
def test_blocks_are_divided_then_joint_and_need_says_so() -> None:
    model = ts.build("haltingvt-tiny")
    config = model.config
    assert (config.depth, config.divided_blocks) == (4, 2)
    kinds = [type(block) for block in model.blocks]
    assert kinds == [DividedBlock, DividedBlock, Block, Block]
    needs = [model.need(p)[0] for p in range(config.depth + 1)]  # position depth: after the last block
    assert needs == ["frames"] * 2 + ["tokens"] * 3
    full = ts.build("timesformer-tiny")  # divided=None: every block
    assert all(type(b) is DividedBlock for b in full.blocks)
    assert {full.need(p)[0] for p in range(full.config.depth)} == {"frames"}


def run_with_block_output(model: ts.VideoBackbone, block: int) -> tuple[Tensor, ts.TokenState]:
    """The logits on a tiny clip and the state block `block` returned."""
    seen: list[ts.TokenState] = []
    hook = model.blocks[block].register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        logits = model(tiny_video("haltingvt-tiny"))
    hook.remove()
    return logits, seen[0]


def test_plans_are_checked_against_each_block() -> None:
    model = ts.build("haltingvt-tiny").eval()
    # Unequal frames before a divided block: refused, naming the block.
    for at in (0, 1):
        with pytest.raises(InputError, match=rf"block {at} \(divided space-time attention\) needs the same"):
            ts.apply(model, f"random:keep=0.5,at={at}")
    # Before the first joint block any tokens go; per frame they go anywhere.
    for spec in ("random:keep=0.5,at=2", "random:keep=0.5,per_frame=true"):
        with ts.apply(model, spec):
            logits, last = run_with_block_output(model, 3)
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        assert last.x.shape[1] == 32  # half of 4 frames x 16 patches


def test_haltingvt_s_parameter_count() -> None:
    """DeiT-S has 22,050,664 parameters (22.05M, its paper): patch embedding 3*16*16*384 + 384 = 295,296,
    class token 384, positions 197*384 = 75,648, 12 blocks of 1,774,464 (norms 2*768, qkv 384*1152 + 1152,
    proj 384*384 + 384, fc1 384*1536 + 1536, fc2 1536*384 + 384), final norm 768, head 1000*384 + 1000.
    HaltingVT-S: the head for 200 classes (-385,000 + 77,000), the time embedding (+8*384 = 3,072) and the
    two divided blocks' temporal parts (+2 * 739,968: temporal_norm1 768, temporal_attn 443,520 + 147,840,
    temporal_fc 147,840) = 23,225,672."""
    with torch.device("meta"):
        model = ts.build("haltingvt-s")
    assert sum(p.numel() for p in model.parameters()) == 23_225_672
    with torch.device("meta"):
        deit = ts.build("joint-deit-s", num_classes=1000, frames=1)
    assert sum(p.numel() for p in deit.parameters()) - 384 == 22_050_664  # less its 1-frame time embedding


def test_haltingvt_s_gflops() -> None:
    """The HaltingVT paper reports no GFLOPs for its unreduced backbone (Tables 1-3 list halting models
    only), so this pins the closed form: 55.58 GFLOPs per 8x224 clip, norms included (55.50 without)."""
    with torch.device("meta"):
        model = ts.build("haltingvt-s")
    D, T, S = 384, 8, 196
    N = T * S
    divided = (
        5 * N * D * D + 2 * S * T * T * D  # temporal qkv + proj + temporal_fc; attention per position
        + 4 * T * (S + 1) * D * D + 2 * T * (S + 1) ** 2 * D  # spatial qkv + proj (cls per frame); attention
        + 8 * (N + 1) * D * D  # MLP
    )  # fmt: skip
    joint = 12 * (N + 1) * D * D + 2 * (N + 1) ** 2 * D  # every token and the class token
    fc = ts.flops(model, detail=True)
    assert fc.macs - fc.by_op["norm"] == 2 * divided + 10 * joint + N * 3 * 16 * 16 * D + D * 200
    # Norms, 5 per element: temporal_norm1, norm1 (class token per frame), norm2; joint 2 each; final (cls).
    assert fc.by_op["norm"] == 5 * D * (2 * (N + T * (S + 1) + N + 1) + 10 * 2 * (N + 1) + 1)
    assert ts.flops(model) == pytest.approx(55.58, abs=0.005)


# --------------------------------------------------------------------------- 2. released checkpoints
def released_state(model: ts.VideoBackbone) -> dict[str, Tensor]:
    """Our TimeSformer's tensors under the released recognizer's names: `backbone.model.` + the
    attribute paths of `HaltingVTModel` (the backbone's own head is Identity), `cls_head.fc_cls`."""
    renamed = {
        "embed.cls_token": "cls_token",
        "embed.pos_embed": "pos_embed",
        "embed.time_embed": "time_embed",
        "embed.proj.weight": "patch_embed.proj.weight",
        "embed.proj.bias": "patch_embed.proj.bias",
    }
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("head."):
            out["cls_head.fc_cls." + key.removeprefix("head.")] = value
        else:
            assert key in renamed or key.startswith(("blocks.", "norm.")), key
            out[PREFIX + renamed.get(key, key)] = value
    return out


def block_keys(i: int, *, divided: bool) -> set[str]:
    """A released block's tensors: `GlimpserBlock` (divided) or `JointHaltBlock` (joint)."""
    parts = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    if divided:
        parts += ["temporal_norm1", "temporal_attn.qkv", "temporal_attn.proj", "temporal_fc"]
    return {f"{PREFIX}blocks.{i}.{part}.{w}" for part in parts for w in ("weight", "bias")}


class HistoryBuffer:
    """Stands for mmengine's message-hub history: an object of another library, with numpy arrays,
    which `torch.load(weights_only=True)` refuses."""

    def __init__(self) -> None:
        self._log_history = np.array([2.3, 2.1])
        self._count_history = np.array([1, 1])
        self.max_length = 1_000_000


class ConfigDict(dict):
    """A foreign dict subclass: its items cannot be set on a placeholder."""


CONFIG_TEXT = """model = dict(
    type='HaltingVTRecognizer3D',
    backbone=dict(
        type='HaltingVT',
        num_classes=0,
        divid_depth=2,
        keep_rate=[1.0, 0.5],
        use_halting=True,
        halt_scale=10.0,
        halt_center=20.0,
        eps=0.01),
    cls_head=dict(type='HaltingVTHead', num_classes=200, in_channels=384, use_motion_head=True))
keep_rate = [1.0, 0.5]
"""


def mmengine_file(path: Path, state: dict[str, Tensor], **extra: object) -> Path:
    """`state` in the layout mmengine's runner saves: weights, meta with the config text, training state."""
    ckpt = {
        "meta": {"epoch": 20, "iter": 151_280, "cfg": CONFIG_TEXT, "seed": 0, "mmengine_version": "0.7.3"},
        "state_dict": state,
        "message_hub": {"log_scalars": {"train/loss": HistoryBuffer()}, "runtime_info": {"epoch": 20}},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
        "param_schedulers": [{"T_max": 20, "eta_min": 0.0}],
        **extra,
    }
    torch.save(ckpt, path)
    return path


def randomized(name: str = "haltingvt-tiny", seed: int = 0) -> ts.VideoBackbone:
    """A preset with every tensor random (std 0.2), the time embedding and norms included."""
    model = ts.build(name).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def motion_head(dim: int = 32) -> dict[str, Tensor]:
    return {"cls_head.fc_motion.weight": torch.randn(2, dim), "cls_head.fc_motion.bias": torch.randn(2)}


def test_released_names_are_what_the_released_code_builds() -> None:
    state = released_state(ts.build("haltingvt-tiny"))
    blocks = {k for k in state if ".blocks." in k}
    assert blocks == set().union(*(block_keys(i, divided=i < 2) for i in range(4)))
    embedding = ("cls_token", "pos_embed", "time_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
    rest = {PREFIX + k for k in (*embedding, "norm.weight", "norm.bias")}
    assert set(state) - blocks == rest | {"cls_head.fc_cls.weight", "cls_head.fc_cls.bias"}


def test_round_trip_through_an_mmengine_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ours = randomized()
    path = mmengine_file(tmp_path / "best_acc_top1_epoch_18.pth", {**released_state(ours), **motion_head()})
    with pytest.raises(pickle.UnpicklingError):  # the placeholders are needed: mmengine's objects
        torch.load(path, weights_only=True)
    with caplog.at_level(logging.INFO, logger="tokensieve"):
        model = ts.load(path, heads=2)
    # The config read off the tensors: haltingvt-tiny's shape, haltingvt-s's numerics.
    assert model.config == dataclasses.replace(preset("haltingvt-tiny"), drop_path=0.1, mean=HALF, std=HALF)
    assert not model.training and model.spec is None
    for (key, a), b in zip(ours.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    video = tiny_video("haltingvt-tiny")
    with torch.no_grad():
        assert torch.equal(model(video), ours(video))
    text = caplog.text
    assert "cls_head.fc_motion" in text and "not loaded" in text
    assert "halting:beta=20,gamma=10,glimpser=0.5" in text


def released_forward(state: dict[str, Tensor], video: Tensor, *, heads: int, divided: int) -> Tensor:
    """HaltingVT's recognizer without halting and without Glimpser selection, over the released names,
    with the released layout: class token first, then patch tokens space-major (position n, frame t at
    1 + n*T + t). Plain softmax attention, exact GELU, LayerNorm eps 1e-6."""

    def p(name: str) -> Tensor:
        return state[PREFIX + name]

    def norm(x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], p(name + ".weight"), p(name + ".bias"), eps=1e-6)

    def linear(x: Tensor, name: str) -> Tensor:
        return F.linear(x, p(name + ".weight"), p(name + ".bias"))

    def attention(x: Tensor, name: str) -> Tensor:
        B_, N_, C_ = x.shape
        q, k, v = linear(x, name + ".qkv").view(B_, N_, 3, heads, C_ // heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * (C_ // heads) ** -0.5).softmax(-1)  # (B', nh, N', N')
        return linear((weights @ v).transpose(1, 2).reshape(B_, N_, C_), name + ".proj")

    B, T = video.shape[:2]
    weight = p("patch_embed.proj.weight")
    x = F.conv2d(video.flatten(0, 1), weight, p("patch_embed.proj.bias"), stride=weight.shape[-1])
    x = x.flatten(2).transpose(1, 2) + p("pos_embed")[:, 1:]  # (B*T, S, C)
    S, C = x.shape[1:]
    x = x.view(B, T, S, C).transpose(1, 2) + p("time_embed")[:, None]  # (B, S, T, C)
    x = torch.cat([(p("cls_token") + p("pos_embed")[:, :1]).expand(B, 1, C), x.reshape(B, S * T, C)], 1)
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(PREFIX + "blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        if i < divided:
            cls, patches = x[:, :1], x[:, 1:]  # (B, 1, C), (B, S*T, C)
            xt = patches.reshape(B * S, T, C)  # space-major: each position's frames are contiguous
            yt = attention(norm(xt, b + "temporal_norm1"), b + "temporal_attn")  # (B*S, T, C)
            patches = patches + linear(yt, b + "temporal_fc").reshape(B, S * T, C)
            xs = patches.view(B, S, T, C).transpose(1, 2).reshape(B * T, S, C)  # (B*T, S, C)
            xs = torch.cat(
                [cls.expand(B, T, C).reshape(B * T, 1, C), xs], 1
            )  # the class token in every frame
            ys = attention(norm(xs, b + "norm1"), b + "attn")  # (B*T, 1+S, C)
            cls = cls + ys[:, :1].view(B, T, C).mean(1, keepdim=True)  # averaged over frames
            patches = patches + ys[:, 1:].view(B, T, S, C).transpose(1, 2).reshape(B, S * T, C)
            x = torch.cat([cls, patches], 1)
        else:
            x = x + attention(norm(x, b + "norm1"), b + "attn")
        x = x + linear(F.gelu(linear(norm(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return F.linear(norm(x, "norm")[:, 0], state["cls_head.fc_cls.weight"], state["cls_head.fc_cls.bias"])


def test_loaded_model_computes_the_released_forward(tmp_path: Path) -> None:
    state = released_state(randomized(seed=3))
    model = ts.load(mmengine_file(tmp_path / "epoch_20.pth", state), heads=2)
    video = tiny_video("haltingvt-tiny")
    with torch.no_grad():
        expected = released_forward(state, video, heads=2, divided=2)
        got = model(video)
    assert expected.std() > 0.1, "degenerate logits would make the comparison vacuous"
    assert (got - expected).abs().max() < 1e-5
    # The comparison can tell frame orders apart: reversed frames move the logits ten times the tolerance.
    with torch.no_grad():
        assert (model(video.flip(1)) - got).abs().max() > 1e-4


def test_haltingvt_s_config_from_released_shapes() -> None:
    with torch.device("meta"):
        state = {**released_state(ts.build("haltingvt-s")), **motion_head(384)}
    assert config_from_state(state) == PRESETS["haltingvt-s"]  # heads 384 // 64 = 6
    assert config_from_state(state, heads=12).heads == 12
    jointless = {k: v for k, v in state.items() if ".temporal_" not in k}
    assert config_from_state(jointless).divided == 0


def test_missing_unexpected_and_misshapen_are_one_error(tmp_path: Path) -> None:
    state = released_state(randomized())
    del state[f"{PREFIX}blocks.3.mlp.fc2.bias"]
    state[f"{PREFIX}motion_token"] = torch.zeros(1, 1, 32)  # the released use_motion_token variant's
    state[f"{PREFIX}blocks.2.attn.proj.weight"] = torch.zeros(32, 16)
    path = mmengine_file(tmp_path / "bad.pth", state)
    with pytest.raises(CheckpointMismatchError) as err:
        ts.load(path, heads=2)
    message = str(err.value)
    assert message.startswith(f"{path} (mmaction2 HaltingVT checkpoint) does not fit TimeSformer:")
    for line in (
        "  missing keys (1):",
        "    blocks.3.mlp.fc2.bias",
        "  unexpected keys (1):",
        f"    {PREFIX}motion_token",
        "  shape mismatches (1):",
        "    blocks.2.attn.proj.weight: checkpoint (32, 16) vs model (32, 32)",
    ):
        assert line in message.splitlines(), line


def test_width_without_heads_asks_for_them(tmp_path: Path) -> None:
    path = mmengine_file(tmp_path / "tiny.pth", released_state(ts.build("haltingvt-tiny")))
    with pytest.raises(InputError, match=r"width 32 is not a multiple of 64, DeiT's head width: pass heads="):
        ts.load(path)


def test_other_mmaction_recognizers_are_refused(tmp_path: Path) -> None:
    path = mmengine_file(tmp_path / "tsn.pth", {"backbone.conv1.weight": torch.zeros(4, 3, 7, 7)})
    with pytest.raises(InputError, match=r"tsn\.pth: its state_dict has no backbone\.model\. keys"):
        ts.load(path)


def test_unreadable_foreign_objects_are_one_input_error(tmp_path: Path) -> None:
    path = mmengine_file(
        tmp_path / "odd.pth", released_state(ts.build("haltingvt-tiny")), extra=ConfigDict(a=1)
    )
    with pytest.raises(InputError, match=r"cannot read .*odd\.pth: .*refuses it") as err:
        ts.load(path, heads=2)
    assert "\n" not in str(err.value) and "its weights saved alone as {'state_dict': ...}" in str(err.value)


def test_halting_spec_from_the_config_text() -> None:
    assert halting_spec({"cfg": CONFIG_TEXT}) == "halting:beta=20,gamma=10,glimpser=0.5"
    assert halting_spec({"cfg": "halt_scale=10.\nhalt_center=5.\nkeep_rate=[1.0, 0.3]"}) == (
        "halting:beta=5,gamma=10,glimpser=0.3"
    )
    assert halting_spec({"cfg": "keep_rate = [1.0, 0.5]"}) is None  # no halting settings
    assert halting_spec(None) is None
