"""The model-adapter seam: for each kind of network, where its attention is and on which token grids it acts.

An adapter says, for one kind of network:

- :meth:`ModelAdapter.matches`: whether a model is of its kind;
- :meth:`ModelAdapter.spec`: the :class:`ModelSpec` (patch size, token grid of every block, heads, CLS token);
- :meth:`ModelAdapter.hooked_attention`: a context in which every forward calls ``callback(block, attention)``
  with each attention block's post-softmax attention ``(B', heads, n, n)`` (rows = queries), in forward order:
  live, gradients flowing through it, or recomputed (``declared`` ``qkv`` modules), with the relevance then given
  through ``on_relevance``;
- :meth:`ModelAdapter.window_layouts`: for windowed attention (Swin), where each block's ``n`` window slots sit
  on its stage's token grid (:class:`swin.WindowLayout`); None for global attention over all tokens
  (``B' = B``, ``n = N``).

The engine (:func:`engine.capture_attention`, :func:`engine.readout`) works from these alone. Adding a kind of
network = one adapter class + one :func:`register` line below. Entries name their adapter by import path and are
imported on first use, as the method registry does.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ContextManager, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import AttentionMapError
from .capture import AttentionCallback


@dataclass(frozen=True)
class ModelSpec:
    """What the explanation needs to know about a model's token grids.

    ``patch_size``, ``grid_shape``: the first token grid (the patch embedding's), in the input's spatial axis
    order; maps of rollout methods are on this grid. ``img_size``: the input's spatial size. ``num_layers``:
    attention blocks in forward order; ``num_heads``: heads of every block (the fewest, when stages differ).
    ``stage_grids`` / ``block_stages`` (hierarchical models): the token grid of each stage and each block's
    stage; empty when every block acts on ``grid_shape``.
    """

    patch_size: Tuple[int, ...]
    grid_shape: Tuple[int, ...]
    img_size: Tuple[int, ...]
    in_channels: int
    num_layers: int
    num_heads: int
    has_cls: bool
    stage_grids: Tuple[Tuple[int, ...], ...] = ()
    block_stages: Tuple[int, ...] = ()

    @property
    def num_patches(self) -> int:
        return int(np.prod(self.grid_shape))

    def block_grid(self, block: int) -> Tuple[int, ...]:
        """The token grid block ``block`` (0-based, forward order) acts on."""
        return self.stage_grids[self.block_stages[block]] if self.stage_grids else self.grid_shape

    def block_index(self, index: Sequence[int], block: int) -> Tuple[int, ...]:
        """A first-grid token index as the index of the token holding it on block ``block``'s grid (stage ``s``
        tokens cover ``2**s`` first-grid tokens per axis, from the origin, as ``PatchMerging`` pairs them)."""
        factor = 2 ** self.block_stages[block] if self.stage_grids else 1
        return tuple(int(i) // factor for i in index)

    def on_first_grid(self, token_map: np.ndarray) -> np.ndarray:
        """A map on a stage's grid (last axes) spread onto the first grid: each token's value on the first-grid
        tokens it covers (nearest, cropped at the far edge); a first-grid map is returned as it is."""
        grid = tuple(token_map.shape[-len(self.grid_shape):])
        if grid == self.grid_shape:
            return token_map
        factor = 2 ** list(self.stage_grids).index(grid)
        for axis in range(token_map.ndim - len(grid), token_map.ndim):
            token_map = np.repeat(token_map, factor, axis=axis)
        return token_map[(Ellipsis,) + tuple(slice(0, n) for n in self.grid_shape)]

    def grid_with(self, tokens: int) -> Tuple[int, ...]:
        """The token grid (the first, or a stage's) holding ``tokens`` tokens."""
        for grid in (self.grid_shape,) + self.stage_grids:
            if int(np.prod(grid)) == tokens:
                return grid
        raise AttentionMapError(f"readout: {tokens} values fit none of the model's token grids "
                                f"{[self.grid_shape, *self.stage_grids]}")


class ModelAdapter:
    """One kind of network (see the module docstring). Subclasses set ``name`` and implement the methods."""

    name = ""
    blockwise = False
    """Whether :mod:`.blockwise` (Q, K recomputed from each block's input) can read this kind's blocks."""

    def matches(self, model: torch.nn.Module) -> bool:
        raise NotImplementedError

    def spec(self, model: torch.nn.Module, img_size: Optional[Sequence[int]],
             input_size: Optional[Sequence[int]]) -> ModelSpec:
        raise NotImplementedError

    def hooked_attention(self, model: torch.nn.Module, callback: AttentionCallback,
                         on_relevance: Optional[AttentionCallback] = None) -> ContextManager[list]:
        """``on_relevance(block, relevance (B', n, n))``: for kinds whose attention is recomputed (not live), the
        adapter gives each block's gradient relevance itself; live attention gets it from the engine's hooks."""
        raise NotImplementedError

    def window_layouts(self, spec: ModelSpec, model: torch.nn.Module, device: torch.device) -> Optional[list]:
        return None

    def output_index(self, model: torch.nn.Module) -> int:
        """Which element of a model that returns several outputs is the one to explain (default the first)."""
        return 0


_ADAPTERS: Dict[str, str] = {}
_LOADED: Dict[str, ModelAdapter] = {}


def register(name: str, path: str) -> None:
    """Add the adapter ``"package.module:OBJECT"`` under ``name`` (new); adapters are tried in this order."""
    if name in _ADAPTERS:
        raise AttentionMapError(f"model adapter {name!r} is already registered")
    _ADAPTERS[name] = path


def _load(name: str) -> ModelAdapter:
    if name not in _LOADED:
        module, _, attribute = _ADAPTERS[name].partition(":")
        _LOADED[name] = getattr(importlib.import_module(module), attribute)
    return _LOADED[name]


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    """The first registered adapter that matches ``model``; one clear error when none does."""
    for name in _ADAPTERS:
        adapter = _load(name)
        if adapter.matches(model):
            return adapter
    raise AttentionMapError(
        f"model: {type(model).__name__} contains no attention block this tool can read; expected a MONAI "
        "ViT, UNETR or ViTAutoEnc (SABlock) or a MONAI SwinUNETR / SwinTransformer (WindowAttention)"
    )


register("declared", f"{__package__}.declared:ADAPTER")  # a declaration on the network wins
register("monai_sablock", f"{__package__}.vit_adapter:ADAPTER")
register("monai_swin", f"{__package__}.swin:ADAPTER")
