"""HaltingVT (`halting`, `glimpser`): the ACT bookkeeping by hand, the released model's forward pass
(zeroed-but-attended halting, the Glimpser without the class token's skip) written here from the paper
and the notes on the released code, A-ViT's semantics (halted tokens masked out of attention) against
our removal through the packed path, the losses and fake clips of training, per-clip GFLOPs, the map of
where tokens halted, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import tokensieve as ts
from conftest import tiny_video
from tokensieve.data.clips import ClipDataset
from tokensieve.data.datasets import read_list
from tokensieve.data.synthetic import make_synthetic
from tokensieve.engine.optim import lr_factor
from tokensieve.reducers.halting import Act, act_step, halting_map
from tokensieve.tokens import INPUTS, LOSSES, STATS, Inputs

NAME = "haltingvt-tiny"  # 4 frames x 16 tokens, blocks 0-1 divided, 2-3 joint


# ------------------------------------------------------------------------------------ ACT by hand
def test_act_on_three_tokens_and_four_blocks_by_hand() -> None:
    """Scores per block (rows) for tokens a, b, c; eps = 0.01, so a token halts once c > 0.99.

    a: 0.5, 0.6        -> c = 0.5, 1.1: halts at block 2 with its remainder 0.5; ponder 2 + 0.5
    b: 0.2, 0.3, 0.1, * -> c = 0.2, 0.5, 0.6, then h = 1 at the last block: remainder 0.4; 4 + 0.4
    c: 0.995           -> halts at block 1 with remainder 1; ponder 1 + 1
    """
    h = torch.tensor([[0.5, 0.2, 0.995], [0.6, 0.3, 0.7], [0.9, 0.1, 0.2], [0.3, 0.4, 0.5]]).double()
    act, running = Act.start(h[0:1]), torch.ones(1, 3, dtype=torch.bool)
    weights, alive = [], []
    for layer in range(4):
        after, weight, going = act_step(act, h[layer : layer + 1], eps=0.01, last=layer == 3)
        # as the halting reducer does: tokens that halted earlier keep their state and weigh nothing
        act = Act(*(torch.where(running, new, old) for new, old in zip(after, act, strict=True)))
        weights.append(torch.where(running, weight, torch.zeros_like(weight))[0].tolist())
        running = going & running
        alive.append(running[0].tolist())
    expected = [[0.5, 0.2, 1.0], [0.5, 0.3, 0.0], [0.0, 0.1, 0.0], [0.0, 0.4, 0.0]]
    assert [w for row in weights for w in row] == pytest.approx([w for row in expected for w in row])
    assert [sum(w[i] for w in weights) for i in range(3)] == pytest.approx([1, 1, 1])  # a convex readout
    assert alive == [[True, True, False], [False, True, False], [False, True, False], [False, False, False]]
    assert act.ponder[0].tolist() == pytest.approx([2.5, 4.4, 2.0])
    assert act.remainder[0].tolist() == pytest.approx([0.5, 0.4, 1.0])


# ------------------------------------------------------------------ the released forward, by hand
def _model(**changes: object) -> ts.VideoBackbone:
    torch.manual_seed(0)
    model = ts.build(NAME, **changes).double().eval()
    with torch.no_grad():  # channel 0 spread widely, so halting scores vary from token to token
        for block in model.blocks:
            block.mlp.fc2.bias[0] = 0.0
            block.mlp.fc2.weight[0] *= 40
    return model


def _attend(attn: torch.nn.Module, x: Tensor, keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Multi-head attention by hand: (output (B, L, C), probabilities (B, nh, L, L)); `keys` (B, L) bool
    masks keys out."""
    B, L, C = x.shape
    nh = attn.heads
    q, k, v = F.linear(x, attn.qkv.weight, attn._qkv_bias()).view(B, L, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / math.sqrt(C // nh)
    if keys is not None:
        logits = logits.masked_fill(~keys[:, None, None, :], float("-inf"))
    p = logits.softmax(-1)
    return attn.proj((p @ v).transpose(1, 2).reshape(B, L, C)), p


def _glimpser_block(block: torch.nn.Module, x: Tensor, cls: Tensor, T: int, keep: float) -> Tensor:
    """The released selecting block: temporal attention, spatial attention with the class token per
    frame, the top ceil(keep * n) tokens of each frame by head-averaged class attention, the class token
    replaced by its frame-averaged attention output (no skip), the MLP on what is left. (B, 1 + kept, C)."""
    B, N, C = x.shape
    n = N // T
    xt = x.view(B, T, n, C).transpose(1, 2).reshape(B * n, T, C)
    yt, _ = _attend(block.temporal_attn, block.temporal_norm1(xt))
    x = x + block.temporal_fc(yt.view(B, n, T, C).transpose(1, 2).reshape(B, N, C))
    xs = torch.cat([cls.repeat_interleave(T, 0), x.view(B * T, n, C)], 1)  # (B*T, 1 + n, C)
    ys, p = _attend(block.attn, block.norm1(xs))
    cls = ys[:, 0].view(B, T, C).mean(1, keepdim=True)  # the skip connection dropped
    x = x.view(B * T, n, C) + ys[:, 1:]
    top = p[:, :, 0, 1:].mean(1).topk(math.ceil(keep * n), dim=1).indices  # (B*T, k)
    kept = x.gather(1, top.unsqueeze(-1).expand(-1, -1, C)).reshape(B, -1, C)
    x = torch.cat([cls, kept], 1)
    return x + block.mlp(block.norm2(x))


def _joint(block: torch.nn.Module, x: Tensor, keys: Tensor | None = None) -> Tensor:
    y, _ = _attend(block.attn, block.norm1(x), keys)
    x = x + y
    return x + block.mlp(block.norm2(x))


def _reference(model: ts.VideoBackbone, video: Tensor, *, beta: float, gamma: float = 10.0, keep: float = 0.5,
               eps: float = 0.01, masked: bool = False) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(logits, mean ponder) of HaltingVT as released: halted tokens multiplied by zero and still attended
    to (`masked=False`), or A-ViT's semantics, halted tokens masked out of every later attention except
    the class token, which stays a key (`masked=True`, ours with `halted=remove`)."""
    state = model.embed(video, model.config.grid)
    state = model.blocks[0](state)
    x = _glimpser_block(model.blocks[1], state.x, state.cls, model.config.grid[0], keep)  # (B, L, C)
    B, L, _ = x.shape
    c, rest, rho = torch.zeros(B, L).double(), torch.ones(B, L).double(), torch.zeros(B, L).double()
    running = torch.ones(B, L, dtype=torch.bool)
    output = torch.zeros_like(x)
    joint = model.blocks[2:]
    for i, block in enumerate(joint):
        if masked:
            keys = running.clone()
            keys[:, 0] = True
            out = _joint(block, x, keys)
        else:
            out = _joint(block, x * running[..., None])
        h = torch.ones(B, L).double() if i == len(joint) - 1 else torch.sigmoid(gamma * out[..., 0] - beta)
        c = c + h
        rho = rho + running
        reached = (c > 1 - eps) & running
        going = c < 1 - eps
        output = output + out * torch.where(reached, rest, torch.where(going & running, h, 0.0))[..., None]
        rho = rho + rest * reached
        rest = rest - torch.where(going & running, h, 0.0)
        running = going & running
        x = out
    return model.head(model.norm(output[:, 0])), rho.mean()


def _reference_mean(model: ts.VideoBackbone, video: Tensor, *, beta: float, masked: bool) -> Tensor:
    """Logits of halting on a mean-pooled model (VideoMAE), from block 0: every token's halting-weighted
    outputs, their mean over the tokens, `fc_norm`, the head; halted tokens zeroed and attended to, or
    masked out of attention (`masked`)."""
    x = model.embed(video, model.config.grid).x  # (B, N, C)
    B, N, _ = x.shape
    c, rest = torch.zeros(B, N).double(), torch.ones(B, N).double()
    running = torch.ones(B, N, dtype=torch.bool)
    output = torch.zeros_like(x)
    for i, block in enumerate(model.blocks):
        keys = running | ~running.any(1, keepdim=True)  # a clip whose tokens all halted: its outputs weigh 0
        out = _joint(block, x, keys) if masked else _joint(block, x * running[..., None])
        last = i == len(model.blocks) - 1
        h = torch.ones(B, N).double() if last else torch.sigmoid(10 * out[..., 0] - beta)
        c = c + h
        reached, going = (c > 0.99) & running, (c < 0.99) & running
        output = output + out * torch.where(reached, rest, torch.where(going, h, 0.0))[..., None]
        rest = rest - torch.where(going, h, 0.0)
        running, x = going, out
    return model.head(model.fc_norm(output.mean(1)))


@pytest.mark.parametrize("beta", [0.0, -100.0])  # -100: every token halts after block 0
@pytest.mark.parametrize("halted", ["zero", "remove"])
def test_a_mean_pooled_model_reads_out_the_mean_of_every_tokens_halting_weighted_outputs(
    halted: str, beta: float
) -> None:
    torch.manual_seed(0)
    model = ts.build("videomae-tiny").double().eval()
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc2.weight[0] *= 40
    video = tiny_video("videomae-tiny", batch=3, dtype=torch.float64)
    seen = []
    with torch.no_grad():
        expected = _reference_mean(model, video, beta=beta, masked=halted == "remove")
        ts.apply(model, f"halting:beta={beta},glimpser=1,halted={halted}")
        hook = model.reducers[1].register_forward_hook(lambda m, a, out: seen.append(out))  # after block 0
        got = model(video)
        hook.remove()
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    if halted == "remove" and beta < 0:  # a clip left with one halted token, which weighs nothing
        assert seen[0].num_tokens.tolist() == [1, 1, 1]


@pytest.mark.parametrize("beta", [-0.5, 0.0, 1.0])
def test_halted_zero_is_the_released_forward_pass(beta: float) -> None:
    model = _model()
    video = tiny_video(NAME, batch=3, dtype=torch.float64)
    with torch.no_grad():
        expected, _ = _reference(model, video, beta=beta)
        ts.apply(model, f"halting:beta={beta},halted=zero")
        got = model(video)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("ragged", ["packed", "padded"])
@pytest.mark.parametrize("beta", [-0.5, 0.0, 1.0])
def test_halted_remove_is_a_vits_masked_attention(beta: float, ragged: str) -> None:
    model = _model()
    model.ragged = ragged
    video = tiny_video(NAME, batch=3, dtype=torch.float64)
    seen = []
    with torch.no_grad():
        expected, ponder = _reference(model, video, beta=beta, masked=True)
        ts.apply(model, f"halting:beta={beta},motion=0")
        hook = model.reducers[3].register_forward_hook(lambda m, a, out: seen.append(out))  # after block 2
        got = model(video)
        hook.remove()
        model.train()  # the same pass (no dropout in the tiny model) with the ponder loss
        state = model.forward_features(video, inputs=Inputs(video, torch.zeros(3, dtype=torch.long)))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(state.aux[LOSSES]["halting.ponder"], 5e-4 * ponder, atol=1e-12, rtol=0)
    counts = seen[0].num_tokens.tolist()
    assert len(set(counts)) > 1 and max(counts) < 32  # the clips kept different numbers: a real test


def test_the_variants_agree_while_no_token_halts() -> None:
    """gamma = 1, beta = 3: h is about 0.05, so nothing halts before the last block, yet the readout mixes
    two blocks' outputs."""
    model = _model()
    video = tiny_video(NAME, batch=2, dtype=torch.float64)
    with torch.no_grad():
        removed = ts.apply(model, "halting:beta=3,gamma=1").model(video)
        zeroed = ts.apply(model, "halting:beta=3,gamma=1,halted=zero").model(video)
        bare = ts.apply(model, "glimpser:keep=0.5").model(video)
    torch.testing.assert_close(removed, zeroed, atol=1e-12, rtol=0)
    assert not torch.allclose(removed, bare, atol=1e-4)  # the halting weights matter


def test_the_paper_form_flips_the_sign_of_beta() -> None:
    model = _model()
    video = tiny_video(NAME, batch=2, dtype=torch.float64)
    with torch.no_grad():
        paper = ts.apply(model, "halting:beta=0.5,form=paper").model(video)
        released = ts.apply(model, "halting:beta=-0.5").model(video)
    torch.testing.assert_close(paper, released, atol=0, rtol=0)


def test_the_glimpser_keeps_ceil_of_each_frame_and_may_keep_the_skip() -> None:
    model = ts.build(NAME)
    steps = ts.apply(model, "halting:glimpser=0.7").steps
    glimpse = next(s for s in steps if s.reducer.name == "glimpser")
    assert glimpse.where == "inside block 1" and glimpse.tokens_out == 4 * math.ceil(0.7 * 16)  # 12, not 11
    video = tiny_video(NAME)
    with torch.no_grad():
        kept = ts.apply(model, "glimpser:keep=0.5,cls_skip=true").model(video)
        same = ts.apply(model, "attention:keep=0.5,per_frame=true,at=1").model(video)
        released = ts.apply(model, "glimpser:keep=0.5").model(video)
    torch.testing.assert_close(kept, same, atol=0, rtol=0)  # with the skip, EViT's per-frame criterion
    assert not torch.allclose(kept, released)


def test_the_spec_expands_into_the_glimpser_and_the_halting() -> None:
    assert [m for m, _ in ts.reducers.parse("halting:beta=20,glimpser=0.3,cls_skip=true")] == [
        "glimpser",
        "halting",
    ]
    assert ts.reducers.parse("halting:glimpser=0.3,cls_skip=true")[0][1] == {"keep": 0.3, "cls_skip": True}
    assert [m for m, _ in ts.reducers.parse("halting:glimpser=1")] == ["halting"]
    model = ts.build(NAME)
    steps = ts.apply(model, "halting:beta=10").steps
    assert [s.where for s in steps] == [
        "before block 0", "inside block 1", "before block 3", "after the last block",
    ]  # fmt: skip  # the fake clips' slot, the Glimpser, then after every joint block


# ------------------------------------------------------------------------------------- training
def test_training_adds_fake_clips_with_their_labels_and_the_motion_and_ponder_losses() -> None:
    torch.manual_seed(0)
    model = ts.apply(ts.build(NAME), "halting:beta=0").model.train()
    video, labels = tiny_video(NAME, batch=3), torch.tensor([0, 1, 2])
    state = model.forward_features(video, inputs=Inputs(video, labels))
    given = state.aux[INPUTS]
    assert given.labels.tolist() == [0, 1, 2, 0, 1, 2]  # the fakes keep their clip's label
    for b in range(3):
        fake = given.video[3 + b]
        assert all(torch.equal(fake[t], fake[0]) for t in range(4))  # one frame repeated
        assert any(torch.equal(fake[0], video[b, t]) for t in range(4))  # one of the clip's own
    features = model.plan[-1].readout(state, model)
    motion = F.cross_entropy(model.plan[-1].motion_head(features), torch.tensor([1, 1, 1, 0, 0, 0]))
    torch.testing.assert_close(state.aux[LOSSES]["halting.motion"], motion)
    assert model.forward_head(state).shape == (6, 10)
    stats = state.aux[STATS]
    assert set(stats) == {"halting.running.2", "halting.h.2", "halting.running.3", "halting.h.3"}
    assert float(stats["halting.running.3"]) == 0  # everything halts at the last block
    model.eval()
    assert model(video).shape == (3, 10)  # no fake clips in evaluation


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, videos=8, classes=3, frames=4, size=32, patch=8, tubelet=1, partial=True)
    return root


def test_train_runs_halting_and_logs_its_statistics(synthetic: Path, tmp_path: Path) -> None:
    model = ts.apply(ts.build(NAME, num_classes=3), "halting:beta=0").model
    data = ClipDataset(read_list(synthetic / "list.txt"), frames=4, size=32, stride=1, num_classes=3)
    infos = []
    before = model.plan[-1].motion_head.weight.clone()
    result = ts.train(model, data, epochs=1, batch_size=4, lr=1e-3, workers=0, progress=infos.append,
                      out=tmp_path / "run")  # fmt: skip
    video = tiny_video(NAME)
    loaded = ts.load(tmp_path / "run")  # the run is a model: the backbone and its trained plan
    assert loaded.spec == "halting:beta=0"
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), model.eval()(video), atol=0, rtol=0)
    assert set(result.epochs[0].losses) == {"task", "halting.ponder", "halting.motion"}
    # the released recipe where nothing was given: Adam, decay 1e-5, warm-up from 0.1, clipping at 40
    config = result.config
    assert (config.optimizer, config.weight_decay, config.warmup_start, config.clip_grad) == (
        "adam",
        1e-5,
        0.1,
        40,
    )
    assert (config.lr, config.warmup_epochs) == (1e-3, 5.0)  # lr given; warm-up the recipe's
    assert {"halting.running.2", "halting.h.3"} <= set(infos[-1].stats)
    assert not torch.equal(before, model.plan[-1].motion_head.weight)  # the motion head trains


def test_the_warm_up_may_start_above_zero() -> None:
    assert [lr_factor(s, total=10, warmup=4, start=0.1) for s in range(4)] == pytest.approx(
        [0.1 + 0.9 * (s + 1) / 4 for s in range(4)]
    )
    assert lr_factor(0, total=10, warmup=4) == 0.25  # the default starts from zero, as before


# ---------------------------------------------------------------------------- cost and pictures
def test_gflops_per_clip_are_each_clips_own() -> None:
    model = _model().float()
    ts.apply(model, "halting:beta=0")
    video = tiny_video(NAME, batch=3)
    count = ts.flops(model, video=video, detail=True)
    alone = [ts.flops(model, video=video[b : b + 1]) for b in range(3)]
    assert count.per_clip == pytest.approx(alone, rel=1e-6)
    assert len(set(count.per_clip)) > 1
    full = ts.flops(ts.apply(model, "halting:beta=0,halted=zero").model, video=video, detail=True)
    assert min(full.per_clip) == max(full.per_clip) > max(count.per_clip)  # zeroed tokens still cost


def test_the_halting_map_says_where_each_token_halted() -> None:
    model = _model().float()
    ts.apply(model, "halting:beta=0")
    with torch.no_grad():
        state = model.forward_features(tiny_video(NAME), trace=True)
    halted = halting_map(state)  # (B, 64)
    assert halted.shape == (2, 64)
    per_frame = (halted >= 0).view(2, 4, 16).sum(2)
    assert per_frame.eq(8).all()  # the Glimpser kept 8 of every frame's 16; each of them halted somewhere
    assert set(halted[halted >= 0].tolist()) <= {2, 3} and (halted == 2).any()


def test_show_draws_the_tokens_still_running_into_each_block() -> None:
    model = _model().float()
    ts.apply(model, "halting:beta=0")
    clip = tiny_video(NAME, batch=1)
    stages = ts.viz.reduction_stages(model, clip)
    assert [s.label for s in stages] == ["input", "glimpser in block 1", "halting before block 3"]
    assert stages[1].tokens == 32 and 0 < stages[2].tokens < 32  # some of the Glimpser's halted after block 2
    with torch.no_grad():
        halted = halting_map(model.forward_features(clip, trace=True))[0]
    assert int((halted == 2).sum()) == 32 - stages[2].tokens  # the map agrees with the picture
    assert ts.viz.kept_tokens(model, clip).ndim == 3


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("name", "spec", "message"),
    [
        ("haltingvt-tiny", "halting:eps=1", "eps must be in"),
        ("haltingvt-tiny", "halting:motion=-1", "loss weights"),
        ("haltingvt-tiny", "halting:at=7", "not a block"),
        ("haltingvt-tiny", "halting:halted=maybe", "halted must be one of"),
        ("timesformer-tiny", "halting:glimpser=1", "divided space-time attention"),
        ("haltingvt-tiny", "halting:glimpser=0", "keep must be in"),
    ],
)
def test_bad_settings_are_one_line(name: str, spec: str, message: str) -> None:
    with pytest.raises(ts.InputError, match=message):
        ts.apply(ts.build(name), spec)


def test_a_model_read_out_by_token_0_is_refused() -> None:
    with pytest.raises(ts.InputError, match=r"reads out its token 0 \(pool='first'\)"):
        ts.apply(ts.build("videomae-tiny", pool="first"), "halting:glimpser=1")
