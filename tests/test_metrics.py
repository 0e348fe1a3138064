"""`tokensieve.metrics.trajectory_sum` (STA, Eq. 6) on hand-checked cases."""

from __future__ import annotations

import torch

import tokensieve as ts
from tokensieve.tokens import TokenState


def test_identical_frames_reach_the_maximum() -> None:
    frame = torch.randn(1, 6, 8)
    state = TokenState.from_grid(frame.repeat(1, 4, 1), (4, 2, 3))
    torch.testing.assert_close(ts.metrics.trajectory_sum(state), torch.tensor([3.0]))  # T - 1


def test_hand_computed_case() -> None:
    # Two frames of two tokens. Last frame: (1, 0) and (0, 1). First frame: (1, 0) and (1, 1).
    # Best cosines: 1 for (1, 0); 1/sqrt(2) for (0, 1). S = (1 + 0.7071) / 2.
    x = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    state = TokenState.from_grid(x, (2, 1, 2))
    torch.testing.assert_close(ts.metrics.trajectory_sum(state), torch.tensor([(1 + 2**-0.5) / 2]))


def test_pruned_frames_and_a_missing_last_frame() -> None:
    # Tokens of frames 0 and 2 of a 4-frame grid (one per frame): frame 2 is the last present.
    x = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
    state = TokenState(x=x, pos=torch.tensor([[0, 2]]), grid=(4, 1, 1))
    torch.testing.assert_close(ts.metrics.trajectory_sum(state), torch.tensor([0.6]))
    # reordering tokens changes nothing
    swapped = TokenState(x=x.flip(1), pos=torch.tensor([[2, 0]]), grid=(4, 1, 1))
    torch.testing.assert_close(ts.metrics.trajectory_sum(swapped), torch.tensor([0.6]))
