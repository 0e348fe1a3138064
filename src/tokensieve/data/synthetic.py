"""A built-in synthetic video benchmark: what a small object does, on a static cluttered scene.

Real video data cannot be shipped, so `make_synthetic` renders and encodes real .mp4 files whose
labels need temporal reasoning, in the spirit of Something-Something: a small asymmetric object moves
left/right/up/down, rotates, grows, shrinks, appears, disappears or stays. It sits on a smooth random
texture with static distractor shapes, so most tokens are redundant (static background) and a few carry
the label. Every video comes with its ground truth: the label, the frame interval of the action and
the fraction of each token covered by the object, so a token-selection plan can be scored directly
(`foreground_recall`).

Layout written into `out`:

    videos/{id}.mp4   H.264 (libx264, yuv420p; mpeg4 when libx264 is missing), `frames` frames
    list.txt          "videos/{id}.mp4 {label}" per line (Kinetics-style, paths relative to `out`)
    classes.txt       class names, line i = label i
    truth/{id}.pt     {"label", "action": (start, end), "mask": (T, H, W) float32, "patch", "tubelet"}
    synthetic.json    {"arguments": {...}}: what the set was made with, written first

A folder holds one set: `make_synthetic` writes into a new or empty folder, or into one holding a set
made with the same arguments (rewritten, to the same bytes); it refuses a folder holding another set
or anything else, so two sets are never mixed and no unrelated file is overwritten.

Rendering: the object is a union of convex polygons drawn with an anti-aliased edge (coverage
0.5 - signed distance, clamped to [0, 1]); every pixel of every frame is computed at once, so a
224 x 224 x 16 clip renders in about 20 ms. The action follows a progress ramp p(t) that is 0
before the action interval, rises linearly from 0 at its first frame to 1 at its last, and stays 1
after it: frames before `start` all show the initial state, frames from `end - 1` on the final one.
Appearing/disappearing fade the object's opacity with p; the truth mask is opacity-weighted coverage.

Determinism: video i is drawn from its own generator seeded with (seed, i) and encoded single-threaded
without x264's lookahead, so the same arguments give the same files, byte for byte.
"""

from __future__ import annotations

import colorsys
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError

__all__ = ["CLASSES", "MANIFEST", "foreground_recall", "load_truth", "make_synthetic"]

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "rotating",
    "growing",
    "shrinking",
    "appearing",
    "disappearing",
    "staying",
)

MANIFEST = "synthetic.json"
"""The file in a set's folder naming the arguments it was made with."""

_MOVES = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1)}
_CRF = "20"  # visually lossless enough for the flat shapes; ~10 kB per 224 x 224 x 16 clip
# No lookahead and so no macroblock tree: on tiny frames (32 x 32) x264's lookahead reads memory it
# never wrote, so the bitstream depended on what the allocator held before (same arguments, other
# videos); without it the output is a function of the frames alone.
_X264 = "rc-lookahead=0:mbtree=0"


def _box(x0: float, y0: float, x1: float, y1: float) -> tuple[tuple[float, float], ...]:
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


# Shapes in object units (x right, y down), each fitting the unit square centred on the origin, which
# is also the centre of rotation and scaling. Object shapes have no 180-degree symmetry, so rotation
# shows; distractors may use any shape, so shape alone does not find the object.
_OBJECT_SHAPES: dict[str, tuple[tuple[tuple[float, float], ...], ...]] = {
    "L": (_box(-0.5, -0.5, -0.1, 0.5), _box(-0.1, 0.1, 0.5, 0.5)),
    "arrow": (_box(-0.5, -0.15, 0.1, 0.15), ((0.05, -0.45), (0.5, 0.0), (0.05, 0.45))),
    "triangle": (((-0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)),),
    "flag": (_box(-0.5, -0.5, -0.3, 0.5), ((-0.3, -0.5), (0.5, -0.2), (-0.3, 0.1))),
}
_DISTRACTOR_SHAPES = {
    **_OBJECT_SHAPES,
    "square": (_box(-0.5, -0.5, 0.5, 0.5),),
    "disk": (tuple((0.5 * math.cos(a), 0.5 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 24, False)),),
}


@functools.cache
def _half_planes(polygon: tuple[tuple[float, float], ...]) -> Tensor:
    """(E, 3) rows (nx, ny, c) of a convex polygon: a point q is inside iff n . q - c <= 0 for all rows,
    and max_e (n . q - c) is its signed distance to the boundary (exact inside, a lower bound outside)."""
    v = torch.tensor(polygon, dtype=torch.float32)  # (E, 2)
    e = v.roll(-1, 0) - v  # (E, 2) edge vectors
    n = F.normalize(torch.stack([e[:, 1], -e[:, 0]], 1), dim=1)  # (E, 2) one of the two normals
    inward = ((v.mean(0) - v) * n).sum(1, keepdim=True) > 0  # (E, 1) this normal points inside
    n = torch.where(inward, -n, n)  # (E, 2) outward
    return torch.cat([n, (n * v).sum(1, keepdim=True)], 1)  # (E, 3)


def _radius(shape: tuple[tuple[tuple[float, float], ...], ...]) -> float:
    """Largest distance from the origin to a vertex: the object stays inside a disk of radius s * this."""
    return max(math.hypot(x, y) for polygon in shape for x, y in polygon)


def _coverage(
    shape: tuple[tuple[tuple[float, float], ...], ...],
    *,
    cx: Tensor,
    cy: Tensor,
    scale: Tensor,
    angle: Tensor,
    size: int,
) -> Tensor:
    """Anti-aliased coverage of `shape` placed at (cx, cy) pixels, side `scale` pixels, rotated by `angle`.

    Args:
        shape: convex polygons whose union is the shape, in object units.
        cx, cy, scale, angle: (F,) per-frame placement (angle in radians, clockwise on screen).
        size: frame side in pixels.

    Returns:
        (F, size, size) float in [0, 1].
    """
    n = cx.shape[0]
    centres = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    dx = centres.view(1, 1, size) - cx.view(n, 1, 1)  # (F, 1, S)
    dy = centres.view(1, size, 1) - cy.view(n, 1, 1)  # (F, S, 1)
    cos, sin, s = angle.cos().view(n, 1, 1), angle.sin().view(n, 1, 1), scale.view(n, 1, 1)
    u = (cos * dx + sin * dy) / s  # (F, S, S): pixel offsets rotated back into object units
    v = (cos * dy - sin * dx) / s  # (F, S, S)
    dist = None
    for polygon in shape:
        planes = _half_planes(polygon)  # (E, 3)
        d = torch.stack([nx * u + ny * v - c for nx, ny, c in planes.tolist()]).amax(0)  # (F, S, S)
        dist = d if dist is None else torch.minimum(dist, d)
    return (0.5 - dist * s).clamp(0.0, 1.0)  # distance in pixels -> a one-pixel soft edge


def _progress(frames: int, start: int, end: int) -> Tensor:
    """(frames,) ramp: 0 before `start`, linear to 1 at `end - 1`, 1 after."""
    t = torch.arange(frames, dtype=torch.float32)
    if end - start < 2:
        return (t >= start).float()
    return ((t - start) / (end - start - 1)).clamp(0.0, 1.0)


def _render(
    *,
    label: int,
    frames: int,
    size: int,
    partial: bool,
    distractors: int,
    rng: np.random.Generator,
    object_size: tuple[float, float] = (1 / 6, 1 / 5),
    texture: float = 1.0,
    returning: bool = False,
    visible: str = "always",
) -> tuple[np.ndarray, Tensor, tuple[int, int]]:
    """One clip: uint8 frames (F, S, S, 3), object coverage (F, S, S) and the action interval."""
    # Background: two octaves of smooth colour noise around a muted base colour, static over time.
    base = torch.from_numpy(rng.uniform(0.3, 0.7, (3, 1, 1))).float()
    coarse, fine = (
        torch.from_numpy(rng.random((1, 3, g, g))).float() for g in (rng.integers(3, 7), rng.integers(10, 20))
    )
    coarse, fine = (
        F.interpolate(x, size=(size, size), mode="bilinear")[0] for x in (coarse, fine)
    )  # (3, S, S)
    image = (base + texture * (0.35 * (coarse - 0.5) + 0.15 * (fine - 0.5))).clamp(0.0, 1.0)  # (3, S, S)

    names = sorted(_DISTRACTOR_SHAPES)
    for _ in range(distractors):
        shape = _DISTRACTOR_SHAPES[names[rng.integers(len(names))]]
        s = rng.uniform(size / 8, size / 5)
        r = s * _radius(shape)
        cx, cy, angle = (
            torch.tensor([x], dtype=torch.float32)
            for x in (*rng.uniform(r, size - r, 2), rng.uniform(0, 2 * math.pi))
        )
        alpha = _coverage(
            shape, cx=cx, cy=cy, scale=torch.tensor([s], dtype=torch.float32), angle=angle, size=size
        )
        colour = torch.tensor(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.8)))
        image = image * (1 - alpha) + colour.view(3, 1, 1) * alpha  # (3, S, S)

    # The object: saturated colour, side `object_size` of the frame (1/6 to 1/5), random orientation.
    name = CLASSES[label]
    shape = _OBJECT_SHAPES[sorted(_OBJECT_SHAPES)[rng.integers(len(_OBJECT_SHAPES))]]
    colour = torch.tensor(colorsys.hsv_to_rgb(rng.random(), 1.0, 1.0)).view(1, 3, 1, 1)
    s = rng.uniform(size * object_size[0], size * object_size[1])
    if partial:
        length = int(rng.integers(max(2, math.ceil(frames / 4)), max(2, frames // 2) + 1))
        length = min(length, frames - 1)
        start = int(rng.integers(0, frames - length + 1))
        action = (start, start + length)
    else:
        action = (0, frames)
    p = _progress(frames, *action)  # (F,)
    if returning:  # do the action, then undo it: the end state equals the start state
        p = 1 - (2 * p - 1).abs()

    grow = {"growing": (2**-0.5, 2.0), "shrinking": (2**0.5, 0.5)}.get(name, (1.0, 1.0))
    scale = s * grow[0] * grow[1] ** p  # (F,) geometric: size doubles or halves over the action
    margin = s * max(grow[0], grow[0] * grow[1]) * _radius(shape) + 1.0
    lo, hi = margin, size - margin
    # Travel about a third of the frame, less for big objects so the path stays inside the frame.
    dist = (
        rng.uniform(0.28, 0.38) * size * min(1.0, (1 - 1.6 * object_size[1]) / 0.68)
        if name in _MOVES
        else 0.0
    )
    step = _MOVES.get(name, (0, 0))
    # Start anywhere that keeps the whole path inside [lo, hi] on both axes.
    cx0, cy0 = (rng.uniform(lo + max(0.0, -d * dist), hi - max(0.0, d * dist)) for d in step)
    cx, cy = cx0 + step[0] * dist * p, cy0 + step[1] * dist * p  # (F,)
    turn = rng.choice((-1.0, 1.0)) * math.pi if name == "rotating" else 0.0  # half a turn, either way
    angle = rng.uniform(0, 2 * math.pi) + turn * p  # (F,)
    opacity = {"appearing": p, "disappearing": 1 - p}.get(name, torch.ones(frames))  # (F,)
    if visible == "action":  # in the scene only from the action's first frame to its last
        t = torch.arange(frames)
        opacity = opacity * ((t >= action[0]) & (t < action[1])).float()

    cover = _coverage(shape, cx=cx, cy=cy, scale=scale, angle=angle, size=size) * opacity.view(-1, 1, 1)
    video = image.unsqueeze(0) * (1 - cover.unsqueeze(1)) + colour * cover.unsqueeze(1)  # (F, 3, S, S)
    video = (video * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (F, S, S, 3)
    return video.contiguous().numpy(), cover, action


def _codec() -> str:
    """libx264 when this PyAV build can encode it, else mpeg4 (always built into FFmpeg)."""
    try:
        av.Codec("libx264", "w")
    except ValueError:  # av.codec.codec.UnknownCodecError
        log.warning("libx264 is not available in this PyAV build; encoding the synthetic videos with mpeg4")
        return "mpeg4"
    return "libx264"


def _encode(path: Path, video: np.ndarray, *, fps: int, codec: str) -> None:
    """Write (F, S, S, 3) uint8 RGB frames to `path` (an .mp4) through a temporary name and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")  # two writers of one set never share it
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            opts = (
                {"crf": _CRF, "preset": "fast", "threads": "1", "x264-params": _X264}
                if codec == "libx264"
                else {}
            )
            stream = container.add_stream(codec, rate=fps, options=opts)
            stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
            stream.codec_context.thread_count = 1  # deterministic bitstream
            if codec == "mpeg4":  # constant quantiser 3, ffmpeg's `-q:v 3`
                stream.codec_context.qscale = True
                stream.codec_context.global_quality = 3 * 118  # FF_QP2LAMBDA
            for frame in video:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")  # two writers of one set never share it
    tmp.write_text("".join(f"{line}\n" for line in lines))
    os.replace(tmp, path)


def _claim(out: Path, arguments: dict[str, object]) -> None:
    """Make `out` the folder of the set made with `arguments` (JSON-ready), or refuse.

    A new or empty folder gets the manifest; a folder whose manifest names the same arguments is
    reused (rewriting it gives the same files); anything else raises InputError.
    """
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            held = json.loads(manifest.read_text())["arguments"]
            differ = [k for k in {**held, **arguments} if held.get(k) != arguments.get(k)]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InputError(
                f"{manifest} is not a synthetic set's manifest; write the set elsewhere"
            ) from None
        if differ:
            changes = ", ".join(f"{k}={held.get(k)!r} there, {arguments.get(k)!r} here" for k in differ)
            raise InputError(
                f"{out} holds another synthetic set ({changes}); write it into a new or empty folder"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise InputError(
            f"{out} is not empty and holds no synthetic set (no {MANIFEST}); write it into a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    _write_text(manifest, [json.dumps({"arguments": arguments}, indent=2)])


def _check(name: str, value: int, ok: bool, valid: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not ok:
        raise InputError(f"{name} must be {valid}, got {value!r}")


def make_synthetic(
    out: str | Path,
    *,
    videos: int,
    classes: int = 10,
    frames: int = 16,
    size: int = 224,
    fps: int = 8,
    partial: bool = False,
    distractors: int = 3,
    object_size: tuple[float, float] = (1 / 6, 1 / 5),
    texture: float = 1.0,
    returning: bool = False,
    visible: str = "always",
    patch: int = 16,
    tubelet: int = 2,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Render, encode and write a synthetic video benchmark into `out` (created if missing).

    Video i is drawn from its own generator seeded with (seed, i); labels are balanced (label
    `j % classes` for j < videos) and shuffled deterministically from `seed`, so the same arguments
    always give the same files. `out` holds one set: it must be new, empty, or hold a set made with
    the same arguments (its `synthetic.json`), which is then rewritten (the same files again; an
    interrupted run is completed this way).

    Args:
        out: output directory.
        videos: number of clips (>= 1).
        classes: use the first `classes` entries of `CLASSES` (1..10).
        frames: frames per clip (>= 1, divisible by `tubelet`; >= 3 with `partial`).
        size: frame side in pixels (>= 32, even, divisible by `patch`).
        fps: frame rate written into the container.
        partial: the action fills a random 1/4 to 1/2 of the clip instead of all of it.
        distractors: static distractor shapes per clip (>= 0).
        object_size: range of the object's side as a fraction of the frame side (within (0, 0.4]);
            larger objects and weaker texture make an easier task (for training tiny models fast).
        texture: contrast of the background texture (1 = the default; 0 = a flat colour).
        returning: the object does its action and then undoes it within the action interval (moves
            and comes back, grows and shrinks back, ...), so the frames before and after the action
            look alike and only the action frames tell the class apart.
        visible: "always" (the default), or "action": the object is in the scene only during the
            action (from its first frame to its last), so every frame outside the action shows the
            same static scene and only the action frames carry the label.
        patch: token side in pixels, for the truth masks.
        tubelet: frames per token, for the truth masks.
        seed: seed of everything random.
        progress: called as `progress(done, total)` after each video.

    Returns:
        The path of list.txt.

    Raises:
        InputError: naming the first invalid argument and its valid range; `out` holding another set
            (naming the arguments that differ) or files that are not a set.
    """
    _check("videos", videos, videos >= 1, "an int >= 1")
    low, high = object_size
    if not 0 < low <= high <= 0.4:
        raise InputError(f"object_size must be a (low, high) range within (0, 0.4], got {object_size!r}")
    if not texture >= 0:
        raise InputError(f"texture must be a float >= 0, got {texture!r}")
    if visible not in ("always", "action"):
        raise InputError(f"visible must be 'always' or 'action', got {visible!r}")
    _check("classes", classes, 1 <= classes <= len(CLASSES), f"an int in 1..{len(CLASSES)}")
    _check("tubelet", tubelet, tubelet >= 1, "an int >= 1")
    _check("patch", patch, patch >= 1, "an int >= 1")
    _check(
        "frames", frames, frames >= 1 and frames % tubelet == 0, f"an int >= 1 divisible by tubelet={tubelet}"
    )
    if partial:
        _check(
            "frames",
            frames,
            frames >= 3,
            "an int >= 3 with partial=True (an action strictly inside the clip)",
        )
    _check(
        "size",
        size,
        size >= 32 and size % 2 == 0 and size % patch == 0,
        f"an even int >= 32 divisible by patch={patch}",
    )
    _check("fps", fps, fps >= 1, "an int >= 1")
    _check("distractors", distractors, distractors >= 0, "an int >= 0")

    out = Path(out)
    arguments = {
        "videos": videos, "classes": classes, "frames": frames, "size": size, "fps": fps, "partial": partial,
        "distractors": distractors, "object_size": list(object_size), "texture": float(texture),
        "returning": returning, "visible": visible, "patch": patch, "tubelet": tubelet, "seed": seed,
    }  # fmt: skip
    _claim(out, json.loads(json.dumps(arguments)))  # as the manifest reads back: tuples are lists
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    codec = _codec()
    width = max(6, len(str(videos - 1)))
    labels = np.random.default_rng([seed, videos]).permutation(np.arange(videos) % classes).tolist()
    began = time.perf_counter()
    lines = []
    for i, label in enumerate(labels):
        vid = f"{i:0{width}d}"
        video, cover, action = _render(
            label=label,
            frames=frames,
            size=size,
            partial=partial,
            distractors=distractors,
            rng=np.random.default_rng([seed, i]),
            object_size=object_size,
            texture=texture,
            returning=returning,
            visible=visible,
        )
        g = size // patch
        mask = cover.view(frames // tubelet, tubelet, g, patch, g, patch).mean((1, 3, 5))  # (T, H, W)
        truth = {
            "label": label,
            "action": action,
            "mask": mask.contiguous(),
            "patch": patch,
            "tubelet": tubelet,
        }
        tmp = out / "truth" / f".{vid}.pt.{os.getpid()}.partial"
        torch.save(truth, tmp)
        os.replace(tmp, out / "truth" / f"{vid}.pt")
        _encode(out / "videos" / f"{vid}.mp4", video, fps=fps, codec=codec)
        lines.append(f"videos/{vid}.mp4 {label}")
        if progress is not None:
            progress(i + 1, videos)
    _write_text(out / "classes.txt", list(CLASSES[:classes]))
    _write_text(out / "list.txt", lines)  # last: a complete list means a complete benchmark
    log.info("wrote %d synthetic videos (%s) to %s in %.1fs", videos, codec, out, time.perf_counter() - began)
    return out / "list.txt"


def load_truth(out: str | Path, video_id: str) -> dict:
    """The ground truth of one video of a benchmark written by `make_synthetic`.

    Args:
        out: the benchmark directory.
        video_id: the id ("000123"), or the video's path as listed in list.txt ("videos/000123.mp4").

    Returns:
        {"label": int, "action": (start, end), "mask": (T, H, W) float32, "patch": int, "tubelet": int}.
    """
    path = Path(out) / "truth" / f"{Path(video_id).stem}.pt"
    if not path.is_file():
        raise InputError(f"no truth file for video {video_id!r}: expected {path}")
    return torch.load(path, weights_only=True)


def foreground_recall(pos: Tensor, mask: Tensor, *, threshold: float = 0.5) -> Tensor:
    """Fraction of the foreground tokens (mask >= threshold) whose grid position was kept.

    Args:
        pos: (N,) or (B, N) long positions into the time-major grid of `mask` (`TokenState.pos`);
            negative entries (padding, learned tokens) are ignored, repeats count once.
        mask: (T, H, W) or (B, T, H, W) per-token foreground fraction (the truth "mask").
        threshold: a token with mask >= threshold is foreground.

    Returns:
        () or (B,) float32 recall; NaN for a video without foreground tokens.
    """
    if pos.dim() not in (1, 2) or mask.dim() != pos.dim() + 2:
        raise InputError(
            f"expected pos (N,) with mask (T, H, W) or pos (B, N) with mask (B, T, H, W), "
            f"got pos {tuple(pos.shape)} and mask {tuple(mask.shape)}"
        )
    if pos.dtype.is_floating_point or pos.dtype == torch.bool:
        raise InputError(f"pos must hold integer grid positions, got {pos.dtype}")
    single = pos.dim() == 1
    pos, mask = (pos[None], mask[None]) if single else (pos, mask)
    if pos.shape[0] != mask.shape[0]:
        raise InputError(f"pos and mask disagree on the batch size: {pos.shape[0]} vs {mask.shape[0]}")
    fg = mask.flatten(1) >= threshold  # (B, THW)
    n = fg.shape[1]
    if bool((pos >= n).any()):
        raise InputError(f"pos holds positions >= {n}, outside the (T, H, W) = {tuple(mask.shape[1:])} grid")
    slot = torch.where(pos >= 0, pos, n).long()  # (B, N), n = the discard slot
    kept = torch.zeros(pos.shape[0], n + 1, dtype=torch.bool, device=pos.device)
    kept = kept.scatter(1, slot, True)[:, :n].to(fg.device)  # (B, THW)
    recall = (kept & fg).sum(1).float() / fg.sum(1).float()  # 0 / 0 = NaN without foreground
    return recall[0] if single else recall
