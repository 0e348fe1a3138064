"""TokenLearner: its modules against references written here from the equations, the fuser's identity at
initialisation, the vector attention, placements, the paper's GFLOPs (Table 1) and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tokensieve as ts
from conftest import tiny_video
from tokensieve.reducers.tokenlearner import MAPS, FuserPaper, FuserReleased, LearnerV1, LearnerV11, block_at
from tokensieve.tokens import SOURCE_MAP
from tokensieve.viz import reduction_stages


def _ln(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _randomise(module: nn.Module) -> None:
    torch.manual_seed(1)
    for p in module.parameters():
        nn.init.normal_(p, std=0.5)


def test_v11_is_a_softmax_weighted_average_over_each_frames_locations() -> None:
    learner = LearnerV11(dim=6, tokens=3).double()
    _randomise(learner)
    x = torch.randn(2, 5, 6, dtype=torch.float64)  # 2 frames of 5 tokens
    z, maps = learner(x, (1, 5))
    for m in range(2):
        logits = learner.mlp(_ln(x[m], learner.norm))  # (5, 3): one logit per location and token
        for s in range(3):
            w = logits[:, s].exp() / logits[:, s].exp().sum()
            torch.testing.assert_close(maps[m, s], w)
            torch.testing.assert_close(z[m, s], (w[:, None] * x[m]).sum(0))  # the un-normalised input


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_v1_is_sigmoid_conv_maps_summed_over_the_grid(pool: str) -> None:
    learner = LearnerV1(dim=4, tokens=2, pool=pool).double()
    _randomise(learner)
    x = torch.randn(3, 6, 4, dtype=torch.float64)  # 3 frames of a 2x3 grid
    z, maps = learner(x, (2, 3))
    a = _ln(x, learner.norm).transpose(1, 2).reshape(3, 4, 2, 3)
    for i, conv in enumerate(learner.convs):  # 3x3, zero padding, no bias; GELU but after the last
        a = F.conv2d(a, conv.weight, padding=1)
        a = a if i == 3 else F.gelu(a)
    alpha = torch.sigmoid(a).flatten(2)  # (3, 2, 6)
    torch.testing.assert_close(maps, alpha)
    expected = torch.einsum("msl,mlc->msc", alpha, x)
    torch.testing.assert_close(z, expected / 6 if pool == "mean" else expected)


def test_released_fuser_mixes_tokens_and_spreads_them_by_sigmoid_maps() -> None:
    fuser = FuserReleased(dim=4, tokens=3).double()
    _randomise(fuser)
    y, full = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    out = fuser(y, full)
    for m in range(2):
        mixed = _ln(y[m], fuser.norm1)  # (3, 4)
        mixed = fuser.mix.weight @ mixed + fuser.mix.bias[:, None]  # tokens mixed per channel
        mixed = _ln(mixed, fuser.norm2)
        spread = torch.sigmoid(fuser.mlp(_ln(full[m], fuser.norm_full)))  # (5, 3)
        torch.testing.assert_close(out[m], spread @ mixed)
    fresh = FuserReleased(dim=4, tokens=3).double()  # unit norms, as built
    fresh.reset_mix()
    assert torch.equal(fresh(y, full), torch.zeros_like(full))  # the unit starts as the identity


def test_paper_fuser_maps_all_tokens_to_one_vector_per_slice_broadcast_over_it() -> None:
    fuser = FuserPaper(frames=2, tokens=3).double()
    _randomise(fuser)
    y, full = torch.randn(1, 6, 4, dtype=torch.float64), torch.randn(1, 10, 4, dtype=torch.float64)
    out = fuser(y, full)
    for t in range(2):
        o = (fuser.mix.weight[t][:, None] * y[0]).sum(0) + fuser.mix.bias[t]  # Eq. 3, every channel
        torch.testing.assert_close(out[0, 5 * t : 5 * t + 5], o.expand(5, 4))


def test_vector_attention_is_eq_2_per_channel() -> None:
    """The blocks on learned tokens with `vector=true`: y_i = sum_j softmax_j(q_i * k_j) * v_j per
    channel, with the block's own projections (written out here token by token)."""
    torch.manual_seed(0)
    model = ts.apply(ts.build("joint-tiny").eval(), "tokenlearner:at=2,tokens=2,vector=true").model
    attn = model.blocks[2].attn
    x = torch.randn(1, 5, 32)
    out, _ = attn(x, vector=True)
    q, k, v = F.linear(x[0], attn.qkv.weight, attn.qkv.bias).chunk(3, -1)  # (5, 32) each
    y = torch.stack([(torch.softmax(q[i] * k, 0) * v).sum(0) for i in range(5)])  # softmax over j
    torch.testing.assert_close(out[0], attn.proj(y), rtol=1e-5, atol=1e-6)
    plain, _ = attn(x)
    assert not torch.allclose(plain, out)


@pytest.mark.parametrize("fuser", ["released", "paper"])
def test_with_the_fuser_at_initialisation_each_unit_is_the_identity(fuser: str) -> None:
    """On a mean-pooled model the patch tokens alone reach the head: at initialisation TokenLearner ->
    block -> fuser adds nothing, so the logits are those of the model without the blocks from `at` on.
    (The unreduced model's differ: those blocks ran on every token.)"""
    torch.manual_seed(0)
    model = ts.build("videomae-tiny").eval()
    video = tiny_video("videomae-tiny")
    cut = copy.deepcopy(model)
    for p in (1, 2):
        cut.blocks[p] = nn.Identity()
    with torch.no_grad():
        expected = cut(video)
        ts.apply(model, f"tokenlearner:at=1,tokens=4,fuser={fuser}")
        logits = model(video)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    model.train()
    model(video).sum().backward()
    assert model.plan[0].fuse.mix.weight.grad.abs().sum() > 0  # it learns from there
    assert model.blocks[2].attn.qkv.weight.grad.abs().sum() == 0  # nothing else reaches the head yet
    model.zero_grad()
    nn.init.normal_(model.plan[0].fuse.mix.weight, std=0.1)  # once the mixing has moved,
    model(video).sum().backward()
    assert model.blocks[2].attn.qkv.weight.grad.abs().sum() > 0  # the blocks on learned tokens learn


def test_placements_follow_the_released_encoders() -> None:
    model = ts.build("joint-tiny")  # 3 blocks, class-token readout
    assert [s.site.position for s in ts.apply(model, "tokenlearner:at=1").slots] == [1]
    assert [s.site.position for s in ts.apply(model, "tokenlearner:at=1,fuser=released").slots] == [1, 2]
    videomae = ts.build("videomae-tiny")  # mean readout: the last fuser after the last block too
    installed = ts.apply(videomae, "tokenlearner:at=1,tokens=4,fuser=released")
    assert [s.site.position for s in installed.slots] == [1, 2, 3]
    assert [step.after.tokens for step in installed.steps] == [2 * 4, 2 * 4, 2 * 16]
    assert block_at(0.5, 12) == 6 and block_at(6, 12) == 6 and block_at(0.5, 21) == 10


def test_traced_forward_records_each_learned_tokens_map() -> None:
    torch.manual_seed(0)
    model = ts.apply(ts.build("videomae-tiny").eval(), "tokenlearner:at=1,tokens=3").model
    with torch.no_grad():
        state = model.forward_features(tiny_video("videomae-tiny"), trace=True)
    maps = state.aux[MAPS]  # (B, S, T, H, W): 3 tokens per slice, 2 slices of 4x4 cells
    assert maps.shape == (2, 3, 2, 4, 4)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 3, 2))  # V1.1: a distribution per token
    owner = state.aux[SOURCE_MAP].view(2, 2, 16)  # each cell goes to its slice's most weighing token
    torch.testing.assert_close(owner, maps.flatten(3).argmax(1) + 3 * torch.arange(2).view(1, 2, 1))


def test_maps_follow_the_tokens_an_earlier_reducer_left() -> None:
    """After `random` drops tokens, a learned token's weights land on the cells of the tokens it pooled
    (each frame's weights still summing to 1) and dropped cells weigh 0."""
    torch.manual_seed(0)
    plan = "random:keep=0.5,per_frame=true+tokenlearner:at=1,tokens=3"
    model = ts.apply(ts.build("videomae-tiny").eval(), plan).model
    clip = tiny_video("videomae-tiny")[:1]
    with torch.no_grad():
        maps = model.forward_features(clip, trace=True).aux[MAPS][0]  # (S, T, H, W)
    kept = torch.from_numpy(reduction_stages(model, clip)[1].owners) >= 0  # (T, H, W) what `random` kept
    assert kept.sum() == 16  # half of the clip's 32 cells
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(3, 2))
    assert (maps[:, ~kept] == 0).all() and (maps[:, kept] > 0).all()


# ViT at 384x384, one image (Table 1): (preset, depth, plan, the paper's GFLOPs, ours).
TABLE_1 = [
    ("vit-s32-384", 12, None, 3.4, 3.450),
    ("vit-b16-384", 12, None, 55.6, 55.538),
    ("vit-s32-384", 12, "tokenlearner:at=0.5,tokens=8,version=1", 1.9, 1.911),
    ("vit-b16-384", 12, "tokenlearner:at=0.5,tokens=8,version=1", 28.7, 28.361),
    ("vit-s32-384", 22, "tokenlearner:at=0.5,tokens=8,version=1", 3.3, 3.357),
    ("vit-b32-384", 20, "tokenlearner:at=0.5,tokens=8,version=1", 11.5, 11.586),
    ("vit-b16-384", 21, "tokenlearner:at=0.5,tokens=8,version=1", 47.1, 47.079),
    ("vit-b16-384", 21, "tokenlearner:at=0.5,tokens=16,version=1", 47.7, 47.745),
]


@pytest.mark.parametrize(("name", "depth", "spec", "paper", "ours"), TABLE_1)
def test_gflops_of_table_1(name: str, depth: int, spec: str | None, paper: float, ours: float) -> None:
    model = ts.build(name, depth=depth)
    with ts.apply(model, spec):
        gflops = float(ts.flops(model))
    assert gflops == pytest.approx(ours, abs=5e-4)
    assert abs(gflops - paper) < 1


def test_table_1s_vit_b32_is_not_a_12_block_b32_at_384() -> None:
    """The paper's 19.8 for ViT B/32 fits none of its other rows: a 12-block B/32 at 384 is 13.06 (its
    TokenLearner B/32 with 20 blocks, 11.5, matches ours); docs/methods.md."""
    assert float(ts.flops(ts.build("vit-b32-384"))) == pytest.approx(13.057, abs=5e-4)


@pytest.mark.parametrize(
    ("name", "spec", "message"),
    [
        ("joint-tiny", "tokenlearner:at=3", "at=3 must be a block of this 3-block model"),
        ("joint-tiny", "tokenlearner:version=2", "version must be 1 .* or 1.1"),
        ("joint-tiny", "tokenlearner:pool=sum", "version 1.1 pools by a softmax-weighted average"),
        ("joint-tiny", "tokenlearner:tokens=0", "tokens must be at least 1"),
        ("joint-tiny", "random:keep=0.5,per_frame=true+tokenlearner:at=1,version=1", "version 1 convolves"),
        (
            "joint-tiny",
            "attention:mass=0.6,at=0+tokenlearner:at=1",
            "tokenlearner .* cannot take a batch whose clips hold different numbers",
        ),
        (
            "joint-tiny",
            "tokenlearner:at=0,fuser=released+random:keep=0.5,at=1",
            "place no other reducer between",
        ),
        ("timesformer-tiny", "tokenlearner:at=1,vector=true", "block 1 of this model is divided"),
    ],
)
def test_bad_settings_are_refused_at_apply(name: str, spec: str, message: str) -> None:
    with pytest.raises(ts.InputError, match=message):
        ts.apply(ts.build(name), spec)
