"""Backbones at any input size (docs/design.md, "Input sizes"): any frame count the tubelet divides and
any frame size, square or not, the patch divides; positions carried there as each original implementation
does it, made once per grid and cached; plans checked against the clips' grid; FLOPs of the grid run.

At its own size a model is unchanged bit for bit: `OWN_SIZE` holds the outputs of every tiny preset
computed by the main branch before input sizes existed (commit 1665670, by `own_size_outputs` below, on
the CPU named in the file's metadata, 2 threads). Parity with transformers at other sizes: TimeSformer in
tests/test_hf.py, ViViT in tests/test_vivit.py (transformers' VideoMAE refuses other sizes: its table is
fixed at construction; ours is made again for the new token count, as VideoMAE's fine-tuning code does).
"""

from __future__ import annotations

import copy
import importlib
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

import tokensieve as ts
from conftest import reducer_outputs
from test_flops import videomae_closed_form
from test_reducers import CONTRACT
from tokensieve.backbones import videovit
from tokensieve.backbones.layers import sinusoid_table
from tokensieve.bench import host_syncs
from tokensieve.engine.sweep import token_ratio

plan_module = importlib.import_module("tokensieve.reducers.plan")  # (`reducers.plan` is also a function)
OWN_SIZE = Path(__file__).parent / "data" / "own_size_outputs.safetensors"
# One per backbone family that runs at any size (MViT does not: tests/test_mvit.py).
# Hierarchical backbones (stages: tokens merge between blocks) are left to their own files: MViT runs only at
# its own size, Video Swin at any (tests/test_swin.py: logits at another clip size equal the reference).
TINY = [
    name
    for name in ts.PRESETS
    if name.endswith("-tiny") and type(ts.build(name)).any_size and not ts.PRESETS[name].stages
]
OTHER_SIZES = [  # (frames, height, width) against the tiny presets' 4 frames of 32x32, tubelet 1 or 2
    (8, 48, 40),  # more frames, larger, not square
    (2, 16, 24),  # fewer frames, smaller, not square
    (4, 40, 40),  # same frames, square and larger
    (6, 32, 32),  # frames alone
]


def clip(
    frames: int, height: int, width: int, *, batch: int = 2, seed: int = 1, dtype=torch.float32
) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 3, height, width, generator=g).to(dtype)  # (B, T, C, H, W)


def grid_of(name: str, frames: int, height: int, width: int) -> tuple[int, int, int]:
    cfg = ts.PRESETS[name]
    return (frames // cfg.tubelet, height // cfg.patch, width // cfg.patch)


# --------------------------------------------------------------------------- own size: unchanged
def own_size_outputs(*, after_another_size: bool = False) -> dict[str, Tensor]:
    """Every tiny preset (random weights, seed 0) on a seeded batch of its own size: float32 logits and
    features, and the logits of its bfloat16 copy. What `OWN_SIZE` stores from the main branch. With
    `after_another_size`, each model (and its bfloat16 copy) first runs at 8 frames of 48x40, so its
    resized positions are cached before the own-size forward."""
    out = {}
    for name in sorted(TINY):
        torch.manual_seed(0)
        model = ts.build(name).eval()
        cfg = model.config
        video, other = clip(cfg.frames, cfg.size, cfg.size), clip(8, 48, 40)
        with torch.no_grad():
            if after_another_size:
                model(other)
            out[name] = model(video)
            out[f"{name}/features"] = model.forward_features(video).x
            model = model.to(torch.bfloat16)
            if after_another_size:
                model(other.bfloat16())
            out[f"{name}/bfloat16"] = model(video.bfloat16())
    return out


def test_a_model_at_its_own_size_is_unchanged_bit_for_bit() -> None:
    with safe_open(str(OWN_SIZE), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
        made_on = f.metadata()["cpu_capability"]
    now = own_size_outputs(after_another_size=True)
    assert sorted(stored) == sorted(now)  # every tiny preset is stored
    for key, value in stored.items():
        if torch.backends.cpu.get_cpu_capability() == made_on:
            assert torch.equal(now[key], value), key
        else:  # another CPU's kernels may round the products differently
            torch.testing.assert_close(
                now[key], value, rtol=1e-5, atol=1e-6 if "bfloat16" not in key else 2e-2
            )


# --------------------------------------------------------------------------- any size runs
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", OTHER_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_every_backbone_runs_at_other_frame_counts_and_sizes(name: str, size: tuple[int, int, int]) -> None:
    model = ts.build(name).eval()
    video = clip(*size)
    with torch.no_grad():
        state = model.forward_features(video)
        logits = model.forward_head(state)
        one = model(video[1:])
    grid = grid_of(name, *size)
    assert state.grid == grid and state.x.shape == (2, math.prod(grid), model.config.dim)
    state.check()
    assert logits.shape == (2, model.config.num_classes) and torch.isfinite(logits).all()
    torch.testing.assert_close(one, logits[1:], rtol=1e-5, atol=1e-6)  # batch of two = two of one


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 3, 3, 32, 32), r"frames \(3\) must be divisible by the tubelet size 2"),
        ((1, 4, 3, 32, 44), r"frame size 32x44 must be divisible by the patch size 8"),
        ((1, 4, 3, 0, 32), r"a clip needs at least 2 frame\(s\) of at least 8x8 pixels, got 4 of 0x32"),
    ],
)
def test_sizes_the_patch_or_tubelet_does_not_divide_are_one_line_errors(shape: tuple, message: str) -> None:
    with pytest.raises(ts.InputError, match=message) as error:
        ts.build("vivit-tiny")(torch.zeros(shape))
    assert "\n" not in str(error.value)


def test_grid_of() -> None:
    cfg = ts.PRESETS["videomae-b"]
    assert cfg.grid_of(16, 224) == cfg.grid == (8, 14, 14)
    assert cfg.grid_of(8, (160, 224)) == (4, 10, 14)


# --------------------------------------------------------------------------- VideoMAE and image ViTs
def test_videomae_positions_are_the_table_made_for_the_new_token_count() -> None:
    model = ts.build("videomae-tiny")  # grid 2 x 4 x 4, tubelet 2
    dim = model.config.dim
    assert torch.equal(model.embed.positions((4, 6, 5)), sinusoid_table(120, dim))
    # Fewer frames of the same size: the first slices' own positions, as VideoMAE's code gives them.
    assert torch.equal(model.embed.positions((1, 4, 4)), model.embed.pos_table[:16])


def _timm_rule(table: Tensor, new: tuple[int, int]) -> Tensor:
    """timm's `resample_abs_pos_embed` as described in its source: (1, 1 + H*W, C) with the class slot
    first and a square grid -> the class slot, then the grid resized bicubically (antialias off)."""
    side = math.isqrt(table.shape[1] - 1)
    grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=False).permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat([table[:, :1], grid.to(table.dtype)], 1)


@pytest.mark.parametrize("new", [(6, 5), (2, 3), (4, 8)], ids=str)
def test_image_vit_positions_are_resampled_as_timm_does(new: tuple[int, int]) -> None:
    model = ts.build("joint-tiny")  # "vit-cls": 4 frames of 4 x 4 patches, learned time embedding
    embed = model.embed
    with torch.no_grad():
        embed.time_embed.normal_()  # (zero at initialisation)
    space, time = embed.tables((4, *new))
    ref = _timm_rule(embed.pos_embed.detach(), new)
    assert torch.equal(space, ref[:, 1:]) and torch.equal(time, embed.time_embed)
    # Downsampling with antialiasing would differ: the rule is told apart.
    if new[0] < 4:
        smooth = F.interpolate(embed.pos_embed.detach()[:, 1:].view(1, 4, 4, -1).permute(0, 3, 1, 2),
                               size=new, mode="bicubic", antialias=True)  # fmt: skip
        assert not torch.allclose(space, smooth.permute(0, 2, 3, 1).flatten(1, 2))
    # Time: TimeSformer's nearest (4 -> 8 repeats each slice twice).
    _, eight = embed.tables((8, 4, 4))
    assert torch.equal(eight[0], embed.time_embed[0].repeat_interleave(2, 0))
    with torch.no_grad():
        state = model.embed(clip(8, 8 * new[0], 8 * new[1]), (8, *new))
    assert state.cls is not None and torch.equal(state.cls[0], embed.cls_token[0] + embed.pos_embed[0, :1])


# --------------------------------------------------------------------------- the cache
def _counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("name", ["vivit-tiny", "joint-tiny", "timesformer-tiny"])
def test_resized_positions_are_made_once_per_grid(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    calls = _counting(monkeypatch, videovit, "resize_space")
    model = ts.build(name).eval()
    with torch.no_grad():
        first = model(clip(4, 48, 40))
        assert len(calls) == 1
        again = model(clip(4, 48, 40))
        model(clip(2, 48, 40))  # another grid: its own entry
        model(clip(4, 32, 32))  # the model's own grid: no entry, nothing resized
    assert len(calls) == 2 and torch.equal(first, again)
    assert "_positions" not in str(model.state_dict().keys())
    assert set(model.state_dict()) == set(ts.build(name).state_dict())


def test_videomae_makes_the_table_once_per_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ts.build("videomae-tiny").eval()
    calls = _counting(monkeypatch, videovit, "sinusoid_table")
    with torch.no_grad(), torch.inference_mode():
        for _ in range(3):
            model(clip(8, 48, 40))
    assert len(calls) == 1


def test_the_cache_follows_the_parameters() -> None:
    """A step of an optimiser, `load_state_dict` (both in place: the version), another dtype (another
    tensor): each makes the positions again, equal to a model built fresh with those weights."""
    model = ts.build("vivit-tiny").eval()
    grid, video = (4, 6, 5), clip(8, 48, 40)

    def fresh(m: nn.Module) -> Tensor:
        twin = copy.deepcopy(m)  # deep copies carry no memo
        assert "_positions" not in twin.embed.__dict__
        return twin.embed.positions(grid)

    with torch.no_grad():
        before = model.embed.positions(grid).clone()
        assert torch.equal(before, model.embed.positions(grid))
        model.embed.pos_embed.mul_(2)  # in place: the version changes
        assert torch.equal(model.embed.positions(grid), fresh(model))
        assert not torch.equal(model.embed.positions(grid), before)
    other = ts.build("vivit-tiny")
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.embed.positions(grid), other.embed.positions(grid), rtol=0, atol=0)
        logits = model(video)
        torch.testing.assert_close(logits, other.eval()(video), rtol=0, atol=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(video).sum().backward()  # training at another size: gradients reach the learned positions
    assert model.embed.pos_embed.grad is not None and model.embed.pos_embed.grad.abs().sum() > 0
    optimizer.step()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.embed.positions(grid), fresh(model))
    model.double()
    with torch.no_grad():
        assert model.embed.positions(grid).dtype == torch.float64
    # Pickled (torch.save) without it, and loads back working.
    assert "_positions" in model.embed.__dict__ and "_positions" not in model.embed.__getstate__()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded.embed.positions(grid), model.embed.positions(grid))


def test_positions_cached_in_inference_mode_serve_a_training_step() -> None:
    model = ts.build("joint-tiny")
    video = clip(2, 48, 40)
    with torch.inference_mode():
        model.eval()(video)
    model.train()
    for p in model.embed.parameters():  # frozen positions: the memo is used while autograd records
        p.requires_grad_(False)
    model(video).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


# --------------------------------------------------------------------------- FLOPs at the grid run
def test_flops_at_another_size_count_its_grid() -> None:
    with torch.device("meta"):
        model = ts.build("videomae-b")
    N = 4 * 10 * 14  # 8 frames of 160x224: 4 x 10 x 14 tubelets
    fc = ts.flops(model, frames=8, size=(160, 224), detail=True)
    assert fc.macs - fc.by_op["norm"] == videomae_closed_form(768, 12, N)
    assert fc.by_op["norm"] == 5 * 768 * (2 * 12 * N + 1)
    assert ts.flops(model, frames=16, size=112) == pytest.approx(
        videomae_closed_form(768, 12, 8 * 7 * 7) / 1e9 + 5 * 768 * (2 * 12 * 392 + 1) / 1e9
    )


def test_flops_of_a_plan_at_another_size() -> None:
    with torch.device("meta"):
        model = ts.build("vivit-b")  # 32 x 224: 16 x 14 x 14 + the class token
    S = 8 * 10 * 12 + 1  # 16 frames of 160x192
    D, L = 768, 12
    fc = ts.flops(model, frames=16, size=(160, 192), detail=True)
    assert (
        fc.macs - fc.by_op["norm"]
        == L * (12 * S * D * D + 2 * S * S * D) + (S - 1) * 3 * 2 * 16 * 16 * D + D * 400
    )
    ts.apply(model, "random:keep=0.5")  # before block 0: 480 of the 960 tubelets, and the class token
    K = 480 + 1
    fc = ts.flops(model, frames=16, size=(160, 192), detail=True)
    assert (
        fc.macs - fc.by_op["norm"]
        == L * (12 * K * D * D + 2 * K * K * D) + (S - 1) * 3 * 2 * 16 * 16 * D + D * 400
    )


# --------------------------------------------------------------------------- plans at another grid
BIGGER = (8, 48, 40)  # the tiny presets' 4 x 32 x 32 grown and made non-square
CASES = [(spec, name) for specs in CONTRACT.values() for spec in specs for name in TINY]


def _applies(name: str, spec: str) -> ts.VideoBackbone | None:
    try:
        return ts.apply(ts.build(name).eval(), spec).model
    except ts.InputError:
        return None


@pytest.mark.parametrize(("spec", "name"), CASES)
def test_every_method_adapts_to_another_grid_or_refuses_it(spec: str, name: str) -> None:
    """Each contract setting at 8 frames of 48x40: it runs, keeping the token counts `steps_at` says
    (the plan checked against the clips' grid), or refuses the grid at the first forward with one line."""
    model = _applies(name, spec)
    if model is None:  # refused at the model's own grid: tests/test_reducers.py
        return
    grid = grid_of(name, *BIGGER)
    seen = reducer_outputs(model)
    try:
        with torch.no_grad():
            state = model.forward_features(clip(*BIGGER))
    except ts.InputError as error:
        assert "token grid" in str(error) and "\n" not in str(error), error
        assert "tokenlearner" in spec and "fuser=paper" in spec  # the one method whose map names the frames
        return
    state.check()
    steps = model.installed.steps_at(grid)
    resizes = [step.reducer for step in steps if step.reducer.resizes_input]  # it runs on the clip, no slot
    assert state.grid == (resizes[0].input_grid(grid) if resizes else grid)
    steps = [step for step in steps if not step.reducer.resizes_input]
    assert len(seen) == len(steps)
    for out, step in zip(seen, steps, strict=True):
        assert int(out.num_tokens.max()) <= step.tokens_out
        if not step.after.ragged:
            assert out.x.shape[1] == step.tokens_out


def test_a_plan_that_does_not_fit_the_grid_is_refused_with_what_it_needs() -> None:
    model = ts.apply(ts.build("videomae-tiny").eval(), "sta:r=4").model  # 16 tokens per frame: fits
    with pytest.raises(ts.InputError) as error:
        model(clip(4, 16, 16))  # 2 x 2 x 2: 4 tokens per frame
    message = str(error.value)
    assert "token grid (2, 2, 2)" in message and "(2, 4, 4)" in message
    assert "sta: r=4 is not smaller than the 4 tokens of a frame (group) at stage 1" in message
    with torch.no_grad():
        model(clip(4, 32, 32))  # the plan still runs at the model's own size


def test_tokenlearner_fuser_paper_refuses_another_frame_count_and_takes_another_size() -> None:
    model = ts.apply(ts.build("videomae-tiny").eval(), "tokenlearner:at=1,tokens=4,fuser=paper").model
    with pytest.raises(ts.InputError, match=r"fuser=paper maps the 2x4 learned tokens .* needs 2 slices"):
        model(clip(8, 32, 32))
    with torch.no_grad():
        assert model(clip(4, 48, 40)).shape == (2, 10)


def test_stts_anchors_adapt_to_a_non_square_grid() -> None:
    model = ts.apply(ts.build("joint-tiny").eval(), "stts:S1=0.5").model
    seen = reducer_outputs(model)
    with torch.no_grad():
        model(clip(4, 48, 64))  # 4 x 6 x 8: P = isqrt(24) = 4, so 16 tokens per frame
    assert seen[0].x.shape[1] == 4 * 16 and seen[0].frames == 4
    rows, cols = seen[0].pos[0, :16] // 8 % 6, seen[0].pos[0, :16] % 8
    assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3  # a 4 x 4 window of the 6 x 8 grid


def test_the_plan_is_checked_once_per_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch, plan_module, "schedule")
    model = ts.apply(ts.build("videomae-tiny").eval(), "tome:r=2").model
    with torch.no_grad():
        for _ in range(3):
            model(clip(8, 48, 40))
        model(clip(4, 32, 32))
    assert len(calls) == 2  # `apply`'s, then one for the other grid


def test_no_host_synchronisation_at_another_grid() -> None:
    model = ts.apply(ts.build("videomae-tiny").eval(), "random:keep=0.5+tome:r=2").model
    with torch.no_grad():
        model(clip(8, 48, 40))  # the first forward of a grid checks the plan and makes the positions
        with host_syncs() as seen:
            model(clip(8, 48, 40))
    assert not seen, seen


def test_token_ratio_at_another_grid() -> None:
    model = ts.build("videomae-tiny")
    assert token_ratio(model, "tome:r=4", (2, 4, 4)) == token_ratio(model, "tome:r=4")
    # 2 x 6 x 5 = 60 tokens, 3 blocks, ToMe inside each (a block counts the mean of its attention's and
    # its MLP's tokens): 60 -> 56, 56 -> 52, 52 -> 48
    assert token_ratio(model, "tome:r=4", (2, 6, 5)) == pytest.approx((58 + 54 + 50) / (3 * 60))


def test_viz_draws_a_clip_of_another_size() -> None:
    model = ts.apply(ts.build("videomae-tiny").eval(), "random:keep=0.5").model
    image = ts.viz.kept_tokens(model, clip(4, 48, 40, batch=1))
    assert image.ndim == 3 and image.shape[2] == 3
