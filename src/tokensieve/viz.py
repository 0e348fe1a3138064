"""Pictures of what a reduction plan keeps: `ts.viz.kept_tokens(model, video)`, `ts.viz.save`.

    image = ts.viz.kept_tokens(model, clip)            # (H, W, 3) uint8: one row per stage
    ts.viz.save(image, "kept.png")
    ts.viz.save(ts.viz.kept_tokens(model, clip, animate=True), "kept.gif")  # one GIF frame per clip frame

The model runs once on the clip with source tracking on (`forward_features(video, trace=True)`,
`tokens.SOURCE_MAP`); forward hooks on the plan's slots (`reducers.base.At`) record the state after
every reducer call that changes the token count: one *stage* each, plus the input. Each stage is
drawn on the clip's frames with the token grid overlaid:
- patches no token stands for any more (dropped) are dimmed;
- patches standing for one merged token (ToMe) are outlined in that token's colour, the same colour
  in every frame the token spans; tokens of one patch get no outline;
- the stage's label and its token count (and how many tokens stand for several patches) are written
  above it;
- a stage that learned new tokens (TokenLearner, `reducers.tokenlearner.MAPS`) outlines the patches
  each learned token weighs most in that token's colour, and is followed by one row per learned token:
  its weight on every patch of each slice (brightness, relative to its largest weight in that slice),
  the patches it pools from.

One token column covers `tubelet` frames (2 on VideoMAE): the still image shows one column per
temporal slice, drawn on the slice's first frame; the animation shows every frame of the clip with
the tokens of its slice.

Drawing uses Pillow (it comes with matplotlib, a dependency), imported only when drawing.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .backbones.base import VideoBackbone
from .backbones.config import BackboneConfig
from .data.transforms import normalize
from .engine.results import write_atomic
from .errors import InputError
from .reducers.base import At
from .reducers.tokenlearner import MAPS
from .tokens import Inputs, TokenState, owners

if TYPE_CHECKING:
    from PIL import ImageDraw, ImageFont

__all__ = ["Stage", "draw", "kept_tokens", "reduction_stages", "save"]

MIN_PANEL = 192
"""Frames smaller than this many pixels are enlarged (by an integer factor) so the grid is readable."""
DIM = 0.25
"""Brightness left to a dropped patch."""
GRID_ALPHA = 0.3
"""Opacity of the white token-grid lines."""
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
FONT_SIZE = 13
GAP = 4
HEAT = (255, 190, 0)
"""Tint of a learned token's weight on a patch (TokenLearner's colour in the plots)."""
HEAT_ALPHA = 0.45
"""Share of the tint on the patch of a learned token's largest weight."""


class Stage(NamedTuple):
    """The tokens after one step of a plan.

    Attributes:
        label: "input", or the reducer and where it ran ("tome in block 0", "sta before block 1").
        tokens: real tokens after it (class token not counted).
        owners: (T, H, W) int64 over the original token grid: the index of the token standing for
            each patch, -1 where none does (`tokens.owners`).
        pos: (N,) int64 each token's grid position (`TokenState.pos`): a merged token keeps its
            destination's, so it names the same token from stage to stage (and picks its colour);
            a learned token has none (-1).
        maps: (S, T, H, W) float for a stage that learned S tokens per slice (TokenLearner): each
            learned token's weight on every patch, 0 where no token stood for it; else None. Its
            `owners` give each patch to the learned token weighing it most.
    """

    label: str
    tokens: int
    owners: np.ndarray
    pos: np.ndarray
    maps: np.ndarray | None = None

    @property
    def merged(self) -> int:
        """Tokens standing for more than one patch (learned tokens pool, they are not merged)."""
        held = self.owners[self.owners >= 0]
        if self.maps is not None or not held.size:
            return 0
        return int((np.bincount(held) > 1).sum())

    @property
    def caption(self) -> str:
        if self.maps is not None:
            return f"{self.tokens} learned tokens, {self.maps.shape[0]} per slice"
        merged = f", {self.merged} of them merged" if self.merged else ""
        return f"{self.tokens} tokens{merged}"

    def colour_key(self, token: int) -> int:
        """What picks token `token`'s colour: its grid position, or for a learned token (no position) its
        index among its slice's learned tokens (the row it is drawn in)."""
        if self.maps is not None:
            return -1 - token % self.maps.shape[0]
        return int(self.pos[token])


# ---------------------------------------------------------------------------------------- running
def _clip(video: Tensor) -> Tensor:
    """The one clip of `video` as (T, C, H, W), uint8 or float."""
    if not isinstance(video, Tensor):
        video = torch.as_tensor(video)
    if video.dim() == 5 and video.shape[0] == 1:
        video = video[0]
    if video.dim() != 4:
        raise InputError(
            f"expected one clip of shape (T, C, H, W) or (1, T, C, H, W), got {tuple(video.shape)}"
        )
    if video.dtype != torch.uint8 and not video.is_floating_point():
        raise InputError(
            f"expected a float clip (normalised like the model) or uint8 frames, got {video.dtype}"
        )
    return video


def _model_input(model: VideoBackbone, video: Tensor) -> Tensor:
    """(1, T, C, H, W): normalised with the model's mean/std when given uint8 frames, on the model's
    device and in its dtype."""
    clip = _clip(video)
    if clip.dtype == torch.uint8:
        clip = normalize(clip.float() / 255, model.config.mean, model.config.std)
    weight = next(model.parameters())
    return clip.to(device=weight.device, dtype=weight.dtype).unsqueeze(0)


def _grid_owners(state: TokenState) -> np.ndarray:
    """(T, H, W) owners of the first sample."""
    return owners(state)[0].view(state.grid).cpu().numpy()


def reduction_stages(model: VideoBackbone, video: Tensor, *, label: int | None = None) -> list[Stage]:
    """Run `model` on one clip and record which tokens stand for which patches after each step.

    The model runs as it is (call `model.eval()` first for inference behaviour), under
    `torch.inference_mode`, with source tracking on.

    Args:
        model: a tokensieve backbone with its plan installed (`ts.apply`).
        video: (T, C, H, W) or (1, T, C, H, W): float normalised with `model.config.mean` / `std`
            (what the model takes), or uint8 frames in [0, 255] (normalised here).
        label: the clip's class, for a plan that reads the labels (an oracle).

    Returns:
        The input stage, then one stage per reducer call that changed the token count, in execution
        order.
    """
    clip = _model_input(model, video)
    stages: list[Stage] = []

    def record(slot: At, args: tuple[TokenState], out: TokenState) -> None:
        if out.x.shape[1] != args[0].x.shape[1]:
            where = "in" if slot.reducer.inside else "before"
            label = f"{slot.reducer.name} {where} block {slot.site.position}"
            maps = out.aux.get(MAPS)
            learned = None if maps is None or maps is args[0].aux.get(MAPS) else maps[0].float().cpu().numpy()
            stages.append(
                Stage(label, int(out.num_tokens[0]), _grid_owners(out), out.pos[0].cpu().numpy(), learned)
            )

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, At)]
    try:
        with torch.inference_mode():
            labels = None if label is None else torch.tensor([label], device=clip.device)
            model.forward_features(clip, trace=True, inputs=Inputs(clip, labels))
    finally:
        for hook in hooks:
            hook.remove()
    grid = model.config.grid_of(clip.shape[1], (clip.shape[3], clip.shape[4]))  # the clip's token grid
    every = np.arange(math.prod(grid)).reshape(grid)  # the patch embedding: one token per patch
    return [Stage("input", every.size, every, every.flatten()), *stages]


# ---------------------------------------------------------------------------------------- drawing
def _display_frames(video: Tensor, config: BackboneConfig) -> np.ndarray:
    """(T, H, W, 3) uint8 frames to draw on: uint8 as given, float undone from normalisation."""
    clip = _clip(video).detach().cpu()
    if clip.dtype != torch.uint8:
        mean = torch.tensor(config.mean, dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
        std = torch.tensor(config.std, dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
        if clip.shape[1] != mean.shape[0]:
            raise InputError(
                f"expected {mean.shape[0]} channels at dim 1 of (T, C, H, W), got {clip.shape[1]}"
            )
        clip = (clip.float() * std + mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    if clip.shape[1] == 1:
        clip = clip.expand(-1, 3, -1, -1)  # grey frames as RGB
    if clip.shape[1] != 3:
        raise InputError(f"can draw clips of 1 or 3 channels, got {clip.shape[1]}")
    return clip.permute(0, 2, 3, 1).numpy()  # (T, H, W, 3)


def _colour(token: int) -> tuple[float, float, float]:
    """A bright colour per token index; golden-ratio steps of hue tell neighbouring indices apart."""
    r, g, b = colorsys.hsv_to_rgb(token * 0.6180339887 % 1.0, 0.85, 1.0)
    return 255 * r, 255 * g, 255 * b


def _grid_lines(img: np.ndarray, cell: int) -> None:
    """Draw the token grid (white, `GRID_ALPHA`) on `img` (h, w, 3) float, in place: a line every
    `cell` pixels."""
    h, w = img.shape[:2]
    rows, cols = np.arange(0, h, cell), np.arange(0, w, cell)
    img[rows] = img[rows] * (1 - GRID_ALPHA) + 255 * GRID_ALPHA
    img[:, cols] = img[:, cols] * (1 - GRID_ALPHA) + 255 * GRID_ALPHA


def _panel(frame: np.ndarray, owner: np.ndarray, stage: Stage, patches: np.ndarray, scale: int) -> np.ndarray:
    """One frame with its token grid drawn over it, enlarged `scale` times: (h, w, 3) uint8.

    Args:
        frame: (S, S, 3) uint8.
        owner: (H, W) the token standing for each patch of this frame's temporal slice, -1 for none.
        stage: the stage drawn (token positions pick the outline colours).
        patches: (tokens,) patches each token stands for over the whole clip.
        scale: integer enlargement.
    """
    H = owner.shape[0]
    cell = frame.shape[0] // H * scale  # one patch, in output pixels
    img = frame.repeat(scale, 0).repeat(scale, 1).astype(np.float32)  # (H*cell, W*cell, 3)
    own = owner.repeat(cell, 0).repeat(cell, 1)  # (H*cell, W*cell)
    img[own < 0] *= DIM
    _grid_lines(img, cell)
    # Outline each merged token's patches: its pixels within `width` of another token's (or the border).
    width = max(2, cell // 12)
    padded = np.pad(own, width, constant_values=-2)  # -2: outside the frame
    h, w = own.shape
    edge = np.zeros_like(own, dtype=bool)
    for d in range(1, width + 1):
        for dy, dx in ((d, 0), (-d, 0), (0, d), (0, -d)):
            edge |= padded[width + dy : width + dy + h, width + dx : width + dx + w] != own
    outline = edge & (own >= 0) & (patches[np.maximum(own, 0)] > 1)
    for token in np.unique(own[outline]):  # the merged tokens of this frame
        img[outline & (own == token)] = _colour(stage.colour_key(int(token)))
    return img.round().clip(0, 255).astype(np.uint8)


def _map_panel(frame: np.ndarray, weights: np.ndarray, scale: int) -> np.ndarray:
    """One frame with a learned token's weights on its patches, enlarged `scale` times: (h, w, 3) uint8.
    A patch's brightness and tint grow with its weight relative to the largest in the frame.

    Args:
        frame: (S, S, 3) uint8.
        weights: (H, W) the token's weight on each patch of this frame's slice.
        scale: integer enlargement.
    """
    H = weights.shape[0]
    cell = frame.shape[0] // H * scale
    top = weights.max()
    share = weights / top if top > 0 else np.zeros_like(weights)  # (H, W) in [0, 1]
    share = share.repeat(cell, 0).repeat(cell, 1)[..., None]  # (H*cell, W*cell, 1)
    img = frame.repeat(scale, 0).repeat(scale, 1).astype(np.float32)
    img *= DIM + (1 - DIM) * share
    img = img * (1 - HEAT_ALPHA * share) + np.asarray(HEAT, np.float32) * HEAT_ALPHA * share
    _grid_lines(img, cell)
    return img.round().clip(0, 255).astype(np.uint8)


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text(
    pen: ImageDraw.ImageDraw,
    xy: tuple[int, int],
    text: str,
    width: int,
    font: object,
    fill: tuple[float, float, float] = TEXT,
) -> None:
    """Write `text` at `xy`, cut short ("...") to fit `width` pixels."""
    if pen.textlength(text, font=font) > width:
        while text and pen.textlength(text + "...", font=font) > width:
            text = text[:-1]
        text += "..."
    pen.text(xy, text, fill=tuple(round(c) for c in fill), font=font)


def _pillow():  # type: ignore[no-untyped-def]
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise ImportError("ts.viz draws with Pillow: pip install pillow") from None
    return Image, ImageDraw


def _frame_label(t: int, tubelet: int) -> str:
    return f"frame {t}" if tubelet == 1 else f"frames {t * tubelet}-{t * tubelet + tubelet - 1}"


class _Row(NamedTuple):
    """A row of panels: its label, the label's colour, and its panel for a frame of the clip."""

    label: str
    colour: tuple[float, float, float]
    panel: Callable[[int], np.ndarray]


def draw(
    stages: Sequence[Stage], video: Tensor, config: BackboneConfig, *, animate: bool = False
) -> np.ndarray:
    """Draw stages (`reduction_stages`) on the clip they were computed from.

    Args:
        stages: what to draw, one row (or panel) each.
        video: the clip, as `reduction_stages` takes it.
        config: the model's config (patch, tubelet, normalisation); the token grid is the stages'.
        animate: False for one image: one row per stage, one column per temporal slice (its first
            frame). True for an animation: one image per frame of the clip, the stages side by side.

    Returns:
        (H, W, 3) uint8, or (frames, H, W, 3) uint8 with `animate`.
    """
    Image, ImageDraw = _pillow()
    if not stages:
        raise InputError("nothing to draw: no stages given")
    frames = _display_frames(video, config)  # (T, H, W, 3)
    T, H, W = stages[0].owners.shape  # the token grid of the clip the stages were computed from
    if frames.shape[0] != T * config.tubelet or frames.shape[1:3] != (H * config.patch, W * config.patch):
        raise InputError(
            f"expected {T * config.tubelet} frames of {H * config.patch}x{W * config.patch} (the clip the "
            f"stages were computed from), got {frames.shape[0]} of {frames.shape[1]}x{frames.shape[2]}"
        )
    scale = max(1, math.ceil(MIN_PANEL / (H * config.patch)))
    ph, pw = H * config.patch * scale, W * config.patch * scale  # panel size
    patches = [np.bincount(s.owners[s.owners >= 0], minlength=1) for s in stages]
    font = _font()
    line = FONT_SIZE + 6

    def panel(s: int, frame: int) -> np.ndarray:
        stage = stages[s]
        return _panel(frames[frame], stage.owners[frame // config.tubelet], stage, patches[s], scale)

    def heat(stage: Stage, token: int, frame: int) -> np.ndarray:
        assert stage.maps is not None
        return _map_panel(frames[frame], stage.maps[token, frame // config.tubelet], scale)

    # Rows of panels, each with a label line: every stage, and after a stage that learned tokens one row
    # per learned token (its colour in the outlines names it).
    rows: list[_Row] = []
    learned: list[_Row] = []  # the rows of learned tokens, under the stages in an animation
    for s, stage in enumerate(stages):
        rows.append(_Row(f"{stage.label}: {stage.caption}", TEXT, lambda f, s=s: panel(s, f)))
        for i in range(0 if stage.maps is None else stage.maps.shape[0]):
            what = f" of {stage.label}: its weight on each patch, relative to its largest in the slice"
            row = _Row(f"learned token {i}" + ("" if i else what), _colour(stage.colour_key(i)),
                       lambda f, stage=stage, i=i: heat(stage, i, f))  # fmt: skip
            rows.append(row)
            learned.append(row)

    if not animate:
        # Column labels, then per row: its label line and its panels, one per temporal slice.
        width = T * pw + (T + 1) * GAP
        height = line + len(rows) * (line + ph + GAP) + GAP
        canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
        for r, (_, _, draw_row) in enumerate(rows):
            top = line + r * (line + ph + GAP) + line
            for t in range(T):
                left = GAP + t * (pw + GAP)
                canvas[top : top + ph, left : left + pw] = draw_row(t * config.tubelet)
        image = Image.fromarray(canvas)
        pen = ImageDraw.Draw(image)
        for t in range(T):
            _text(pen, (GAP + t * (pw + GAP), 3), _frame_label(t, config.tubelet), pw, font)
        for r, (text, colour, _) in enumerate(rows):
            y = line + r * (line + ph + GAP) + 3
            _text(pen, (GAP, y), text, width - 2 * GAP, font, colour)
        return np.asarray(image).copy()

    # One image per frame of the clip: a title line, then the stages side by side, two lines each; under
    # them, the learned tokens' weights on that frame, side by side (one label line each).
    across = max(len(stages), len(learned))
    width = across * pw + (across + 1) * GAP
    height = line + 2 * line + ph + GAP + (line + ph + GAP if learned else 0)
    images = []
    for f in range(frames.shape[0]):
        canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
        for s in range(len(stages)):
            left = GAP + s * (pw + GAP)
            canvas[3 * line : 3 * line + ph, left : left + pw] = panel(s, f)
        below = 3 * line + ph + GAP + line  # the learned tokens' panels
        for i, (_, _, draw_row) in enumerate(learned):
            left = GAP + i * (pw + GAP)
            canvas[below : below + ph, left : left + pw] = draw_row(f)
        image = Image.fromarray(canvas)
        pen = ImageDraw.Draw(image)
        slice_note = (
            "" if config.tubelet == 1 else f" (tokens of {_frame_label(f // config.tubelet, config.tubelet)})"
        )
        title = f"frame {f} (frames 0-{frames.shape[0] - 1}){slice_note}"
        _text(pen, (GAP, 3), title, width - 2 * GAP, font)
        for s, stage in enumerate(stages):
            left = GAP + s * (pw + GAP)
            _text(pen, (left, line + 3), stage.label, pw, font)
            _text(pen, (left, 2 * line + 3), stage.caption, pw, font)
        for i, (_, colour, _) in enumerate(learned):
            left = GAP + i * (pw + GAP)
            _text(pen, (left, below - line + 3), f"learned token {i}", pw, font, colour)
        images.append(np.asarray(image))
    return np.stack(images)  # (frames, H, W, 3)


def kept_tokens(
    model: VideoBackbone,
    video: Tensor,
    *,
    stages: bool = True,
    animate: bool = False,
    label: int | None = None,
) -> np.ndarray:
    """Which tokens `model`'s plan keeps, drops and merges on one clip, drawn on its frames.

    Args:
        model: a tokensieve backbone with its plan installed (`ts.apply`); run as it is.
        video: (T, C, H, W) or (1, T, C, H, W): float normalised with `model.config.mean` / `std`,
            or uint8 frames in [0, 255].
        stages: draw every stage (the input, then each reducer call that changed the token count);
            False draws the final tokens only.
        animate: see `draw`: False for one image, True for one image per frame of the clip.
        label: the clip's class, for a plan that reads the labels (an oracle).

    Returns:
        (H, W, 3) uint8 image, or (frames, H, W, 3) with `animate` (write either with `save`).
    """
    found = reduction_stages(model, video, label=label)
    return draw(found if stages else found[-1:], video, model.config, animate=animate)


def save(image: np.ndarray, path: str | Path, *, fps: float = 4.0) -> Path:
    """Write an image from `kept_tokens` or `draw` as .png or .gif (atomically; folders are created).

    Args:
        image: (H, W, 3) uint8, or (frames, H, W, 3) uint8 (an animation: .gif only).
        path: where to write; the extension chooses the format.
        fps: frames per second of an animated GIF.

    Returns:
        The path written.
    """
    Image, _ = _pillow()
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".png", ".gif"):
        raise InputError(f"expected an image path ending in .png or .gif, got {path}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise InputError(
            f"expected a (H, W, 3) or (frames, H, W, 3) uint8 image, got {image.dtype} of shape {image.shape}"
        )
    if kind == ".png" and image.ndim == 4:
        raise InputError(
            f"a .png holds one image, got an animation of {image.shape[0]} frames; save it as .gif"
        )
    frames = [Image.fromarray(f) for f in (image if image.ndim == 4 else image[None])]
    buffer = io.BytesIO()
    if kind == ".png":
        frames[0].save(buffer, format="PNG")
    else:
        frames[0].save(
            buffer, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path
