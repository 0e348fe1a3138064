"""Per-video result records on disk: written one line at a time, resumable, merged once.

Layout for an output `results.jsonl`:
- while running, each process appends to `results.jsonl.parts/rank-<r>.jsonl`, one JSON object per
  line, flushed as soon as a video is done (so a killed run loses at most the video in flight);
- at the end, after a barrier, rank 0 merges the parts (and any earlier `results.jsonl`) into
  `results.jsonl` in dataset order, through a temporary file and an atomic rename, then removes the
  parts.

Reading tolerates exactly one kind of damage, the one an interruption causes: a torn last line (no
newline, or not valid JSON). It is cut off, so that video is simply done again. Duplicates (a video
finished by two runs) are kept once. Anything else malformed is an error naming file and line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["RecordWriter", "merge", "part_path", "read_done"]

log = logging.getLogger(__name__)

Record = dict[str, Any]


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def part_path(out: Path, rank: int) -> Path:
    return parts_dir(out) / f"rank-{rank}.jsonl"


def _read(path: Path, *, repair: bool) -> list[Record]:
    """Records of one JSONL file; a torn last line is cut off (when `repair`) or ignored."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # `tail` is empty when the file ends with a newline
    records, good_bytes = [], 0
    for number, line in enumerate(complete, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(complete) and not tail:  # the last line, torn inside its JSON
                break
            raise InputError(
                f"{path}:{number}: not a result record (the file is damaged): {line[:80]!r}"
            ) from None
        good_bytes += len(line) + 1
    if good_bytes != len(data):
        log.warning(
            "%s: cutting off a torn last record (%d bytes); that video will be redone",
            path,
            len(data) - good_bytes,
        )
        if repair:
            with path.open("r+b") as f:
                f.truncate(good_bytes)
    return records


def read_done(out: Path, *, repair: bool = False) -> dict[str, Record]:
    """Every record already on disk for `out` (merged file and parts), by video id, first wins."""
    done: dict[str, Record] = {}
    files = [out, *sorted(parts_dir(out).glob("rank-*.jsonl"))] if parts_dir(out).exists() else [out]
    for path in files:
        for record in _read(path, repair=repair):
            done.setdefault(record["id"], record)
    return done


class RecordWriter:
    """Appends records to this process's part file, one flushed line each."""

    def __init__(self, out: Path, rank: int) -> None:
        self.path = part_path(out, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _read(self.path, repair=True)  # cut a torn line left by a killed run before appending
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: Record) -> None:
        # One write call per line: an interruption leaves at most a torn last line.
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge(out: Path, order: Iterable[str]) -> list[Record]:
    """Merge `out` and its parts into `out` (dataset `order`; unknown ids last), atomically; remove the
    parts. Returns the merged records."""
    done = read_done(out)
    rank = {vid: i for i, vid in enumerate(order)}
    records = sorted(done.values(), key=lambda r: rank.get(r["id"], len(rank)))
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    parts = parts_dir(out)
    if parts.exists():
        for path in parts.glob("rank-*"):
            path.unlink()
        parts.rmdir()
    return records
