"""Initialising class-token video backbones from an image ViT in timm naming (`ts.load_image_weights`).

The oracle is a reference image ViT written here in plain torch (explicit softmax attention) with
timm's parameter names and random weights. Invariants that hold exactly:

- joint model ("vit-cls") built for ONE frame == the image ViT on that frame. With T > 1 identical
  frames it does not: every patch key appears T times but the class-token key once, so the
  attention weights shift towards the patches.
- TimeSformer on T identical frames (any T) == the image ViT on one frame: the temporal branch
  ends in `temporal_fc`, which starts at zero, and spatial attention is per frame, the class token's
  per-frame outputs being averaged over identical values.
- The hybrid (divided blocks, then joint ones: HaltingVT) on T identical frames: its divided stage
  computes the image ViT's first blocks frame by frame; with one frame, the whole model equals it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tokensieve as ts
from tokensieve.backbones import build_from_config
from tokensieve.backbones.checkpoint import CheckpointMismatchError
from tokensieve.backbones.config import preset
from tokensieve.errors import InputError

SIZE, PATCH, DIM, DEPTH, HEADS, MLP = 32, 8, 32, 3, 2, 64  # the tiny presets' shape
NUM_CLASSES = 10


# --------------------------------------------------------------------------- reference image ViT
class RefAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        hd = C // HEADS
        q, k, v = self.qkv(x).view(B, N, 3, HEADS, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hd)
        weights = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(-1)  # (B, nh, N, N)
        return self.proj((weights @ v).transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class RefMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM, MLP)
        self.fc2 = nn.Linear(MLP, DIM)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU


class RefBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM, eps=1e-6)
        self.attn = RefAttention()
        self.norm2 = nn.LayerNorm(DIM, eps=1e-6)
        self.mlp = RefMlp()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, DIM, kernel_size=PATCH, stride=PATCH)


class RefViT(nn.Module):
    """timm/DeiT image ViT: class token, learned positions, pre-norm blocks, final norm, head on cls."""

    def __init__(self, *, size: int = SIZE, depth: int = DEPTH, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (size // PATCH) ** 2, DIM))
        self.patch_embed = PatchEmbed()
        self.blocks = nn.ModuleList(RefBlock() for _ in range(depth))
        self.norm = nn.LayerNorm(DIM, eps=1e-6)
        self.head = nn.Linear(DIM, num_classes)

    def forward(self, image: Tensor) -> Tensor:
        x = self.patch_embed.proj(image).flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed  # (B, 1+HW, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def ref_vit(seed: int = 0, **kwargs: int) -> RefViT:
    model = RefViT(**kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def images(batch: int = 2, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, SIZE, SIZE, generator=g)  # (B, C, H, W)


def save(state: dict[str, Tensor], directory: Path, fmt: str) -> Path:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = directory / "vit.safetensors"
        save_file(state, str(path))
    elif fmt == "pth-model":
        path = directory / "deit.pth"
        torch.save({"model": state, "epoch": 300}, path)  # DeiT's release format
    else:
        path = directory / "pytorch_model.bin"
        torch.save(state, path)
    return path


def run(model: nn.Module, video: Tensor) -> Tensor:
    with torch.no_grad():
        return model.eval()(video)


def max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- 1. joint model
@pytest.mark.parametrize("fmt", ["safetensors", "pth-model", "bin"])
def test_joint_one_frame_equals_image_vit(tmp_path: Path, fmt: str) -> None:
    ref = ref_vit()
    path = save(ref.state_dict(), tmp_path, fmt)
    model = build_from_config(preset("joint-tiny", frames=1, num_classes=NUM_CLASSES))
    before = run(model, images()[:, None])
    assert ts.load_image_weights(model, path, load_head=True) is model
    image = images()
    expected = run(ref, image)
    assert expected.std() > 0.1, "degenerate reference logits would make the comparison vacuous"
    assert max_diff(run(model, image[:, None]), expected) < 1e-5  # (B, T=1, C, H, W)
    assert max_diff(before, expected) > 1e-2  # the random init was really replaced


def test_every_timm_tensor_lands_in_place() -> None:
    ref = ref_vit()
    model = ts.build("joint-tiny", num_classes=NUM_CLASSES)  # 4 frames
    ts.load_image_weights(model, ref.state_dict(), load_head=True)
    renamed = {"cls_token": "embed.cls_token", "pos_embed": "embed.pos_embed"}
    renamed |= {f"patch_embed.proj.{p}": f"embed.proj.{p}" for p in ("weight", "bias")}
    ours = model.state_dict()
    theirs = {renamed.get(k, k): v for k, v in ref.state_dict().items()}
    assert set(ours) - set(theirs) == {"embed.time_embed"}
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert not ours["embed.time_embed"].any(), "the time embedding is not in an image checkpoint: stays zero"


# --------------------------------------------------------------------------- 2. TimeSformer
# "haltingvt-tiny": 2 divided blocks, then 2 joint ones (`BackboneConfig.divided`).
TIMESFORMERS = ["timesformer-tiny", "haltingvt-tiny"]


def timesformer(name: str, **changes: int) -> ts.VideoBackbone:
    return build_from_config(preset(name, num_classes=NUM_CLASSES, **changes))


@pytest.mark.parametrize(
    ("name", "frames"), [("timesformer-tiny", 1), ("timesformer-tiny", 4), ("haltingvt-tiny", 1)]
)
def test_timesformer_identical_frames_equal_image_vit(name: str, frames: int) -> None:
    """With one frame the joint blocks are the image blocks too; with more, only divided blocks are
    (see the module docstring), which the next test checks for the hybrid's divided stage."""
    model = timesformer(name, frames=frames)
    ref = ref_vit(depth=model.config.depth)
    assert model.blocks[0].temporal_fc.weight.abs().sum() > 0  # random before loading
    ts.load_image_weights(model, ref.state_dict(), load_head=True)
    image = images()
    clip = image[:, None].expand(-1, frames, -1, -1, -1)  # (B, T, C, H, W), T identical frames
    assert max_diff(run(model, clip), run(ref, image)) < 1e-5


def ref_tokens(ref: RefViT, image: Tensor, blocks: int) -> Tensor:
    """(B, 1+HW, C) the image ViT's tokens after its first `blocks` blocks."""
    x = ref.patch_embed.proj(image).flatten(2).transpose(1, 2)  # (B, HW, C)
    x = torch.cat([ref.cls_token.expand(x.shape[0], -1, -1), x], 1) + ref.pos_embed  # (B, 1+HW, C)
    for block in ref.blocks[:blocks]:
        x = block(x)
    return x


def test_hybrid_divided_stage_equals_image_vit_on_identical_frames() -> None:
    model = timesformer("haltingvt-tiny")  # 4 frames
    divided = model.config.divided_blocks
    ref = ref_vit(depth=model.config.depth)
    ts.load_image_weights(model, ref.state_dict(), load_head=True)
    seen: list = []
    model.blocks[divided - 1].register_forward_hook(lambda m, args, out: seen.append(out))
    image = images()
    run(model, image[:, None].expand(-1, 4, -1, -1, -1))  # (B, T, C, H, W), identical frames
    with torch.no_grad():
        expected = ref_tokens(ref, image, divided)  # (B, 1+HW, C)
    state = seen[0]
    B, T, HW, C = 2, 4, (SIZE // PATCH) ** 2, DIM
    per_frame = state.x.view(B, T, HW, C)  # time-major tokens, frame by frame
    assert expected.std() > 0.1
    assert max_diff(state.cls[:, 0], expected[:, 0]) < 1e-5
    for t in range(T):
        assert max_diff(per_frame[:, t], expected[:, 1:]) < 1e-5, t


@pytest.mark.parametrize("name", TIMESFORMERS)
def test_timesformer_temporal_branch_starts_as_spatial_copy(name: str) -> None:
    model = timesformer(name)
    ref = ref_vit(depth=model.config.depth)
    ts.load_image_weights(model, ref.state_dict())
    state = ref.state_dict()
    divided = model.config.divided_blocks
    for i, block in enumerate(model.blocks):
        for part in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
            assert torch.equal(block.attn.get_parameter(part), state[f"blocks.{i}.attn.{part}"])
        if i >= divided:  # a joint block: the image block as it is, nothing temporal
            assert not any("temporal" in k for k in block.state_dict()), i
            continue
        for part in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
            assert torch.equal(block.temporal_attn.get_parameter(part), state[f"blocks.{i}.attn.{part}"])
        assert block.temporal_attn.qkv.weight.data_ptr() != block.attn.qkv.weight.data_ptr()
        assert torch.equal(block.temporal_norm1.weight, state[f"blocks.{i}.norm1.weight"])
        assert torch.equal(block.temporal_norm1.bias, state[f"blocks.{i}.norm1.bias"])
        # Every divided block, the first included: what the released code ends with (image_init.py).
        assert not block.temporal_fc.weight.any() and not block.temporal_fc.bias.any()
    assert not model.embed.time_embed.any()
    assert sum("temporal_attn.qkv.weight" in k for k in model.state_dict()) == divided


def test_hybrid_reports_missing_spatial_and_temporal_keys_together() -> None:
    """A divided block's temporal copy comes from its spatial weights: both are missing when those
    are; a joint block misses only its own."""
    state = ref_vit(depth=4).state_dict()
    del state["blocks.1.attn.qkv.weight"], state["blocks.3.attn.qkv.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(3\):") as err:
        ts.load_image_weights(timesformer("haltingvt-tiny"), state)
    lines = str(err.value).splitlines()
    for key in ("blocks.1.attn.qkv.weight", "blocks.1.temporal_attn.qkv.weight", "blocks.3.attn.qkv.weight"):
        assert f"    {key}" in lines, key


def test_timesformer_distinct_frames_differ_from_per_frame_image_vit() -> None:
    """Sanity of the invariant above: with distinct frames the frames do mix (spatial class token)."""
    ref = ref_vit()
    model = ts.build("timesformer-tiny", num_classes=NUM_CLASSES)
    ts.load_image_weights(model, ref.state_dict(), load_head=True)
    clip = torch.randn(2, 4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    assert max_diff(run(model, clip), run(ref, clip[:, 0])) > 1e-3


# --------------------------------------------------------------------------- 3. errors
def test_other_image_size_names_pos_embed() -> None:
    state = ref_vit(size=48).state_dict()
    model = ts.build("joint-tiny")
    with pytest.raises(
        CheckpointMismatchError, match=r"embed\.pos_embed: checkpoint \(1, 37, 32\) vs model \(1, 17, 32\)"
    ):
        ts.load_image_weights(model, state)


def test_distilled_deit_keys_are_unexpected() -> None:
    state = ref_vit().state_dict()
    state["dist_token"] = torch.zeros(1, 1, DIM)
    state["head_dist.weight"] = torch.zeros(NUM_CLASSES, DIM)
    state["head_dist.bias"] = torch.zeros(NUM_CLASSES)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(3\):") as err:
        ts.load_image_weights(ts.build("timesformer-tiny"), state)
    for key in ("dist_token", "head_dist.weight", "head_dist.bias"):
        assert f"    {key}\n" in str(err.value) + "\n"


def test_shallower_checkpoint_names_missing_blocks() -> None:
    state = ref_vit(depth=DEPTH - 1).state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(12\):") as err:
        ts.load_image_weights(ts.build("joint-tiny"), state)
    assert "blocks.2.attn.qkv.weight" in str(err.value)
    assert "blocks.1." not in str(err.value)


@pytest.mark.parametrize(
    "content",
    [[1, 2, 3], {"model": {"epoch": 3}}, {"weights": torch.zeros(2), "step": 3}],
    ids=["list", "model-of-ints", "mixed"],
)
def test_file_without_state_dict(tmp_path: Path, content: object) -> None:
    path = tmp_path / "junk.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"junk\.pth holds no state dict of tensors"):
        ts.load_image_weights(ts.build("joint-tiny"), path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no checkpoint file at .*nothing\.safetensors"):
        ts.load_image_weights(ts.build("joint-tiny"), tmp_path / "nothing.safetensors")


def test_videomae_arch_is_rejected() -> None:
    with pytest.raises(
        ValueError, match=r"class-token backbones \(arch 'vit-cls' or 'timesformer'\), not 'videomae'"
    ):
        ts.load_image_weights(ts.build("videomae-tiny"), ref_vit().state_dict())


# --------------------------------------------------------------------------- 4. load_head
@pytest.mark.parametrize("preset_name", ["joint-tiny", "timesformer-tiny"])
def test_load_head_false_keeps_head(preset_name: str) -> None:
    ref = ref_vit(num_classes=7)  # another class count: its head could not be loaded
    model = ts.build(preset_name, num_classes=NUM_CLASSES)
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    ts.load_image_weights(model, ref.state_dict(), load_head=False)
    for key, value in model.head.state_dict().items():
        assert torch.equal(value, head[key]), key
    assert torch.equal(model.embed.pos_embed, ref.pos_embed)  # the rest did load
    assert torch.equal(model.norm.weight, ref.norm.weight)


def test_load_head_true_with_other_class_count_names_head() -> None:
    ref = ref_vit(num_classes=7)
    with pytest.raises(
        CheckpointMismatchError, match=r"head\.weight: checkpoint \(7, 32\) vs model \(10, 32\)"
    ):
        ts.load_image_weights(
            ts.build("joint-tiny", num_classes=NUM_CLASSES), ref.state_dict(), load_head=True
        )


def test_load_head_true_copies_head() -> None:
    ref = ref_vit()
    model = ts.build("joint-tiny", num_classes=NUM_CLASSES)
    ts.load_image_weights(model, ref.state_dict(), load_head=True)
    assert torch.equal(model.head.weight, ref.head.weight)
    assert torch.equal(model.head.bias, ref.head.bias)
