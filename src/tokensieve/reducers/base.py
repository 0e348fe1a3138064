"""The reducer contract and the one registry of methods.

A reducer is an `nn.Module` taking a `TokenState` and returning one. It declares
- `name`: its spec name (`"random"` in `"random:keep=0.5"`), set by `@register`;
- `needs`: what the block before it must record (`KEYS`, `CLS_ATTN`);
- `positions(depth)`: where it runs, as the number of blocks run before it (0 = right after the
  patch embedding).
Its constructor's keyword-only arguments are exactly its spec parameters, with the paper's defaults;
the spec parser reads them from the signature.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..tokens import TokenState

__all__ = ["REGISTRY", "Reducer", "register"]


class Reducer(nn.Module):
    """Base class of every token-reduction method."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    def positions(self, depth: int) -> tuple[int, ...]:
        """Block counts before each place this reducer runs, for a model of `depth` blocks."""
        raise NotImplementedError

    def forward(self, state: TokenState) -> TokenState:
        raise NotImplementedError


REGISTRY: dict[str, type[Reducer]] = {}


def register(name: str):  # type: ignore[no-untyped-def]
    """Class decorator adding a reducer to the registry under its spec name."""

    def add(cls: type[Reducer]) -> type[Reducer]:
        if name in REGISTRY:
            raise ValueError(f"reducer {name!r} is registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return add
