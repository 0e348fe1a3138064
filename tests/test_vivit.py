"""ViViT (transformers' `VivitForVideoClassification` and `VivitModel`) as the native arch "vivit":
conversion, logits and features equal to transformers', the tubelet layout, both generations of key
names, `ts.load` of a saved folder, mismatches, the tanh GELU, and reducers on a converted model.

The oracle is transformers itself, as in tests/test_hf.py: tiny models with every parameter
re-randomised. Its eager ViViT attention takes the softmax in float32 whatever the dtype
(`softmax(..., dtype=torch.float32)`), which alone leaves ~1e-8 between float64 models; the float64
comparisons therefore run its SDPA path, which stays in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import tokensieve as ts
from test_hf import (
    NUM_LABELS,
    TOL32,
    TOL64,
    assert_converts_exactly,
    clip,
    hf_logits,
    max_diff,
    our_logits,
    randomize,
)  # fmt: skip
from tokensieve.backbones.checkpoint import CheckpointMismatchError
from tokensieve.backbones.config import HALF
from tokensieve.backbones.hf import from_hf_state_dict
from tokensieve.backbones.layers import Mlp
from tokensieve.errors import InputError

transformers = pytest.importorskip("transformers")

# Block eps differing from ViViT's and our default (1e-6), so a converter that drops the config's eps
# fails the config checks and the float64 comparison.
VIVIT_EPS = 1e-7
GRID = (2, 4, 4)  # 4 frames of 32x32 in tubelets of 2x8x8
N = 32


def vivit_config(**changes: object):
    return transformers.VivitConfig(
        **{
            "image_size": 32,
            "num_frames": 4,
            "tubelet_size": [2, 8, 8],
            "num_channels": 3,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "layer_norm_eps": VIVIT_EPS,
            **changes,
        },
        num_labels=NUM_LABELS,
        attn_implementation="eager",
    )


VARIANTS = {
    "tubelet-2": {},  # hidden_act "gelu_fast", transformers' default
    "tubelet-1": {"tubelet_size": [1, 8, 8]},
    "tubelet-4-no-qkv-bias": {"tubelet_size": [4, 8, 8], "qkv_bias": False},
    "exact-gelu": {"hidden_act": "gelu"},
}


def hf_vivit(variant: str = "tubelet-2", *, bare: bool = False, **changes: object) -> nn.Module:
    cls = transformers.VivitModel if bare else transformers.VivitForVideoClassification
    return randomize(cls(vivit_config(**{**VARIANTS[variant], **changes})))


def hf64(hf: nn.Module) -> nn.Module:
    """`hf` in float64 on transformers' SDPA path (its eager softmax is float32, see the docstring)."""
    hf = hf.double()
    hf.set_attn_implementation("sdpa")
    return hf


# --------------------------------------------------------------------------- 1. classifiers
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_classifier_logits_match_transformers(variant: str) -> None:
    ours = assert_converts_exactly(hf_vivit(variant), hf64)
    assert not ours.training and isinstance(ours, ts.VideoViT)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_config_copies_the_numerics(variant: str) -> None:
    hf = hf_vivit(variant)
    hc = hf.config
    ours = ts.from_hf(hf)
    cfg = ours.config
    assert (cfg.arch, cfg.pool) == ("vivit", "cls")
    assert (cfg.frames, cfg.size, cfg.patch, cfg.tubelet) == (4, 32, 8, hc.tubelet_size[0])
    assert cfg.grid == (4 // hc.tubelet_size[0], 4, 4)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.num_classes) == (32, 2, 4, 64, NUM_LABELS)
    assert cfg.eps == ours.blocks[0].norm1.eps == ours.blocks[1].norm2.eps == ours.norm.eps == VIVIT_EPS
    assert cfg.act == ("gelu" if hc.hidden_act == "gelu" else "gelu_tanh")
    assert ours.blocks[0].mlp.act.approximate == ("none" if cfg.act == "gelu" else "tanh")
    assert cfg.qkv_bias == ("qkv" if hc.qkv_bias else "none")
    assert (cfg.mean, cfg.std) == (HALF, HALF)


def _swap_qk(model: nn.Module) -> None:
    w = model.blocks[0].attn.qkv.weight
    q, k, v = w.detach().clone().chunk(3)
    w.copy_(torch.cat([k, q, v]))


def _space_major_positions(model: nn.Module) -> None:
    """The patch positions laid out space-major (n*T + t) instead of time-major."""
    T, H, W = GRID
    pos = model.embed.pos_embed
    patches = pos[0, 1:].view(H * W, T, -1).transpose(0, 1).reshape(N, -1)  # (N, C)
    pos[0, 1:] = patches.clone()


def _exact_gelu(model: nn.Module) -> None:
    for block in model.blocks:
        block.mlp.act = nn.GELU()


MAPPING_BUGS: dict[str, Callable[[nn.Module], None]] = {
    "qk-swapped": _swap_qk,
    "class-position-dropped": lambda m: m.embed.pos_embed[:, 0].zero_(),
    "positions-space-major": _space_major_positions,
    "tubelet-frames-swapped": lambda m: m.embed.proj.weight.copy_(m.embed.proj.weight.flip(2)),
    "exact-gelu": _exact_gelu,
    "default-eps": lambda m: setattr(m.blocks[0].norm2, "eps", 1e-6),
    "final-norm-dropped": lambda m: m.norm.bias.zero_(),
}


@pytest.mark.parametrize("bug", list(MAPPING_BUGS))
def test_comparison_detects_mapping_bugs(bug: str) -> None:
    """Negative control: the randomised models and tolerances above catch typical converter bugs."""
    hf = hf64(hf_vivit())
    ours = ts.from_hf(hf)
    video = clip().double()
    assert max_diff(our_logits(ours, video), hf_logits(hf, video)) < TOL64
    with torch.no_grad():
        MAPPING_BUGS[bug](ours)
    assert max_diff(our_logits(ours, video), hf_logits(hf, video)) > TOL64


# --------------------------------------------------------------------------- 2. bare models
@pytest.mark.parametrize("pooler", [True, False], ids=["pooler", "no-pooler"])
def test_bare_vivit_matches_last_hidden_state(pooler: bool, caplog: pytest.LogCaptureFixture) -> None:
    hf = randomize(transformers.VivitModel(vivit_config(), add_pooling_layer=pooler))
    with caplog.at_level(logging.INFO, logger="tokensieve.backbones.hf"):
        ours = ts.from_hf(hf)
    assert ("pooler is not converted" in caplog.text) == pooler
    assert ours.config.num_classes == 0
    video = clip()
    with torch.no_grad():
        ref = hf(pixel_values=video).last_hidden_state  # (B, 1 + N, C), all normed
        state = ours.forward_features(video)
        cls = ours.forward_head(state)  # (B, C): the normed class token, no classifier
        tokens = ours.norm(state.x)  # (B, N, C)
    assert ref.shape == (2, 1 + N, 32) and state.grid == GRID
    assert max_diff(cls, ref[:, 0]) < TOL32
    # Conv3d tokens flattened (T', H', W'): time-major in transformers as in ours, no permutation.
    assert max_diff(tokens, ref[:, 1:]) < TOL32
    T, H, W = GRID
    space_major = ref[:, 1:].unflatten(1, (H * W, T)).transpose(1, 2).flatten(1, 2)  # (B, N, C)
    assert max_diff(tokens, space_major) > 1e-2  # the order matters: another one does not line up


# --------------------------------------------------------------------------- 3. key generations
def test_hub_and_memory_key_names(tmp_path: Path) -> None:
    """transformers >= 5 names in memory (`layers.i.attention.q_proj`) and the hub file's names
    (`encoder.layer.i.attention.attention.query`, what `save_pretrained` writes) convert alike."""
    from safetensors.torch import load_file

    hf = hf_vivit()
    memory = hf.state_dict()
    assert "vivit.layers.0.attention.q_proj.weight" in memory
    hf.save_pretrained(tmp_path)
    hub = load_file(str(tmp_path / "model.safetensors"))
    assert "vivit.encoder.layer.0.attention.attention.query.weight" in hub
    assert "vivit.encoder.layer.1.output.dense.bias" in hub
    video = clip()
    ref = hf_logits(hf, video)
    from_memory = our_logits(from_hf_state_dict(memory, hf.config, "VivitForVideoClassification"), video)
    from_hub = our_logits(from_hf_state_dict(hub, hf.config, "VivitForVideoClassification"), video)
    assert max_diff(from_memory, ref) < TOL32
    assert torch.equal(from_memory, from_hub)


def test_state_dict_without_prefix() -> None:
    hf = randomize(transformers.VivitModel(vivit_config(), add_pooling_layer=False))
    state = hf.state_dict()
    assert not any(k.startswith("vivit.") for k in state)
    ours = from_hf_state_dict(state, hf.config, "VivitModel")
    video = clip()
    with torch.no_grad():
        assert max_diff(ours(video), hf(pixel_values=video).last_hidden_state[:, 0]) < TOL32


# --------------------------------------------------------------------------- 4. save_pretrained -> load
@pytest.mark.parametrize("bare", [False, True], ids=["classifier", "bare"])
@pytest.mark.parametrize("preprocessor", [True, False], ids=["preprocessor", "no-preprocessor"])
def test_load_saved_directory(tmp_path: Path, bare: bool, preprocessor: bool) -> None:
    hf = hf_vivit(bare=bare)
    hf.save_pretrained(tmp_path)
    if preprocessor:  # transformers' own: image_mean = image_std = 0.5 (on its [-1, 1] rescaling)
        transformers.VivitImageProcessor().save_pretrained(tmp_path)
    ours = ts.load(str(tmp_path))
    assert not ours.training and ours.config.arch == "vivit"
    assert (ours.config.mean, ours.config.std) == (HALF, HALF)
    video = clip()
    with torch.no_grad():
        ref = hf(pixel_values=video)
        ref = ref.last_hidden_state[:, 0] if bare else ref.logits
        assert max_diff(ours(video), ref) < TOL32


# --------------------------------------------------------------------------- 5. bad checkpoints
P = "vivit.layers"


def _drop_query(state: dict[str, Tensor]) -> None:
    del state[f"{P}.0.attention.q_proj.weight"]


def _add_stray(state: dict[str, Tensor]) -> None:
    state["vivit.embeddings.time_embeddings"] = torch.zeros(1, 2, 32)


def _grow_positions(state: dict[str, Tensor]) -> None:
    state["vivit.embeddings.position_embeddings"] = torch.zeros(1, 2 * N + 1, 32)


def test_mismatch_lists_every_problem_at_once() -> None:
    hf = hf_vivit()
    state = dict(hf.state_dict())
    for corrupt in (_drop_query, _add_stray, _grow_positions):
        corrupt(state)
    with pytest.raises(
        CheckpointMismatchError, match="VivitForVideoClassification state dict does not fit VideoViT"
    ) as err:
        from_hf_state_dict(state, hf.config, "VivitForVideoClassification")
    assert err.match(r"missing keys \(1\):\n +blocks\.0\.attn\.qkv\.weight\n")
    assert err.match(r"unexpected keys \(3\):")  # the stray key and the two thirds left unfused
    assert err.match(r"embeddings\.time_embeddings")
    assert err.match(r"blocks\.0\.attn\.qkv\.weight#k")
    assert err.match(r"embed\.pos_embed: checkpoint \(1, 65, 32\) vs model \(1, 33, 32\)")


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"tubelet_size": [2, 8, 4]}, r"only square patches are supported, got \(8, 4\)"),
        ({"image_size": [32, 40]}, r"only square image sizes are supported, got \(32, 40\)"),
        ({"hidden_act": "relu"}, r"only hidden_act 'gelu', 'gelu_fast', .* is supported, got 'relu'"),
    ],
)
def test_unsupported_config(changes: dict, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        from_hf_state_dict({}, vivit_config(**changes), "VivitForVideoClassification")


def test_converted_vivit_runs_at_other_grids_and_rejects_indivisible_ones() -> None:
    """Other grids: positions resized as transformers and Scenic do (tests/test_input_size.py)."""
    ours = ts.from_hf(hf_vivit())
    with torch.no_grad():
        assert ours(torch.zeros(1, 8, 3, 48, 40)).shape == (1, NUM_LABELS)
    with pytest.raises(InputError, match=r"frames \(3\) must be divisible by the tubelet size 2"):
        ours(torch.zeros(1, 3, 3, 32, 32))


# --------------------------------------------------------------------------- 6. the tanh GELU
def test_tanh_gelu_is_transformers_formula() -> None:
    """Our "gelu_tanh" against transformers' three spellings, in float64: gelu_new and gelu_pytorch_tanh
    are the same formula; gelu_fast (ViViT's) writes sqrt(2/pi) as 0.7978845608, 3e-12 from it."""
    from transformers.activations import ACT2FN

    x = torch.linspace(-10, 10, 20001, dtype=torch.float64)
    ours = Mlp(dim=1, hidden=1, act="gelu_tanh").act(x)
    assert max_diff(ours, ACT2FN["gelu_new"](x)) < 1e-15
    assert max_diff(ours, ACT2FN["gelu_pytorch_tanh"](x)) < 1e-15
    assert max_diff(ours, ACT2FN["gelu_fast"](x)) < 1e-11
    assert max_diff(ours, ACT2FN["gelu"](x)) > 1e-4  # the exact GELU is another function
    assert max_diff(Mlp(dim=1, hidden=1).act(x), ACT2FN["gelu"](x)) == 0.0


@pytest.mark.parametrize("family", ["videomae", "timesformer"])
def test_tanh_gelu_converts_for_every_family(family: str) -> None:
    from test_hf import timesformer_config, videomae_config

    if family == "videomae":
        hf = transformers.VideoMAEForVideoClassification(videomae_config(hidden_act="gelu_new"))
    else:
        hf = transformers.TimesformerForVideoClassification(timesformer_config(hidden_act="gelu_new"))
    hf = randomize(hf).double()
    ours = ts.from_hf(hf)
    assert ours.config.act == "gelu_tanh"
    video = clip().double()
    assert max_diff(our_logits(ours, video), hf_logits(hf, video)) < TOL64


def test_act_is_checked() -> None:
    with pytest.raises(InputError, match=r"act must be one of gelu, gelu_tanh, got 'relu'"):
        ts.build("vivit-tiny", act="relu")
    with pytest.raises(InputError, match=r"act must be one of gelu, gelu_tanh, got 'tanh'"):
        Mlp(dim=4, hidden=8, act="tanh")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- 7. presets and reducers
def test_vivit_b_preset() -> None:
    """ViViT-B/16x2 as google/vivit-b-16x2-kinetics400: 32 frames of 224, 16x16x2 tubelets, 3136 tokens
    plus the class token."""
    cfg = ts.PRESETS["vivit-b"]
    hc = transformers.VivitConfig()  # the checkpoint's configuration
    assert (cfg.frames, cfg.size, cfg.tubelet, cfg.patch) == (
        hc.num_frames,
        hc.image_size,
        *hc.tubelet_size[:2],
    )
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.mlp_dim) == (768, 12, 12, 3072)
    assert (cfg.eps, cfg.act, cfg.num_classes, cfg.mean, cfg.std) == (1e-6, "gelu_tanh", 400, HALF, HALF)
    assert cfg.grid == (16, 14, 14) and cfg.has_cls
    with torch.device("meta"):
        model = ts.build("vivit-b")
        hf = transformers.VivitForVideoClassification(transformers.VivitConfig(num_labels=400))
    assert model.num_params == sum(p.numel() for p in hf.parameters()) == 88_954_000
    assert model.embed.pos_embed.shape == (1, 1 + 16 * 14 * 14, 768)


@pytest.mark.parametrize("spec", ["none", "random:keep=0.5", "tome:r=2"])
def test_reducers_run_on_a_converted_vivit(spec: str) -> None:
    hf = hf_vivit()
    bare = ts.from_hf(hf)
    model = ts.apply(ts.from_hf(hf), spec).model.eval()
    video = clip()
    with torch.no_grad():
        state = model.forward_features(video)
        logits = model(video)
    state.check()
    assert state.cls is not None and logits.shape == (2, NUM_LABELS) and logits.isfinite().all()
    expected = {"none": N, "random:keep=0.5": N // 2, "tome:r=2": N - 2 * 2}[spec]  # tome: r per block
    assert state.x.shape[1] == expected
    if spec == "none":
        assert torch.equal(logits, our_logits(bare, video))


# --------------------------------------------------------------------------- 8. other input sizes
# transformers' `interpolate_pos_encoding` reshapes the whole T*H*W table into one square image of side
# sqrt(T*H*W), resizes it to one frame's grid and returns the table unchanged for square frames: it runs
# only on one temporal slice at a non-square size. There the logits are compared; for more slices, ours
# slice by slice with its function (docs/design.md, "Input sizes").
@pytest.mark.parametrize("variant", ["tubelet-2", "tubelet-1", "exact-gelu"])
@pytest.mark.parametrize("size", [(48, 32), (16, 40)], ids=str)
def test_other_sizes_match_transformers_interpolation(variant: str, size: tuple[int, int]) -> None:
    """One temporal slice (frames = tubelet), non-square frames: bicubic, the class slot apart."""
    frames = 1 if variant == "tubelet-1" else 2
    hf = hf_vivit(variant, num_frames=frames)
    for to, tol in ((lambda m: m, TOL32), (hf64, TOL64)):
        hf = to(hf)
        video = clip(frames, size, dtype=next(hf.parameters()).dtype)
        with torch.no_grad():
            ref = hf(pixel_values=video, interpolate_pos_encoding=True).logits
        assert ref.std() > 0.05 and max_diff(our_logits(ts.from_hf(hf), video), ref) < tol


def test_positions_resize_every_slice_as_transformers_resizes_one() -> None:
    """2 temporal slices at 48x40: each slice of ours equals transformers' `interpolate_pos_encoding` on a
    one-slice embedding holding that slice's positions."""
    hf = hf_vivit().double()  # 4 frames of 32x32, tubelet 2: grid 2 x 4 x 4
    table = ts.from_hf(hf).embed.positions((2, 6, 5)).view(2, 30, -1)  # (T, H*W, C)
    positions = hf.vivit.embeddings.position_embeddings.detach()  # (1, 1 + 32, C)
    one = transformers.models.vivit.modeling_vivit.VivitEmbeddings(vivit_config(num_frames=2)).double()
    for t in range(2):
        with torch.no_grad():
            one.position_embeddings.copy_(
                torch.cat([positions[:, :1], positions[:, 1 + 16 * t : 17 + 16 * t]], 1)
            )
            ref = one.interpolate_pos_encoding(torch.zeros(1, 31, 32, dtype=torch.float64), 48, 40)
        assert max_diff(table[t], ref[0, 1:]) < 1e-12
