"""Video Swin (backbones/swin.py): logits against a window attention written here with loops over windows,
heads and tokens, sizes and grids of the presets, and which plans it takes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from conftest import tiny_video
from test_flops import meta_model
from tokensieve.backbones.swin import HOLES, nearest_fill, window_and_shift
from tokensieve.errors import InputError
from tokensieve.reducers.sta import accumulate, drop_first


# ------------------------------------------------------------------ the reference forward
def _window_attention(
    y: torch.Tensor, P: dict, pre: str, heads: int, full: tuple[int, int, int], shifted: bool,
    mask_padding: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Video Swin's (shifted) window attention on normalised tokens y (B, T, H, W, C), one window, head
    and token pair at a time, as the paper and the released code describe it:
    - along an axis no longer than the window, the window is the axis and there is no shift;
    - the grid is zero-padded at its end to a multiple of the window; padded tokens take part (unmasked,
      unless `mask_padding`, the negative control);
    - a shifted block moves the windows by half a window: window position r holds the token at
      (r + s) mod (padded side); two tokens of a window of which one wrapped round the end along some axis
      (and the other did not) get -100 added to their logit;
    - the relative position bias: token m of the window (raster order) is given the coordinates of the
      m-th token of the *full* window (the released code slices the full window's index table)."""
    B, T, H, W, C = y.shape
    hd = C // heads
    sizes = (T, H, W)
    win = [n if n <= w else w for n, w in zip(sizes, full, strict=True)]
    shift = [0 if n <= w or not shifted else w // 2 for n, w in zip(sizes, full, strict=True)]
    padded = [math.ceil(n / w) * w for n, w in zip(sizes, win, strict=True)]
    ypad = y.new_zeros(B, *padded, C)
    ypad[:, :T, :H, :W] = y
    qkv = ypad @ P[pre + "qkv.weight"].T + P[pre + "qkv.bias"]  # every token, padded ones too
    out = torch.zeros_like(ypad)
    table = P[pre + "relative_position_bias_table"]
    ft, fh, fw = full
    V = math.prod(win)

    def full_coords(m: int) -> tuple[int, int, int]:
        return (m // (fh * fw), (m // fw) % fh, m % fw)

    for start in itertools.product(*(range(0, n, w) for n, w in zip(padded, win, strict=True))):
        cells = list(
            itertools.product(*(range(a, a + w) for a, w in zip(start, win, strict=True)))
        )  # window positions r
        source = [tuple((r + s) % n for r, s, n in zip(cell, shift, padded, strict=True)) for cell in cells]
        wrapped = [
            tuple(s > 0 and r >= n - s for r, s, n in zip(cell, shift, padded, strict=True)) for cell in cells
        ]
        real = [all(o < n for o, n in zip(src, sizes, strict=True)) for src in source]
        rows = []
        for h in range(heads):
            q = torch.stack([qkv[:, t, i, j, h * hd : (h + 1) * hd] for t, i, j in source], 1)  # (B, V, hd)
            k = torch.stack([qkv[:, t, i, j, C + h * hd : C + (h + 1) * hd] for t, i, j in source], 1)
            v = torch.stack([qkv[:, t, i, j, 2 * C + h * hd : 2 * C + (h + 1) * hd] for t, i, j in source], 1)
            logits = q @ k.transpose(1, 2) / math.sqrt(hd)  # (B, V, V)
            extra = torch.zeros(V, V, dtype=y.dtype)
            for m, n in itertools.product(range(V), range(V)):
                (a, b, c), (d, e, f) = full_coords(m), full_coords(n)
                row = (
                    (a - d + ft - 1) * (2 * fh - 1) * (2 * fw - 1)
                    + (b - e + fh - 1) * (2 * fw - 1)
                    + (c - f + fw - 1)
                )
                extra[m, n] = table[row, h]
                if wrapped[m] != wrapped[n]:
                    extra[m, n] -= 100.0
                if mask_padding and not real[n]:
                    extra[m, n] = -math.inf
            rows.append(torch.softmax(logits + extra, -1) @ v)  # (B, V, hd)
        mixed = torch.cat(rows, -1) @ P[pre + "proj.weight"].T + P[pre + "proj.bias"]  # (B, V, C)
        for idx, (t, i, j) in enumerate(source):
            out[:, t, i, j] = mixed[:, idx]
    return out[:, :T, :H, :W]


def _merge(x: torch.Tensor, P: dict, pre: str, eps: float) -> torch.Tensor:
    """Patch merging, token by token: (0,0), (1,0), (0,1), (1,1) of each 2x2 cell (zeros beyond the grid)."""
    B, T, H, W, C = x.shape
    h2, w2 = (H + 1) // 2, (W + 1) // 2
    out = x.new_zeros(B, T, h2, w2, 4 * C)
    for i, j in itertools.product(range(h2), range(w2)):
        parts = []
        for di, dj in ((0, 0), (1, 0), (0, 1), (1, 1)):
            a, b = 2 * i + di, 2 * j + dj
            parts.append(x[:, :, a, b] if a < H and b < W else x.new_zeros(B, T, C))
        out[:, :, i, j] = torch.cat(parts, -1)
    normed = F.layer_norm(out, (4 * C,), P[pre + "norm.weight"], P[pre + "norm.bias"], eps=eps)
    return normed @ P[pre + "reduction.weight"].T


def _nearest_kept(kept: torch.Tensor) -> torch.Tensor:
    """For a (T, H, W) bool mask of kept cells: (T, H, W, 2) the (row, column) of the kept cell of the same
    slice nearest to each cell (itself when kept; among equally near ones, the first in raster order)."""
    T, H, W = kept.shape
    out = torch.zeros(T, H, W, 2, dtype=torch.long)
    for t, i, j in itertools.product(range(T), range(H), range(W)):
        best = None
        for a, b in itertools.product(range(H), range(W)):  # raster order: a strict < keeps the first
            if kept[t, a, b] and (best is None or (a - i) ** 2 + (b - j) ** 2 < best[0]):
                best = ((a - i) ** 2 + (b - j) ** 2, a, b)
        out[t, i, j] = torch.tensor(best[1:])
    return out


def _filled(x: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, H, W, C) with every dropped cell holding its nearest kept cell's value."""
    if kept is None:
        return x
    out = x.clone()
    for b in range(x.shape[0]):
        near = _nearest_kept(kept[b])
        for t, i, j in itertools.product(*(range(n) for n in kept.shape[1:])):
            out[b, t, i, j] = x[b, t, near[t, i, j, 0], near[t, i, j, 1]]
    return out


def _sta_keep(
    x: torch.Tensor, y: torch.Tensor, P: dict, pre: str, heads: int, r: int, backward: bool
) -> torch.Tensor:
    """STA on Swin's merged tokens x (B, T, H, W, C), their next block's norm1 output y: the keys of that
    block, averaged over the heads, and the semantic score of x, per temporal slice, dropping r cells of each
    slice with STA's own functions (tested against the released code in test_sta.py). (B, T, H, W) kept."""
    B, T, H, W, C = x.shape
    k = y @ P[pre + "qkv.weight"][C : 2 * C].T + P[pre + "qkv.bias"][C : 2 * C]
    keys = F.normalize(k.view(B, T, H * W, heads, C // heads).mean(3), dim=-1)  # (B, T, HW, hd)
    act = x.abs().sum(-1).view(B, T, H * W)
    semantic = (act - act.amin(-1, keepdim=True)) / (act.amax(-1, keepdim=True) - act.amin(-1, keepdim=True))
    if backward:
        keys, semantic = keys.flip(1), semantic.flip(1)
    pos = torch.arange(H * W).expand(B, -1)
    first = drop_first(keys[:, 0], pos, r, "tome")
    kept_idx, _ = accumulate(keys, semantic, first, r)
    if backward:
        kept_idx.reverse()
    kept = torch.zeros(B, T, H * W, dtype=torch.bool)
    for t, idx in enumerate(kept_idx):
        kept[:, t].scatter_(1, idx, True)
    return kept.view(B, T, H, W)


def reference_logits(
    model: ts.VideoBackbone,
    video: torch.Tensor,
    frames_kept: list[int] | None = None,
    mask_padding: bool = False,
    select=None,  # type: ignore[no-untyped-def]
    select_stage: int = 0,
    sta: int | None = None,
    fill: bool = True,
    kept_at: dict | None = None,
) -> torch.Tensor:
    """The logits of `model`'s weights computed as the Video Swin paper and the released code describe the
    network. `frames_kept`: temporal slices kept right after the embedding (windowed as adjacent); `select`: any
    selection there (clip by clip), or before stage `select_stage` (after the merging that ends the stage
    before, as the released loop `x = select(x); x = layers[i](x)` does); `sta`: STA's r, as its paper describes it on Swin (§4.1): after the
    merging of each of the first three stages, r, 1.5r/4 and 2r/16 cells of every temporal slice dropped (F-B-F),
    each dropped cell filled with its nearest kept token of the same slice in the window attention and in the
    merging (the copies' outputs discarded), the mean over the kept tokens at the end; `kept_at`: the same with
    the cells kept before some blocks given ({block: (B, T, H, W) bool})."""
    cfg = model.config
    P = dict(model.named_parameters())
    eps, t, p = cfg.eps, cfg.tubelet, cfg.patch
    x = F.conv3d(video.transpose(1, 2), P["embed.proj.weight"], P["embed.proj.bias"], stride=(t, p, p))
    x = x.permute(0, 2, 3, 4, 1)  # (B, T, H, W, C)
    x = F.layer_norm(x, (cfg.dim,), P["embed.norm.weight"], P["embed.norm.bias"], eps=eps)
    if frames_kept is not None:
        x = x[:, frames_kept]
    if select is not None and select_stage == 0:  # (B, T, H, W, C) -> (B, T', H', W', C)
        x = select(x)
    stage, first = 0, 0
    kept = None  # (B, T, H, W) the cells STA keeps, None while none is dropped
    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        if i in cfg.stages:
            x = _merge(_filled(x, kept), P, f"blocks.{i - 1}.downsample.", eps)
            stage, first, kept = stage + 1, i, None
            if select is not None and select_stage == stage:
                x = select(x)
        C = x.shape[-1]
        y = F.layer_norm(x, (C,), P[pre + "norm1.weight"], P[pre + "norm1.bias"], eps=eps)
        if sta is not None and i in cfg.stages[:3]:
            r = (sta, sta * 3 // 8, sta // 8)[stage - 1]
            kept = _sta_keep(x, y, P, pre + "attn.", cfg.heads * 2**stage, r, backward=stage == 2)
        if kept_at is not None and i in kept_at:  # cells some other selection keeps before block i
            kept = kept_at[i]
        shifted = (i - first) % 2 == 1
        attended = _window_attention(
            _filled(y, kept if fill else None),
            P,
            pre + "attn.",
            cfg.heads * 2**stage,
            cfg.window,
            shifted,
            mask_padding,
        )
        x = x + attended  # at the dropped cells x is not read again: the next uses fill them
        y = F.layer_norm(x, (C,), P[pre + "norm2.weight"], P[pre + "norm2.bias"], eps=eps)
        hidden = F.gelu(y @ P[pre + "mlp.fc1.weight"].T + P[pre + "mlp.fc1.bias"])
        x = x + hidden @ P[pre + "mlp.fc2.weight"].T + P[pre + "mlp.fc2.bias"]
    x = F.layer_norm(x, (x.shape[-1],), P["norm.weight"], P["norm.bias"], eps=eps)
    if kept is None:
        return x.mean((1, 2, 3)) @ P["head.weight"].T + P["head.bias"]
    pooled = torch.stack([x[b][kept[b]].mean(0) for b in range(x.shape[0])])  # the kept tokens' mean
    return pooled @ P["head.weight"].T + P["head.bias"]


def _model(**changes: object) -> ts.VideoBackbone:
    torch.manual_seed(0)
    model = ts.build("swin3d-tiny", **changes).double().eval()
    with torch.no_grad():  # nothing at its init value (zero biases, unit norms would hide a swap)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return model


# ------------------------------------------------------------------ logits
@pytest.mark.parametrize(
    ("changes", "clip"),
    [
        (
            {},
            None,
        ),  # 4x8x8 (padded to 4x9x9), 4x4x4 (padded to 4x6x6), 4x2x2 (window shrunk to 2x2, no shift)
        ({"size": 24}, None),  # 6x6 unpadded; 3x3 = the window: spatial shift 0, temporal shift 1
        ({"window": (4, 4, 4)}, None),  # T = 4 = the window: no temporal shift; 8x8 shifted by 2
        ({"frames": 12, "size": 36}, None),  # 6x9x9 -> merged from odd sides 5x5 (padded to 6x6) -> 3x3
        ({}, (4, 40, 24)),  # another clip size (any_size): 2x10x6, a single temporal window
    ],
)
def test_logits_equal_the_reference_forward(changes: dict, clip: tuple[int, int, int] | None) -> None:
    model = _model(**changes)
    cfg = model.config
    frames, height, width = clip or (cfg.frames, cfg.size, cfg.size)
    video = torch.randn(2, frames, 3, height, width, dtype=torch.float64)
    with torch.no_grad():
        ours, theirs = model(video), reference_logits(model, video)
    assert (ours - theirs).abs().max() < 1e-10


def test_the_shift_and_the_unmasked_padding_matter() -> None:
    """Negative controls: the reference without shifted windows, or with the padded tokens masked out,
    is told apart from the model (so the equality above tests both)."""
    model = _model()
    video = tiny_video("swin3d-tiny").double()
    with torch.no_grad():
        ours = model(video)
        assert (reference_logits(model, video, mask_padding=True) - ours).abs().max() > 1e-6
        for block in model.blocks:
            block.attn.shift = (0, 0, 0)
        assert (reference_logits(model, video) - model(video)).abs().max() > 1e-6


def test_frame_selection_windows_the_kept_slices_as_adjacent() -> None:
    model = _model()
    video = tiny_video("swin3d-tiny").double()
    ts.apply(model, "uniform:keep=0.5")
    with torch.no_grad():
        state = model.forward_features(video)
        kept = sorted(set((state.pos[0] // 64).tolist()))  # pos indexes the 4x8x8 patch grid
        assert len(kept) == 2 and state.frames == 2 and state.frame_grid == (2, 2)
        assert (model(video) - reference_logits(model, video, frames_kept=kept)).abs().max() < 1e-10


# ------------------------------------------------------------------ STA on Swin
@pytest.mark.parametrize(
    ("changes", "r"),
    [
        ({}, 6),  # 4x4x4 after the first merging (6 of 16 cells of each slice dropped), 4x2x2 (2 of 4)
        ({"frames": 12, "size": 36}, 8),  # 6x5x5, windows padded to 6x6 (8 of 25), 6x3x3 (3 of 9)
        (
            {"window": (4, 2, 2)},
            4,
        ),  # 2x2 windows: every window has holes; shift on all axes (4 of 16, 1 of 4)
    ],
)
def test_sta_on_swin_equals_the_papers_description_written_out(changes: dict, r: int) -> None:
    model = _model(**changes)
    cfg = model.config
    video = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size, dtype=torch.float64)
    installed = ts.apply(model, f"sta:r={r}")
    assert [s.site.position for s in installed.steps] == list(cfg.stages)
    with torch.no_grad():
        ours, theirs = model(video), reference_logits(model, video, sta=r)
        assert (ours - theirs).abs().max() < 1e-10
        # Negative control: windows holding the dropped cells' stale values instead of copies differ.
        assert (reference_logits(model, video, sta=r, fill=False) - ours).abs().max() > 1e-6
        ts.apply(model, None)
        assert (model(video) - ours).abs().max() > 1e-6


def test_random_per_frame_on_swin_leaves_holes_filled_as_stas() -> None:
    """STA's random baseline on Swin: `random` per frame at the same places drops cells the windows fill the
    same way (the reference given the cells the model kept)."""
    model = _model(**{"frames": 12, "size": 36})
    installed = ts.apply(model, "random:keep=0.6,per_frame=true,at=2+random:keep=0.5,per_frame=true,at=4")
    assert [s.after.holes for s in installed.steps] == [(5, 5), (3, 3)]
    kept: dict = {}

    def capture(block_index: int):  # type: ignore[no-untyped-def]
        def hook(_module, args):  # type: ignore[no-untyped-def]
            holes = args[0].aux[HOLES]
            B, (T, H, W) = holes.slot.shape[0], holes.grid
            kept[block_index] = (
                torch.zeros(B, T * H * W, dtype=torch.bool).scatter(1, holes.slot, True).view(B, T, H, W)
            )

        return hook

    for p in model.config.stages:
        model.blocks[p].register_forward_pre_hook(capture(p))
    video = torch.randn(2, 12, 3, 36, 36, dtype=torch.float64)
    with torch.no_grad():
        ours = model(video)
    assert [int(kept[p][0, 0].sum()) for p in (2, 4)] == [15, 4]  # round(0.6 * 25), round(0.5 * 9) per slice
    assert not torch.equal(kept[2][0], kept[2][1])  # each clip its own cells
    with torch.no_grad():
        assert (ours - reference_logits(model, video, kept_at=kept)).abs().max() < 1e-10


def test_stas_random_baseline_on_swin_b_keeps_its_counts() -> None:
    """`random` per frame at STA's places with STA r=256's counts: the same tokens at every stage, and the
    GFLOPs without STA's keys and scoring (2.49 + 0.23)."""
    model = meta_model("swin3d-b")
    random = ts.apply(model, "+".join(f"random:keep={(n - r) / n},per_frame=true,at={p}"
                                      for r, n, p in ((256, 784, 2), (96, 196, 4), (32, 49, 22))))  # fmt: skip
    assert [s.tokens_out for s in random.steps] == [16 * 528, 16 * 100, 16 * 17]
    assert f"{ts.flops(model):.2f}" == "175.47"
    sta = ts.apply(model, "sta:r=256")
    assert [s.tokens_out for s in sta.steps] == [16 * 528, 16 * 100, 16 * 17]


def test_sta_on_swin_fills_with_the_nearest_kept_cell() -> None:
    # One 3x4 slice keeping cells 0, 3 and 10 (raster): hand-checked nearest kept cells, ties to the first.
    slot = torch.tensor([[0, 3, 10]])
    fill = nearest_fill(slot, (1, 3, 4))
    #  cell:  0  1  2  3 | 4  5  6  7 | 8  9 10 11
    assert fill.tolist() == [[0, 0, 1, 1, 0, 0, 2, 1, 0, 2, 2, 2]]
    # Two slices, the second's tokens listed out of raster order: indices follow the tokens.
    slot = torch.tensor([[1, 2, 7, 4]])  # slice 0 keeps cells 1, 2; slice 1 keeps 3 (7 - 4) and 0
    assert nearest_fill(slot, (2, 2, 2)).tolist() == [[0, 0, 1, 0, 3, 3, 3, 2]]


@pytest.mark.parametrize(
    ("name", "ours", "paper"),
    [
        ("swin3d-t", ("69.30", "62.46", "55.63"), (68, 61, 54)),
        ("swin3d-s", ("122.85", "107.85", "92.84"), (121, 106, 91)),
        ("swin3d-b", ("204.83", "178.19", "151.54"), (202, 176, 149)),
        ("swin3d-b-ssv2", ("243.86", "217.21", "190.57"), (241, 215, 188)),  # window 16x7x7: 321 unreduced
    ],
)
def test_sta_on_swin_gflops_next_to_the_paper(name: str, ours: tuple, paper: tuple) -> None:
    """STA's Video Swin rows (its Table 3, K400 and SSv2, r = 192 / 256 / 320, 32x224): attention on whole windows (the
    copies too), every linear layer on the kept tokens, as its §4.1 describes. Ours also count the keys STA
    reads (the next block's key projection of every merged token, `keys`: 2.49 G on Swin-B, 1.41 on T/S);
    without them every row is the paper's, to the unit it publishes."""
    model = meta_model(name)
    for r, want, published in zip((192, 256, 320), ours, paper, strict=True):
        ts.apply(model, f"sta:r={r}")
        count = ts.flops(model, detail=True)
        assert f"{count.gflops:.2f}" == want
        assert round(count.gflops - count.by_module["keys"] / 1e9) == published


# ------------------------------------------------------------------ sizes and grids
def test_swin_sizes_grids_and_windows() -> None:
    with torch.device("meta"):
        model = ts.build("swin3d-b")
    assert model.num_params == 88_048_984  # torchvision's swin3d_b
    grids = model.grids()
    # Grids before each block: a stage's patch merging ends its last block (blocks 1, 3, 21).
    assert grids[0] == grids[1] == (16, 56, 56) and grids[2] == grids[3] == (16, 28, 28)
    assert grids[4] == grids[21] == (16, 14, 14) and grids[22] == grids[24] == (16, 7, 7)
    widths = [model.config.width(p) for p in (0, 1, 2, 3, 4, 21, 22, 24)]
    assert widths == [128, 128, 256, 256, 512, 512, 1024, 1024]
    assert [b.attn.heads for b in model.blocks][::2] == [4, 8] + [16] * 9 + [32]
    assert [p for p, b in enumerate(model.blocks) if b.merges] == [1, 3, 21]
    assert [any(b.attn.shift) for b in model.blocks] == [False, True] * 12
    assert window_and_shift((16, 7, 7), (8, 7, 7), (4, 3, 3)) == ((8, 7, 7), (4, 0, 0))
    assert window_and_shift((6, 56, 56), (8, 7, 7), (4, 3, 3)) == ((6, 7, 7), (0, 3, 3))


def test_config_checks() -> None:
    with pytest.raises(InputError, match="arch 'swin' reads out the mean of its tokens"):
        ts.build("swin3d-tiny", pool="cls")
    with pytest.raises(InputError, match="window must be three sizes"):
        ts.build("swin3d-tiny", window=(2, 0, 3))
    with pytest.raises(InputError, match="frame size 30x30 must be divisible by the patch size 4"):
        ts.build("swin3d-tiny")(torch.randn(1, 8, 3, 30, 30))


# ------------------------------------------------------------------ plans
@pytest.mark.parametrize(
    "spec", ["random:keep=0.5", "tome:r=4", "attention:keep=0.5", "lite:keep=0.5",
             "tokenlearner:at=1,tokens=4", "halting:beta=0", "random:keep=0.5,per_frame=true,at=1+random:keep=0.5,at=1"],
)  # fmt: skip
def test_per_token_methods_are_refused_with_the_grid_requirement(spec: str) -> None:
    with pytest.raises(InputError, match=r"Swin3D block \d \(shifted-window attention over each frame's grid\) "
                       r"needs a full \(or cropped\) grid of tokens in every frame") as error:  # fmt: skip
        ts.apply(ts.build("swin3d-tiny"), spec)
    assert "\n" not in str(error.value)


def test_whole_frame_methods_and_reductions_after_the_last_block_run() -> None:
    model = ts.build("swin3d-tiny").eval()
    video = tiny_video("swin3d-tiny")
    for spec, tokens in [
        ("uniform:keep=0.5", [128]), ("random_frames:keep=0.5,at=2", [32]), ("stts:T0=0.5", [128]),
        ("random:keep=0.5,at=5", [8]),
    ]:  # fmt: skip
        installed = ts.apply(model, spec)
        assert [step.tokens_out for step in installed.steps] == tokens
        assert model(video).shape == (2, 10)
    with pytest.raises(
        InputError,
        match=r"needs attn_received recorded by the attention before it, which Swin3D.s attention does not record \(it attends within windows",
    ):
        ts.apply(model, "attention:keep=0.5,at=4")


# ------------------------------------------------------------------ checkpoints
def _released_names(model: ts.VideoBackbone, layout: str) -> dict[str, torch.Tensor]:
    """`model`'s tensors under the names of a released layout, written here from the released key lists
    (hierarchical.md §3.3-3.4): "original" (Video Swin / mmaction2 0.x, in mmcv's `state_dict`), "mmaction1"
    (the final norm is `norm3`) or "torchvision" (`features.{2s}` / `features.{2s+1}`, `mlp.0/3`)."""
    cfg = model.config
    starts = (0, *cfg.stages)
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            stage = sum(s <= int(i) for s in cfg.stages)
            j = int(i) - starts[stage]
            if rest.startswith("downsample."):  # the stage's last block
                rest = rest.removeprefix("downsample.")
                key = (
                    f"features.{2 * stage + 1}.{rest}"
                    if layout == "torchvision"
                    else f"backbone.layers.{stage}.downsample.{rest}"
                )
            elif layout == "torchvision":
                rest = rest.replace("mlp.fc1", "mlp.0").replace("mlp.fc2", "mlp.3")
                key = f"features.{2 * stage}.{j}.{rest}"
            else:
                key = f"backbone.layers.{stage}.blocks.{j}.{rest}"
        elif layout == "torchvision":
            key = key.replace("embed.", "patch_embed.")
        else:
            norm = "backbone.norm3." if layout == "mmaction1" else "backbone.norm."
            key = key.replace("embed.", "backbone.patch_embed.").replace("head.", "cls_head.fc_cls.")
            key = norm + key.removeprefix("norm.") if key.startswith("norm.") else key
        out[key] = value
    for i, block in enumerate(model.blocks):  # the released files carry the index buffer too
        stage = sum(s <= i for s in cfg.stages)
        j = i - starts[stage]
        index = block.attn.relative_position_index
        out[f"features.{2 * stage}.{j}.attn.relative_position_index" if layout == "torchvision"
            else f"backbone.layers.{stage}.blocks.{j}.attn.relative_position_index"] = index  # fmt: skip
    return out if layout == "torchvision" else {"meta": {}, "state_dict": out}


@pytest.mark.parametrize("layout", ["original", "mmaction1", "torchvision"])
@pytest.mark.parametrize("changes", [{}, {"window": (4, 2, 2), "qkv_bias": "none", "num_classes": 7}])
def test_checkpoints_load_back_with_equal_logits(layout: str, changes: dict, tmp_path) -> None:
    model = _model(**changes)
    path = tmp_path / "swin.pth"
    torch.save(_released_names(model, layout), path)
    loaded = ts.load(path)
    assert isinstance(loaded, ts.Swin3D) and loaded.config.window == model.config.window
    assert loaded.config.stages == model.config.stages and loaded.config.heads == model.config.heads
    video = tiny_video("swin3d-tiny").double()
    with torch.no_grad():
        assert torch.equal(loaded(video), model(video))


def test_a_checkpoint_that_does_not_fit_is_one_error_listing_every_key(tmp_path) -> None:
    from tokensieve.backbones.checkpoint import CheckpointMismatchError

    ckpt = _released_names(_model(), "original")
    state = ckpt["state_dict"]
    del state["backbone.layers.1.blocks.0.mlp.fc2.bias"]
    state["backbone.layers.0.blocks.1.attn.extra"] = torch.zeros(1)
    state["backbone.layers.0.downsample.norm.weight"] = torch.zeros(5)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as error:
        ts.load(tmp_path / "bad.pth")
    message = str(error.value)
    assert "missing keys (1)" in message and "blocks.2.mlp.fc2.bias" in message
    assert "unexpected keys (1)" in message and "backbone.layers.0.blocks.1.attn.extra" in message
    assert "shape mismatches (1)" in message and "blocks.1.downsample.norm.weight: checkpoint (5,)" in message


def test_a_relative_position_index_of_another_window_is_refused(tmp_path) -> None:
    state = _released_names(_model(), "torchvision")
    state["features.0.1.attn.relative_position_index"] = state[
        "features.0.1.attn.relative_position_index"
    ].flip(0)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(InputError, match="block 1's relative position index is not that of window"):
        ts.load(tmp_path / "odd.pth")


# ------------------------------------------------------------------ STTS's Swin checkpoints
def _predictor(P: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """STTS's released `PredictorLG` on candidates (B, L, D): LayerNorm, Linear(D, D), GELU; the first half of
    the channels per candidate, the mean of the second half over the candidates; an MLP to one raw score."""
    D = x.shape[-1]
    h = F.layer_norm(x, (D,), P[prefix + "in_conv.0.weight"], P[prefix + "in_conv.0.bias"], eps=1e-5)
    h = F.gelu(h @ P[prefix + "in_conv.1.weight"].T + P[prefix + "in_conv.1.bias"])
    h = torch.cat([h[..., : D // 2], h[..., D // 2 :].mean(1, keepdim=True).expand(-1, x.shape[1], -1)], -1)
    for j in (0, 2):
        h = F.gelu(h @ P[prefix + f"out_conv.{j}.weight"].T + P[prefix + f"out_conv.{j}.bias"])
    return (h @ P[prefix + "out_conv.4.weight"].T + P[prefix + "out_conv.4.bias"])[..., 0]


def released_stts_swin(
    model: ts.VideoBackbone,
    predictors: dict,
    video: torch.Tensor,
    ratio: float,
    space: float | None = None,
    stage: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """STTS's released Swin evaluation path (`time_pruning_loc=[stage]`, `time_score='tpool'`; with `space`,
    also `space_pruning_loc=[0]`, `space_score='spatch'`), in Video Swin (`reference_logits`).

    `PatchNet` on the patch embedding's (B, C, T, H, W) output: each slice's mean and max over its tokens,
    concatenated, scored by `PredictorLG(2C)` (`predictors["T"]`: weights under the released names without
    `backbone.time_score_predictor.0.score_network.`), min-max over the slices, the K = int(T * ratio) best in
    time order. Spatial (`predictors["S"]`, `PredictorLG(C)`): in every kept slice, each token's score, the mean
    over each P x P anchor (P = int(sqrt(int(H * W * space))), stride max((H - P) // 2, 1), as `F.unfold`
    lays them out), min-max over the anchors, the best one's P x P tokens. Returns the logits and the kept
    slices (B, K)."""
    kept_slices = []

    def select(x: torch.Tensor) -> torch.Tensor:
        B, T, H, W, C = x.shape
        tokens = x.flatten(2, 3)  # (B, T, H*W, C)
        scores = _predictor(
            predictors["T"], "", torch.cat([tokens.mean(2), tokens.max(2).values], -1)
        )  # (B, T)
        kept = _min_max(scores).topk(int(T * ratio), -1).indices.sort(-1).values  # (B, K)
        kept_slices.append(kept)
        x = torch.stack([x[b, kept[b]] for b in range(B)])  # (B, K, H, W, C)
        if space is None:
            return x
        P = math.isqrt(int(H * W * space))
        stride = max((H - P) // 2, 1)
        crops = []
        for b, t in itertools.product(range(B), range(x.shape[1])):
            token_scores = _predictor(predictors["S"], "", x[b, t].reshape(1, H * W, C))  # (1, H*W)
            anchors = F.unfold(token_scores.view(1, 1, H, W), P, stride=stride).mean(1)  # (1, G)
            best = int(_min_max(anchors).topk(1, -1).indices)
            windows = F.unfold(x[b, t].permute(2, 0, 1)[None], P, stride=stride)  # (1, C*P*P, G)
            crops.append(windows[0, :, best].view(C, P, P).permute(1, 2, 0))  # (P, P, C)
        return torch.stack(crops).view(B, -1, P, P, C)

    logits = reference_logits(model, video, select=select, select_stage=stage)
    return logits, kept_slices[0]


def _min_max(s: torch.Tensor) -> torch.Tensor:
    low, high = s.min(-1, keepdim=True).values, s.max(-1, keepdim=True).values
    return (s - low) / (high - low + 1e-5)


STTS_SWIN_CONFIG = """model = dict(
    type='Recognizer3D',
    backbone=dict(
        type='SwinTransformer3D',
        patch_size=(2, 4, 4),
        embed_dim=8,
        depths=[2, 2, 1],
        num_heads=[1, 2, 4],
        window_size=(2, 3, 3),
        mlp_ratio=2.0,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.2,
        patch_norm=True,
        num_frames=8,
        image_size=32,
        time_pruning_loc=[0],
        time_left_ratio=[0.7],
        time_score='tpool',
        pretrained2d=False),
    cls_head=dict(type='I3DHead', in_channels=32, num_classes=10, spatial_type='avg', dropout_ratio=0.5),
    test_cfg=dict(average_clips='prob', max_testing_views=2))
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_bgr=False)
optimizer = dict(type='AdamW', lr=0.0003, betas=(0.9, 0.999), weight_decay=0.05)
"""
"""A tiny STTS Swin config as mmcv's `cfg.pretty_text` writes it (mmaction2 0.x saves it as `meta["config"]`):
on swin3d-tiny's 4 slices, K = int(4 * 0.7) = 2 (where rounding would keep 3)."""


def _stts_swin_model(space: str = "", at: int = 0) -> ts.VideoBackbone:
    model = _model()
    ts.apply(model, f"stts:T{at}=0.5{space},pool=meanmax,anchor_pool=mean,scorer=released,sigma=0.05")
    with torch.no_grad():  # a scorer with spread-out scores, so that each clip picks its own slices
        for param in model.plan.parameters():
            param.copy_(torch.randn_like(param))
    return model.eval()


def _stts_swin_file(path, model: ts.VideoBackbone, config: str | None = STTS_SWIN_CONFIG):  # type: ignore[no-untyped-def]
    """`model` saved as STTS's Swin saves it (mmcv: `meta` with the config text, `state_dict` in mmaction2 0.x
    names, the temporal predictor under `backbone.time_score_predictor.0.score_network.`)."""
    ckpt = _released_names(model, "original")
    state = ckpt["state_dict"]
    for key in [k for k in state if k.startswith("plan.")]:
        index, rest = key.removeprefix("plan.0.selections.").split(".scorer.")
        what = "time" if model.plan[0].selections[int(index)].kind == "T" else "space"
        state[f"backbone.{what}_score_predictor.0.score_network." + rest] = state.pop(key)
    ckpt["meta"] = {"mmcv_version": "1.3.8", "epoch": 10} | ({"config": config} if config is not None else {})
    torch.save(ckpt, path)
    return path


def _released_predictors(model: ts.VideoBackbone) -> dict:
    """The plan's scorers' weights by kind ("T", "S"), under the released `PredictorLG` names."""
    (reducer,) = model.plan
    return {s.kind: dict(s.scorer.named_parameters()) for s in reducer.selections}


def test_an_stts_swin_checkpoint_equals_the_released_evaluation_path(tmp_path) -> None:
    model = _stts_swin_model()
    loaded = ts.load(_stts_swin_file(tmp_path / "stts_swin.pth", model))
    assert isinstance(loaded, ts.Swin3D) and loaded.config.frames == 8 and loaded.config.size == 32
    assert loaded.spec == "stts:T0=0.5,pool=meanmax,anchor_pool=mean,scorer=released,sigma=0.05"
    predictors = _released_predictors(loaded)
    assert all(torch.equal(v, _released_predictors(model)["T"][k]) for k, v in predictors["T"].items())
    video = torch.randn(4, 8, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = loaded(video)
        theirs, kept = released_stts_swin(loaded, predictors, video, 0.7)
        state = loaded.forward_features(video)
    assert (
        kept.shape == (4, 2) and len({tuple(row) for row in kept.tolist()}) > 1
    )  # the clips chose differently
    assert torch.equal((state.pos.view(4, -1)[:, ::4] // 64).unique(dim=1), kept)  # slices in time order
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    with torch.no_grad():
        assert torch.equal(ours, model(video))


def test_an_stts_swin_checkpoint_selecting_before_a_later_stage_equals_the_released_path(tmp_path) -> None:
    """`time_pruning_loc=[1]`: STTS scores the slices of the tokens stage 0's patch merging made (width 16
    here), which our slot before stage 1's first block (block 2) holds."""
    model = _stts_swin_model(at=2)
    config = STTS_SWIN_CONFIG.replace("time_pruning_loc=[0]", "time_pruning_loc=[1]")
    loaded = ts.load(_stts_swin_file(tmp_path / "stts_swin_s1.pth", model, config))
    assert loaded.spec == "stts:T2=0.5,pool=meanmax,anchor_pool=mean,scorer=released,sigma=0.05"
    video = torch.randn(4, 8, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = loaded(video)
        theirs, kept = released_stts_swin(loaded, _released_predictors(loaded), video, 0.7, stage=1)
    assert kept.shape == (4, 2) and len({tuple(row) for row in kept.tolist()}) > 1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_an_stts_swin_checkpoint_without_a_config_takes_its_ratio_from_a_keyword(tmp_path) -> None:
    model = _stts_swin_model()
    path = _stts_swin_file(tmp_path / "bare.pth", model, config=None)
    with pytest.raises(InputError, match="holds STTS selectors, but its config names no time_pruning_loc"):
        ts.load(path)
    loaded = ts.load(path, time_left_ratio=0.7, frames=8, size=32)
    assert loaded.spec == "stts:T0=0.5,pool=meanmax,anchor_pool=mean,scorer=released,sigma=0.05"
    video = tiny_video("swin3d-tiny", batch=3).double()
    with torch.no_grad():
        assert torch.equal(loaded(video), model(video))
    with pytest.raises(InputError, match="holds no STTS selectors: time_left_ratio= apply"):
        ts.load(_stts_swin_file(tmp_path / "plain.pth", _model()), time_left_ratio=0.5)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("time_pruning_loc=[0]", "time_pruning_loc=[3]"),
            "STTS selects before Swin stage 3, but the model has 3",
        ),
        (("time_score='tpool'", "time_score='tconv'"), "time_score 'tconv'; tokensieve runs STTS's 'tpool'"),
        (("time_left_ratio=[0.7]", "time_left_ratio=[0.7, 0.5]"), "gives time_pruning_loc \\[0\\] but"),
        (("model = dict(", "model = dict(x=import_this(), "), "time_score_predictor|selector"),
    ],
)
def test_stts_swin_configs_we_do_not_run_are_refused(edit: tuple[str, str], message: str, tmp_path) -> None:
    path = _stts_swin_file(tmp_path / "odd.pth", _stts_swin_model(), STTS_SWIN_CONFIG.replace(*edit))
    if "import_this" in edit[1]:  # a call that is not dict(...) reads as None; the rest still loads
        assert ts.load(path).spec.startswith("stts:T0=0.5,")
        return
    with pytest.raises(InputError, match=message):
        ts.load(path)


def test_an_stts_swin_checkpoint_that_does_not_fit_is_one_error(tmp_path) -> None:
    from tokensieve.backbones.checkpoint import CheckpointMismatchError

    path = _stts_swin_file(tmp_path / "bad.pth", _stts_swin_model())
    ckpt = torch.load(path)
    state = ckpt["state_dict"]
    del state["backbone.time_score_predictor.0.score_network.out_conv.4.bias"]
    state["backbone.time_score_predictor.0.score_network.in_conv.1.weight"] = torch.zeros(3, 3)
    del state["backbone.layers.1.blocks.0.mlp.fc2.bias"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointMismatchError) as error:
        ts.load(path)
    message = str(error.value)
    assert "missing keys (2)" in message and "plan.0.selections.0.scorer.out_conv.4.bias" in message
    assert "blocks.2.mlp.fc2.bias" in message
    assert "shape mismatches (1)" in message and "plan.0.selections.0.scorer.in_conv.1.weight" in message


def test_stts_spatial_anchors_on_swin_equal_the_released_spatch_path(tmp_path) -> None:
    """The spatial form (implemented in the released code, used by no released config): after the temporal
    selection, one 5x5 anchor per kept slice of the 8x8 grid (int(64 * 0.4) = 25 tokens, stride 1, 16 anchors);
    the windows (3x3) pad 5x5 to 6x6 as released, the merge pads 5x5 to 6x6 -> 3x3 = the window: no shift."""
    config = STTS_SWIN_CONFIG.replace(
        "time_score='tpool',", "time_score='tpool',\n        space_pruning_loc=[0],\n        space_left_ratio=[0.4],"
        "\n        space_score='spatch',"
    )  # fmt: skip
    model = _stts_swin_model(",S0=0.4")
    loaded = ts.load(_stts_swin_file(tmp_path / "stts_s0.pth", model, config))
    assert loaded.spec == "stts:T0=0.5,S0=0.4,pool=meanmax,anchor_pool=mean,scorer=released,sigma=0.05"
    assert [(s.after.tokens, s.after.frame_grid) for s in loaded.installed.steps] == [
        (128, (8, 8)),
        (50, (5, 5)),
    ]
    assert loaded.grids()[-1] == (
        4,
        2,
        2,
    )  # the bare model's grids: the plan's are (2, 5, 5), (2, 3, 3), (2, 2, 2)
    video = torch.randn(3, 8, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = loaded(video)
        theirs, _ = released_stts_swin(loaded, _released_predictors(loaded), video, 0.7, space=0.4)
        state = loaded.forward_features(video, trace=True)
    state.check()
    anchors = {tuple((state.pos.view(3, 2, -1)[b, t, 0] % 64).tolist() for t in range(2)) for b in range(3)}
    assert len(anchors) > 1  # the clips' slices chose different anchors
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    with torch.no_grad():
        assert torch.equal(ours, model(video))
