"""What every backbone shares: input validation, the loop over blocks and reducer slots, the head.

    forward(video) = forward_head(forward_features(video))

`reducers[p]` runs after `p` blocks (position 0 = right after patch embedding, position `depth` after
the last block, before the head), `blocks[p].inner` between the attention and the MLP of block `p`. A
bare model holds `nn.Identity()` in every slot; `tokensieve.apply` puts a plan's reducers there (and
the reducers themselves in `plan`).

Each backbone declares what its blocks need of the tokens (`need`: any tokens, equal frames, a grid
in every frame) and what they do to the layout (`layout_after`: MViT's pooling shrinks the grid), which
`apply` checks every plan against. A ragged batch (clips holding different counts, a padding mask)
runs packed by default (`ragged`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..rng import clip_keys
from ..tokens import CLIP_KEY, INPUTS, Inputs, Layout, Need, TokenState, track_sources
from .config import BackboneConfig
from .layers import RAGGED, Block, run_packed

__all__ = ["VideoBackbone", "init_weights"]


class VideoBackbone(nn.Module):
    """Base class of the native video backbones. Subclasses build `embed` and `blocks`."""

    embed: nn.Module
    blocks: nn.ModuleList
    block_need: ClassVar[tuple[Need, str]] = ("tokens", "joint attention")
    """What every block needs of its tokens (`tokens.Need`) and why, as `need` reports it."""
    records: ClassVar[frozenset[str] | None] = None
    """The side results its blocks' attention can record for the reducer after it (`KEYS`, `CLS_ATTN`,
    ...), None for every one; `apply` refuses a plan that needs another."""
    no_records_why: ClassVar[str] = ""
    """Why not the others (for the error message)."""
    records_ahead: ClassVar[bool] = False
    """True: what a reducer needs is recorded by the block *after* its slot, on the tokens the slot is given,
    before the reducer runs (Video Swin: the merged tokens of a new stage have met no attention yet); the
    backbone's `_slot` does it. False: by the block before (the reducer reads what that block saw)."""
    any_size: ClassVar[bool] = True
    """False: it runs only at the grid its positions are built for (MViT); `apply` refuses a plan that
    changes the clip's size (`resize`)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        C = config.width(config.depth)  # the tokens' width after the last block
        # Readout: mean pooling + fc_norm (VideoMAE), or final norm + one token.
        mean_pool = config.pool == "mean"
        self.norm = nn.Identity() if mean_pool else nn.LayerNorm(C, eps=config.eps)
        self.fc_norm = nn.LayerNorm(C, eps=config.fc_norm_eps) if mean_pool else nn.Identity()
        self.head_drop = nn.Dropout(config.drop) if config.drop > 0 else nn.Identity()
        self.head = nn.Linear(C, config.num_classes) if config.num_classes > 0 else nn.Identity()
        # One slot before each block and one after the last (position `depth`, before the head).
        self.reducers = nn.ModuleList(nn.Identity() for _ in range(config.depth + 1))
        self.plan = nn.ModuleList()  # the installed plan's reducers (`tokensieve.apply`)
        self.spec: str | None = None  # the installed plan's spec
        # The plan's reducer that pools the features instead (a reference: it lives in `plan`).
        self.__dict__["readout_by"] = None
        self.__dict__["installed"] = None  # the `InstalledPlan` `apply` returned (a reference)

    # ------------------------------------------------------------------ contract
    def need(self, position: int) -> tuple[Need, str]:
        """What block `position` needs of the tokens it is given, and why (for error messages)."""
        return self.block_need

    def layout_after(self, position: int, layout: Layout) -> Layout:
        """The layout of the tokens after block `position`'s attention given `layout` before it: the same,
        except where a block pools its tokens (MViT). `apply` walks plans with it and `layout_leaving`, so
        every reducer and block is checked against the grid it will really see."""
        return layout

    def layout_leaving(self, position: int, layout: Layout) -> Layout:
        """The layout block `position` hands on, given `layout` after its attention and the reducers inside
        it: the same, except where a block ends by merging its tokens (Video Swin's patch merging)."""
        return layout

    @property
    def ragged(self) -> Literal["packed", "padded"]:
        """How blocks run a ragged batch: "packed" (real tokens only, attention per clip; the default)
        or "padded" (every row, with a padding mask: the reference). Settable."""
        return self.blocks[0].ragged

    @ragged.setter
    def ragged(self, how: Literal["packed", "padded"]) -> None:
        if how not in RAGGED:
            raise InputError(f"ragged must be one of {', '.join(RAGGED)}, got {how!r}")
        for block in self.blocks:
            block.ragged = how

    # ------------------------------------------------------------------ input
    def check_input(self, video: Tensor) -> tuple[int, int, int]:
        """Validate a clip batch and return its token grid (T, H, W): any frame count the tubelet divides
        and any frame size (not necessarily square) the patch divides. At a grid other than the one the
        positions are built for (`config.grid`), the embedding carries them there by the backbone's rule
        (`backbones.positions`) and the installed plan is checked against the grid (`check_plan`).

        Raises:
            InputError: naming the expected layout when the shape does not fit the model.
        """
        cfg = self.config
        if not isinstance(video, Tensor) or video.dim() != 5:
            shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
            raise InputError(f"expected a video batch of shape (B, T, C, H, W), got {shape}")
        if not video.is_floating_point():
            raise InputError(
                f"expected a float video (normalised like the checkpoint), got dtype {video.dtype}"
            )
        _, T, C, H, W = video.shape
        if C != cfg.channels:
            raise InputError(
                f"expected {cfg.channels} channels at dim 2 of (B, T, C, H, W), got {C} (shape {tuple(video.shape)})"
            )
        return cfg.grid_of(T, (H, W))

    def check_plan(self, grid: tuple[int, int, int]) -> None:
        """Check the installed plan against clips of token grid `grid` (`InstalledPlan.steps_at`: once per
        grid, then remembered; no data is read; at the grid `apply` checked it against, `config.grid` unless
        given, nothing to do). `forward_features` calls it for every batch.

        Raises:
            InputError: a reducer whose parameters or layout do not fit `grid`, naming what it needs.
        """
        installed = self.__dict__.get("installed")
        if installed is not None:
            installed.steps_at(grid)

    # ------------------------------------------------------------------ forward
    def forward_features(
        self, video: Tensor, *, trace: bool = False, inputs: Inputs | None = None
    ) -> TokenState:
        """Tokens after the last block and the slot after it (before the final norm).

        Args:
            video: (B, T, C, H, W) float clips, normalised with `config.mean` / `config.std`.
            trace: also track which original patches each token stands for (`tokens.SOURCE_MAP`,
                read with `tokens.owners` / `tokens.covered`); the tokens are the same either way.
                Off, it costs nothing.
            inputs: what reducers may read besides the tokens (`tokens.Inputs`: labels, the teacher's
                results; the training loop passes them). Default: the clip alone.
        """
        grid = self.check_input(video)
        self.check_plan(grid)  # nothing to do at the grid the plan was installed for
        if self.plan and self.plan[0].resizes_input:  # `resize`: the model runs on the resized clip
            video, grid = self.plan[0].resize_clip(video, self.config.patch), self.plan[0].input_grid(grid)
        state = self.embed(video, grid)
        state = state.with_aux(**{INPUTS: inputs if inputs is not None else Inputs(video)})
        if trace:
            state = track_sources(state)
        if any(r.keyed_random for r in self.plan):  # the plan will draw random numbers keyed by clip
            state = state.with_aux(**{CLIP_KEY: clip_keys(video)})
        depth, p = len(self.blocks), 0
        while (
            p < depth
        ):  # a reducer slot, then its block (or a run of blocks a ragged batch goes through packed)
            state = self._slot(p, state)
            end = self._packed_run(p, state)
            state = run_packed(self.blocks[p:end], state) if end > p + 1 else self.blocks[p](state)
            p = end
        return self.reducers[depth](state)

    def _slot(self, p: int, state: TokenState) -> TokenState:
        """The reducer slot before block `p` (a backbone may add to it: Video Swin records ahead and fills
        the holes it leaves)."""
        return self.reducers[p](state)

    def _packed_run(self, p: int, state: TokenState) -> int:
        """The end (exclusive) of the blocks from `p` a ragged batch goes through as one packed run
        (`layers.run_packed`: packed once, tile by tile through all of them): joint blocks with no reducer
        slot, no reducer inside and no observer hooks in between; one that records ends the run (the
        reducer after it reads the records). Otherwise `p + 1`: block `p` alone."""
        if state.mask is None or self.blocks[p].ragged != "packed":
            return p + 1
        end = p
        while end < len(self.blocks):
            block = self.blocks[end]
            if type(block) is not Block or not isinstance(block.inner, nn.Identity) or _observed(block):
                break
            if end > p and not isinstance(self.reducers[end], nn.Identity):
                break
            end += 1
            if block.record:
                break
        return max(end, p + 1)

    def forward_head(self, state: TokenState) -> Tensor:
        """(B, num_classes) logits, or (B, C) pooled features when `num_classes=0`.

        A plan whose reducer overrides the readout (`Reducer.overrides_readout`, e.g. HaltingVT's
        halting-weighted class token) pools the features instead of the configured pooling.
        """
        if self.readout_by is not None:
            return self.head(self.head_drop(self.readout_by.readout(state, self)))
        pool = self.config.pool
        if pool == "cls":
            feat = self.norm(state.cls[:, 0])  # (B, C)
        elif pool == "first":
            feat = self.norm(state.x[:, 0])  # (B, C)
        else:
            feat = self.fc_norm(_mean_tokens(state))  # (B, C)
        return self.head(self.head_drop(feat))

    def forward(self, video: Tensor) -> Tensor:
        """
        Args:
            video: (B, T, C, H, W) float clips, normalised with `config.mean` / `config.std`.

        Returns:
            (B, num_classes) logits.
        """
        return self.forward_head(self.forward_features(video))

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _observed(module: nn.Module) -> bool:
    """Whether forward hooks watch `module` (a packed run would skip its call, so it runs on its own)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _mean_tokens(state: TokenState) -> Tensor:
    """Mean over the real tokens of each sample, each weighted by the patches it stands for (merged
    tokens, as ToMe's MAE readout): (B, C)."""
    if state.mask is None and state.size is None:
        return state.x.mean(1)
    weight = torch.ones_like(state.x[..., 0]) if state.size is None else state.size.to(state.x.dtype)
    if state.mask is not None:
        weight = weight * state.mask
    weight = weight.unsqueeze(-1)  # (B, N, 1)
    return (state.x * weight).sum(1) / weight.sum(1).clamp_min(1e-6)


def init_weights(module: nn.Module) -> None:
    """timm-style init: truncated normal (std 0.02) for linear weights, zero biases, unit norms."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
