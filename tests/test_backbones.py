from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tokensieve as ts
from conftest import tiny_video
from tokensieve.backbones import build_from_config, layers
from tokensieve.backbones.config import preset
from tokensieve.backbones.layers import Attention, patch_tokens, sinusoid_table
from tokensieve.errors import InputError
from tokensieve.tokens import CLS_ATTN, KEYS, Layout, TokenState

TINY = [name for name in ts.PRESETS if name.endswith("-tiny")]  # haltingvt-tiny: divided, then joint blocks


# ------------------------------------------------------------------ presets
@pytest.mark.parametrize(
    ("name", "params_m"),
    # Parameter counts of the papers: VideoMAE Tab. (22M, 87M, 305M, 633M), TimeSformer 121.4M.
    [
        ("videomae-s", 22),
        ("videomae-b", 87),
        ("videomae-l", 305),
        ("videomae-h", 633),
        ("timesformer-b", 121.4),
    ],
)
def test_preset_sizes_match_papers(name: str, params_m: float) -> None:
    with torch.device("meta"):
        model = ts.build(name)
    assert model.num_params / 1e6 == pytest.approx(params_m, rel=0.01)


def test_preset_input_sizes() -> None:
    assert preset("videomae-b").grid == (8, 14, 14)
    assert preset("timesformer-b").grid == (8, 14, 14)
    assert preset("joint-deit-s").has_cls and not preset("videomae-s").has_cls


def test_unknown_preset_and_field() -> None:
    with pytest.raises(InputError, match="valid presets: videomae-s"):
        ts.build("videomae-xxl")
    with pytest.raises(InputError, match="unknown config field"):
        ts.build("videomae-tiny", num_class=3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pool": "cls"}, "no class token"),
        ({"arch": "timesformer", "pool": "cls", "tubelet": 2}, "tubelet must be 1"),
        ({"frames": 5}, "divisible by the tubelet"),
        ({"size": 30}, "divisible by the patch"),
        ({"heads": 3}, "divisible by heads"),
    ],
)
def test_config_validation(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preset("videomae-tiny", **changes)


def test_vivit_config() -> None:
    """ViViT: tubelets of any length, a class token, so the class-token readout only; tanh GELU."""
    assert preset("vivit-tiny", tubelet=4).grid == (1, 4, 4)
    assert preset("vivit-tiny").has_cls and preset("vivit-tiny").act == "gelu_tanh"
    with pytest.raises(InputError, match="arch 'vivit' reads out its class token: pool must be 'cls'"):
        preset("vivit-tiny", pool="mean")
    with pytest.raises(InputError, match="arch must be one of videomae, vit-cls, timesformer, vivit"):
        preset("vivit-tiny", arch="vivit2")


# ------------------------------------------------------------------ numerics
def test_sinusoid_table_matches_reference_construction() -> None:
    # The reference builds the table in float64 Python lists, then casts to float32.
    n, d = 10, 6
    ref = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    ref[:, 0::2], ref[:, 1::2] = np.sin(ref[:, 0::2]), np.cos(ref[:, 1::2])
    table = sinusoid_table(n, d)
    assert table.dtype == torch.float32
    assert torch.equal(table, torch.tensor(ref, dtype=torch.float32))
    assert table[3, 4].item() == pytest.approx(math.sin(3 / 10000 ** (4 / 6)))


def test_position_table_is_not_saved() -> None:
    model = ts.build("videomae-tiny")
    assert "embed.pos_table" not in model.state_dict()
    assert model.embed.pos_table.shape == (2 * 4 * 4, 32)


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_and_state(name: str) -> None:
    model = ts.build(name).eval()
    video = tiny_video(name)
    state = model.forward_features(video)
    state.check()
    cfg = model.config
    layout = Layout.of_grid(cfg.grid)  # walked through what each block declares it does (MViT, Swin pool)
    for p in range(cfg.depth):
        layout = model.layout_leaving(p, model.layout_after(p, layout))
    assert state.grid == cfg.grid and state.x.shape == (2, layout.tokens, cfg.width(cfg.depth))
    assert (state.frames, state.frame_grid) == (layout.frames, layout.frame_grid)
    assert (state.cls is not None) == cfg.has_cls
    assert model(video).shape == (2, cfg.num_classes)


@pytest.mark.parametrize("name", TINY)
def test_batch_of_two_equals_two_batches_of_one(name: str) -> None:
    model = ts.build(name).eval()
    video = tiny_video(name)
    with torch.no_grad():
        both = model(video)
        single = torch.cat([model(video[:1]), model(video[1:])])
    torch.testing.assert_close(both, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    model = ts.build(name).train()
    model(tiny_video(name)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # A fresh model has a zero time embedding, but its gradient is still non-zero.
    assert not missing, missing


def test_drop_path_is_stochastic_in_training_only() -> None:
    model = ts.build("videomae-tiny", drop_path=0.5)
    video = tiny_video()
    model.train()
    outs = {tuple(model(video).flatten().tolist()) for _ in range(4)}
    assert len(outs) > 1
    model.eval()
    torch.testing.assert_close(model(video), model(video), rtol=0, atol=0)


def test_bfloat16_autocast_is_close_to_float32() -> None:
    model = ts.build("videomae-tiny").eval()
    video = tiny_video()
    with torch.no_grad():
        ref = model(video)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(video)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------ recording
def test_block_records_keys_and_class_attention_on_request() -> None:
    model = ts.build("joint-tiny").eval()
    state = model.embed(tiny_video("joint-tiny"), model.config.grid)
    block = model.blocks[0]
    plain = block(state)
    assert KEYS not in plain.aux and CLS_ATTN not in plain.aux
    block.record = frozenset({KEYS, CLS_ATTN})
    rec = block(state)
    torch.testing.assert_close(rec.x, plain.x, rtol=0, atol=0)  # recording changes nothing

    # Reference: keys and the class token's attention row, computed by hand.
    attn = block.attn
    x = block.norm1(torch.cat([state.cls, state.x], 1))
    B, N, _ = x.shape
    q, k, _ = (
        (x @ attn.qkv.weight.T + attn.qkv.bias).view(B, N, 3, attn.heads, -1).unbind(2)
    )  # (B, N, nh, hd)
    torch.testing.assert_close(rec.aux[KEYS], k[:, 1:].mean(2))
    logits = torch.einsum("bhd,bnhd->bhn", q[:, 0], k) / math.sqrt(attn.head_dim)
    torch.testing.assert_close(rec.aux[CLS_ATTN], logits.softmax(-1)[:, :, 1:].mean(1))


def test_class_attention_without_class_token_is_refused() -> None:
    attn = Attention(dim=8, heads=2)
    with pytest.raises(ValueError, match="without a class token"):
        attn(torch.randn(1, 4, 8), record=frozenset({CLS_ATTN}))


def test_videomae_keys_have_no_bias() -> None:
    attn = Attention(dim=8, heads=2, qkv_bias="qv")
    with torch.no_grad():
        attn.q_bias.fill_(1.0)
        attn.v_bias.fill_(2.0)
    bias = attn._qkv_bias()
    assert bias[:8].eq(1).all() and bias[8:16].eq(0).all() and bias[16:].eq(2).all()
    assert [n for n, _ in attn.named_parameters()] == [
        "q_bias",
        "v_bias",
        "qkv.weight",
        "proj.weight",
        "proj.bias",
    ]


# ------------------------------------------------------------------ padding masks
@pytest.mark.parametrize("name", ["videomae-tiny", "joint-tiny", "vivit-tiny"])
def test_padding_tokens_change_nothing(name: str) -> None:
    """A sample padded with junk tokens (mask False) gives the logits of the sample alone."""
    model = ts.build(name).eval()
    state = model.embed(tiny_video(name, batch=1), model.config.grid)
    keep = state.gather(torch.arange(0, 32, 2)[None])  # 16 real tokens
    pad = 5
    junk = torch.randn(1, pad, model.config.dim) * 10
    padded = keep.replace(
        x=torch.cat([keep.x, junk], 1),
        pos=torch.cat([keep.pos, torch.zeros(1, pad, dtype=torch.long)], 1),
        mask=torch.cat([torch.ones(1, 16, dtype=torch.bool), torch.zeros(1, pad, dtype=torch.bool)], 1),
    )
    padded.check()

    def run(s: TokenState) -> torch.Tensor:
        for block in model.blocks:
            s = block(s)
        return model.forward_head(s)

    with torch.no_grad():
        torch.testing.assert_close(run(padded), run(keep), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ TimeSformer on reduced grids
def test_timesformer_runs_on_the_actual_grid() -> None:
    model = ts.build("timesformer-tiny").eval()
    with torch.no_grad():  # strong weights, so that temporal attention matters to the output
        for p in model.parameters():
            p.normal_(0, 0.3)
    state = model.embed(tiny_video("timesformer-tiny"), model.config.grid)  # 4 frames x 16 tokens

    def run(s: TokenState) -> torch.Tensor:
        for block in model.blocks:
            s = block(s)
        return model.forward_head(s)

    with torch.no_grad():
        # Two of four frames (frame selection), and 9 tokens per frame (per-frame pruning).
        frames = state.gather(
            torch.cat([torch.arange(16), torch.arange(32, 48)])[None].expand(2, -1), frames=2
        )
        per_frame = torch.cat([f * 16 + torch.arange(9) for f in range(4)])[None].expand(2, -1)
        assert run(frames).shape == run(state.gather(per_frame, frames=4)).shape == (2, 10)

        # The same spatial permutation in every frame keeps slot j at one spatial position across
        # frames, so divided attention must give every token exactly the same output.
        def tokens(s: TokenState) -> torch.Tensor:
            for block in model.blocks:
                s = block(s)
            return s.gather(s.pos.argsort(1)).x  # back in grid order

        perm = torch.randperm(16)
        permuted = torch.cat([f * 16 + perm for f in range(4)])[None].expand(2, -1)
        torch.testing.assert_close(
            tokens(state.gather(permuted, frames=4)), tokens(state), rtol=1e-4, atol=1e-4
        )

        # A different permutation per frame breaks that pairing: temporal attention mixes other
        # positions, so the outputs must change.
        shuffled = torch.cat([f * 16 + torch.randperm(16) for f in range(4)])[None].expand(2, -1)
        assert (tokens(state.gather(shuffled, frames=4)) - tokens(state)).abs().mean() > 0.1


def test_timesformer_refuses_unequal_frames_and_padding() -> None:
    model = ts.build("timesformer-tiny").eval()
    state = model.embed(tiny_video("timesformer-tiny"), model.config.grid)
    with pytest.raises(ValueError, match="same number of tokens in every frame"):
        model.blocks[0](state.gather(torch.arange(10)[None].expand(2, -1)))
    with pytest.raises(ValueError, match="dense batch"):
        model.blocks[0](state.replace(mask=torch.ones(2, 64, dtype=torch.bool)))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((4, 3, 32, 32), torch.float32, r"\(B, T, C, H, W\)"),
        ((1, 4, 1, 32, 32), torch.float32, "expected 3 channels"),
        ((1, 3, 3, 32, 32), torch.float32, "divisible by the tubelet size 2"),
        ((1, 4, 3, 30, 30), torch.float32, "divisible by the patch size 8"),
        ((1, 4, 3, 32, 36), torch.float32, r"frame size 32x36 must be divisible by the patch size 8"),
        ((1, 0, 3, 32, 32), torch.float32, r"at least 2 frame\(s\) of at least 8x8 pixels, got 0 of 32x32"),
        ((1, 4, 3, 32, 32), torch.uint8, "expected a float video"),
    ],
)
def test_bad_video_input(shape: tuple, dtype: torch.dtype, message: str) -> None:
    model = ts.build("videomae-tiny")
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape, dtype=dtype))


def test_meta_build_matches_real_structure() -> None:
    with torch.device("meta"):
        meta = build_from_config(preset("timesformer-tiny"))
    real = ts.build("timesformer-tiny")
    assert {k: v.shape for k, v in meta.state_dict().items()} == {
        k: v.shape for k, v in real.state_dict().items()
    }


@pytest.mark.parametrize("name", ["videomae-tiny", "vivit-tiny"])
def test_the_tubelet_embedding_of_a_batch_equals_its_clips_embedded_in_chunks(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the patch embedding runs a few clips at a time (`TILE_ROWS` tokens); the tokens are those
    of the whole batch at once, bit for bit, under autocast too."""
    from tokensieve.backbones import videovit

    model = ts.build(name).eval()
    video = tiny_video(name, batch=5)
    with torch.no_grad():
        whole = model.embed(video, model.config.grid).x
        monkeypatch.setattr(videovit, "TILE_ROWS", 40)  # 32 tokens per clip: one clip at a time
        chunked = model.embed(video, model.config.grid).x
        with torch.autocast("cpu", dtype=torch.bfloat16):
            monkeypatch.setattr(videovit, "TILE_ROWS", 64)  # two clips at a time, the last alone
            low = model.embed(video, model.config.grid).x
            monkeypatch.setattr(videovit, "TILE_ROWS", 10**6)
            low_whole = model.embed(video, model.config.grid).x
    assert torch.equal(chunked, whole) and chunked.is_contiguous()
    assert low.dtype == torch.bfloat16 and torch.equal(low, low_whole)


@pytest.mark.parametrize("name", ["videomae-tiny", "vivit-tiny"])
def test_the_tubelet_embedding_trains_on_batches_it_would_chunk(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: training on CPU failed once a batch held more than `TILE_ROWS` tokens (videomae-s: 2
    clips), the embedding's chunks being written with `out=`, which autograd refuses. With autograd
    recording it takes the batch whole: the gradients of a batch that fits one chunk."""
    from tokensieve.backbones import videovit

    model = ts.build(name).train()
    video = tiny_video(name, batch=3)
    grads = []
    for rows in (10**6, 40):  # whole, then one clip (32 tokens) per chunk
        monkeypatch.setattr(videovit, "TILE_ROWS", rows)
        model.zero_grad()
        torch.manual_seed(0)
        model(video).logsumexp(-1).sum().backward()
        grads.append(model.embed.proj.weight.grad.clone())
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv3d(3, 8, (2, 4, 4), (2, 4, 4)), (2, 4, 3, 8, 12)),
        (nn.Conv3d(3, 8, (2, 4, 4), (2, 4, 4)), (1, 5, 3, 9, 8)),  # frames and height not divisible: the conv
        (nn.Conv2d(3, 8, 4, 4), (2, 3, 3, 8, 12)),
        (nn.Conv2d(3, 8, 4, 4), (1, 2, 3, 10, 8)),
        (nn.Conv3d(3, 8, (2, 4, 4), (1, 4, 4)), (1, 4, 3, 8, 8)),  # overlapping in time: the conv
    ],
)
def test_patch_tokens_are_the_convolution(conv: nn.Module, shape: tuple[int, ...]) -> None:
    """The embedding's matrix product over patches gives the convolution's tokens (float64: up to
    rounding), in (B, T', H', W', D) time-major order, whatever the input divides into."""
    conv = conv.double()
    video = torch.randn(*shape, dtype=torch.float64)
    if isinstance(conv, nn.Conv3d):
        expected = conv(video.transpose(1, 2)).permute(0, 2, 3, 4, 1)
    else:
        expected = conv(video.flatten(0, 1)).unflatten(0, shape[:2]).permute(0, 1, 3, 4, 2)
    torch.testing.assert_close(patch_tokens(video, conv), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not layers.PACK_BF16, reason="this torch has no oneDNN bfloat16 operators")
def test_bfloat16_inference_with_the_packed_weight_is_the_plain_product() -> None:
    """Linear's packed path (bfloat16, CPU, no grad) gives the bits of F.linear, on 2-D, 3-D and
    strided inputs and with another bias; it packs again when the weight changes in place or is replaced,
    and a deep copy or a pickle leaves the packed copy behind."""
    torch.manual_seed(0)
    linear = layers.Linear(48, 40).to(torch.bfloat16)
    inputs = [torch.randn(7, 48), torch.randn(2, 5, 48), torch.randn(5, 96)[:, ::2]]
    with torch.no_grad():
        for x in (x.to(torch.bfloat16) for x in inputs):
            assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
            assert "_packed" in linear.__dict__  # the packed path ran
            other = torch.randn(40, dtype=torch.bfloat16)
            assert torch.equal(linear.project(x, other), F.linear(x, linear.weight, other))
        x = inputs[0].to(torch.bfloat16)
        linear.weight.mul_(2)  # in place: the version changes
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
        linear.load_state_dict({"weight": torch.randn(40, 48), "bias": torch.zeros(40)})
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
        twin = copy.deepcopy(linear)
        assert "_packed" not in twin.__dict__ and torch.equal(twin(x), linear(x))
        assert "_packed" not in pickle.loads(pickle.dumps(linear)).__dict__
    y = linear(x)  # with grad enabled: the plain product, differentiable
    assert y.requires_grad and torch.equal(y, F.linear(x, linear.weight, linear.bias))


def test_a_bfloat16_model_counts_the_same_flops_with_packed_weights() -> None:
    """The FLOP counter (a dispatch mode) sees the plain products: a bfloat16 model counts what a float32
    one counts."""
    model = ts.build("videomae-tiny").eval()
    assert ts.flops(copy.deepcopy(model).to(torch.bfloat16)) == pytest.approx(ts.flops(model))


@pytest.mark.parametrize("name", ["videomae-tiny", "vivit-tiny", "joint-tiny"])
def test_inference_runs_the_mlp_in_row_tiles_with_the_same_result(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In CPU inference a dense batch's MLP half runs in row tiles (`TILE_ROWS`, here 7 rows: tiles that
    cut clips and the class token's row apart): the same output as the whole batch at once, and as
    with grad enabled (no tiles)."""
    model = ts.build(name).eval()
    video = torch.randn(3, *tiny_video(name).shape[1:])
    calls: list[torch.Size] = []
    model.blocks[0].mlp.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    with torch.inference_mode():
        whole = model(video)
    ((B, L, _),) = calls  # one call on the whole batch (class token included)
    monkeypatch.setattr(layers, "TILE_ROWS", 7)
    calls.clear()
    with torch.inference_mode():
        tiled = model(video)
    assert (
        max(c[0] for c in calls) <= 7 and sum(c[0] for c in calls) == B * L
    )  # tiles of <= 7 rows, each row once
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(video), whole, rtol=1e-5, atol=1e-6)
