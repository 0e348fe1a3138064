"""`stts`: Spatial-Temporal Token Selection (Wang et al., "Efficient Video Transformers with
Spatial-Temporal Token Selection", ECCV 2022, arXiv:2111.11591). Learned; trained end to end.

Spec in the paper's notation: `stts:T0=0.6,S4=0.9` selects 60% of the temporal slices before block 0
and, before block 4, one square anchor per frame holding about 90% of its tokens. Any number of
`T<p>` / `S<p>` selections may be given (one scorer each).

Scorer (Sec. 3.2, Eq. 2-3), on L candidates q (frames or tokens) of width D:
    f_l = MLP_1(LN(q))            per candidate, width D/2              (Eq. 2)
    f_g = mean_i f_l,i            the sequence's context
    s   = MLP_2([f_l, f_g])       one score per candidate                (Eq. 3)
    s'  = (s - min s) / (max s - min s + 1e-5)    min-max over the candidates that compete (`min_max`)
NOTE(paper): the paper does not give the layers; like the released code we put a LayerNorm first,
use one Linear+GELU for MLP_1 and Linear(D, D/2)+GELU, Linear(D/2, D/4)+GELU, Linear(D/4, 1) for
MLP_2. The released code instead maps D -> D and splits the channels into local and global halves:
`scorer=released` (`ReleasedScorer`) runs that network, for its trained weights. Each scorer has the
width of the tokens at its block (MViT's grows by stage).

Temporal selection (Eq. 5-6): frame descriptors by max-pooling over each frame's tokens (`pool=max`,
the paper; `pool=meanmax` concatenates mean and max pooling as the released code does), scores s,
min-max over the frames, Y = Top-K(s') in (B, K, T), kept frames z = Y x, in time order.
K = round(ratio * T).
Spatial selection (Eq. 7): token scores within each frame (context = the frame's mean), reshaped to
the frame's H x W grid (`TokenState.frame_grid`: the patch grid, MViT's pooled grid, an earlier anchor); anchors are the P x P windows at stride s, P = floor(sqrt(ratio * H * W)),
s = max((H - P) // 2, 1) unless `stride` is given (the released code's rule), G = ((H-P)/s+1)((W-P)/s+1)
anchors (the paper's formula omits the +1); anchor score = max over its tokens' raw scores s
(`anchor_pool=max`, the paper; `mean`, the released code), then min-max over the anchors of the
frame; Top-1 anchor per frame. The kept tokens stay a rectangular P x P grid in every frame; the class
token is always kept. Like the released code, the token scores are pooled raw and normalised once,
after pooling. (Min-max over the tokens first changes the normalised anchor scores only through the
1e-5, which matters while the pooled raw scores span about that little: an untrained scorer's
mean-pooled anchors on `joint-tiny` span ~3e-6, so the released order keeps them within [0, 0.25]
where normalising twice spread them over [0, 1]; on VideoMAE-B they span ~2e-3 and the two orders
differ by < 1%.)

Training: Top-K is the perturbed maximum (`ops.perturbed_topk`, `samples` noise draws, `sigma`
decayed linearly to 0 over training by `on_train_step`), so the kept frames / anchors are convex
mixtures Y x and gradients reach the scorers. Its backward is the released code's diagonal Jacobian
estimate by default (`jacobian=diagonal`: each slot's entry for item n is differentiated only with
respect to s'[n]) or Eq. 11's full estimate E[Y Z^T] / sigma (`jacobian=full`); equations in `ops`.
Evaluation (or sigma = 0): hard selection, a gather.
"""

from __future__ import annotations

import math
import re
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import rng
from ..backbones.base import VideoBackbone
from ..errors import InputError
from ..ops import JACOBIANS, perturbed_topk
from ..tokens import Layout, TokenState
from .base import Reducer, Site, keep_frames, register

__all__ = ["Scorer", "SpatioTemporalSelection", "anchor_grid", "min_max"]


def min_max(scores: Tensor) -> Tensor:
    """(B, L) scores -> (B, L) in [0, 1): (s - min s) / (max s - min s + 1e-5) per row (the released eps)."""
    low, high = scores.amin(1, keepdim=True), scores.amax(1, keepdim=True)
    return (scores - low) / (high - low + 1e-5)


class Scorer(nn.Module):
    """The selection network: per-candidate MLP, global context, second MLP; raw scores.

    The min-max normalisation is not part of it: the caller applies `min_max` over whatever competes
    (frames, or anchors after pooling the raw token scores), as the released code does.
    """

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        half = dim // 2
        self.norm = nn.LayerNorm(dim)
        self.local = nn.Sequential(nn.Linear(dim, half), nn.GELU())
        self.score = nn.Sequential(
            nn.Linear(2 * half, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 1),
        )

    def forward(self, q: Tensor) -> Tensor:
        """(B, L, D) candidates -> (B, L) raw scores (not normalised)."""
        f_l = self.local(self.norm(q))  # (B, L, D/2)
        f_g = f_l.mean(1, keepdim=True).expand_as(f_l)  # (B, L, D/2)
        return self.score(torch.cat([f_l, f_g], -1)).squeeze(-1)  # (B, L)


class ReleasedScorer(nn.Module):
    """The released code's scorer (`PredictorLG`, `scorer=released`), to run its trained weights: LayerNorm,
    Linear(D, D) and GELU; the first D/2 channels are each candidate's local features, the mean of the
    last D/2 over the candidates their context; then Linear(D, D/2), GELU, Linear(D/2, D/4), GELU,
    Linear(D/4, 1). Raw scores, as `Scorer`. Submodule names are the released ones (`in_conv`, `out_conv`)."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 1),
        )

    def forward(self, q: Tensor) -> Tensor:
        """(B, L, D) candidates -> (B, L) raw scores (not normalised)."""
        f = self.in_conv(q)  # (B, L, D)
        half = f.shape[-1] // 2
        f_g = f[..., half:].mean(1, keepdim=True).expand(-1, f.shape[1], -1)  # (B, L, D - D/2)
        return self.out_conv(torch.cat([f[..., :half], f_g], -1)).squeeze(-1)  # (B, L)


SCORERS = {"paper": Scorer, "released": ReleasedScorer}


def anchor_grid(H: int, W: int, ratio: float, stride: int | None) -> tuple[int, int, int, int]:
    """(P, stride, anchors down, anchors across) for keeping ~`ratio` of an H x W grid."""
    P = math.isqrt(int(H * W * ratio))
    if P < 1 or P > min(H, W):
        raise InputError(
            f"stts: a spatial ratio of {ratio} on a {H}x{W} grid gives an anchor side of {P}; it must be "
            f"between 1 and {min(H, W)}"
        )
    s = stride if stride is not None else max((H - P) // 2, 1)
    return P, s, (H - P) // s + 1, (W - P) // s + 1


class _Selection(nn.Module):
    """One `T<p>` or `S<p>` selection: its kind, place, ratio and scorer."""

    def __init__(self, kind: str, position: int, ratio: float, dim: int, scorer: str = "paper") -> None:
        super().__init__()
        self.kind, self.position, self.ratio = kind, position, ratio
        self.scorer = SCORERS[scorer](dim=dim)


@register("stts")
class SpatioTemporalSelection(Reducer):
    """Learned temporal top-K frame selection and anchor-based spatial top-1 selection."""

    pattern_parameters: ClassVar[dict[str, type]] = {r"T\d+": float, r"S\d+": float}
    budget = "T0"  # the sweep varies the frames kept before block 0
    trained_with = ("scorer",)  # another network: weights trained for one never run as the other

    def __init__(
        self,
        *,
        samples: int = 500,
        sigma: float = 0.05,
        pool: Literal["max", "meanmax"] = "max",
        anchor_pool: Literal["max", "mean"] = "max",
        stride: int = 0,
        jacobian: Literal["diagonal", "full"] = "diagonal",
        scorer: Literal["paper", "released"] = "paper",
        **selections: float,
    ) -> None:
        super().__init__()
        if samples < 1:
            raise InputError(f"stts: samples must be >= 1, got {samples}")
        if sigma < 0:
            raise InputError(f"stts: sigma must be >= 0, got {sigma}")
        if pool not in ("max", "meanmax") or anchor_pool not in ("max", "mean"):
            raise InputError(
                f"stts: pool must be max or meanmax and anchor_pool max or mean, got {pool}, {anchor_pool}"
            )
        if jacobian not in JACOBIANS:
            raise InputError(f"stts: jacobian must be one of {', '.join(JACOBIANS)}; got {jacobian!r}")
        if stride < 0:
            raise InputError(f"stts: stride must be >= 0 (0: the released code's rule), got {stride}")
        if scorer not in SCORERS:
            raise InputError(f"stts: scorer must be one of {', '.join(SCORERS)}; got {scorer!r}")
        chosen = []
        for key, ratio in selections.items():
            if not re.fullmatch(r"[TS]\d+", key):
                raise InputError(
                    f"stts has no parameter {key!r}; selections are T<block>=ratio or S<block>=ratio"
                )
            if not 0.0 < float(ratio) <= 1.0:
                raise InputError(f"stts: {key} must be a ratio in (0, 1], got {ratio}")
            chosen.append((int(key[1:]), key[0] == "S", key[0], float(ratio)))
        if not chosen:
            raise InputError("stts needs at least one selection, e.g. stts:T0=0.6 or stts:T0=0.6,S4=0.9")
        places = [(kind, p) for p, _, kind, _ in chosen]
        twice = next((f"{kind}{p}" for kind, p in places if places.count((kind, p)) > 1), None)
        if twice is not None:
            raise InputError(
                f"stts: two {twice[0]} selections before block {twice[1:]} (e.g. T0 and T00); give one"
            )
        self.specs = [(kind, p, ratio) for p, _, kind, ratio in sorted(chosen)]  # temporal first at a place
        self.samples, self.sigma, self.pool, self.anchor_pool = samples, sigma, pool, anchor_pool
        self.stride = stride or None
        self.jacobian, self.scorer = jacobian, scorer
        self.current_sigma = sigma  # set every training step by `on_train_step`
        self.selections = nn.ModuleList()  # filled by `setup`, once the model's width is known

    # ------------------------------------------------------------------ plan hooks
    def setup(self, model: VideoBackbone) -> None:
        width = model.config.width  # the tokens' width before each block (MViT's grows by stage)
        self.selections = nn.ModuleList(
            _Selection(
                kind, p, ratio, (2 if kind == "T" and self.pool == "meanmax" else 1) * width(p), self.scorer
            )
            for kind, p, ratio in self.specs
        )
        for m in self.selections.modules():  # the backbone's init: trunc-normal(0.02), zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        param = next(model.parameters())  # the scorers take the model's device and dtype
        self.selections.to(device=param.device, dtype=param.dtype)

    def positions(self, depth: int) -> tuple[int, ...]:
        return tuple(p for _, p, _ in self.specs)

    def on_train_step(self, step: int, total_steps: int) -> None:
        super().on_train_step(step, total_steps)
        self.current_sigma = self.sigma * max(0.0, 1.0 - step / max(total_steps, 1))

    def count(self, layout: Layout, site: Site) -> Layout:
        kind, _, ratio = self.specs[site.stage]
        frames = layout.frames
        if frames is None:
            raise InputError(f"stts: {kind}{site.position} needs the same number of tokens in every frame")
        n = layout.tokens // frames
        if kind == "T":
            k = round(ratio * frames)
            if k < 1:
                raise InputError(f"stts: T{site.position}={ratio} of {frames} frames keeps no frame")
            return Layout(k * n, frames=k, whole=layout.whole, frame_grid=layout.frame_grid)
        if layout.frame_grid is None:
            raise InputError(
                f"stts: S{site.position} needs a grid of tokens in every frame (the whole frame or an anchor), "
                f"but frames hold {n} tokens here, not in a grid"
            )
        H, W = layout.frame_grid
        P, *_ = anchor_grid(H, W, ratio, self.stride)
        return Layout(frames * P * P, frames=frames, whole=layout.whole and P == H == W, frame_grid=(P, P))

    # ------------------------------------------------------------------ forward
    @property
    def soft(self) -> bool:
        """Whether selections are perturbed mixtures now (training with sigma > 0)."""
        return self.training and self.current_sigma > 0

    @property
    def keyed_random(self) -> bool:
        """Draws perturbation noise keyed by clip, in training only (`Reducer.keyed_random`)."""
        return self.soft

    def _soft_topk(self, scores: Tensor, k: int, state: TokenState, site: Site) -> Tensor:
        """(B*R, L) scores, R rows per clip (frames of a spatial selection, 1 for temporal) ->
        (B*R, k, L) perturbed Top-K indicator, rows in ascending index order.

        The noise is keyed by clip and training step (`draw_stream`), so a clip's gradient estimate
        does not depend on the rest of its batch nor on how `torchrun` splits the batch.
        """
        keys, stream = self.draw_stream(state, site, 0)
        rows, L = scores.shape[0] // keys.shape[0], scores.shape[1]
        noise = rng.normal(keys, (rows, self.samples, L), stream=stream, dtype=scores.dtype)  # (B, R, S, L)
        return perturbed_topk(
            scores,
            k,
            num_samples=self.samples,
            sigma=self.current_sigma,
            training=True,
            noise=noise.view(-1, self.samples, L),  # (B*R, S, L)
            jacobian=self.jacobian,
        )

    def forward(self, state: TokenState, site: Site) -> TokenState:
        selection = self.selections[site.stage]
        if selection.kind == "T":
            return self._temporal(state, selection, site)
        return self._spatial(state, selection, site)

    def _temporal(self, state: TokenState, selection: _Selection, site: Site) -> TokenState:
        x = state.per_frame()  # (B, F, n, C); raises when per-frame counts differ
        B, F_, n, C = x.shape
        k = round(selection.ratio * F_)
        pooled = x.amax(2) if self.pool == "max" else torch.cat([x.mean(2), x.amax(2)], -1)  # (B, F, C')
        scores = min_max(selection.scorer(pooled))  # (B, F)
        # The hard choice gives positions (and, in eval, the tokens): unique frames in time order.
        kept = keep_frames(state, scores.topk(k, dim=1).indices.sort(1).values)
        if not self.soft:
            return kept
        Y = self._soft_topk(scores, k, state, site)  # (B, k, F)
        return kept.replace(x=(Y @ x.reshape(B, F_, n * C)).view(B, k * n, C))  # z = Y x: (B, k*n, C)

    def _spatial(self, state: TokenState, selection: _Selection, site: Site) -> TokenState:
        x = state.per_frame()  # (B, F, n, C)
        B, F_, n, C = x.shape
        if state.frame_grid is None:
            raise InputError(
                f"stts: spatial selection needs a grid of tokens in every frame, got {n} per frame"
            )
        H, W = state.frame_grid  # the patch grid, an anchor of it, or MViT's pooled grid
        P, s, _, Gw = anchor_grid(H, W, selection.ratio, self.stride)
        frames = x.reshape(B * F_, n, C)  # (B*F, H*W, C), raster order
        token_scores = selection.scorer(frames).view(B * F_, 1, H, W)  # raw: normalised after pooling
        pool = F.max_pool2d if self.anchor_pool == "max" else F.avg_pool2d
        anchor_scores = min_max(pool(token_scores, P, s).flatten(1))  # (B*F, G)
        best = anchor_scores.argmax(1)  # (B*F,)
        # Token indices of the chosen anchor in each frame, raster order within the P x P window.
        rows = (best // Gw * s).view(-1, 1, 1) + torch.arange(P, device=best.device).view(1, P, 1)
        cols = (best % Gw * s).view(-1, 1, 1) + torch.arange(P, device=best.device).view(1, 1, P)
        idx = (rows * W + cols).view(B, F_, P * P)  # (B, F, P*P) within each frame
        idx = (idx + torch.arange(F_, device=idx.device).view(1, F_, 1) * n).view(B, F_ * P * P)
        kept = state.gather(idx, frames=F_, frame_grid=(P, P))
        if not self.soft:
            return kept
        Y = self._soft_topk(anchor_scores, 1, state, site)  # (B*F, 1, G)
        windows = F.unfold(frames.transpose(1, 2).reshape(B * F_, C, H, W), P, stride=s)  # (B*F, C*P*P, G)
        mixed = (windows @ Y.transpose(1, 2)).view(B * F_, C, P * P).transpose(1, 2)  # (B*F, P*P, C)
        return kept.replace(x=mixed.reshape(B, F_ * P * P, C))

    def extra_repr(self) -> str:
        picks = ", ".join(f"{kind}{p}={ratio}" for kind, p, ratio in self.specs)
        return (
            f"{picks}, samples={self.samples}, sigma={self.sigma}, pool={self.pool}, "
            f"anchor_pool={self.anchor_pool}, jacobian={self.jacobian}, scorer={self.scorer}"
        )
