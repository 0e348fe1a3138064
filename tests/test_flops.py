from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokensieve as ts
from conftest import tiny_video
from tokensieve.flops import count_flops, register_cpu_sdpa_formula


def meta_model(name: str, **changes: object) -> ts.VideoBackbone:
    with torch.device("meta"):
        return ts.build(name, **changes)


@pytest.mark.parametrize(
    ("name", "paper"),
    # VideoMAE (Tong et al. 2022), Tab. 6/7: GFLOPs per 16x224 view.
    [("videomae-s", 57), ("videomae-b", 180), ("videomae-l", 597), ("videomae-h", 1192)],
)
def test_videomae_gflops_match_the_papers(name: str, paper: float) -> None:
    assert ts.flops(meta_model(name), frames=16, size=224) == pytest.approx(paper, abs=1.0)


def videomae_closed_form(D: int, L: int, N: int = 1568, classes: int = 400) -> int:
    """Per block 12*N*D^2 (qkv, proj, MLP) + 2*N^2*D (QK^T and AV); tubelet embedding; classifier."""
    return L * (12 * N * D * D + 2 * N * N * D) + N * (3 * 2 * 16 * 16) * D + D * classes


@pytest.mark.parametrize(
    ("name", "D", "L"), [("videomae-s", 384, 12), ("videomae-b", 768, 12), ("videomae-h", 1280, 32)]
)
def test_products_equal_the_closed_form(name: str, D: int, L: int) -> None:
    fc = ts.flops(meta_model(name), detail=True)
    assert fc.macs - fc.by_op["norm"] == videomae_closed_form(D, L)
    # Layer norms as fvcore counts them: 5 per element, two per block plus fc_norm.
    assert fc.by_op["norm"] == 5 * D * (2 * L * 1568 + 1)


def test_timesformer_closed_form() -> None:
    D, L, T, S = 768, 12, 8, 196
    N = T * S
    block = (
        5 * N * D * D + 2 * S * T * T * D  # temporal qkv + proj + temporal_fc; attention per position
        + 4 * T * (S + 1) * D * D + 2 * T * (S + 1) ** 2 * D  # spatial qkv + proj (cls per frame); attention
        + 8 * (N + 1) * D * D  # MLP
    )  # fmt: skip
    fc = ts.flops(meta_model("timesformer-b"), detail=True)
    assert fc.macs - fc.by_op["norm"] == L * block + N * 3 * 16 * 16 * D + D * 400


def test_vivit_closed_form() -> None:
    """ViViT-B/16x2 joint (model 1) at 32x224: N = 16*14*14 = 3136 tubelets plus the class token, every
    block over all 3137; the final norm and classifier on the class token alone. Pinned: 451.81 GFLOPs."""
    D, L, N = 768, 12, 3136
    S = N + 1
    fc = ts.flops(meta_model("vivit-b"), detail=True)
    assert (
        fc.macs - fc.by_op["norm"]
        == L * (12 * S * D * D + 2 * S * S * D) + N * (3 * 2 * 16 * 16) * D + D * 400
    )
    assert fc.by_op["norm"] == 5 * D * (2 * L * S + 1)
    assert fc.gflops == pytest.approx(451.81, abs=0.01)


def mvit_closed_form(frames: int, strided_kv: bool = False) -> tuple[int, list[int]]:
    """MViT-B multiply-adds from the architecture (hierarchical.md §4.3), norms included (5 per element):
    (total, per block). N counts the class token; primes are pooled patch tokens without it."""
    T, side, C, kv = frames // 2, 56, 96, 8
    total = T * side * side * C * (3 * 3 * 7 * 7)  # patch embedding
    blocks = []
    for i in range(16):
        stage = i in (1, 3, 14)
        if stage:
            kv = max(kv // 2, 1)
        C_out = 2 * C if i + 1 in (1, 3, 14) else C
        N = T * side * side + 1
        q_side = (side - 1) // 2 + 1 if stage else side
        Nq_ = T * q_side * q_side
        Nq = Nq_ + 1
        pools_kv = kv > 1 or not strided_kv
        Nk_ = T * ((side - 1) // kv + 1) ** 2 if pools_kv else N - 1
        Nk = Nk_ + 1
        macs = 5 * N * C + 3 * N * C * C  # norm1, qkv
        if stage:
            macs += 27 * Nq_ * C + 5 * Nq * C  # q pooling conv and its norm
        if pools_kv:
            macs += 2 * (27 * Nk_ * C + 5 * Nk * C)  # k and v pooling
        macs += 2 * Nq * Nk * C + Nq * C * C + 5 * Nq * C  # attention, proj, norm2
        macs += 4 * Nq * C * C + 4 * Nq * C * C_out + (Nq * C * C_out if C_out != C else 0)  # MLP, widening
        blocks.append(macs)
        side, C = q_side, C_out
    return total + sum(blocks) + 5 * C + C * 400, blocks  # final norm (class token), classifier


@pytest.mark.parametrize(
    ("name", "changes", "ours", "fvcore", "without_norms"),
    # hierarchical.md §1.3/§4.1, fvcore 0.1.5 on STTS's MViT (kv pools at every block) and on the original
    # pySlowFast config (none at blocks 14, 15); torchvision's mvit_v1_b `_ops` = 70.599 (no norms).
    [
        ("mvit-b-16x4", {}, "70.80", "70.80", "70.599"),
        ("mvit-b-16x4", {"kv_pool": "strided"}, "70.71", "70.71", "70.52"),
        ("mvit-b-32x3", {}, "170.36", "170.37", "169.96"),
    ],
)
def test_mvit_gflops_match_fvcore(
    name: str, changes: dict, ours: str, fvcore: str, without_norms: str
) -> None:
    """To the digits given. Our final norm runs on the class token alone (the only token read), the
    released model's on every token: 5 x 768 multiply-adds per patch token more there (32x3: 0.003 G, so
    fvcore's 170.367 against our 170.364). Without norms the two are equal."""
    fc = ts.flops(meta_model(name, **changes), detail=True)
    assert f"{fc.gflops:.2f}" == ours
    released_final_norm = 5 * 768 * ts.PRESETS[name].grid[0] * 7 * 7
    assert f"{(fc.macs + released_final_norm) / 1e9:.2f}" == fvcore
    no_norms = (fc.macs - fc.by_op["norm"]) / 1e9
    assert f"{no_norms:.{len(without_norms.split('.')[1])}f}" == without_norms
    assert fc.by_op["conv"] > 0  # the patch embedding and every pooling convolution


@pytest.mark.parametrize(
    ("name", "changes"), [("mvit-b-16x4", {}), ("mvit-b-16x4", {"kv_pool": "strided"}), ("mvit-b-32x3", {})]
)
def test_mvit_closed_form(name: str, changes: dict) -> None:
    """The count equals the formula exactly; per block, the formula gives fvcore's split (§1.3)."""
    fc = ts.flops(meta_model(name, **changes), detail=True)
    total, blocks = mvit_closed_form(ts.PRESETS[name].frames, strided_kv=bool(changes))
    assert fc.macs == total
    if name == "mvit-b-16x4" and not changes:
        fvcore = [6.08, 8.72, 5.13, 6.82] + [3.27] * 9 + [4.65, 5.90, 3.04]
        assert [round(m / 1e9, 2) for m in blocks] == fvcore


@pytest.mark.parametrize(
    ("T0", "S4", "frames", "side", "fvcore", "without_norms"),
    # hierarchical.md §1.3: STTS's five released MViT configs (TIME/SPACE_LEFT_RATIO), fvcore on its code.
    [
        (0.875, 0.863, 7, 13, "56.39", "56.21"),
        (0.75, 0.863, 6, 13, "47.21", "47.06"),
        (0.625, 0.863, 5, 13, "38.46", "38.34"),
        (0.5, 0.7367, 4, 12, "26.95", "26.86"),
        (0.375, 0.6174, 3, 11, "18.46", "18.39"),
    ],
)
def test_stts_on_mvit_gflops_match_fvcore(
    T0: float, S4: float, frames: int, side: int, fvcore: str, without_norms: str
) -> None:
    """With the released scorer, descriptor and anchor pooling. The released model's final norm runs on
    every token (ours on the class token: the logits are the same), 5 * 768 per token fvcore counts
    besides; added here, the count gives fvcore's number to the digit (the 56.39 row: 56.3842 without)."""
    model = meta_model("mvit-b-16x4")
    installed = ts.apply(model, f"stts:T0={T0},S4={S4},pool=meanmax,anchor_pool=mean,scorer=released")
    assert [s.after.frames for s in installed.steps] == [frames, frames]
    assert installed.steps[1].after.frame_grid == (side, side)
    fc = ts.flops(model, detail=True)
    released_final_norm = 5 * 768 * frames * ((side - 1) // 2 + 1) ** 2  # the patch tokens' rows
    assert f"{(fc.macs + released_final_norm) / 1e9:.2f}" == fvcore
    assert f"{(fc.macs - fc.by_op['norm']) / 1e9:.2f}" == without_norms
    assert fc.share("reducers.4") > 0.002  # the spatial scorer on frames x 196 tokens of width 384 counts


@pytest.mark.parametrize(
    "name", ["videomae-tiny", "timesformer-tiny", "joint-tiny", "vivit-tiny", "mvit-tiny"]
)
def test_agrees_with_torch_flop_counter(name: str) -> None:
    """Cross-check on CPU, where SDPA runs its fused CPU kernel (which torch 2.13 cannot count)."""
    register_cpu_sdpa_formula()
    model = ts.build(name).eval()
    video = tiny_video(name)
    with torch.no_grad(), FlopCounterMode(display=False) as torch_counter:
        model(video)
    fc = ts.flops(model, video=video, detail=True)
    assert fc.by_op["attention"] > 0  # counted from the fused kernel, not a decomposition
    assert fc.macs - fc.by_op["norm"] == torch_counter.get_total_flops() // 2


def test_cpu_sdpa_formula_is_registered_once() -> None:
    register_cpu_sdpa_formula()
    assert register_cpu_sdpa_formula() is False


def test_attention_count_is_exact_on_cpu() -> None:
    model = ts.build("videomae-tiny").eval()
    fc = ts.flops(model, detail=True)
    N, D, L = 32, 32, 3
    assert fc.by_op["attention"] == L * 2 * N * N * D


def test_meta_and_real_counts_agree() -> None:
    assert ts.flops(meta_model("joint-tiny")) == ts.flops(ts.build("joint-tiny").eval())


def test_per_clip_does_not_depend_on_batch() -> None:
    model = ts.build("videomae-tiny").eval()
    assert ts.flops(model, video=tiny_video(batch=3)) == pytest.approx(ts.flops(model))


def test_breakdown_by_part_sums_to_total() -> None:
    fc = ts.flops(meta_model("videomae-b"), detail=True)
    assert set(fc.by_module) == {"embed", "blocks", "fc_norm", "head"}
    assert sum(fc.by_module.values()) == fc.macs
    assert fc.share("blocks") > 0.98


def test_counter_attributes_work_outside_the_model() -> None:
    model = ts.build("videomae-tiny").eval()
    with count_flops(model) as fc:
        torch.ones(4, 5) @ torch.ones(5, 6)
    assert fc.macs == 120 and fc.by_module == {"other": 120}


def test_needs_input_size_without_config() -> None:
    with pytest.raises(ValueError, match="frames= and size="):
        ts.flops(torch.nn.Linear(3, 3))


@pytest.mark.parametrize(("keep", "gflops"), [(0.9, 159), (0.7, 118), (0.5, 80), (0.3, 46)])
def test_random_keep_at_position_0_gflops_of_lite(keep: float, gflops: float) -> None:
    with torch.device("meta"):
        model = ts.apply(ts.build("videomae-b"), f"random:keep={keep}").model
    assert ts.flops(model) == pytest.approx(gflops, abs=1.0)


def test_reducer_side_work_is_counted() -> None:
    """ToMe's matching product and the received-attention recomputation execute, so they count."""
    with torch.device("meta"):
        model = ts.build("videomae-s")
    base = ts.flops(model)
    received = ts.flops(ts.apply(model, "attention:keep=1").model)  # records, selects nothing
    N, C = 1568, 384
    assert received - base == pytest.approx(N * N * C / 1e9, rel=1e-3)  # one more q.k^T at block 1


# ---------------------------------------------------------------------------------------- per clip
def _sharp(name: str) -> ts.VideoBackbone:
    """A tiny model with sharpened attention, so an adaptive budget keeps different counts per clip."""
    torch.manual_seed(1)
    model = ts.build(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return model


@pytest.mark.parametrize("name", ["videomae-tiny", "joint-tiny"])
def test_per_clip_gflops_are_each_clips_own_cost(name: str) -> None:
    """An adaptive plan (`attention:mass`) costs each clip what it keeps: its per-clip GFLOPs equal those
    of the fixed plan keeping the same count, and the batch run packed costs their sum."""
    model = _sharp(name)
    video = torch.randn(4, 4, 3, 32, 32)
    installed = ts.apply(model, "attention:mass=0.6,at=0")
    with torch.no_grad():
        kept = model.forward_features(video)
    counts = kept.num_tokens.tolist()
    assert installed.adaptive and len(set(counts)) > 1  # really ragged
    fc = ts.flops(model, video=video, detail=True)
    assert len(fc.per_clip) == 4 and fc.clips == 4
    assert fc.gflops == pytest.approx(sum(fc.per_clip) / 4, rel=1e-12)
    assert ts.flops(model, video=video) == pytest.approx(fc.gflops, rel=1e-12)
    T, H, W = model.config.grid
    for clip, n in zip(fc.per_clip, counts, strict=True):
        fixed = ts.apply(ts.build(name).eval(), f"attention:keep={n / (T * H * W)},at=0").model
        assert clip == pytest.approx(ts.flops(fixed), rel=1e-12)  # the same ops on the same counts
    with torch.no_grad(), count_flops(model, clips=4) as batch:
        model(video)
    assert batch.gflops == pytest.approx(fc.gflops, rel=1e-12)  # packed: padding costs nothing
    model.ragged = "padded"
    with torch.no_grad(), count_flops(model, clips=4) as padded:
        model(video)
    assert padded.gflops > fc.gflops  # the reference path computes the padding too


def test_a_fixed_plan_has_equal_per_clip_gflops() -> None:
    model = ts.apply(ts.build("videomae-tiny").eval(), "random:keep=0.5").model
    fc = ts.flops(model, video=torch.randn(3, 4, 3, 32, 32), detail=True)
    assert len(set(fc.per_clip)) == 1 and fc.gflops == pytest.approx(ts.flops(model), rel=1e-12)


@pytest.mark.parametrize(
    ("name", "frames", "ours", "without_norms"),
    # hierarchical.md §2.3/§4.1: fvcore on the released Video Swin-B at 32x224 gives 281.92 (281.33 without
    # norms); torchvision's swin3d_t/s/b `_ops` (16 frames, no norms) are 43.882 / 82.841 / 140.667. The
    # Video Swin README's 87.9 / 165.9 / 281.6 (32 frames) are none of these conventions exactly.
    [
        ("swin3d-b", 32, "281.92", "281.33"),
        ("swin3d-b", 16, "140.96", "140.667"),
        ("swin3d-s", 16, "83.06", "82.841"),
        ("swin3d-t", 16, "44.03", "43.882"),
    ],
)
def test_swin_gflops_match_fvcore_and_torchvision(
    name: str, frames: int, ours: str, without_norms: str
) -> None:
    """Attention and qkv counted on the padded windows (what runs), the norms at 5 per element."""
    fc = ts.flops(meta_model(name), frames=frames, detail=True)
    assert f"{fc.gflops:.2f}" == ours
    no_norms = (fc.macs - fc.by_op["norm"]) / 1e9
    assert f"{no_norms:.{len(without_norms.split('.')[1])}f}" == without_norms
    if (
        name == "swin3d-b" and frames == 32
    ):  # fvcore's split: linear 241.69 + matmul 39.02, conv 0.62, norm 0.59
        assert [round(fc.by_op[k] / 1e9, 2) for k in ("matmul", "conv", "norm")] == [280.72, 0.62, 0.59]


@pytest.mark.parametrize(
    ("ratio", "kept", "fvcore"),
    # hierarchical.md §2.3: STTS's five released Swin-B configs (time_left_ratio, K = int(16 r)), fvcore on
    # its code. The STTS README's 252.5 / 223.4 / 181.4 / 121.6 / 91.4 mix counting conventions.
    [
        (0.875, 14, "261.51"),
        (0.75, 12, "241.09"),
        (0.625, 10, "220.68"),
        (0.5625, 9, "210.47"),
        (0.375, 6, "102.47"),
    ],
)
def test_stts_on_swin_gflops_match_fvcore(ratio: float, kept: int, fvcore: str) -> None:
    """K from 9 to 15 pads to two temporal windows of 8 in every block: the attention costs as at K = 16."""
    model = meta_model("swin3d-b")
    installed = ts.apply(model, f"stts:T0={ratio},pool=meanmax,scorer=released")
    assert [s.after.frames for s in installed.steps] == [kept]
    fc = ts.flops(model, detail=True)
    assert f"{fc.gflops:.2f}" == fvcore
    assert fc.by_module["reducers.0"] > 0  # the temporal scorer counts


def test_swin_agrees_with_torch_flop_counter() -> None:
    """Swin's attention with its additive bias and mask runs SDPA's fused CPU kernel (a (1, nh, V, V) mask; a
    3-D one would send it to the math path), which torch's counter learns from `register_cpu_sdpa_formula`."""
    register_cpu_sdpa_formula()
    model = ts.build("swin3d-tiny").eval()
    video = tiny_video("swin3d-tiny")
    with torch.no_grad(), FlopCounterMode(display=False) as torch_counter:
        model(video)
    fc = ts.flops(model, video=video, detail=True)
    assert fc.macs - fc.by_op["norm"] == torch_counter.get_total_flops() // 2
