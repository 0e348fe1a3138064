"""`python -m tokensieve ...`: the same as the `tokensieve` command."""

from .cli import main

main()
