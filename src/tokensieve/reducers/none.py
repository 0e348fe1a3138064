"""`none`: no reduction. The baseline every method is measured against."""

from __future__ import annotations

from ..tokens import TokenState
from .base import Reducer, Site, register

__all__ = ["NoReduction"]


@register("none")
class NoReduction(Reducer):
    """Keeps every token; installs nothing, so the model runs exactly as the bare backbone."""

    @property
    def keeps_frames(self) -> bool:
        return True

    def positions(self, depth: int) -> tuple[int, ...]:
        return ()

    def count(self, num: int, frames: int | None, site: Site) -> tuple[int, int | None]:
        return num, frames

    def forward(self, state: TokenState, site: Site) -> TokenState:
        return state
