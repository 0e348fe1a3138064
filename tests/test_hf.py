"""Conversion of transformers VideoMAE/TimeSformer models (`ts.from_hf`, `from_hf_state_dict`,
`ts.load`), and TimeSformer at other input sizes; ViViT's in tests/test_vivit.py, the rest of other input
sizes in tests/test_input_size.py.

The oracle is transformers itself: tiny models with *every* parameter re-randomised (HF leaves
time embeddings, biases and LayerNorm affines at 0/1, which would hide a mis-mapped tensor), eager
attention, compared logit for logit in float32 and float64.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import tokensieve as ts
from tokensieve.backbones.checkpoint import CheckpointMismatchError
from tokensieve.backbones.hf import SUPPORTED, from_hf_state_dict
from tokensieve.errors import InputError

transformers = pytest.importorskip("transformers")

NUM_LABELS = 5
TINY = {
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "num_frames": 4,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
# Block eps differing from every default of ours (1e-6), so a converter that drops the config's eps
# fails the config checks and the float64 comparison. VideoMAE keeps the hub value 1e-12.
TIMESFORMER_EPS = 1e-7
TOL32, TOL64 = 1e-4, 1e-9


# --------------------------------------------------------------------------- helpers
def videomae_config(*, mean_pool: bool = True, qv_bias: bool = True, **changes: object):
    return transformers.VideoMAEConfig(
        **{**TINY, **changes},
        tubelet_size=2,
        use_mean_pooling=mean_pool,
        qv_bias=qv_bias,
        num_labels=NUM_LABELS,
        attn_implementation="eager",
    )


def timesformer_config(**changes: object):
    return transformers.TimesformerConfig(
        **{**TINY, "layer_norm_eps": TIMESFORMER_EPS, **changes},
        num_labels=NUM_LABELS,
        attn_implementation="eager",
    )


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter ~ N(0, 0.2^2), LayerNorm affines and embeddings included; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def clip(
    frames: int = 4,
    size: int | tuple[int, int] = 32,
    *,
    batch: int = 2,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 3, height, width, generator=g).to(dtype)  # (B, T, C, H, W)


def max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


def hf_logits(hf: nn.Module, video: Tensor) -> Tensor:
    with torch.no_grad():
        return hf(pixel_values=video).logits


def our_logits(model: nn.Module, video: Tensor) -> Tensor:
    with torch.no_grad():
        return model(video)


CLASSIFIERS = {
    "videomae-mean-qv": lambda: videomae_config(mean_pool=True, qv_bias=True),
    "videomae-mean-nobias": lambda: videomae_config(mean_pool=True, qv_bias=False),
    "videomae-first-qv": lambda: videomae_config(mean_pool=False, qv_bias=True),
    "videomae-first-nobias": lambda: videomae_config(mean_pool=False, qv_bias=False),
    "timesformer": timesformer_config,
}


def hf_classifier(name: str) -> nn.Module:
    config = CLASSIFIERS[name]()
    cls = (
        transformers.TimesformerForVideoClassification
        if name == "timesformer"
        else transformers.VideoMAEForVideoClassification
    )
    return randomize(cls(config))


# --------------------------------------------------------------------------- 1. classifiers
@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifier_logits_match_transformers(name: str) -> None:
    hf = hf_classifier(name)
    assert not assert_converts_exactly(hf).training


def assert_converts_exactly(
    hf: nn.Module, to64: Callable[[nn.Module], nn.Module] = lambda m: m.double()
) -> ts.VideoBackbone:
    """`ts.from_hf(hf)` gives transformers' logits on a random clip within TOL32, and in float64
    (`to64(hf)` converted again) within TOL64; returns the float32 conversion."""
    video = clip()
    ref = hf_logits(hf, video)
    assert ref.std() > 0.1, "degenerate reference logits would make the comparison vacuous"

    ours = ts.from_hf(hf)
    assert max_diff(our_logits(ours, video), ref) < TOL32

    hf64 = to64(hf)
    ours64 = ts.from_hf(hf64)
    assert next(ours64.parameters()).dtype == torch.float64
    assert max_diff(our_logits(ours64, video.double()), hf_logits(hf64, video.double())) < TOL64
    return ours


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_converted_config_copies_the_numerics(name: str) -> None:
    hf = hf_classifier(name)
    hc = hf.config
    cfg = ts.from_hf(hf).config
    is_mae = name.startswith("videomae")
    assert cfg.arch == ("videomae" if is_mae else "timesformer")
    assert (cfg.frames, cfg.size, cfg.patch, cfg.tubelet) == (4, 32, 8, 2 if is_mae else 1)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.mlp_dim) == (32, 2, 4, 64)
    assert cfg.num_classes == NUM_LABELS
    assert cfg.eps == hc.layer_norm_eps == (1e-12 if is_mae else TIMESFORMER_EPS)
    assert cfg.fc_norm_eps == 1e-5  # torch's default, which HF's fc_norm uses whatever the config says
    if is_mae:
        assert cfg.pool == ("mean" if hc.use_mean_pooling else "first")
        assert cfg.qkv_bias == ("qv" if hc.qv_bias else "none")
    else:
        assert (cfg.pool, cfg.qkv_bias) == ("cls", "qkv")


def test_converted_modules_use_the_config_eps() -> None:
    ours = ts.from_hf(hf_classifier("videomae-mean-qv"))
    assert ours.blocks[0].norm1.eps == ours.blocks[1].norm2.eps == 1e-12
    assert ours.fc_norm.eps == 1e-5
    ours = ts.from_hf(hf_classifier("timesformer"))
    block = ours.blocks[0]
    assert block.temporal_norm1.eps == block.norm1.eps == block.norm2.eps == ours.norm.eps == TIMESFORMER_EPS


def _swap_qk(model: nn.Module) -> None:
    w = model.blocks[0].attn.qkv.weight
    q, k, v = w.detach().clone().chunk(3)
    w.copy_(torch.cat([k, q, v]))


def _swap_norms(model: nn.Module) -> None:
    b = model.blocks[1]
    w1, w2 = b.norm1.weight.detach().clone(), b.norm2.weight.detach().clone()
    b.norm1.weight.copy_(w2)
    b.norm2.weight.copy_(w1)


def _swap_attentions(model: nn.Module) -> None:
    b = model.blocks[0]
    spatial = {k: v.clone() for k, v in b.attn.state_dict().items()}
    b.attn.load_state_dict(b.temporal_attn.state_dict())
    b.temporal_attn.load_state_dict(spatial)


MAPPING_BUGS: dict[str, tuple[str, Callable[[nn.Module], None]]] = {
    "qk-swapped": ("videomae-mean-qv", _swap_qk),
    "norms-swapped": ("videomae-first-qv", _swap_norms),
    "v-bias-dropped": ("videomae-mean-qv", lambda m: m.blocks[0].attn.v_bias.zero_()),
    "fc-norm-eps-from-config": ("videomae-mean-qv", lambda m: setattr(m.fc_norm, "eps", 1e-12)),
    "time-embed-dropped": ("timesformer", lambda m: m.embed.time_embed.zero_()),
    "temporal-spatial-swapped": ("timesformer", _swap_attentions),
    "temporal-fc-dropped": ("timesformer", lambda m: m.blocks[1].temporal_fc.bias.zero_()),
    "default-eps": ("timesformer", lambda m: setattr(m.blocks[0].norm2, "eps", 1e-6)),
}


@pytest.mark.parametrize("bug", list(MAPPING_BUGS))
def test_comparison_detects_mapping_bugs(bug: str) -> None:
    """Negative control: the randomised models and tolerances above catch typical converter bugs."""
    name, corrupt = MAPPING_BUGS[bug]
    hf = hf_classifier(name).double()
    ours = ts.from_hf(hf)
    video = clip().double()
    assert max_diff(our_logits(ours, video), hf_logits(hf, video)) < TOL64
    with torch.no_grad():
        corrupt(ours)
    assert max_diff(our_logits(ours, video), hf_logits(hf, video)) > TOL64


# --------------------------------------------------------------------------- 2. bare models
@pytest.mark.parametrize("mean_pool", [True, False], ids=["mean", "first"])
def test_bare_videomae_matches_last_hidden_state(mean_pool: bool) -> None:
    hf = randomize(transformers.VideoMAEModel(videomae_config(mean_pool=mean_pool)))
    ours = ts.from_hf(hf)
    assert ours.config.num_classes == 0
    video = clip()
    with torch.no_grad():
        ref = hf(pixel_values=video).last_hidden_state  # (B, N, C), time-major like ours
        state = ours.forward_features(video)
        # With mean pooling HF has no final norm; without, it normalises every token.
        tokens = state.x if mean_pool else ours.norm(state.x)
        pooled = ours.forward_head(state)
    assert ref.shape == (2, 2 * 4 * 4, 32)
    assert max_diff(tokens, ref) < TOL32
    # Pooled features: the plain token mean (HF has no fc_norm here), or the normed token 0.
    assert max_diff(pooled, ref.mean(1) if mean_pool else ref[:, 0]) < TOL32


def test_bare_timesformer_matches_last_hidden_state() -> None:
    hf = randomize(transformers.TimesformerModel(timesformer_config()))
    ours = ts.from_hf(hf)
    assert ours.config.num_classes == 0
    video = clip()
    T, HW = 4, 16
    with torch.no_grad():
        ref = hf(pixel_values=video).last_hidden_state  # (B, 1 + HW*T, C), patches space-major
        state = ours.forward_features(video)
        cls = ours.forward_head(state)  # (B, C): the normed class token, no classifier
        tokens = ours.norm(state.x)  # (B, T*HW, C), time-major
    assert max_diff(cls, ref[:, 0]) < TOL32
    # HF index n*T + t -> ours t*HW + n.
    ref_patches = ref[:, 1:].unflatten(1, (HW, T)).transpose(1, 2).flatten(1, 2)  # (B, T*HW, C)
    assert max_diff(tokens, ref_patches) < TOL32
    # The permutation matters: without it the tokens do not line up.
    assert max_diff(tokens, ref[:, 1:]) > 1e-2


# --------------------------------------------------------------------------- 3. key generations
def _legacy_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers >= 5 in-memory names -> hub/4.x names (`q_bias`, `v_bias`)."""
    return {
        k.replace("attention.attention.query.bias", "attention.attention.q_bias").replace(
            "attention.attention.value.bias", "attention.attention.v_bias"
        ): v
        for k, v in state.items()
    }


@pytest.mark.parametrize("names", ["memory", "legacy"])
def test_videomae_both_key_generations(names: str) -> None:
    hf = hf_classifier("videomae-mean-qv")
    state = hf.state_dict()
    assert "videomae.encoder.layer.0.attention.attention.query.bias" in state
    if names == "legacy":
        state = _legacy_names(state)
        assert "videomae.encoder.layer.0.attention.attention.q_bias" in state
        assert not any("query.bias" in k or "value.bias" in k for k in state)
    ours = from_hf_state_dict(state, hf.config, "VideoMAEForVideoClassification")
    video = clip()
    ref = hf_logits(hf, video)
    assert max_diff(our_logits(ours, video), ref) < TOL32
    assert torch.equal(our_logits(ours, video), our_logits(ts.from_hf(hf), video))


def test_videomae_hub_file_names(tmp_path: Path) -> None:
    """The safetensors file transformers writes (legacy names) converts without transformers' loader."""
    from safetensors.torch import load_file

    hf = hf_classifier("videomae-first-qv")
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    ours = from_hf_state_dict(state, hf.config, "VideoMAEForVideoClassification")
    video = clip()
    assert max_diff(our_logits(ours, video), hf_logits(hf, video)) < TOL32


def test_state_dict_without_prefix() -> None:
    hf = randomize(transformers.TimesformerModel(timesformer_config()))
    state = hf.state_dict()
    assert not any(k.startswith("timesformer.") for k in state)
    ours = from_hf_state_dict(state, hf.config, "TimesformerModel")
    video = clip()
    with torch.no_grad():
        ref = hf(pixel_values=video).last_hidden_state[:, 0]
        assert max_diff(ours(video), ref) < TOL32


# --------------------------------------------------------------------------- 4. save_pretrained -> load
@pytest.mark.parametrize("name", ["videomae-mean-qv", "timesformer"])
@pytest.mark.parametrize("preprocessor", [True, False], ids=["preprocessor", "no-preprocessor"])
def test_load_saved_directory(tmp_path: Path, name: str, preprocessor: bool) -> None:
    hf = hf_classifier(name)
    hf.save_pretrained(tmp_path)
    if preprocessor:
        config = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 0.75]}
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = ts.load(str(tmp_path))
    assert not ours.training
    video = clip()
    assert max_diff(our_logits(ours, video), hf_logits(hf, video)) < TOL32
    if preprocessor:
        expected = ((0.5, 0.5, 0.5), (0.25, 0.5, 0.75))
    elif name == "timesformer":
        expected = ((0.45, 0.45, 0.45), (0.225, 0.225, 0.225))
    else:
        expected = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (ours.config.mean, ours.config.std) == expected


def test_load_saved_pretraining_checkpoint(tmp_path: Path) -> None:
    """A VideoMAEForPreTraining directory loads as its encoder (the decoder is dropped by transformers)."""
    config = videomae_config(
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    hf = randomize(transformers.VideoMAEForPreTraining(config))
    hf.save_pretrained(tmp_path)
    ours = ts.load(tmp_path)
    assert ours.config.num_classes == 0
    video = clip()
    with torch.no_grad():
        ref = hf.videomae(pixel_values=video).last_hidden_state
        assert max_diff(ours.forward_features(video).x, ref) < TOL32


# --------------------------------------------------------------------------- 5. bad checkpoints
@pytest.mark.parametrize(
    "model",
    [
        lambda: nn.Linear(2, 2),
        lambda: transformers.VideoMAEForPreTraining(  # ts.load takes its encoder; from_hf does not guess
            videomae_config(
                decoder_hidden_size=16,
                decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2,
                decoder_intermediate_size=32,
            )
        ),
    ],
    ids=["linear", "videomae-pretraining"],
)
def test_unsupported_class(model: Callable[[], nn.Module]) -> None:
    m = model()
    with pytest.raises(InputError, match=rf"cannot convert {type(m).__name__}; supported") as err:
        ts.from_hf(m)
    for name in SUPPORTED:
        assert name in str(err.value)


def test_unknown_kind() -> None:
    hf = hf_classifier("timesformer")
    with pytest.raises(ValueError, match="unknown kind 'TimesformerForPreTraining'; supported"):
        from_hf_state_dict(hf.state_dict(), hf.config, "TimesformerForPreTraining")


P = "videomae.encoder.layer"


def _drop_key(state: dict[str, Tensor]) -> None:
    del state[f"{P}.1.intermediate.dense.bias"]


def _drop_fc_norm(state: dict[str, Tensor]) -> None:
    del state["fc_norm.bias"]  # optional for a bare VideoMAEModel only


def _drop_query(state: dict[str, Tensor]) -> None:
    del state[f"{P}.0.attention.attention.query.weight"]


def _add_key_bias(state: dict[str, Tensor]) -> None:
    state[f"{P}.0.attention.attention.key.bias"] = torch.zeros(32)  # VideoMAE has none


def _add_stray(state: dict[str, Tensor]) -> None:
    state["videomae.pooler.dense.weight"] = torch.zeros(32, 32)


def _grow_head(state: dict[str, Tensor]) -> None:
    state["classifier.weight"] = torch.zeros(NUM_LABELS + 1, 32)


def _shrink_mlp(state: dict[str, Tensor]) -> None:
    state[f"{P}.1.intermediate.dense.weight"] = torch.zeros(48, 32)


BAD_STATES: dict[str, tuple[Callable[[dict[str, Tensor]], None], list[str]]] = {
    "missing": (_drop_key, [r"missing keys \(1\):", r"blocks\.1\.mlp\.fc1\.bias"]),
    "missing-fc-norm": (_drop_fc_norm, [r"missing keys \(1\):\n +fc_norm\.bias$"]),
    "missing-third": (
        _drop_query,
        [r"missing keys \(1\):\n +blocks\.0\.attn\.qkv\.weight\n", r"blocks\.0\.attn\.qkv\.weight#k"],
    ),
    "unexpected": (
        _add_key_bias,
        [r"unexpected keys \(1\):", r"encoder\.layer\.0\.attention\.attention\.key\.bias"],
    ),
    "unexpected-unmapped": (_add_stray, [r"unexpected keys \(1\):", r"pooler\.dense\.weight"]),
    "shape-head": (
        _grow_head,
        [r"shape mismatches \(1\):", r"head\.weight: checkpoint \(6, 32\) vs model \(5, 32\)"],
    ),
    "shape-mlp": (_shrink_mlp, [r"blocks\.1\.mlp\.fc1\.weight: checkpoint \(48, 32\) vs model \(64, 32\)"]),
}


@pytest.mark.parametrize("bad", list(BAD_STATES))
def test_mismatched_state_dict(bad: str) -> None:
    corrupt, patterns = BAD_STATES[bad]
    hf = hf_classifier("videomae-mean-qv")
    state = dict(hf.state_dict())
    corrupt(state)
    with pytest.raises(
        CheckpointMismatchError, match="VideoMAEForVideoClassification state dict does not fit"
    ) as err:
        from_hf_state_dict(state, hf.config, "VideoMAEForVideoClassification")
    for pattern in patterns:
        assert err.match(pattern)


def test_mismatch_lists_every_problem_at_once() -> None:
    hf = hf_classifier("videomae-mean-qv")
    state = dict(hf.state_dict())
    for corrupt in (_drop_key, _add_key_bias, _grow_head):
        corrupt(state)
    with pytest.raises(CheckpointMismatchError) as err:
        from_hf_state_dict(state, hf.config, "VideoMAEForVideoClassification")
    message = str(err.value)
    assert "blocks.1.mlp.fc1.bias" in message
    assert "encoder.layer.0.attention.attention.key.bias" in message
    assert "head.weight: checkpoint (6, 32)" in message


@pytest.mark.parametrize("arch", ["videomae", "timesformer"])
@pytest.mark.parametrize("act", ["quick_gelu", "relu"])  # the tanh GELUs convert: tests/test_vivit.py
def test_unsupported_activation(arch: str, act: str) -> None:
    config = videomae_config(hidden_act=act) if arch == "videomae" else timesformer_config(hidden_act=act)
    cls = (
        transformers.VideoMAEForVideoClassification
        if arch == "videomae"
        else transformers.TimesformerForVideoClassification
    )
    with pytest.raises(ValueError, match=rf"only hidden_act 'gelu', .* is supported, got '{act}'"):
        ts.from_hf(cls(config))


@pytest.mark.parametrize("attention_type", ["joint_space_time", "space_only"])
def test_unsupported_timesformer_attention(attention_type: str) -> None:
    hf = transformers.TimesformerForVideoClassification(timesformer_config(attention_type=attention_type))
    with pytest.raises(
        ValueError, match=rf"only attention_type='divided_space_time' is supported, got '{attention_type}'"
    ):
        ts.from_hf(hf)


def test_non_square_frames() -> None:
    config = videomae_config(image_size=[32, 40])
    with pytest.raises(ValueError, match=r"only square image sizes are supported, got \(32, 40\)"):
        from_hf_state_dict({}, config, "VideoMAEForVideoClassification")


def test_load_unsupported_architecture(tmp_path: Path) -> None:
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
    )
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path)
    with pytest.raises(
        InputError, match=r"'ViTForImageClassification'\] is not supported; supported: VideoMAE"
    ):
        ts.load(str(tmp_path))


# --------------------------------------------------------------------------- 6. bad input
BAD_INPUTS = {
    "rank": ((2, 3, 32, 32), r"expected a video batch of shape \(B, T, C, H, W\), got \(2, 3, 32, 32\)"),
    "channels": ((2, 4, 1, 32, 32), r"expected 3 channels at dim 2 of \(B, T, C, H, W\), got 1"),
    "channels-last": ((2, 4, 32, 32, 3), r"expected 3 channels at dim 2 of \(B, T, C, H, W\), got 32"),
    "tubelet": ((2, 3, 3, 32, 32), r"frames \(3\) must be divisible by the tubelet size 2"),
    "patch": ((2, 4, 3, 30, 30), r"frame size 30x30 must be divisible by the patch size 8"),
    # Other frame counts and sizes run (positions carried to the grid): tests/test_input_size.py.
    "empty": ((2, 0, 3, 32, 32), r"a clip needs at least 2 frame\(s\) of at least 8x8 pixels, got 0"),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_converted_videomae_rejects_bad_input(bad: str) -> None:
    shape, pattern = BAD_INPUTS[bad]
    ours = ts.from_hf(hf_classifier("videomae-mean-qv"))
    with pytest.raises(ValueError, match=pattern):
        ours(torch.zeros(shape))


def test_converted_model_rejects_integer_video() -> None:
    ours = ts.from_hf(hf_classifier("videomae-mean-qv"))
    with pytest.raises(ValueError, match=r"expected a float video .* got dtype torch\.uint8"):
        ours(torch.zeros(2, 4, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((4, 3, 32, 32), r"expected a video batch of shape \(B, T, C, H, W\)"),
        ((2, 4, 4, 32, 32), r"expected 3 channels at dim 2"),
        ((2, 4, 3, 32, 0), r"a clip needs at least 1 frame\(s\) of at least 8x8 pixels, got 4 of 32x0"),
        ((2, 4, 3, 36, 36), r"frame size 36x36 must be divisible by the patch size 8"),
    ],
)
def test_converted_timesformer_rejects_bad_input(shape: tuple[int, ...], pattern: str) -> None:
    ours = ts.from_hf(hf_classifier("timesformer"))
    with pytest.raises(ValueError, match=pattern):
        ours(torch.zeros(shape))


# --------------------------------------------------------------------------- 7. other input sizes
# transformers' TimeSformer interpolates its positions and time embeddings by itself (nearest), but its
# layers reshape with `config.num_frames` and `config.image_size` (the width; the height is derived from
# the token count): end to end it runs at another height alone. At another frame count or width the
# tests tell its layers the clip's geometry through its config; its own embedding still interpolates.
@contextlib.contextmanager
def geometry(hf: nn.Module, frames: int, width: int) -> Iterator[None]:
    """transformers' TimeSformer layers told the clip's frame count and width."""
    cfg = hf.config
    before = cfg.num_frames, cfg.image_size
    cfg.num_frames, cfg.image_size = frames, width
    try:
        yield
    finally:
        cfg.num_frames, cfg.image_size = before


def test_timesformer_at_another_height_matches_transformers_as_it_is() -> None:
    """4 frames of 48x32 (grid 4 x 6 x 4): transformers interpolates and runs unchanged."""
    hf = hf_classifier("timesformer")
    video = clip(4, (48, 32))
    ref = hf_logits(hf, video)
    assert ref.std() > 0.05 and max_diff(our_logits(ts.from_hf(hf), video), ref) < TOL32


@pytest.mark.parametrize("size", [(6, 40, 48), (2, 24, 16), (8, 32, 32), (4, 40, 40)], ids=str)
def test_timesformer_at_other_frame_counts_and_sizes_matches_transformers(size: tuple[int, int, int]) -> None:
    hf = hf_classifier("timesformer")
    frames, height, width = size
    for dtype, tol in ((torch.float32, TOL32), (torch.float64, TOL64)):
        hf = hf.to(dtype)
        video = clip(frames, (height, width), dtype=dtype)
        with geometry(hf, frames, width):
            ref = hf_logits(hf, video)
        assert ref.std() > 0.05 and max_diff(our_logits(ts.from_hf(hf), video), ref) < tol, dtype


def test_timesformer_embedding_equals_transformers_tokens_at_another_size() -> None:
    """The embedded tokens themselves (positions and time embeddings resized), transformers' in its
    space-major order n*T + t: 6 frames of 40x24 against 4 of 32x32."""
    hf = hf_classifier("timesformer").double()
    ours = ts.from_hf(hf)
    video = clip(6, (40, 24), dtype=torch.float64)
    T, n = 6, 5 * 3
    with torch.no_grad():
        ref = hf.timesformer.embeddings(video)  # (B, 1 + N, C): class token, then space-major
        state = ours.embed(video, (T, 5, 3))
    ref_patches = ref[:, 1:].reshape(2, n, T, -1).transpose(1, 2).reshape(2, T * n, -1)  # time-major
    assert max_diff(state.x, ref_patches) < 1e-12 and max_diff(state.cls, ref[:, :1]) < 1e-12
