"""Measures of what a reduction kept.

`trajectory_sum` is STA's temporal-redundancy measure (Ding et al., ICCV 2023, Eq. 6, Table 1):
for every token i of the last frame, the cosine similarity to its most similar token in each earlier
frame, summed over those frames and averaged over i,

    S = 1/n_s sum_i sum_{t < last} max_j cos(x_last,i , x_t,j).

Identical frames give the maximum, T - 1. Frames left empty by a reduction contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .tokens import TokenState

__all__ = ["trajectory_sum"]


def trajectory_sum(state: TokenState) -> Tensor:
    """STA's trajectory sum of each sample's tokens: (B,) float.

    Works on any state: tokens are assigned to frames by their grid position, so pruned, unequal
    frames are fine. The last frame is the latest frame that still holds a (real) token.
    """
    T, H, W = state.grid
    x = F.normalize(state.x.float(), dim=-1)  # (B, N, C)
    real = state.pos >= 0
    if state.mask is not None:
        real = real & state.mask
    frame = torch.where(real, state.pos // (H * W), -1)  # (B, N), -1 for no frame
    last = frame.amax(1, keepdim=True)  # (B, 1)
    in_last = frame == last  # (B, N)
    sim = x @ x.transpose(1, 2)  # (B, N, N): row i of the last frame against every token
    # Best match of every token in each frame: scatter the max over tokens into frame slots.
    slot = torch.where(frame >= 0, frame, T).unsqueeze(1).expand_as(sim)  # (B, N, N), T = discard
    best = sim.new_full((*sim.shape[:2], T + 1), float("-inf")).scatter_reduce(2, slot, sim, reduce="amax")[
        ..., :T
    ]  # (B, N, T)
    earlier = torch.arange(T, device=x.device).view(1, 1, T) < last.unsqueeze(-1)  # (B, 1, T)
    best = torch.where(earlier & (best > float("-inf")), best, 0.0).sum(-1)  # (B, N)
    count = in_last.sum(1).clamp_min(1)
    return (best * in_last).sum(1) / count
