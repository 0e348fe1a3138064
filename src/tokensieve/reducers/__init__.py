"""Token-reduction methods and reduction plans."""

from __future__ import annotations

# Importing each method's module registers it.
from . import (  # noqa: F401
    adaptive,
    attention,
    halting,
    lite,
    none,
    oracle,
    random,
    random_frames,
    resize,
    sta,
    stts,
    tokenlearner,
    tome,
    uniform,
)
from .base import REGISTRY, Reducer, Site, register
from .plan import Step, apply, parse, plan, schedule

__all__ = ["REGISTRY", "Reducer", "Site", "Step", "apply", "parse", "plan", "register", "schedule"]
