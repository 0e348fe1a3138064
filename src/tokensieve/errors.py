"""The library's error type for bad input.

Every check of what a user passes in (a spec, a path, a setting, a dataset that does not fit the
model) raises `InputError` with a one-line message naming what was expected. It subclasses
`ValueError`, so code that catches `ValueError` keeps working. The command line turns exactly this
type into one red line and exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input from the user; the message names what was expected."""
