"""Token-reduction methods and reduction plans."""

from __future__ import annotations

from . import adaptive, attention, halting, lite, none, oracle, random, random_frames, sta, stts, tome, uniform  # noqa: F401  (register the methods)
from .base import REGISTRY, Reducer, Site, register
from .plan import Step, apply, parse, plan, schedule

__all__ = ["REGISTRY", "Reducer", "Site", "Step", "apply", "parse", "plan", "register", "schedule"]
