"""`tokensieve show` through typer's test runner: a .png and a .gif of a tiny preset's plan on a
synthetic video, the token counts it prints, and bad input as one line with exit code 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tokensieve.cli import app
from tokensieve.data.synthetic import make_synthetic

runner = CliRunner()
WIDE = {"COLUMNS": "200"}


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic video of 4 frames of 32 x 32 (the tiny presets' input)."""
    listing = make_synthetic(tmp_path_factory.mktemp("synth"), videos=1, frames=4, size=32, patch=8)
    return listing.parent / listing.read_text().split()[0]


def _show(*args: str) -> object:
    return runner.invoke(app, ["show", *args], env=WIDE)


def _rows(stdout: str) -> dict[str, list[str]]:
    """Table rows by stage: "tome in block 0    28    4" -> {"tome in block 0": ["28", "4"]}."""
    rows = {}
    for line in stdout.splitlines():
        words = line.split()
        if len(words) >= 3 and words[-2].isdigit():
            rows[" ".join(words[:-2])] = words[-2:]
    return rows


def test_show_writes_a_png_with_a_row_per_stage(video: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures" / "kept.png"
    result = _show("--model", "videomae-tiny", "--plan", "tome:r=4", "--video", str(video), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    assert "videomae-tiny, plan tome:r=4" in result.stdout
    rows = _rows(result.stdout)
    assert rows["input"] == ["32", "-"]
    assert [rows[f"tome in block {p}"][0] for p in range(3)] == ["28", "24", "20"]
    assert all(int(rows[f"tome in block {p}"][1]) > 0 for p in range(3))  # merged tokens
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[0] > 4 * 192 and image.shape[1] == 2 * 192 + 3 * 4  # 4 rows of 2 temporal slices


def test_show_writes_a_gif_with_a_frame_per_clip_frame(video: Path, tmp_path: Path) -> None:
    out = tmp_path / "kept.gif"
    args = ["--model", "timesformer-tiny", "--plan", "sta:r=4,balance=frame", "--video", str(video)]
    result = _show(*args, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert [row[0] for row in _rows(result.stdout).values()] == ["64", "48", "40"]
    assert Image.open(out).n_frames == 4


def _one_error_line(result, *names: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for name in names:
        assert name in result.stderr, result.stderr


def test_bad_input_is_one_line_with_exit_code_2(video: Path, tmp_path: Path) -> None:
    base = ["--model", "videomae-tiny", "--video"]
    _one_error_line(
        _show(*base, str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "a.png")),
        "no such video",
        "nope.mp4",
    )
    _one_error_line(
        _show(*base, str(video), "--out", str(tmp_path / "a.jpg")), "--out must end in .png or .gif", "a.jpg"
    )
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    _one_error_line(_show(*base, str(broken), "--out", str(tmp_path / "a.png")), "broken.mp4")
    _one_error_line(
        _show(*base, str(video), "--plan", "tome:r=99", "--out", str(tmp_path / "a.png")), "more than half"
    )
    _one_error_line(
        _show("--model", "videomae-nope", "--video", str(video), "--out", str(tmp_path / "a.png")),
        "unknown model",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.mp4"]  # nothing written


def test_learned_tokens_get_a_row_each_and_an_untrained_plan_is_warned_about(
    video: Path, tmp_path: Path
) -> None:
    """On the built-in model, the shipped TokenLearner plan draws the input, the learned tokens, then one
    row per learned token; a setting it ships no weights for runs untrained, with a warning."""
    out = tmp_path / "learned.png"
    args = ["--model", "builtin:synthetic", "--video", str(video), "--out", str(out)]
    result = _show(*args, "--plan", "tokenlearner")
    assert result.exit_code == 0, result.output
    assert _rows(result.stdout)["tokenlearner before block 2"] == ["64", "-"]  # 8 slices x 8 tokens
    assert "warning" not in result.stderr
    image = np.asarray(Image.open(out).convert("RGB"))
    line = 13 + 6  # viz.FONT_SIZE + 6
    assert image.shape == (line + (2 + 8) * (line + 192 + 4) + 4, 8 * 192 + 9 * 4, 3)  # 8 slices wide
    result = _show(*args, "--plan", "tokenlearner:tokens=3")
    assert result.exit_code == 0, result.output
    assert "warning: builtin:synthetic ships no trained tokenlearner:tokens=3 weights" in result.stderr
