"""Token-reduction methods and reduction plans."""

from __future__ import annotations

from . import none  # noqa: F401  (registers the method)
from .base import REGISTRY, Reducer, register
from .plan import apply, parse, plan

__all__ = ["REGISTRY", "Reducer", "apply", "parse", "plan", "register"]
