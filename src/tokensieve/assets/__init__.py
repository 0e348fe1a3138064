"""Built-in models: small backbones trained here on the synthetic benchmark, shipped with the package.

    model = ts.load("builtin:synthetic")         # the reference model, no download
    trained = assets.selectors("builtin:synthetic")  # {"stts": scorer weights}: trained selectors
    data = assets.heldout("builtin:synthetic")   # list.txt of its held-out set, made on demand

Each built-in is a folder here (`synthetic/`):

    model/                 the backbone, as `ts.save` writes it (tokensieve.json + model.safetensors)
    selectors.safetensors  the trained reducers of the learned methods, keys "<method>/<parameter>"
    finetuned.safetensors  methods trained with the whole model (HaltingVT): "<method>/<model key>"
    card.json              what made it: the synthetic set's arguments, the training recipe, the
                           held-out set and the accuracies measured on it (machine-readable)
    MODEL_CARD.md          the same for people

`benchmarks/train_builtin.py` reproduces every file from fixed seeds. The held-out set is not shipped:
`heldout` renders it from the card's arguments into a cache folder (`TOKENSIEVE_CACHE`, else
`$XDG_CACHE_HOME/tokensieve`, else `~/.cache/tokensieve`), the same files on every machine, once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import InputError

__all__ = [
    "BUILTINS", "DEFAULT", "cache_dir", "card", "folder", "heldout", "install_selectors", "is_builtin", "load",
    "selectors",
]  # fmt: skip

ROOT = Path(__file__).parent
PREFIX = "builtin:"
BUILTINS: dict[str, str] = {"builtin:synthetic": "synthetic"}
"""Name -> folder of every built-in model."""
DEFAULT = "builtin:synthetic"
"""The model `tokensieve sweep` runs without arguments."""


def is_builtin(name: object) -> bool:
    """Whether `name` names a built-in model ("builtin:..."); an unknown one is refused by `folder`."""
    return isinstance(name, str) and name.startswith(PREFIX)


def folder(name: str) -> Path:
    """The package folder of built-in model `name`."""
    if name not in BUILTINS:
        raise InputError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTINS)}")
    path = ROOT / BUILTINS[name]
    if not (path / "card.json").is_file():
        raise InputError(f"{name}'s files are missing from {path}: reinstall tokensieve")
    return path


def card(name: str = DEFAULT) -> dict[str, Any]:
    """The model card of `name` as data (see the module docstring)."""
    return json.loads((folder(name) / "card.json").read_text())


def load(name: str = DEFAULT, **config_changes: Any) -> Any:
    """The backbone of built-in model `name` (no plan installed), on the CPU in eval mode."""
    from ..backbones.saved import load_local

    return load_local(folder(name) / "model", **config_changes)


def selectors(name: str = DEFAULT) -> dict[str, dict[str, Tensor]]:
    """The trained weights of `name`'s learned methods: `reducers.plan.weights_key` ("stts", "lite:tensor=
    embed,value=gradnorm", "halting") -> the reducer's `state_dict()`, or for a method trained with the
    whole model (`Reducer.trains_backbone`) the whole model's. Stored as safetensors files,
    "<key>/<parameter>": `selectors.safetensors` and `finetuned.safetensors` (whole models)."""
    from safetensors.torch import load_file

    found: dict[str, dict[str, Tensor]] = {}
    for file in ("selectors.safetensors", "finetuned.safetensors"):
        path = folder(name) / file
        if not path.is_file():
            continue
        for key, tensor in load_file(path).items():
            method, _, param = key.partition("/")
            found.setdefault(method, {})[param] = tensor
    return found


def install_selectors(model: Any, name: str = DEFAULT) -> None:
    """Give the learned reducers of `model`'s installed plan the trained weights `name` ships for their
    method, where they fit; a plan of another shape, or of a setting `name` has no weights for, keeps
    its fresh weights, with a warning."""
    import logging

    from ..reducers.plan import load_trained, trained_keys

    log = logging.getLogger(__name__)
    shipped = selectors(name)
    for reducer, key in zip(model.plan, trained_keys(model), strict=True):
        learned = reducer.trains_backbone or any(True for _ in reducer.parameters())
        if learned and key not in shipped:
            log.warning("%s ships no trained %s weights; %s runs untrained", name, key, reducer.name)
    for key in load_trained(model, shipped):
        log.warning("%s's trained %s weights do not fit %s; it runs untrained", name, key, model.spec)


def cache_dir() -> Path:
    """Where data made on demand goes: `TOKENSIEVE_CACHE`, else `$XDG_CACHE_HOME/tokensieve`, else
    `~/.cache/tokensieve`."""
    if os.environ.get("TOKENSIEVE_CACHE"):
        return Path(os.environ["TOKENSIEVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokensieve"


def heldout(
    name: str = DEFAULT,
    *,
    cache: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The list.txt of `name`'s held-out set, rendered into the cache on first use (a few seconds).

    The folder is named after the set's arguments, so a set is never mixed with another; an
    interrupted rendering is completed by the next call (`make_synthetic` rewrites the same files).
    """
    from ..data.synthetic import make_synthetic

    arguments = card(name)["heldout"]
    tag = hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()[:10]
    out = Path(cache) if cache is not None else cache_dir()
    out = out / f"{BUILTINS[name]}-heldout-{tag}"
    listed = out / "list.txt"
    if listed.is_file():
        return listed
    return make_synthetic(
        out, **{**arguments, "object_size": tuple(arguments["object_size"])}, progress=progress
    )
