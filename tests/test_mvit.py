"""MViT v1 (backbones/mvit.py): sizes and grids of MViT-B, logits against a forward written here from
the paper's and pySlowFast's description with plain torch operations, and which plans it takes."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import tokensieve as ts
from conftest import tiny_video
from tokensieve.backbones.checkpoint import CheckpointMismatchError
from tokensieve.backbones.config import preset
from tokensieve.errors import InputError


# ------------------------------------------------------------------ the reference forward
def _pool(t: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int, int], thw: tuple[int, int, int],
          norm: tuple[torch.Tensor, torch.Tensor], eps: float) -> tuple[torch.Tensor, tuple[int, int, int]]:  # fmt: skip
    """One head's tokens (B, 1 + T*H*W, hd): the class token around a depthwise 3x3x3 convolution
    (padding 1), then LayerNorm over the head width."""
    B, _, hd = t.shape
    cube = t[:, 1:].transpose(1, 2).reshape(B, hd, *thw)
    out = F.conv3d(cube, weight, stride=stride, padding=1, groups=hd)
    pooled = torch.cat([t[:, :1], out.flatten(2).transpose(1, 2)], 1)
    return F.layer_norm(pooled, (hd,), *norm, eps=eps), tuple(out.shape[2:])


def reference_logits(
    model: ts.VideoBackbone, video: torch.Tensor, frames_kept: list[int] | None = None, select=None
) -> torch.Tensor:
    """The logits of `model`'s weights computed the way the MViT paper and pySlowFast describe the
    network, one token, head and block at a time. `frames_kept`: temporal slices kept right after the
    embedding (a frame-selection plan); the later convolutions treat them as adjacent. `select(i, x, thw)
    -> (x, thw)`: a selection before block i (STTS's)."""
    cfg = model.config
    P = dict(model.named_parameters())
    t, p = cfg.tubelet, cfg.patch
    grid = F.conv3d(video.transpose(1, 2), P["embed.proj.weight"], P["embed.proj.bias"], stride=(t, p, p),
                    padding=(t - 1, p - 1, p - 1))  # fmt: skip
    B, _, T, H, W = grid.shape
    tokens = [
        grid[:, :, ti, hi, wi] + P["embed.pos_embed_spatial"][0, hi * W + wi] + P["embed.pos_embed_temporal"][0, ti]
        for ti in range(T) for hi in range(H) for wi in range(W)
    ]  # fmt: skip
    x = torch.stack(tokens, 1)  # (B, T*H*W, C), time-major
    if frames_kept is not None:
        x = torch.cat([x[:, f * H * W : (f + 1) * H * W] for f in frames_kept], 1)
        T = len(frames_kept)
    x = torch.cat([(P["embed.cls_token"] + P["embed.pos_embed_class"]).expand(B, 1, -1), x], 1)
    thw = (T, H, W)
    hd = cfg.dim // cfg.heads  # every head is this wide
    kv = list(cfg.kv_stride)
    for i in range(cfg.depth):
        if select is not None:
            x, thw = select(i, x, thw)
        b = f"blocks.{i}."
        dim = x.shape[-1]
        pools_q = i in cfg.stages
        if pools_q:  # a new stage: kv stride halved spatially
            kv = [kv[0], max(kv[1] // 2, 1), max(kv[2] // 2, 1)]
        pools_kv = cfg.kv_pool == "all" or kv != [1, 1, 1]
        xn = F.layer_norm(x, (dim,), P[b + "norm1.weight"], P[b + "norm1.bias"], eps=cfg.eps)
        q, k, v = (xn @ P[b + "attn.qkv.weight"].T + P[b + "attn.qkv.bias"]).split(dim, -1)
        heads, new_thw = [], thw
        for h in range(dim // hd):
            qh, kh, vh = (z[..., h * hd : (h + 1) * hd] for z in (q, k, v))
            if pools_q:
                qh, new_thw = _pool(qh, P[b + "attn.pool_q.weight"], (1, 2, 2), thw,
                                    (P[b + "attn.norm_q.weight"], P[b + "attn.norm_q.bias"]), cfg.pool_eps)  # fmt: skip
            if pools_kv:
                kh, _ = _pool(kh, P[b + "attn.pool_k.weight"], tuple(kv), thw,
                              (P[b + "attn.norm_k.weight"], P[b + "attn.norm_k.bias"]), cfg.pool_eps)  # fmt: skip
                vh, _ = _pool(vh, P[b + "attn.pool_v.weight"], tuple(kv), thw,
                              (P[b + "attn.norm_v.weight"], P[b + "attn.norm_v.bias"]), cfg.pool_eps)  # fmt: skip
            weights = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(hd), -1)
            heads.append(weights @ vh)
        y = torch.cat(heads, -1) @ P[b + "attn.proj.weight"].T + P[b + "attn.proj.bias"]
        if pools_q:  # max-pooled skip: kernel (1, 3, 3), stride (1, 2, 2), padding (0, 1, 1)
            cube = x[:, 1:].transpose(1, 2).reshape(B, dim, *thw)
            pooled = F.max_pool3d(cube, (1, 3, 3), (1, 2, 2), (0, 1, 1))
            x = torch.cat([x[:, :1], pooled.flatten(2).transpose(1, 2)], 1)
        x = x + y
        thw = new_thw
        xn = F.layer_norm(x, (dim,), P[b + "norm2.weight"], P[b + "norm2.bias"], eps=cfg.eps)
        hidden = F.gelu(xn @ P[b + "mlp.fc1.weight"].T + P[b + "mlp.fc1.bias"])
        out = hidden @ P[b + "mlp.fc2.weight"].T + P[b + "mlp.fc2.bias"]
        if out.shape[-1] != dim:  # the stage's last block widens the normed tokens for the skip too
            x = xn @ P[b + "proj.weight"].T + P[b + "proj.bias"]
        x = x + out
    final = F.layer_norm(x, (x.shape[-1],), P["norm.weight"], P["norm.bias"], eps=cfg.eps)
    return final[:, 0] @ P["head.weight"].T + P["head.bias"]


def _model(**changes: object) -> ts.VideoBackbone:
    torch.manual_seed(0)
    model = ts.build("mvit-tiny", **changes).double().eval()
    with torch.no_grad():  # norms and biases away from their init, so that a mix-up shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.mark.parametrize(
    "changes",
    [{}, {"kv_pool": "strided"}, {"pool_eps": 1e-6}, {"frames": 4, "size": 40}],
    ids=["kv-pool-all", "kv-pool-strided", "pool-eps-1e-6", "2x10x10-grid"],
)
def test_logits_equal_the_reference_forward(changes: dict) -> None:
    model = _model(**changes)
    cfg = model.config
    video = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size, dtype=torch.float64)
    with torch.no_grad():
        ours, ref = model(video), reference_logits(model, video)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()  # and the comparison is not vacuous
    assert ref.std() > 0


def test_the_pooling_norms_epsilon_matters() -> None:
    """The same weights under the other checkpoint family's epsilon give other logits, well beyond the
    tolerance of the comparison above: the option is not decorative."""
    video = torch.randn(2, 8, 3, 32, 32, dtype=torch.float64)
    base, other = _model(), _model(pool_eps=1e-6)
    other.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert (other(video) - base(video)).abs().max() > 1e-8


def test_frame_selection_before_block_0_convolves_the_kept_slices_as_adjacent() -> None:
    """`uniform:keep=0.5` keeps slices 1 and 3 of 4 (segment centres); the pooling then runs on them."""
    model = _model()
    video = torch.randn(2, 8, 3, 32, 32, dtype=torch.float64)
    ts.apply(model, "uniform:keep=0.5")
    with torch.no_grad():
        torch.testing.assert_close(
            model(video), reference_logits(model, video, frames_kept=[1, 3]), rtol=0, atol=1e-10
        )


# ------------------------------------------------------------------ STTS on MViT
def _predictor(P: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """The released `PredictorLG` on candidates (B, L, D): LayerNorm, Linear(D, D), GELU; the first half of
    the channels per candidate, the mean of the second half over the candidates; an MLP to one score."""
    D = x.shape[-1]
    h = F.layer_norm(x, (D,), P[prefix + "in_conv.0.weight"], P[prefix + "in_conv.0.bias"], eps=1e-5)
    h = F.gelu(h @ P[prefix + "in_conv.1.weight"].T + P[prefix + "in_conv.1.bias"])
    h = torch.cat([h[..., : D // 2], h[..., D // 2 :].mean(1, keepdim=True).expand(-1, x.shape[1], -1)], -1)
    for j in (0, 2):
        h = F.gelu(h @ P[prefix + f"out_conv.{j}.weight"].T + P[prefix + f"out_conv.{j}.bias"])
    return (h @ P[prefix + "out_conv.4.weight"].T + P[prefix + "out_conv.4.bias"])[..., 0]


def _min_max(s: torch.Tensor) -> torch.Tensor:
    low, high = s.min(-1, keepdim=True).values, s.max(-1, keepdim=True).values
    return (s - low) / (high - low + 1e-5)


def released_stts(model: ts.VideoBackbone, picks: dict[int, tuple[str, int, int]]):  # type: ignore[no-untyped-def]
    """STTS's evaluation path as its `PatchNet` runs it (`tpool`, `spatch`), for `reference_logits`:
    picks = {block: ("T", K frames, selection index) or ("S", anchor side P, selection index)}."""
    P = dict(model.named_parameters())

    def select(
        i: int, x: torch.Tensor, thw: tuple[int, int, int]
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        if i not in picks:
            return x, thw
        kind, k, index = picks[i]
        prefix = f"plan.0.selections.{index}.scorer."
        B, _, C = x.shape
        T, H, W = thw
        frames = x[:, 1:].reshape(B, T, H * W, C)
        if kind == "T":
            scores = _min_max(_predictor(P, prefix, torch.cat([frames.mean(2), frames.max(2).values], -1)))
            idx = scores.topk(k, -1).indices.sort(-1).values
            kept = torch.stack([frames[b, idx[b]] for b in range(B)])  # (B, K, H*W, C)
            return torch.cat([x[:, :1], kept.flatten(1, 2)], 1), (k, H, W)
        stride = max((H - k) // 2, 1)
        crops = []
        for b in range(B):
            for t in range(T):
                scores = _predictor(P, prefix, frames[b, t][None])  # (1, H*W)
                anchors = F.unfold(scores.view(1, 1, H, W), k, stride=stride).mean(1)  # (1, G)
                best = int(_min_max(anchors).argmax())
                windows = F.unfold(frames[b, t].T.reshape(1, C, H, W), k, stride=stride)  # (1, C*k*k, G)
                crops.append(windows[0, :, best].view(C, k * k).T)  # (k*k, C), raster order in the window
        kept = torch.stack(crops).view(B, T * k * k, C)
        return torch.cat([x[:, :1], kept], 1), (T, k, k)

    return select


STTS_TINY = "stts:T0=0.5,S2=0.6,pool=meanmax,anchor_pool=mean,scorer=released"
"""On mvit-tiny: 2 of the 4 slices before block 0; before block 2 (4x4 grid, width 16) one 3x3 anchor per
frame (int(16 * 0.6) = 9 tokens), stride max((4 - 3) // 2, 1) = 1: four anchors; block 3 pools 3x3 to 2x2."""


def _stts_model() -> ts.VideoBackbone:
    model = _model()
    ts.apply(model, STTS_TINY)
    with (
        torch.no_grad()
    ):  # scorers with spread-out scores, so that each clip picks its own frames and anchors
        for param in model.plan.parameters():
            param.copy_(torch.randn_like(param))
    return model.eval()


def test_stts_on_mvit_equals_the_released_selection_then_the_reference() -> None:
    model = _stts_model()
    video = torch.randn(4, 8, 3, 32, 32, dtype=torch.float64)
    layouts = [(s.after.tokens, s.after.frame_grid) for s in model.installed.steps]
    assert layouts == [(128, (8, 8)), (18, (3, 3))]
    with torch.no_grad():
        ours = model(video)
        ref = reference_logits(model, video, select=released_stts(model, {0: ("T", 2, 0), 2: ("S", 3, 1)}))
        kept = model.forward_features(video, trace=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    kept.check()
    assert len({tuple(row) for row in kept.pos.tolist()}) > 1  # the clips chose differently


# ------------------------------------------------------------------ MViT-B
def test_mvit_b_size_and_grid_per_block() -> None:
    """36.6 M parameters (torchvision's mvit_v1_b: 36,610,672); the grid before each block (§1.1's table)."""
    with torch.device("meta"):
        model = ts.build("mvit-b-16x4")
        zoo = ts.build("mvit-b-16x4", kv_pool="strided")  # the original zoo file: no kv pool at blocks 14, 15
    assert model.num_params == 36_610_672
    assert model.num_params - zoo.num_params == 2 * 2 * (96 * 27 + 2 * 96)  # two convs and norms, two blocks
    sides = [56, 56, 28, 28] + [14] * 11 + [7, 7]  # before block 0..15, after the last
    assert model.grids() == [(8, s, s) for s in sides]
    widths = [96, 192, 192, 384] + [384] * 10 + [768, 768, 768]
    assert [model.config.width(p) for p in range(17)] == widths
    assert [model.config.heads_at(p) for p in range(16)] == [1, 2, 2] + [4] * 11 + [8, 8]
    kv_grids = []
    for p, block in enumerate(model.blocks):
        stride = block.attn.kv_stride
        kv_grids.append(tuple((n - 1) // s + 1 for n, s in zip((8, sides[p], sides[p]), stride, strict=True)))
    # §1.1: 8x7x7, 8x14x14, 8x7x7, 8x14x14, 8x7x7 (blocks 4-13), 8x14x14, 8x7x7
    seven, fourteen = (8, 7, 7), (8, 14, 14)
    assert kv_grids == [seven, fourteen, seven, fourteen] + [seven] * 10 + [fourteen, seven]
    assert [b.attn.kv_stride for b in zoo.blocks[14:]] == [None, None]
    with torch.device("meta"):
        assert ts.build("mvit-b-32x3").grids()[0] == (16, 56, 56)


def test_pooled_tokens_stand_for_their_cells() -> None:
    """After the query pooling, a token sits at the centre of its convolution window in the patch grid
    and stands for the s x s cell of tokens there: sizes add up to the clip, positions index the grid."""
    model = ts.build("mvit-tiny").eval()
    with torch.no_grad():
        state = model.forward_features(tiny_video("mvit-tiny"), trace=True)
    state.check()
    assert state.frame_grid == (2, 2) and state.frames == 4
    assert state.size[0].tolist() == [16.0] * 16  # 4 x 4 patches each
    assert state.pos[0, :4].tolist() == [0, 4, 32, 36]  # (0, 0), (0, 4), (4, 0), (4, 4) of frame 0
    assert bool(ts.tokens.covered(state).all())


# ------------------------------------------------------------------ plans
@pytest.mark.parametrize(
    "spec", ["random:keep=0.5", "tome:r=4", "sta:r=4", "attention:keep=0.5", "lite:keep=0.5",
             "tokenlearner:at=1,tokens=4", "halting:beta=0", "random:keep=0.5,per_frame=true,at=2"],
)  # fmt: skip
def test_per_token_methods_are_refused_with_the_grid_requirement(spec: str) -> None:
    with pytest.raises(InputError, match=r"MViT block \d \(attention pooled over each frame's grid\) needs a full "
                       r"\(or cropped\) grid of tokens in every frame") as error:  # fmt: skip
        ts.apply(ts.build("mvit-tiny"), spec)
    assert "\n" not in str(error.value)


def test_whole_frame_methods_and_reductions_after_the_last_block_run() -> None:
    model = ts.build("mvit-tiny").eval()
    video = tiny_video("mvit-tiny")
    for spec, tokens in [("uniform:keep=0.5", [128]), ("random_frames:keep=0.5,at=2", [32]), ("random:keep=0.5,at=5", [8])]:  # fmt: skip
        installed = ts.apply(model, spec)
        assert [step.tokens_out for step in installed.steps] == tokens
        assert model(video).shape == (2, 10)
    # Inside the last block no grid is needed after it, but MViT's attention records nothing per token.
    with pytest.raises(InputError, match="needs cls_attn recorded by the attention before it, which MViT's"):
        ts.apply(model, "attention:keep=0.5,at=4")


def test_config_checks() -> None:
    with pytest.raises(InputError, match="stages sets MViT's pooling stages"):
        preset("joint-tiny", stages=(1,))
    with pytest.raises(InputError, match=r"stages must be increasing blocks in 1\.\.depth-1"):
        preset("mvit-tiny", stages=(3, 1))
    with pytest.raises(InputError, match="kv_pool must be one of all, strided"):
        preset("mvit-tiny", kv_pool="none")
    with pytest.raises(InputError, match="qkv_bias must be 'qkv' or 'none'"):
        preset("mvit-tiny", qkv_bias="qv")


# ------------------------------------------------------------------ checkpoints
def _slowfast_names(state: dict[str, torch.Tensor], *, separate_qkv: bool = False) -> dict[str, torch.Tensor]:
    """Our tensors under pySlowFast's names (the layout STTS saves), q/k/v fused or separate."""
    out = {}
    for key, value in state.items():
        if key.startswith("embed.proj."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("embed."):
            out[key.removeprefix("embed.")] = value  # cls_token, pos_embed_spatial, ...
        elif key.startswith("head."):
            out["head.projection." + key.rsplit(".", 1)[1]] = value
        elif separate_qkv and ".attn.qkv." in key:
            for part, third in zip("qkv", value.chunk(3), strict=True):
                out[key.replace(".attn.qkv.", f".attn.{part}.")] = third
        else:
            out[key] = value
    return out


def _torchvision_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under torchvision's `mvit_v1_b` names and shapes."""
    renames = [
        (r"^embed\.proj\.", "conv_proj."), (r"^embed\.cls_token$", "pos_encoding.class_token"),
        (r"^embed\.pos_embed_spatial$", "pos_encoding.spatial_pos"),
        (r"^embed\.pos_embed_temporal$", "pos_encoding.temporal_pos"),
        (r"^embed\.pos_embed_class$", "pos_encoding.class_pos"), (r"\.attn\.proj\.", ".attn.project.0."),
        (r"\.attn\.pool_([qkv])\.weight$", r".attn.pool_\1.pool.weight"),
        (r"\.attn\.norm_([qkv])\.", r".attn.pool_\1.norm_act.0."), (r"\.mlp\.fc1\.", ".mlp.0."),
        (r"\.mlp\.fc2\.", ".mlp.3."), (r"^(blocks\.\d+)\.proj\.", r"\1.project."), (r"^head\.", "head.1."),
    ]  # fmt: skip
    out = {}
    for key, value in state.items():
        name = key
        for pattern, target in renames:
            name = re.sub(pattern, target, name)
        if name.startswith("pos_encoding."):  # (1, n, C) -> (n, C); the class tensors (1, 1, C) -> (C,)
            value = value[0, 0] if value.shape[1] == 1 else value[0]
        out[name] = value
    return out


def _slowfast_file(path: Path, state: dict[str, torch.Tensor], kv_stride: list[int] | None) -> Path:
    mvit = {"POOL_KVQ_KERNEL": [3, 3, 3], "POOL_Q_STRIDE": [[1, 1, 2, 2], [3, 1, 2, 2]], "DROPPATH_RATE": 0.0}
    if kv_stride is not None:
        mvit["POOL_KV_STRIDE_ADAPTIVE"] = kv_stride
    cfg = yaml.safe_dump({"DATA": {"NUM_FRAMES": 8}, "MVIT": mvit})  # as yacs' CfgNode.dump() writes it
    torch.save({"epoch": 3, "model_state": state, "optimizer_state": {"state": {}}, "cfg": cfg}, path)
    return path


@pytest.mark.parametrize(
    ("layout", "changes"),
    [
        ("slowfast", {}),
        ("slowfast-separate-qkv", {}),
        ("slowfast", {"kv_pool": "strided"}),  # the original pySlowFast zoo file: no kv pool at stride 1
        ("torchvision", {"pool_eps": 1e-6}),
    ],
)
def test_checkpoints_load_back_with_equal_logits(layout: str, changes: dict, tmp_path: Path) -> None:
    model = _model(**changes).float()
    state = model.state_dict()
    path = tmp_path / "model.pyth"
    load_changes = {}
    if layout == "torchvision":
        torch.save(_torchvision_names(state), path)
        load_changes = {"kv_stride": (1, 4, 4)}  # not in the tensors; torchvision's own is MViT-B's (1, 8, 8)
    else:
        names = _slowfast_names(state, separate_qkv=layout.endswith("separate-qkv"))
        _slowfast_file(path, names, kv_stride=[1, 4, 4])
    loaded = ts.load(path, **load_changes)
    assert type(loaded) is ts.MViT and not loaded.training
    # Read off the tensors (and the cfg's kv stride and stochastic depth; torchvision's: MViT-B's 0.2).
    expected = model.config if layout != "torchvision" else dataclasses.replace(model.config, drop_path=0.2)
    assert loaded.config == expected
    assert loaded.config.pool_eps == (1e-6 if layout == "torchvision" else 1e-5)
    video = tiny_video("mvit-tiny")
    with torch.no_grad():
        assert torch.equal(loaded(video), model(video))


def test_the_kv_stride_comes_from_the_cfg(tmp_path: Path) -> None:
    model = _model().float()
    names = _slowfast_names(model.state_dict())
    assert ts.load(_slowfast_file(tmp_path / "a.pyth", names, kv_stride=[1, 2, 2])).config.kv_stride == (
        1,
        2,
        2,
    )
    assert ts.load(_slowfast_file(tmp_path / "b.pyth", names, kv_stride=None)).config.kv_stride == (1, 8, 8)


def test_a_checkpoint_that_does_not_fit_is_one_error_listing_every_key(tmp_path: Path) -> None:
    names = _slowfast_names(_model().float().state_dict())
    del names["blocks.2.mlp.fc1.bias"]
    names["blocks.2.attn.rel_pos_h"] = torch.zeros(3, 8)  # MViTv2's relative positions
    names["blocks.1.attn.proj.weight"] = torch.zeros(16, 15)
    with pytest.raises(CheckpointMismatchError) as error:
        ts.load(_slowfast_file(tmp_path / "bad.pyth", names, kv_stride=[1, 4, 4]))
    message = str(error.value)
    for expected in ("missing keys (1)", "blocks.2.mlp.fc1.bias", "unexpected keys (1)", "blocks.2.attn.rel_pos_h",
                     "shape mismatches (1)", "blocks.1.attn.proj.weight: checkpoint (16, 15) vs model (16, 16)"):  # fmt: skip
        assert expected in message


def _stts_file(path: Path, model: ts.VideoBackbone) -> Path:
    """`model` (with `STTS_TINY`) saved as STTS saves its MViT: the selectors under their released names."""
    state = model.state_dict()
    names = _slowfast_names({k: v for k, v in state.items() if not k.startswith("plan.")})
    for key, value in state.items():
        if key.startswith("plan.0.selections."):
            index, rest = key.removeprefix("plan.0.selections.").split(".scorer.")
            prefix = "time_score_predictor.0." if index == "0" else "space_score_predictor.0."
            names[prefix + "score_network." + rest] = value
    mvit = {
        "POOL_KV_STRIDE_ADAPTIVE": [1, 4, 4], "DROPPATH_RATE": 0.0, "TIME_PRUNING_LOC": [0], "TIME_LEFT_RATIO": [0.5],
        "TIME_SCORE": "tpool", "SPACE_PRUNING_LOC": [2], "SPACE_LEFT_RATIO": [0.6], "SPACE_SCORE": "spatch",
        "SIGMA": 0.1,
    }  # fmt: skip
    torch.save({"epoch": 1, "model_state": names, "cfg": yaml.safe_dump({"MVIT": mvit})}, path)
    return path


def test_an_stts_checkpoint_loads_with_its_selectors_as_a_plan(tmp_path: Path) -> None:
    model = _stts_model().float()
    loaded = ts.load(_stts_file(tmp_path / "stts.pyth", model))
    assert loaded.spec == STTS_TINY + ",sigma=0.1"
    video = tiny_video("mvit-tiny", batch=4)
    with torch.no_grad():
        assert torch.equal(loaded(video), model(video))


def test_an_stts_checkpoint_without_its_places_is_refused(tmp_path: Path) -> None:
    path = _stts_file(tmp_path / "stts.pyth", _stts_model().float())
    ckpt = torch.load(path)
    ckpt["cfg"] = yaml.safe_dump({"MVIT": {"POOL_KV_STRIDE_ADAPTIVE": [1, 4, 4]}})
    torch.save(ckpt, path)
    with pytest.raises(InputError, match="holds STTS selectors, but its cfg names no TIME_PRUNING_LOC"):
        ts.load(path)


def test_variants_we_do_not_build_are_refused_by_name(tmp_path: Path) -> None:
    names = _slowfast_names(_model().float().state_dict())
    names["blocks.0.attn.pool_k.weight"] = torch.zeros(8, 1, 1, 9, 9)  # MViT-B-24: kernel s + 1
    with pytest.raises(InputError, match=r"pools with kernels .*3x3x3 pooling only"):
        ts.load(_slowfast_file(tmp_path / "b24.pyth", names, kv_stride=[1, 4, 4]))


def test_mvit_runs_only_at_its_own_size() -> None:
    """Neither pySlowFast's nor torchvision's MViT carries its positions to another size: refused in one
    line at the forward, and a plan that resizes the clip at `apply`."""
    model = ts.build("mvit-tiny").eval()
    with pytest.raises(ts.InputError, match=r"MViT runs only at the size its positions are built for"):
        model(torch.randn(1, 8, 3, 40, 32))
    with pytest.raises(ts.InputError, match=r"resize changes the clip's size, and MViT runs only at"):
        ts.apply(model, "resize:keep=0.5")


def test_an_evaluation_at_another_clip_size_is_refused_for_mvit() -> None:
    from types import SimpleNamespace

    from tokensieve.engine.evaluate import check_fits

    data = SimpleNamespace(frames=8, size=40, num_classes=None)
    with pytest.raises(ts.InputError, match=r"the dataset makes 8x40 clips but MViT runs only at 8x32"):
        check_fits(ts.build("mvit-tiny"), data)
    check_fits(ts.build("videomae-tiny"), data)  # any other backbone takes it
