"""`ts.viz`: the stages recorded on one clip, what the picture shows where (hand-checked pixels on
flat frames), one column per temporal slice, the animation, and writing .png/.gif."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import tokensieve as ts
from tokensieve import viz
from tokensieve.data.transforms import normalize
from tokensieve.errors import InputError
from tokensieve.reducers.base import At
from tokensieve.tokens import owners


def _model(name: str, spec: str | None = None) -> ts.VideoBackbone:
    torch.manual_seed(0)
    model = ts.build(name).eval()
    return ts.apply(model, spec).model if spec else model


def _frames(name: str, values: list[int] | None = None) -> torch.Tensor:
    """uint8 (T, 3, S, S) flat frames: frame f is grey `values[f]` (128 everywhere by default)."""
    cfg = ts.build(name).config
    values = values or [128] * cfg.frames
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, cfg.size, cfg.size).clone()


def _layout(config: ts.BackboneConfig) -> tuple[int, int, int]:
    """(patch side in pixels, panel side, height of a text line) of the drawing."""
    H = config.grid[1]
    scale = max(1, math.ceil(viz.MIN_PANEL / (H * config.patch)))
    return config.patch * scale, H * config.patch * scale, viz.FONT_SIZE + 6


def _still_pixel(
    image: np.ndarray, config: ts.BackboneConfig, stage: int, t: int, h: int, w: int, dy: int, dx: int
):  # type: ignore[no-untyped-def]
    """The pixel (dy, dx) inside patch (h, w) of temporal slice t in stage row `stage` of a still image."""
    cell, panel, line = _layout(config)
    top = line + stage * (line + panel + viz.GAP) + line
    left = viz.GAP + t * (panel + viz.GAP)
    return image[top + h * cell + dy, left + w * cell + dx]


def test_stages_of_a_composed_plan() -> None:
    model = _model("videomae-tiny", "random:keep=0.5+tome:r=3")
    clip = _frames("videomae-tiny")
    stages = viz.reduction_stages(model, clip)
    assert [s.label for s in stages] == [
        "input", "random before block 0", "tome in block 0", "tome in block 1", "tome in block 2",
    ]  # fmt: skip
    assert [s.tokens for s in stages] == [32, 16, 13, 10, 7]
    assert all(s.owners.shape == model.config.grid for s in stages)
    assert stages[0].merged == 0 and stages[1].merged == 0 and stages[-1].merged > 0
    with torch.inference_mode():
        final = model.forward_features(
            normalize(clip.float() / 255, model.config.mean, model.config.std)[None], trace=True
        )
    assert stages[-1].owners.flatten().tolist() == owners(final)[0].tolist()
    assert stages[-1].pos.tolist() == final.pos[0].tolist()
    assert stages[-1].merged == int((final.size[0] > 1).sum())
    assert not any(m._forward_hooks for m in model.modules() if isinstance(m, At))  # hooks removed


def test_uint8_frames_and_normalised_floats_give_the_same_stages() -> None:
    model = _model("joint-tiny", "tome:r=6")
    frames = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    floats = normalize(frames.float() / 255, model.config.mean, model.config.std)
    for a, b in zip(
        viz.reduction_stages(model, frames), viz.reduction_stages(model, floats[None]), strict=True
    ):
        assert a.label == b.label and np.array_equal(a.owners, b.owners)
    # ... and the same picture: normalised floats are drawn undone from normalisation
    np.testing.assert_array_equal(viz.kept_tokens(model, frames), viz.kept_tokens(model, floats))


def test_a_bare_model_has_only_the_input_stage() -> None:
    (stage,) = viz.reduction_stages(_model("videomae-tiny"), _frames("videomae-tiny"))
    assert (
        stage.label == "input" and stage.tokens == 32 and stage.owners.flatten().tolist() == list(range(32))
    )


def test_dropped_patches_are_dimmed_and_kept_ones_untouched() -> None:
    model = _model("videomae-tiny", "random:keep=0.5")
    clip = _frames("videomae-tiny")
    stages = viz.reduction_stages(model, clip)
    image = viz.kept_tokens(model, clip)
    cell, panel, line = _layout(model.config)
    T, H, W = model.config.grid
    assert image.shape == (line + 2 * (line + panel + viz.GAP) + viz.GAP, T * panel + (T + 1) * viz.GAP, 3)
    mid = cell // 2
    for t in range(T):
        for h in range(H):
            for w in range(W):
                assert _still_pixel(image, model.config, 0, t, h, w, mid, mid).tolist() == [128] * 3
                kept = stages[1].owners[t, h, w] >= 0
                expected = 128 if kept else round(128 * viz.DIM)
                assert _still_pixel(image, model.config, 1, t, h, w, mid, mid).tolist() == [expected] * 3


def test_merged_patches_are_outlined_in_their_tokens_colour() -> None:
    model = _model("videomae-tiny", "tome:r=6")
    clip = _frames("videomae-tiny")
    stages = viz.reduction_stages(model, clip)
    image = viz.kept_tokens(model, clip)
    cell = _layout(model.config)[0]
    stage = stages[1]  # after the first merge
    patches = np.bincount(stage.owners.flatten())
    T, H, W = model.config.grid
    outlined = 0
    for t in range(T):
        for h in range(H):
            for w in range(W):
                token = stage.owners[t, h, w]
                # One pixel in from the left edge of the patch (the grid line is at 0).
                edge = _still_pixel(image, model.config, 1, t, h, w, cell // 2, 1)
                left_same = w > 0 and stage.owners[t, h, w - 1] == token
                if patches[token] > 1 and not left_same:
                    colour = np.round(viz._colour(int(stage.pos[token]))).astype(np.uint8)
                    assert edge.tolist() == colour.tolist()
                    outlined += 1
                else:
                    assert edge.tolist() == [128] * 3
    assert outlined >= 6  # every merged token has an outlined left side somewhere


def test_tubelet_two_draws_one_column_per_slice_and_animates_every_frame() -> None:
    model = _model("videomae-tiny", "random:keep=0.5")
    clip = _frames("videomae-tiny", [40, 80, 120, 160])  # 4 frames, 2 temporal slices
    cell, panel, line = _layout(model.config)
    still = viz.kept_tokens(model, clip)
    assert still.shape[1] == 2 * panel + 3 * viz.GAP  # two columns: frames 0-1 and 2-3
    assert (
        _still_pixel(still, model.config, 0, 1, 0, 0, cell // 2, cell // 2).tolist() == [120] * 3
    )  # slice 1 shows frame 2
    frames = viz.kept_tokens(model, clip, animate=True)
    assert frames.shape[0] == 4 and frames.dtype == np.uint8
    # One image per frame; panels side by side (input, random), below a title and two label lines.
    stages = viz.reduction_stages(model, clip)
    for f, value in enumerate([40, 80, 120, 160]):
        for s, stage in enumerate(stages):
            t = f // 2
            kept = np.argwhere(stage.owners[t] >= 0)[0]
            y = 3 * line + kept[0] * cell + cell // 2
            x = viz.GAP + s * (panel + viz.GAP) + kept[1] * cell + cell // 2
            assert frames[f, y, x].tolist() == [value] * 3
    on_timesformer = viz.kept_tokens(_model("timesformer-tiny"), _frames("timesformer-tiny"))
    assert on_timesformer.shape[1] == 4 * panel + 5 * viz.GAP  # tubelet 1: a column per frame


def test_stages_false_draws_the_final_tokens_only() -> None:
    model = _model("videomae-tiny", "tome:r=4")
    clip = _frames("videomae-tiny")
    every, final = viz.kept_tokens(model, clip), viz.kept_tokens(model, clip, stages=False)
    _, panel, line = _layout(model.config)
    assert final.shape[0] == line + (line + panel + viz.GAP) + viz.GAP
    assert every.shape[0] == line + 4 * (line + panel + viz.GAP) + viz.GAP
    np.testing.assert_array_equal(final[2 * line :], every[-(final.shape[0] - 2 * line) :])  # the last row


def test_save_writes_png_and_gif(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _model("videomae-tiny", "tome:r=4")
    clip = _frames("videomae-tiny")
    image = viz.kept_tokens(model, clip)
    path = viz.save(image, tmp_path / "out" / "kept.png")  # the folder is created
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), image)
    animation = viz.kept_tokens(model, clip, animate=True)
    gif = Image.open(viz.save(animation, tmp_path / "kept.gif"))
    assert gif.n_frames == 4 and gif.size == animation.shape[2:0:-1]
    assert Image.open(viz.save(image, tmp_path / "still.gif")).n_frames == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kept.gif",
        "out",
        "still.gif",
    ]  # no temporary files


@pytest.mark.parametrize(
    ("image", "name", "message"),
    [
        (np.zeros((8, 8, 3), np.uint8), "kept.jpg", r"\.png or \.gif"),
        (np.zeros((2, 8, 8, 3), np.uint8), "kept.png", "save it as .gif"),
        (np.zeros((8, 8, 3), np.float32), "kept.png", r"uint8 image"),
        (np.zeros((8, 8)), "kept.png", r"uint8 image"),
    ],
)
def test_save_refuses_what_it_cannot_write(tmp_path, image, name, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=message):
        viz.save(image, tmp_path / name)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("clip", "message"),
    [
        (torch.zeros(2, 4, 3, 32, 32), r"one clip of shape \(T, C, H, W\)"),
        (torch.zeros(4, 3, 32, 32, dtype=torch.int32), "float clip"),
        (torch.zeros(3, 3, 32, 32), "divisible by the tubelet size 2"),  # other sizes the model runs at
        (torch.zeros(4, 3, 32, 32, dtype=torch.uint8)[..., :28], "divisible by the patch size 8"),
    ],
)
def test_bad_clips_are_input_errors(clip: torch.Tensor, message: str) -> None:
    with pytest.raises(InputError, match=message):
        viz.kept_tokens(_model("videomae-tiny", "tome:r=4"), clip)


def test_learned_tokens_get_a_row_each_showing_their_weights() -> None:
    """TokenLearner: the stage gives each patch to the learned token weighing it most (outlined in that
    token's colour), then one row per learned token draws its weight on each patch: a flat grey frame
    becomes grey * (DIM + (1 - DIM) w) tinted by HEAT_ALPHA w, w = weight / the slice's largest."""
    model = _model("videomae-tiny", "tokenlearner:at=1,tokens=3")
    clip = _frames("videomae-tiny")
    stages = viz.reduction_stages(model, clip)
    assert [s.label for s in stages] == ["input", "tokenlearner before block 1"]
    stage = stages[1]
    T, H, W = model.config.grid
    assert stage.maps is not None and stage.maps.shape == (3, T, H, W)
    assert stage.caption == f"{3 * T} learned tokens, 3 per slice" and stage.merged == 0
    np.testing.assert_allclose(stage.maps.sum((-2, -1)), np.ones((3, T)), rtol=1e-5)  # V1.1: softmax
    np.testing.assert_array_equal(stage.owners % 3, stage.maps.argmax(0))  # a patch's token: its heaviest
    image = viz.kept_tokens(model, clip)
    cell, panel, line = _layout(model.config)
    assert image.shape[0] == line + (2 + 3) * (line + panel + viz.GAP) + viz.GAP
    mid = cell // 2
    for i in range(3):
        for t in range(T):
            share = stage.maps[i, t] / stage.maps[i, t].max()  # (H, W)
            for h in range(H):
                for w in range(W):
                    grey = 128 * (viz.DIM + (1 - viz.DIM) * share[h, w])
                    a = viz.HEAT_ALPHA * share[h, w]
                    expected = [round(grey * (1 - a) + c * a) for c in viz.HEAT]
                    got = _still_pixel(image, model.config, 2 + i, t, h, w, mid, mid).tolist()
                    assert np.abs(np.subtract(got, expected)).max() <= 1, (i, t, h, w, got, expected)
    # The learned tokens' outlines take the colours of their rows.
    token = int(stage.owners[0, 0, 0])
    colour = np.round(viz._colour(stage.colour_key(token))).astype(np.uint8).tolist()
    assert _still_pixel(image, model.config, 1, 0, 0, 0, mid, 1).tolist() == colour
    assert stage.colour_key(token) == stage.colour_key(token % 3) == -1 - token % 3
    # The animation: under the stages, the learned tokens of each frame's slice side by side.
    frames = viz.kept_tokens(model, clip, animate=True)
    assert frames.shape[1] == line + 2 * line + panel + viz.GAP + line + panel + viz.GAP
    assert frames.shape[2] == 3 * panel + 4 * viz.GAP  # 3 learned tokens are wider than 2 stages
