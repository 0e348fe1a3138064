"""`none`: no reduction. The baseline every method is measured against."""

from __future__ import annotations

from ..tokens import Layout, TokenState
from .base import Reducer, Site, register

__all__ = ["NoReduction"]


@register("none")
class NoReduction(Reducer):
    """Keeps every token; installs nothing, so the model runs exactly as the bare backbone."""

    def positions(self, depth: int) -> tuple[int, ...]:
        return ()

    def count(self, layout: Layout, site: Site) -> Layout:
        return layout

    def forward(self, state: TokenState, site: Site) -> TokenState:
        return state
