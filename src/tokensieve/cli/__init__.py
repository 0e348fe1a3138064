"""The `tokensieve` command line: `sweep`, `bench`, `flops`, `info`, `eval`, `oracle`, `make-synthetic`,
`train` and `show`.

    tokensieve sweep                      (the built-in model: every method x budget vs random; report.md)
    tokensieve sweep  --model runs/x --data val.txt --methods sta,tome --budgets 0.3,0.5 --out sweep/
    tokensieve bench  --model videomae-s --plan none --plan random:keep=0.5 --batch-size 1 --batch-size 8
    tokensieve train  --model videomae-s --data train.txt --val val.txt --plan random:keep=0.5 --epochs 3
    tokensieve eval   --model videomae-s --data val.txt --plan random:keep=0.5 --views 5x3 --out runs/val
    tokensieve oracle --model builtin:synthetic --data synth/list.txt --out oracle/
    tokensieve make-synthetic synth --videos 100 --partial
    tokensieve flops  --model videomae-b --plan sta:r=64
    tokensieve show   --model videomae-s --plan tome:r=100 --video clip.mp4 --out kept.png
    tokensieve info

`--model` is a preset name (random weights, no download), a saved model (`ts.save`), a training run
(its folder or `last.pt`), or a transformers checkpoint folder or hub id. Tables go to stdout, progress to stderr; `--json` prints one JSON document
on stdout and nothing else. Usage errors (unknown preset, bad plan, bad dtype) print one red line
naming the valid choices and exit with code 2.
"""

from __future__ import annotations

from . import data, measure, oracle, show, sweep, train  # noqa: F401  (importing a command module registers them)
from .common import app

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the `tokensieve` command."""
    app(prog_name="tokensieve")
