"""Per-video result records on disk: a provenance header, one line per video, resumable, merged once.

A results file `results.jsonl` holds JSON lines:
- line 1, the header: what produced the records (`Provenance`), e.g.
  {"tokensieve": "eval-results", "format": 1, "version": "0.1.0", "model": "videomae-s",
   "checksum": "sha256:...", "plan": "sta:r=64", "views": [2, 3], "frames": 16, "size": 224,
   "resize": 224, "sampling": "dense", "stride": 4, "short": "loop", "dtype": "float32"};
- then one record per video, in dataset order: {"id", "labels", "status": "ok", "top5": [[class,
  probability], ...]} (and "scores" for multi-label data) or {"id", "labels", "status": "failed",
  "error"}. `read_results` reads one.

Records are only ever added to a file of the same provenance: a run with another model (checksum),
plan, views, clip shape, sampling or dtype is refused with the fields that differ, so a file never
mixes runs and never shows old records under new labels. The model's name or path is informational:
the checksum decides. A file that is not a results file (no header on its first line) is never
overwritten.

Layout for an output `results.jsonl`:
- at the start, the first process (holding the lock, below) checks the file and its parts, and
  writes the header alone to `results.jsonl` when the file is new (atomically);
- while running, each process appends to `results.jsonl.parts/rank-<r>.jsonl`, which starts with
  the same header, one JSON object per line, written as soon as a video is done (so a killed run
  loses at most the video in flight);
- at the end, rank 0 merges the parts (and the records already in `results.jsonl`) into
  `results.jsonl` in dataset order, through a temporary file, fsync and an atomic rename, then
  removes the parts.

Reading tolerates exactly one kind of damage, the one an interruption causes: a torn last line (no
newline, or not valid JSON). It is cut off, so that video is simply done again. Duplicates (a video
finished by two runs) are kept once. Anything else malformed is an error naming file and line.

One run at a time: `RunLock` holds `results.jsonl.lock` with `fcntl.flock`, which the operating
system releases when its holder dies however it dies, so a lock left by a killed run is taken over
and a live one refuses a second run at its start. Under torchrun only rank 0 takes it; the other
processes of the run write only their own parts.

Operating-system errors (a full disk, a read-only folder) leave nothing half-written: atomic writes
remove their temporary file, and a record that could not be appended whole is cut off again. They
are raised as `OSError` naming the file the user asked for.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = [
    "Provenance",
    "RecordWriter",
    "RunLock",
    "discard",
    "merge",
    "part_path",
    "read_done",
    "read_results",
    "record_key",
    "start_run",
    "write_atomic",
]

log = logging.getLogger(__name__)

Record = dict[str, Any]

KIND = "eval-results"  # the header's "tokensieve" value: what tells a results file from any other
FORMAT = 1


# ---------------------------------------------------------------------------------------- provenance
@dataclass(frozen=True)
class Provenance:
    """What produced a results file; records are only added to a file of equal provenance.

    Attributes:
        model: the model's name or path as given (informational: `checksum` identifies the model).
        checksum: "sha256:<hex>" of the model's config and state dict (every tensor's name, dtype,
            shape and bytes; a learned plan's parameters included).
        plan: the installed plan's spec (None: no plan).
        views: (temporal clips, spatial crops) per video.
        frames, size, resize: clip length, crop side, short side before cropping.
        sampling: "dense" or "segments"; stride, short: dense clips' stride and past-the-end policy
            (None for segments, which use neither).
        dtype: "float32" or "bfloat16".
    """

    model: str | None
    checksum: str
    plan: str | None
    views: tuple[int, int]
    frames: int
    size: int
    resize: int
    sampling: str
    stride: int | None
    short: str | None
    dtype: str

    def header(self) -> Record:
        from .. import __version__  # the package imports this module: read its version lazily

        return {"tokensieve": KIND, "format": FORMAT, "version": __version__, **asdict(self)}

    @classmethod
    def from_header(cls, header: Record, path: Path) -> Provenance:
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in header]
        if header.get("format") != FORMAT or missing:
            raise InputError(
                f"{path}: a results header of format {header.get('format')!r} (this tokensieve reads "
                f"format {FORMAT}{'; missing ' + ', '.join(missing) if missing else ''}); "
                "choose another out, or move the file away"
            )
        values = {name: header[name] for name in names}
        return cls(**{**values, "views": tuple(values["views"])})

    def differences(self, written: Provenance) -> list[str]:
        """What differs from the run that wrote `written`, as "field (file: a, now: b)". The
        model's name or path counts only through its checksum; plans compare as parsed."""
        found = []
        for field in fields(self):
            name = field.name
            old, new = getattr(written, name), getattr(self, name)
            if name == "model" or (name == "plan" and _plan_key(old) == _plan_key(new)) or old == new:
                continue
            if name == "checksum":
                found.append(f"model weights (file: {_model_text(written)}, now: {_model_text(self)})")
            elif name == "views":
                found.append(f"views (file: {old[0]}x{old[1]}, now: {new[0]}x{new[1]})")
            else:
                found.append(f"{name} (file: {old if old is not None else 'none'}, now: {new if new is not None else 'none'})")  # fmt: skip
        return found


def _model_text(p: Provenance) -> str:
    short = p.checksum[: len("sha256:") + 12]
    return f"{p.model} {short}" if p.model else short


def _plan_key(spec: str | None) -> str:
    """A spec with every parameter's default filled in ("sta" equals "sta:r=64"); "none" for no plan."""
    from ..reducers import REGISTRY, parse
    from ..reducers.plan import spec_parameters

    if spec is None:
        return "none"
    try:
        items = parse(spec)
    except InputError:  # a method this version does not know: compare the text
        return spec.strip()
    terms = []
    for method, values in items:
        if method == "none":
            continue
        defaults = {n: p.default for n, (p, _) in spec_parameters(REGISTRY[method]).items()}
        terms.append(f"{method}:{sorted({**defaults, **values}.items())!r}")
    return "+".join(terms) or "none"


# ---------------------------------------------------------------------------------------- writing
def _write(fd: int, data: bytes) -> None:
    """All of `data` to `fd` (os.write may write part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _named(err: OSError, path: Path) -> OSError:
    """The same error naming `path` (an error on a temporary file names the file asked for)."""
    if err.errno is None:
        return err
    return OSError(err.errno, err.strerror, str(path))  # OSError(errno, ...) picks the subclass


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` through a temporary file, fsync and a rename: readers see the old
    file or the new one, never part of it; on failure the temporary file is removed.

    Raises:
        OSError: naming `path`.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise _named(err, path) from err


def _line(record: Record) -> bytes:
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


# ---------------------------------------------------------------------------------------- reading
def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def part_path(out: Path, rank: int) -> Path:
    return parts_dir(out) / f"rank-{rank}.jsonl"


def _not_results(path: Path, first: bytes) -> InputError:
    try:
        doc = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and "id" in doc and "status" in doc:
        return InputError(
            f"{path} holds records without a results header (an older tokensieve wrote it), so what "
            "produced them is unknown: it is not resumed or overwritten; choose another out, or move "
            "the file away"
        )
    return InputError(
        f"{path} is not a tokensieve results file (its first line is not a results header); not "
        "overwriting it: choose another out, or move the file away"
    )


def _header(path: Path) -> Record | None:
    """The header of a results file; None for a missing or empty file.

    Raises:
        InputError: anything else (a foreign file is never taken for a results file).
        OSError: `path` is not a regular file (a folder, a device), or cannot be read.
    """
    if not path.exists():
        return None
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not path.is_file():
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    with path.open("rb") as f:
        first = f.readline(1 << 20)
    if not first:
        return None
    try:
        header = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not (first.endswith(b"\n") and isinstance(header, dict) and header.get("tokensieve") == KIND):
        raise _not_results(path, first)
    return header


def _read(path: Path, *, repair: bool) -> tuple[Record | None, list[Record]]:
    """Header and records of one results or part file; a torn last line is cut off (when `repair`)
    or ignored."""
    header = _header(path)
    if header is None:
        return None, []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[1:-1], lines[-1]  # `tail` is empty when the file ends with a newline
    records, good_bytes = [], len(lines[0]) + 1
    for number, line in enumerate(complete, 2):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(complete) + 1 and not tail:  # the last line, torn inside its JSON
                break
            record = None
        if not isinstance(record, dict) or "id" not in record:
            raise InputError(f"{path}:{number}: not a result record (the file is damaged): {line[:80]!r}")
        records.append(record)
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
    return header, records


def _files(out: Path) -> list[Path]:
    parts = parts_dir(out)
    return [out, *sorted(parts.glob("rank-*.jsonl"))] if parts.is_dir() else [out]


def record_key(video_id: str, setting: str | None = None) -> str:
    """What identifies a record: its video id, and in a sweep's file also its setting (a plan)."""
    return video_id if setting is None else f"{video_id}\t{setting}"


def read_done(out: Path, *, repair: bool = False) -> dict[str, Record]:
    """Every record already on disk for `out` (merged file and parts) by `record_key`, first wins."""
    done: dict[str, Record] = {}
    for path in _files(out):
        for record in _read(path, repair=repair)[1]:
            done.setdefault(record_key(record["id"], record.get("setting")), record)
    return done


def read_results(path: str | Path) -> tuple[Provenance, list[Record]]:
    """What produced a results file, and its records (see the module docstring).

    Raises:
        InputError: the file is not a results file.
    """
    path = Path(path)
    header, records = _read(path, repair=False)
    if header is None:
        raise InputError(f"{path} is empty or missing: no results")
    return Provenance.from_header(header, path), records


# ---------------------------------------------------------------------------------------- a run
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_inherited_locks() -> None:
    # A forked child (a decoding worker) gets copies of the lock's descriptor, and a flock lasts
    # until every copy is closed: were the run killed, lingering workers would keep its lock.
    # Closing the copies (never LOCK_UN, which would unlock the parent too) keeps it the parent's.
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLock:
    """Exclusive use of an output by one run: `fcntl.flock` on `<out>.lock`, which names its holder.

    The lock is the flock, not the file: the operating system drops it when the holder dies (even
    killed with SIGKILL), so a file left behind by a dead run is taken over (with a warning naming
    it), and only a live run refuses another.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.with_name(out.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise InputError naming the run that holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "a process"
                os.close(fd)
                raise InputError(
                    f"{self.out} is being written by another run ({holder}); wait for it to finish, "
                    "or choose another out"
                ) from None
            except OSError as err:
                os.close(fd)
                raise _named(err, self.path) from err
            # The holder we waited for may have removed the file between our open and flock: then
            # our lock is on a file nobody else will see; open the path again.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        _HELD.add(fd)
        try:
            left = os.read(fd, 200).decode(errors="replace").strip()
            if left:
                log.warning(
                    "%s: taking over the lock of a run that ended without releasing it (%s)", self.out, left
                )
            holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            _write(fd, holder.encode())
        except OSError as err:
            self.release()
            raise _named(err, self.path) from err
        return self

    def release(self) -> None:
        """Remove the file, then drop the lock (in that order, see `acquire`)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(fd)
        with contextlib.suppress(OSError):
            self.path.unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def discard(out: Path) -> None:
    """Remove the records of `out` (the merged file and any parts) so that a run starts it afresh.

    For files a caller owns: the training loop's per-epoch evaluation, whose records belong to the
    weights at the end of that epoch; after a resume they are recomputed, never resumed from a
    killed attempt (whose weights may differ in their last bits on a GPU).
    """
    out.unlink(missing_ok=True)
    _remove_parts(out)


def _remove_parts(out: Path) -> None:
    """Remove the per-process part files of `out` and their folder."""
    parts = parts_dir(out)
    if parts.is_dir():
        for path in parts.glob("rank-*"):
            path.unlink()
        parts.rmdir()


def start_run(out: Path, provenance: Provenance) -> RunLock:
    """Lock `out` for this run and make it ready for records, or refuse: a folder or a file that is
    not a results file, records of another provenance (naming what differs), another live run.

    Creates a missing parent folder; writes the header alone to a new (or empty) `out`. Called by
    one process of the run; the caller releases the returned lock.
    """
    if out.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where a folder should be: name it
        blocker = next(p for p in [out.parent, *out.parent.parents] if p.exists() and not p.is_dir())
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(blocker)) from None
    lock = RunLock(out).acquire()
    try:
        for path in _files(out):
            header = _header(path)
            if header is None:
                continue
            differ = provenance.differences(Provenance.from_header(header, path))
            if differ:
                count = len({record["id"] for record in read_done(out).values()})  # a sweep's: many per video
                state = ", unfinished" if parts_dir(out).exists() else ""
                raise InputError(
                    f"{out} holds results of another run ({count} video{'s' * (count != 1)}{state}); "
                    f"resuming would mix them. Differs: {'; '.join(differ)}. Choose another out, or "
                    "move the file away to start afresh"
                )
        if _header(out) is None:
            write_atomic(out, _line(provenance.header()))
    except BaseException:
        lock.release()
        raise
    return lock


class RecordWriter:
    """Appends records to this process's part file, one whole line each (or nothing)."""

    def __init__(self, out: Path, rank: int, provenance: Provenance) -> None:
        self.path = part_path(out, rank)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _named(err, self.path.parent) from err
        if _read(self.path, repair=True)[0] is None:  # new, or a torn line of a killed run cut off
            write_atomic(self.path, _line(provenance.header()))
        try:
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as err:
            raise _named(err, self.path) from err

    def write(self, record: Record) -> None:
        assert self._fd is not None, "write after close"
        size = os.fstat(self._fd).st_size
        try:
            _write(self._fd, _line(record))
        except OSError as err:  # a full disk: cut off the part of the line that was written
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise _named(err, self.path) from err

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge(out: Path, order: Iterable[str], provenance: Provenance) -> list[Record]:
    """Merge `out` and its parts into `out` (in the `order` of their `record_key`s; unknown ones
    last), atomically, under `out`'s header (or `provenance`'s); remove the parts. Returns the merged
    records."""
    done = read_done(out)
    rank = {key: i for i, key in enumerate(order)}
    records = sorted(done.items(), key=lambda item: rank.get(item[0], len(rank)))
    records = [record for _, record in records]
    header = _header(out) or provenance.header()
    write_atomic(out, b"".join(_line(r) for r in [header, *records]))
    _remove_parts(out)
    return records
