"""Saved models and training runs as models: `ts.save`, and the loading half of `ts.load`.

A saved model is a folder of two files:

    tokensieve.json     {"format": 1, "tokensieve": "0.1.0", "backbone": {BackboneConfig fields,
                         mean/std included}, "spec": "stts:T0=0.5" or null, "removed": [],
                         "weights": "model.safetensors"}
    model.safetensors   the model's state dict: backbone and plan parameters (STTS's scorers)

Loading rebuilds the backbone from its config, installs the plan (so learned reducers create their
parameters), puts back any submodule the saved model had removed (`removed`: a converted bare
`VideoMAEModel` has no `fc_norm`) and copies the weights strictly: every key and shape is checked
and a mismatch raises one `CheckpointMismatchError` listing all of them. The model comes back in
eval mode, on the CPU, in the dtype of its weights.

A training run (`ts.train(..., out=run)`) is a model too: `run/last.pt` (or any `step-*.pt`) holds
the same three things (`backbone`, `spec`, `model`) next to the optimiser state. `read_checkpoint`
reads such a file and turns a truncated, corrupt or foreign one into one `InputError` line naming
the file.

A released HaltingVT checkpoint (mmaction2 1.x, saved by mmengine: `state_dict` with `backbone.model.`
keys) given as a file loads as its bare backbone through `mmaction.py`, an MViT checkpoint of
pySlowFast / STTS (`model_state`) or torchvision (`mvit_v1_b`'s state dict) through `mvit_weights.py`,
a Video Swin checkpoint (original / mmaction2 `backbone.layers.`, torchvision's `swin3d_*` state dict)
through `swin_weights.py`; the file is read once and what it holds decides.

`save` writes into a temporary folder beside the target and renames it into place, so a kill never
leaves a half-written model; it refuses a target that holds anything but a saved model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import InputError
from ..reducers import apply
from . import build_from_config, mmaction, mvit_weights, swin_weights
from .base import VideoBackbone
from .checkpoint import fit_problems, load_checked
from .config import BackboneConfig

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "RUN_CHECKPOINT",
    "WEIGHTS_FILE",
    "is_run",
    "is_saved",
    "load_local",
    "read_checkpoint",
    "save",
]

FORMAT = 1
"""Version of the saved-model layout; a reader refuses a newer one by name."""
CONFIG_FILE = "tokensieve.json"
WEIGHTS_FILE = "model.safetensors"
RUN_CHECKPOINT = "last.pt"
"""The latest checkpoint of a training run, inside its `out` folder."""
_RUN_FORMAT = 1  # the "format" engine/train.py writes into every checkpoint
_FIELDS = {f.name for f in dataclasses.fields(BackboneConfig)}


# ---------------------------------------------------------------------------------------- what a path is
def is_saved(path: Path) -> bool:
    """Whether `path` is a folder written by `save` (it holds `tokensieve.json`)."""
    return (path / CONFIG_FILE).is_file()


def is_run(path: Path) -> bool:
    """Whether `path` is a training run's folder (it holds `last.pt`)."""
    return (path / RUN_CHECKPOINT).is_file()


# ---------------------------------------------------------------------------------------- save
def save(model: nn.Module, path: str | Path) -> Path:
    """Save a backbone with its installed plan as a folder: `tokensieve.json` + `model.safetensors`.

    Args:
        model: a tokensieve backbone, with or without a plan (learned reducers' weights are saved).
        path: the folder to write. It must not exist, be empty, or hold a saved model (replaced).

    Returns:
        `path`, so `ts.load(ts.save(model, path))` reads it back.

    Raises:
        InputError: not a tokensieve backbone, a model on the meta device, a structure its config
            and plan do not rebuild, or a target holding anything but a saved model.
    """
    target = Path(path)
    if not isinstance(model, VideoBackbone):
        raise InputError(
            f"ts.save expects a tokensieve backbone (ts.build, ts.load), got {type(model).__name__}"
        )
    state = model.state_dict()
    if any(t.is_meta for t in state.values()):
        raise InputError("cannot save a model on the meta device: it holds no weights")
    spec = getattr(model, "spec", None)
    removed = _removed_modules(model)
    _check_rebuilds(model, spec, removed)
    _check_target(target)
    doc = {
        "format": FORMAT, "tokensieve": _version(), "backbone": _config_dict(model.config), "spec": spec,
        "removed": removed, "weights": WEIGHTS_FILE,
    }  # fmt: skip
    # Contiguous CPU copies: safetensors stores neither views into larger storages nor device tensors.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    place = target.absolute()  # "." has no name to put a temporary folder beside
    place.parent.mkdir(parents=True, exist_ok=True)
    tmp = place.with_name(f".{place.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        # safetensors creates its file private (0600); give it the mode the umask gives the JSON.
        os.chmod(tmp / WEIGHTS_FILE, (tmp / CONFIG_FILE).stat().st_mode & 0o777)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            _fsync(tmp / name)
        _swap_in(tmp, place)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _config_dict(config: BackboneConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _removed_modules(model: VideoBackbone) -> list[str]:
    """Submodules the model holds as `nn.Identity` where its config builds a real module."""
    with torch.device("meta"):
        fresh = build_from_config(model.config)
    own = dict(model.named_modules())
    removed: list[str] = []
    for name, module in fresh.named_modules():
        inside_removed = any(name.startswith(r + ".") for r in removed)
        if name and not inside_removed and isinstance(own.get(name), nn.Identity):
            if not isinstance(module, nn.Identity):
                removed.append(name)
    return removed


def _check_rebuilds(model: VideoBackbone, spec: str | None, removed: list[str]) -> None:
    """Refuse to save what `load_local` could not rebuild: the keys and shapes must come back."""
    with torch.device("meta"):
        rebuilt = _remove(apply(build_from_config(model.config), spec).model, removed)
    missing, unexpected, mismatched = fit_problems(rebuilt.state_dict(), model.state_dict())
    differ = sorted({*missing, *unexpected, *mismatched})
    if differ:
        raise InputError(
            f"cannot save: the model's structure is not what its config and plan {spec!r} build "
            f"(changed after ts.build/ts.apply?); differing keys: {', '.join(differ[:8])}"
            + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        )


def _check_target(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise InputError(f"cannot save to {target}: it is a file, not a folder")
    others = sorted(p.name for p in target.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE))
    if others:
        raise InputError(
            f"refusing to save to {target}: it holds {', '.join(others[:5])}"
            + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            + ", not only a saved model; choose an empty or new folder"
        )


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished folder into place. An existing saved model is moved aside first and
    deleted after (a directory cannot be renamed over a non-empty one)."""
    if target.exists() and any(target.iterdir()):
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)  # over an empty folder, or none


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------- load
def load_local(path: Path, **config_changes: Any) -> VideoBackbone:
    """Load a saved model (folder or one of its files), a training run's folder or a checkpoint file.

    Args:
        path: a folder written by `save`, its `tokensieve.json` or `model.safetensors`; a run folder
            holding `last.pt`; a checkpoint file of a run (`last.pt`, `step-*.pt`); a released
            HaltingVT checkpoint (mmaction2/mmengine, `mmaction.py`); or an MViT checkpoint of pySlowFast,
            STTS or torchvision (`mvit_weights.py`).
        **config_changes: `BackboneConfig` fields to override (e.g. `frames`); the weights must
            still fit.

    Returns:
        The backbone with its plan installed, in eval mode, on the CPU (a HaltingVT checkpoint: the
        bare backbone; its plan is logged).

    Raises:
        InputError: not a saved model or run, a damaged or foreign file, a format written by a
            newer tokensieve, an unknown config field.
        CheckpointMismatchError: the weights do not fit the rebuilt model (every key listed).
    """
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE) and is_saved(path.parent):
        path = path.parent
    if path.is_dir() and is_saved(path):
        return _load_saved(path, config_changes)
    file = path / RUN_CHECKPOINT if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise InputError(
            f"{path} holds neither a saved model ({CONFIG_FILE}) nor a training run ({RUN_CHECKPOINT})"
        )
    if file.suffix == ".safetensors":
        raise InputError(
            f"{file}: a .safetensors file loads as a model only inside a folder with {CONFIG_FILE}"
        )
    ckpt = _read_torch(file, foreign=lambda obj: mmaction.is_checkpoint(obj) or swin_weights.is_mmaction(obj))
    if swin_weights.is_mmaction(ckpt):
        return swin_weights.from_mmaction(ckpt, source=str(file), **config_changes)
    if swin_weights.is_torchvision(ckpt):
        return swin_weights.from_torchvision(ckpt, source=str(file), **config_changes)
    if mmaction.is_checkpoint(ckpt):
        return mmaction.from_checkpoint(ckpt, source=str(file), **config_changes)
    if mvit_weights.is_slowfast(ckpt):
        return mvit_weights.from_slowfast(ckpt, source=str(file), **config_changes)
    if mvit_weights.is_torchvision(ckpt):
        return mvit_weights.from_torchvision(ckpt, source=str(file), **config_changes)
    ckpt = _check_run(ckpt, file)
    config = _config(ckpt["backbone"], config_changes, file)
    return _assemble(config, ckpt["spec"], [], ckpt["model"], source=str(file))


def _load_saved(folder: Path, config_changes: dict[str, Any]) -> VideoBackbone:
    meta = folder / CONFIG_FILE
    try:
        doc = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{meta} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("format"), int):
        raise InputError(f"{meta} is not a tokensieve model description (no format number)")
    if doc["format"] > FORMAT:
        raise InputError(
            f"{meta} has format {doc['format']}, written by a newer tokensieve ({doc.get('tokensieve')}); "
            f"this one ({_version()}) reads format {FORMAT}: upgrade tokensieve"
        )
    missing = [k for k in ("backbone", "spec", "weights") if k not in doc]
    if missing or not isinstance(doc["backbone"], dict) or not isinstance(doc["spec"], (str, type(None))):
        raise InputError(
            f"{meta} is not a tokensieve model description (missing or bad: backbone, spec, weights)"
        )
    removed = doc.get("removed", [])
    if not isinstance(removed, list) or not all(isinstance(r, str) for r in removed):
        raise InputError(f"{meta}: 'removed' must be a list of module names, got {removed!r}")
    name = doc["weights"]
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise InputError(f"{meta}: 'weights' must name a file in its folder, got {name!r}")
    weights = folder / name
    if not weights.is_file():
        raise InputError(
            f"{folder} is an incomplete saved model: {meta.name} names {weights.name}, which is missing"
        )
    with weights.open("rb"):  # a file that cannot be opened stays an OSError naming it
        pass
    try:
        tensors = load_file(weights)
    except SafetensorError as err:
        raise InputError(f"cannot read {weights}: truncated or corrupt safetensors file ({err})") from err
    config = _config(doc["backbone"], config_changes, meta)
    return _assemble(config, doc["spec"], removed, tensors, source=str(weights))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training run's checkpoint file and check it is one.

    Returns:
        The checkpoint (`model`, `spec`, `backbone`, and the training state `ts.train` resumes from).

    Raises:
        InputError: the file is truncated, corrupt, not a torch file, or not a tokensieve run's
            checkpoint; one line naming the file.
        OSError: it cannot be read at all (missing, no permission).
    """
    return _check_run(_read_torch(path), path)


def _read_torch(path: Path, *, foreign: Callable[[Any], bool] | None = None) -> Any:
    """What a `torch.save` file holds, read with `torch.load(weights_only=True)`.

    Args:
        path: the file.
        foreign: when the safe reader refuses classes it does not know, read them as inert
            placeholders (`mmaction.read_foreign`) and keep the result if `foreign` accepts it (an
            mmengine checkpoint pickles mmengine objects beside its weights).

    Raises:
        InputError: truncated, corrupt, not a torch file, or objects the safe reader refuses.
        OSError: it cannot be read at all (missing, no permission).
    """
    with path.open("rb") as f:  # a missing or unreadable file stays an OSError naming it
        try:
            with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
                warnings.simplefilter("ignore")
                ckpt = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:
            # torch.load on damaged bytes raises whatever its reader trips over: RuntimeError (a torn
            # zip archive), OSError EINVAL (torn elsewhere), EOFError (empty), KeyError or IndexError
            # (text), UnpicklingError (random bytes, or objects other than tensors and plain data).
            # The file is open and this call is all the try holds, so each of them means the content.
            hint = ""
            if foreign is not None and _refused(err):
                try:
                    held = mmaction.read_foreign(path)
                except Exception:  # the placeholders do not fit either (or torch < 2.6): report the refusal
                    held = None
                if held is not None and foreign(held):
                    return held
                hint = f"; {mmaction.UNREADABLE}"
            raise InputError(
                f"cannot read {path}: truncated, corrupt or not a tokensieve checkpoint ({_why(err)}){hint}"
            ) from err
    return ckpt


def _check_run(ckpt: Any, path: Path) -> dict[str, Any]:
    """`ckpt` if it is what `ts.train` writes, else the `InputError` naming `path`."""
    if not isinstance(ckpt, dict) or not {"model", "spec", "backbone"} <= ckpt.keys():
        got = type(ckpt).__name__
        if isinstance(ckpt, dict):
            got = f"keys {', '.join(map(str, list(ckpt)[:6]))}" if ckpt else "an empty dict"
        raise InputError(
            f"{path} is not a tokensieve training checkpoint: expected model, spec and backbone "
            f"(written by ts.train), found {got}"
        )
    fmt = ckpt.get("format")
    if isinstance(fmt, int) and fmt > _RUN_FORMAT:
        raise InputError(
            f"{path} has checkpoint format {fmt}, written by a newer tokensieve: upgrade tokensieve"
        )
    model, backbone, spec = ckpt["model"], ckpt["backbone"], ckpt["spec"]
    if (
        fmt != _RUN_FORMAT
        or not isinstance(model, dict)
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in model.items())
        or not isinstance(backbone, dict)
        or not isinstance(spec, (str, type(None)))
    ):
        raise InputError(
            f"{path} is not a tokensieve training checkpoint: its format, model weights, spec or backbone "
            "config is not what ts.train writes"
        )
    return ckpt


def _refused(err: Exception) -> bool:
    """Whether torch.load's exception is the safe reader refusing what the file holds (not damage)."""
    return isinstance(err, pickle.UnpicklingError) and str(err).strip().startswith("Weights only load failed")


def _why(err: Exception) -> str:
    """What torch.load's exception says, in a few words."""
    text = str(err).strip()
    if _refused(err):
        return "torch.load(weights_only=True) refuses it: it is not only tensors and plain data"
    if isinstance(err, EOFError):
        return "it is empty or ends early"
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _config(fields: Mapping[str, Any], changes: Mapping[str, Any], source: Path) -> BackboneConfig:
    unknown = sorted((set(fields) | set(changes)) - _FIELDS)
    if unknown:
        raise InputError(
            f"{source}: unknown backbone config field(s) {unknown}; valid: {', '.join(sorted(_FIELDS))}"
        )
    merged = {k: tuple(v) if isinstance(v, list) else v for k, v in {**fields, **changes}.items()}
    missing = sorted(
        f.name for f in dataclasses.fields(BackboneConfig) if f.name not in merged and _required(f)
    )
    if missing:
        raise InputError(f"{source}: the backbone config lacks {', '.join(missing)}")
    try:
        return BackboneConfig(**merged)
    except TypeError as err:  # a value of the wrong type, e.g. "dim": "32" (its checks do arithmetic)
        raise InputError(f"{source}: bad backbone config ({err})") from err


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _assemble(
    config: BackboneConfig,
    spec: str | None,
    removed: list[str],
    weights: Mapping[str, Tensor],
    *,
    source: str,
) -> VideoBackbone:
    """Build `config`, install `spec`, remove `removed`, copy `weights` (strictly), eval mode."""
    try:
        model = apply(build_from_config(config), spec).model
    except InputError as err:  # a method this version lacks, a plan the changed config does not fit
        raise InputError(f"{source}: cannot install its plan {spec!r}: {err}") from err
    model = _remove(model, removed, source=source)
    dtypes = {v.dtype for v in weights.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # before copying, so float64 weights are not rounded through float32
        model = model.to(dtype=dtypes.pop())
    load_checked(model, weights, source=source)
    return model.eval()


def _remove(model: VideoBackbone, names: list[str], *, source: str = "") -> VideoBackbone:
    for name in names:
        parent, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(parent)
            getattr(owner, attr)
        except AttributeError as err:
            raise InputError(f"{source}: the model has no submodule {name!r} to remove") from err
        setattr(owner, attr, nn.Identity())
    return model


def _version() -> str:
    from .. import __version__  # at call time: the package root imports this module before defining it

    return __version__
