from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_video(
    name: str = "videomae-tiny", batch: int = 2, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A random clip batch of the input size a preset expects."""
    from tokensieve.backbones.config import preset

    cfg = preset(name)
    return torch.randn(batch, cfg.frames, cfg.channels, cfg.size, cfg.size, dtype=dtype)


def reducer_outputs(model: torch.nn.Module) -> list:
    """The output state of every reducer call of `model` from now on (forward hooks on the plan's `At`
    slots), in call order."""
    from tokensieve.reducers.base import At

    seen: list = []
    for module in model.modules():
        if isinstance(module, At):
            module.register_forward_hook(lambda m, args, out: seen.append(out))
    return seen


def interrupt_after_records(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Make the results writer raise KeyboardInterrupt (Ctrl-C) when asked for record `count` + 1, after
    writing the first `count` whole: a run killed in the middle (`monkeypatch.undo()` ends it)."""
    from tokensieve.engine.results import RecordWriter

    real, written = RecordWriter.write, []

    def write(self, record: dict) -> None:  # type: ignore[no-untyped-def]
        if len(written) == count:
            raise KeyboardInterrupt
        written.append(record)
        real(self, record)

    monkeypatch.setattr(RecordWriter, "write", write)
