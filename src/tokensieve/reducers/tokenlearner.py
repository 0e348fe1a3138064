"""`tokenlearner`: TokenLearner (Ryoo et al., "TokenLearner: What Can 8 Learned Tokens Do for Images and
Videos?", NeurIPS 2021, arXiv:2106.11297), with the TokenFuser and the vector transformer. Learned.

S tokens per frame, each a weighted pooling of that frame's tokens x (n of them) by a spatial map:
    z_i = sum_l alpha_i(x)[l] x_l                                       (Eq. 1, the pooling of `pool`)
`version=1.1` (the released default, `TokenLearnerModuleV11`): alpha = softmax over the n locations of
MLP(LN(x)) (Linear(C, 64), GELU, Linear(64, S)), a weighted average (`LearnerV11`). `version=1` (the
paper's experiments, `TokenLearnerModule`): alpha = sigmoid of LN, three 3x3 convolutions to S channels
with GELU, a fourth 3x3 convolution (no biases), over the frame's H x W grid, summed (`LearnerV1`;
`pool=mean` divides by n). The pooled x is the un-normalised input, as released. Learned tokens carry
`pos = -1`, keep the frames (T x S tokens, `frames=T`), so divided attention still runs on them.

Placement (released `EncoderMod`, `EncoderModFuser`): without a fuser, one TokenLearner before block `at`;
every later block runs on the T x S tokens. With a fuser, at every block p >= at: TokenLearner -> block p
-> fuser back to the full-resolution tokens, which are kept in between (`FULL` in `aux`):
    x <- x + fuser(block(TL(x)), x)
(on a model that reads out its class token, no fuser after the last block: nothing would read it).
The released fuser (`fuser=released`, `FuserReleased`): LN on the S tokens, a Linear(S, S) mixing the
tokens per channel (zero-initialised), LN; a map per location from the kept tokens,
sigmoid(MLP(LN(x))) (Linear(C, 64), GELU, Linear(64, S)), spreads the S tokens back over the frame's n
locations. The paper's (`fuser=paper`, Eq. 3, `FuserPaper`): one linear map of the T x S tokens to T
per channel, o_t[c] = sum_i w_{t,i} y_i[c], added to every location of frame t (zero-initialised).
Both output zero at initialisation, so a TokenLearner + block + fuser unit starts as the identity.

The vector transformer (Eq. 2, `vector=true`): y_i = sum_j softmax_j(q_i * k_j) * v_j per channel, on the
blocks that run on learned tokens, with their own q/k/v projections: multi-head attention with one
head per channel and no scaling (`VECTOR_ATTN`; the blocks read it). The released code has none.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import VideoBackbone
from ..errors import InputError
from ..tokens import SOURCE_MAP, TOKEN_AUX, VECTOR_ATTN, Layout, TokenState, owners
from .base import Reducer, Site, per_frame_count, register, require_frames

__all__ = [
    "FULL",
    "MAPS",
    "FuserPaper",
    "FuserReleased",
    "LearnerV1",
    "LearnerV11",
    "TokenLearner",
    "block_at",
]

FULL = "tokenlearner_full"
"""`aux` entry: the full-resolution state a fuser adds its output to (fuser placements only)."""
MAPS = "tokenlearner_maps"
"""`aux` entry when tracing (`forward_features(trace=True)`): (B, S, T, H, W) the weight alpha of each of
the S learned tokens of a slice on each cell of the original grid (the weight of the token standing for
that cell when TokenLearner ran, 0 where none did), from the first TokenLearner (what `tokensieve show`
draws)."""
BOTTLENECK = 64
"""Hidden width of the released V1.1 and fuser MLPs (`bottleneck_dim`)."""
EPS = 1e-6
"""LayerNorm epsilon of the modules (Flax's default, as released)."""


def block_at(at: float, depth: int) -> int:
    """The block TokenLearner runs before: `at` itself when a whole number (a block index), else the
    fraction `at` of the depth, rounded (`at=0.5` of 12 blocks: 6, as the paper states placements)."""
    block = int(at) if float(at).is_integer() else round(at * depth)
    if not 0 <= block < depth:
        raise InputError(
            f"tokenlearner: at={at:g} must be a block of this {depth}-block model (0..{depth - 1}) or a "
            "fraction of its depth in (0, 1)"
        )
    return block


class LearnerV11(nn.Module):
    """Released TokenLearner V1.1: alpha = softmax over locations of MLP(LN(x)); tokens = alpha x."""

    def __init__(self, *, dim: int, tokens: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, BOTTLENECK), nn.GELU(), nn.Linear(BOTTLENECK, tokens))

    def forward(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(M, n, C) tokens of M frames -> ((M, S, C) learned tokens, (M, S, n) maps)."""
        maps = self.mlp(self.norm(x)).transpose(1, 2).softmax(-1)  # (M, S, n)
        return maps @ x, maps


class LearnerV1(nn.Module):
    """The paper's TokenLearner (V1): alpha = sigmoid(conv(gelu(conv(gelu(conv(gelu(conv(LN(x))))))))),
    3x3 convolutions over the frame's grid with S channels and no bias; tokens = sum (or mean) of alpha x."""

    def __init__(self, *, dim: int, tokens: int, pool: Literal["sum", "mean"]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=EPS)
        self.convs = nn.ModuleList(
            nn.Conv2d(dim if i == 0 else tokens, tokens, 3, padding=1, bias=False) for i in range(4)
        )
        self.pool = pool

    def forward(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(M, n, C) tokens of M frames in raster order over `grid` (H, W) -> ((M, S, C), (M, S, n))."""
        M, n, C = x.shape
        H, W = grid
        a = self.norm(x).transpose(1, 2).reshape(M, C, H, W)  # (M, C, H, W)
        for i, conv in enumerate(self.convs):
            a = conv(a) if i == len(self.convs) - 1 else F.gelu(conv(a))  # (M, S, H, W)
        maps = a.flatten(2).sigmoid()  # (M, S, n)
        z = maps @ x  # (M, S, C): the sum over locations
        return (z / n if self.pool == "mean" else z), maps


class _Fuser(nn.Module):
    """A TokenFuser: its token mixing `mix` starts at zero, so its output does (`reset_mix`)."""

    mix: nn.Linear

    def reset_mix(self) -> None:
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)


class FuserReleased(_Fuser):
    """Released TokenFuser: the S tokens mixed per channel (LN, Linear(S, S) zero-initialised, LN), spread
    over the n locations by sigmoid(MLP(LN(x))) of the full-resolution tokens x."""

    def __init__(self, *, dim: int, tokens: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.mix = nn.Linear(tokens, tokens)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.norm_full = nn.LayerNorm(dim, eps=EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, BOTTLENECK), nn.GELU(), nn.Linear(BOTTLENECK, tokens))

    def forward(self, y: Tensor, full: Tensor) -> Tensor:
        """(M, S, C) tokens after the block, (M, n, C) full-resolution tokens -> (M, n, C) to add to them."""
        mixed = self.norm2(self.mix(self.norm1(y).transpose(1, 2)).transpose(1, 2))  # (M, S, C)
        spread = self.mlp(self.norm_full(full)).sigmoid()  # (M, n, S)
        return spread @ mixed


class FuserPaper(_Fuser):
    """The paper's TokenFuser (Eq. 3): a linear map of the T x S tokens to T per channel (zero-
    initialised), each o_t broadcast to every location of frame t."""

    def __init__(self, *, frames: int, tokens: int) -> None:
        super().__init__()
        self.frames = frames
        self.mix = nn.Linear(frames * tokens, frames)

    def forward(self, y: Tensor, full: Tensor) -> Tensor:
        """(B, T*S, C) tokens after the block, (B, T*n, C) full-resolution tokens -> (B, T*n, C)."""
        B, N, C = full.shape
        T = self.frames
        o = self.mix(y.transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        return o.unsqueeze(2).expand(B, T, N // T, C).reshape(B, N, C)


@register("tokenlearner")
class TokenLearner(Reducer):
    """S learned tokens per frame before block `at` (and, with a fuser, fused back after every block)."""

    takes_ragged: ClassVar[bool] = False
    trained_with = ("at", "tokens", "version", "pool", "fuser", "vector")
    main_settings = ("tokenlearner:at=0.5,tokens=8",)  # the paper's: 8 tokens at the middle

    def __init__(
        self,
        *,
        at: float = 0.5,
        tokens: int = 8,
        version: float = 1.1,
        pool: Literal["default", "sum", "mean"] = "default",
        fuser: Literal["none", "released", "paper"] = "none",
        vector: bool = False,
    ) -> None:
        super().__init__()
        if tokens < 1:
            raise InputError(f"tokenlearner: tokens must be at least 1, got {tokens}")
        if version not in (1.0, 1.1):
            raise InputError(
                f"tokenlearner: version must be 1 (the paper's) or 1.1 (released), got {version:g}"
            )
        if version == 1.1 and pool not in ("default", "mean"):
            raise InputError(
                "tokenlearner: version 1.1 pools by a softmax-weighted average; pool=sum is version 1's"
            )
        if at < 0:
            raise InputError(f"tokenlearner: at must be a block index or a fraction of the depth, got {at:g}")
        self.at, self.tokens, self.version, self.fuser, self.vector = at, tokens, version, fuser, vector
        self.pool: Literal["sum", "mean"] = (
            ("sum" if version == 1.0 else "mean") if pool == "default" else pool
        )
        self.learner: nn.Module = nn.Identity()
        self.fuse: nn.Module | None = None
        self.last_fuse = True  # a fuser after the last block; not on a class-token readout (`setup`)

    def setup(self, model: VideoBackbone) -> None:
        cfg = model.config
        self.last_fuse = cfg.pool != "cls"  # the class token is read out: the patch tokens are not
        if self.vector and cfg.divided_blocks > block_at(self.at, cfg.depth):
            raise InputError(
                "tokenlearner: vector=true replaces the attention of the blocks on learned tokens, but block "
                f"{block_at(self.at, cfg.depth)} of this model is divided space-time; place it at or after "
                f"block {cfg.divided_blocks}"
            )
        if self.version == 1.0:
            self.learner = LearnerV1(dim=cfg.dim, tokens=self.tokens, pool=self.pool)
        else:
            self.learner = LearnerV11(dim=cfg.dim, tokens=self.tokens)
        if self.fuser == "released":
            self.fuse = FuserReleased(dim=cfg.dim, tokens=self.tokens)
        elif self.fuser == "paper":
            self.fuse = FuserPaper(frames=cfg.grid[0], tokens=self.tokens)
        for m in self.modules():  # the backbone's init for linear layers; the fuser's mixing at zero
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if self.fuse is not None:
            self.fuse.reset_mix()
        param = next(model.parameters())
        self.to(device=param.device, dtype=param.dtype)

    def positions(self, depth: int) -> tuple[int, ...]:
        first = block_at(self.at, depth)
        return (first,) if self.fuser == "none" else tuple(range(first, depth + int(self.last_fuse)))

    def count(self, layout: Layout, site: Site) -> Layout:
        T, H, W = site.grid
        if site.stage > 0:  # a fuser's place: the learned tokens come back from the block before
            frames = layout.frames
            if layout.ragged or frames is None or layout.tokens != frames * self.tokens:
                raise InputError(
                    f"tokenlearner: its fuser needs the {self.tokens} learned tokens per frame the block before "
                    f"it ran on, but it is given {layout.describe()}: place no other reducer between"
                )
            full = Layout(frames * H * W, frames=frames, whole=True)
            return full if site.position == site.depth else Layout(frames * self.tokens, frames=frames)
        per_frame_count(layout, self.name)
        if layout.ragged:
            raise InputError("tokenlearner: pools each frame's tokens and needs a batch of equal clips")
        if (self.version == 1.0 or self.fuser != "none") and not layout.whole:
            why = (
                "version 1 convolves each frame's grid"
                if self.version == 1.0
                else "a fuser restores each frame's grid"
            )
            raise InputError(
                f"tokenlearner: {why} and needs every frame whole, but it is given {layout.describe()}; "
                "place it before the reduction that leaves it"
            )
        # fuser=paper's map is made for the slices of the model's own grid (`setup`; before it, the site's).
        F_ = self.fuse.frames if isinstance(self.fuse, FuserPaper) else T
        if self.fuser == "paper" and layout.frames != F_:
            raise InputError(
                f"tokenlearner: fuser=paper maps the {F_}x{self.tokens} learned tokens of every slice to {F_} "
                f"slices and needs {F_} slices (clips of this model's own frame count), but {layout.frames} "
                "reach it"
            )
        return Layout(layout.frames * self.tokens, frames=layout.frames)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        if site.stage > 0:
            state = self._fused(state)
        if site.position < site.depth:
            state = self._learned(state, site, first=site.stage == 0)
        return state

    def _learned(self, state: TokenState, site: Site, *, first: bool) -> TokenState:
        """S tokens per frame from each frame's tokens; the state they replace kept for a fuser."""
        T = require_frames(state, self.name)
        B, N, C = state.x.shape
        n = N // T
        z, maps = self.learner(state.x.reshape(B * T, n, C), site.grid[1:])  # (B*T, S, C), (B*T, S, n)
        S = self.tokens
        aux = {k: v for k, v in state.aux.items() if k not in TOKEN_AUX and k != SOURCE_MAP}
        if SOURCE_MAP in state.aux:  # tracing: each cell goes to the learned token weighing it most
            before = owners(state)  # (B, THW) index of the token holding each cell, -1 for none
            aux[SOURCE_MAP] = _owners_after(before, maps.view(B, T, S, n), S)
            if first:
                aux[MAPS] = _cell_maps(before, maps.detach().view(B, T, S, n), state.grid)
        if self.fuser != "none":
            aux[FULL] = state
        if self.vector:
            aux[VECTOR_ATTN] = True
        pos = torch.full((B, T * S), -1, dtype=torch.long, device=state.x.device)
        return TokenState(x=z.view(B, T * S, C), pos=pos, grid=state.grid, cls=state.cls, frames=T, aux=aux)

    def _fused(self, state: TokenState) -> TokenState:
        """The full-resolution tokens kept before the block, plus the fuser's output from its learned ones."""
        full: TokenState = state.aux[FULL]
        B, N, C = full.x.shape
        T = full.frames
        assert T is not None and self.fuse is not None
        if isinstance(self.fuse, FuserPaper):
            out = self.fuse(state.x, full.x)
        else:
            out = self.fuse(state.x.reshape(B * T, self.tokens, C), full.x.reshape(B * T, N // T, C))
        aux = {
            k: v
            for k, v in state.aux.items()
            if k not in TOKEN_AUX and k not in (FULL, VECTOR_ATTN, SOURCE_MAP)
        }
        if SOURCE_MAP in full.aux:
            aux[SOURCE_MAP] = full.aux[SOURCE_MAP]
        return full.replace(x=full.x + out.reshape(B, N, C), cls=state.cls, aux=aux)


def _cell_maps(before: Tensor, maps: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """(B, S, T, H, W): each learned token's weight on every cell of the original `grid`, from the (B,
    T, S, n) maps over the tokens of each slice and `before` (B, THW), the token standing for each cell
    (`owners`, -1 for none): a cell gets its token's weight (a merged token's on each of its patches),
    0 where no token stands for it."""
    B, T, S, n = maps.shape
    token = before.clamp_min(0)
    by_token = maps.permute(0, 2, 1, 3).reshape(B, S, T * n)  # (B, S, N) the weight on each token
    cells = by_token.gather(2, token.unsqueeze(1).expand(B, S, token.shape[1]))  # (B, S, THW)
    cells = cells * (before >= 0).unsqueeze(1)
    return cells.view(B, S, *grid)


def _owners_after(before: Tensor, maps: Tensor, S: int) -> Tensor:
    """(B, T*H*W) source map after learning, from `before` (B, THW), the token holding each cell before
    (`owners`, -1 for none): each cell's owner becomes the learned token of its owner's frame with the
    largest weight at that owner (B, T, S, n maps), -1 where there was none."""
    B, T, _, n = maps.shape
    best = maps.argmax(2).view(B, T * n)  # (B, T*n) the learned token weighing each token most
    held = before >= 0
    token = before.clamp_min(0)
    learned = (token // n) * S + best.gather(1, token)  # (B, THW)
    return torch.where(held, learned, -1)
