"""MONAI's Swin Transformer (``SwinUNETR``, ``SwinTransformer``): shifted-window attention read on each stage's grid.

A Swin block attends within windows of ``n`` tokens (7 x 7 x 7 in SwinUNETR), every other block on the grid rolled
by half a window (``torch.roll``; ``compute_mask`` keeps tokens that the roll brought together from opposite sides
apart), and ``PatchMerging`` halves the grid between stages. The attention a block applies to its stage's ``N``
tokens is therefore block-diagonal up to a permutation: one ``n x n`` block per window. It is kept as such,
``(B, windows, n, n)`` per block (:class:`WindowLayout` says which token each window slot holds), and every method
is read out through it without ever forming ``N x N``: a vector times a block is a gather, one batched ``n x n``
product per window, and a scatter, O(windows * n^2) time and memory.

Definitions (as for a ViT, with these choices where Swin differs):

- a block's matrix ``A`` (``N x N`` on its stage grid): ``A[i, j]`` = the post-softmax weight of token ``i`` on
  token ``j`` if they share a window, else 0. Window slots that are padding (a grid not divisible by the window is
  padded by MONAI after the block's LayerNorm) are not tokens: their columns are dropped, so such a row sums to
  less than 1.
- from a stage to the next (``PatchMerging``: token ``(a, b, c)`` of the coarse grid is made of the up to 8 fine
  tokens ``(2a + i, 2b + j, 2c + k)``): a coarse row vector ``v`` becomes the fine vector
  ``v[parent(t)] / children(parent(t))``, each merged token's weight shared equally among the tokens it was made
  of (the mass is kept). Convolutions between stages (``use_v2``), like MLPs, are not part of rollout.
- ``raw``: row(s) of block ``layer`` on its own stage grid; ``rollout`` / ``grad_rollout``: blocks
  ``0..layer`` read out from the left, through the merges, onto the first stage's grid. The readout row is the
  query token (a grid index on block ``layer``'s stage grid) or the mean of all rows (no CLS token).
- ``discard_ratio``: the cut is the k-th smallest of the block's entries between real tokens of one window
  (``k = int(entries * ratio)``), the entries the block computes; zeros outside windows are not entries.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.networks.blocks.patchembedding import PatchEmbed
from monai.networks.nets.swin_unetr import (
    BasicLayer,
    SwinTransformer,
    WindowAttention,
    get_window_size,
    window_partition,
)

from ..errors import AttentionMapError
from .capture import AttentionCallback, attention_hooks
from .model_adapters import ModelAdapter, ModelSpec


@dataclass(frozen=True)
class WindowLayout:
    """Where one block's window slots sit on its stage grid.

    ``grid``: the stage's token grid (input spatial axis order); ``tokens``: ``(windows, n)`` int64, the flat
    (C order) grid index of the token in each window slot, -1 for a padding slot, in the order of MONAI's
    ``window_partition`` of the (rolled) grid, which is the order of the block's attention ``(B * windows, ...)``.
    """

    grid: Tuple[int, ...]
    tokens: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.grid))


def window_layout(grid: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int],
                  device: Optional[torch.device] = None) -> WindowLayout:
    """The layout of a block with ``window_size`` and ``shift_size`` on ``grid``, as MONAI's
    ``SwinTransformerBlock.forward_part1`` partitions it (window shrunk to the grid and no shift along an axis
    no longer than the window: ``get_window_size``; grid padded at its far end; rolled by ``-shift``)."""
    grid = tuple(int(g) for g in grid)
    window, shift = get_window_size(grid, tuple(window_size), tuple(shift_size))
    padded = tuple(-(-g // w) * w for g, w in zip(grid, window))
    index = torch.full(padded, -1, dtype=torch.int64)
    index[tuple(slice(0, g) for g in grid)] = torch.arange(int(np.prod(grid))).reshape(grid)
    if any(s > 0 for s in shift):
        index = torch.roll(index, shifts=tuple(-s for s in shift), dims=tuple(range(len(grid))))
    slots = window_partition(index[None, ..., None], window).squeeze(-1)
    return WindowLayout(grid, slots.to(device))


def stage_grids(input_size: Sequence[int], patch_size: Sequence[int], layers: Sequence[BasicLayer]) -> List[Tuple]:
    """Token grid of each stage: the input over the patch (``PatchEmbed`` pads to a multiple), then halved
    (rounded up: ``PatchMerging`` pads) after every stage that merges."""
    grid = tuple(-(-int(s) // int(p)) for s, p in zip(input_size, patch_size))
    grids = []
    for layer in layers:
        grids.append(grid)
        if layer.downsample is not None:
            grid = tuple(-(-g // 2) for g in grid)
    return grids


def _stages(model: torch.nn.Module) -> List[BasicLayer]:
    layers = [m for m in model.modules() if isinstance(m, BasicLayer)]
    for index, layer in enumerate(layers):
        if getattr(layer, "use_hyena", False):
            raise AttentionMapError(f"model: stage {index} of {type(model).__name__} is built from Hyena blocks, "
                                    "which have no attention to read; use a SwinUNETR without use_hyena")
    return layers


def _blocks(model: torch.nn.Module) -> List[torch.nn.Module]:
    return [block for layer in _stages(model) for block in layer.blocks]


class SwinAdapter(ModelAdapter):
    """MONAI ``SwinUNETR`` / ``SwinTransformer``: ``WindowAttention`` in ``SwinTransformerBlock``s, one
    ``BasicLayer`` per stage."""

    name = "monai_swin"

    def matches(self, model: torch.nn.Module) -> bool:
        return any(isinstance(m, WindowAttention) for m in model.modules())

    def spec(self, model: torch.nn.Module, img_size: Optional[Sequence[int]] = None,
             input_size: Optional[Sequence[int]] = None) -> ModelSpec:
        """Grids from the ``PatchEmbed`` patch and the input size (``img_size``, else the input at hand: a
        SwinUNETR takes any size divisible by ``patch * 32``)."""
        embedding = next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)
        layers = _stages(model)
        if embedding is None or not layers:
            raise AttentionMapError(f"model: {type(model).__name__} has no MONAI PatchEmbed and Swin stages "
                                    "(BasicLayer); expected a MONAI SwinUNETR or SwinTransformer")
        patch = tuple(int(p) for p in embedding.patch_size)
        size = img_size if img_size is not None else input_size
        if size is None:
            raise AttentionMapError("img_size: a Swin model does not store its input size; pass img_size "
                                    "(e.g. the model card's roi size)")
        if len(size) != len(patch):
            raise AttentionMapError(f"x: expected a torch tensor (B, C) + {len(patch)} spatial axes, "
                                    f"got {len(size)} spatial axes {tuple(size)}")
        check = getattr(model, "_check_input_size", None)  # SwinUNETR's own rule (multiples of patch_size ** 5)
        if callable(check):
            try:
                check(tuple(int(s) for s in size))
            except ValueError as exc:
                raise AttentionMapError(f"x: {exc} (MONAI SwinUNETR); resize or tile the volume first "
                                        "(explain_volume does, with an img_size that is)") from None
        grids = stage_grids(size, patch, layers)
        stages = tuple(index for index, layer in enumerate(layers) for _ in layer.blocks)
        blocks = _blocks(model)
        return ModelSpec(patch, grids[0], tuple(int(s) for s in size), int(embedding.proj.in_channels),
                         len(blocks), min(int(b.attn.num_heads) for b in blocks), False,
                         tuple(grids), stages)

    def output_index(self, model: torch.nn.Module) -> int:
        """A bare SwinTransformer returns the outputs of the patch embedding and of each stage: the last is the
        deepest (the first has seen no attention); SwinUNETR returns one tensor."""
        return -1 if isinstance(model, SwinTransformer) else 0

    def window_layouts(self, spec: ModelSpec, model: torch.nn.Module, device: torch.device) -> List[WindowLayout]:
        return [window_layout(spec.block_grid(index), block.window_size, block.shift_size, device)
                for index, block in enumerate(_blocks(model))]

    @contextmanager
    def hooked_attention(self, model: torch.nn.Module, callback: AttentionCallback,
                         on_relevance: Optional[AttentionCallback] = None) -> Iterator[list]:
        """Every forward calls ``callback(block, attention)`` with the output of each block's ``softmax``
        ``(B * windows, heads, n, n)``, mask and relative position bias included. Flash attention (MONAI >= 1.6)
        and gradient checkpointing are off within the context (the first never forms the weights, the second
        would run each block twice); they, the training flags and the hooks are restored on exit."""
        blocks = _blocks(model)
        settings = [(b, "use_checkpoint", False) for b in blocks]
        settings += [(b.attn, "use_flash_attention", False) for b in blocks if hasattr(b.attn, "use_flash_attention")]
        with attention_hooks(model, [b.attn.softmax for b in blocks], settings, callback):
            yield blocks


def vector_times_block(vector: torch.Tensor, weights: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """``v A`` for a block's window weights ``(B, windows, n, n)``: ``(B, N)`` -> ``(B, N)``, O(windows * n^2)."""
    valid = layout.tokens >= 0
    index = layout.tokens.clamp(min=0)
    gathered = vector[:, index] * valid  # (B, windows, n); padding slots carry nothing
    batch, windows, slots = gathered.shape
    product = torch.bmm(gathered.reshape(batch * windows, 1, slots), weights.reshape(batch * windows, slots, slots))
    out = torch.zeros_like(vector)
    out[:, layout.tokens[valid]] = product.reshape(batch, windows, slots)[:, valid]
    return out


def block_row_sums(weights: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """``(B, N)``: each token's row sum over the real tokens of its window."""
    valid = layout.tokens >= 0
    sums = (weights * valid[None, :, None, :]).sum(dim=-1)
    out = torch.zeros((weights.shape[0], layout.num_tokens), dtype=weights.dtype, device=weights.device)
    out[:, layout.tokens[valid]] = sums[:, valid]
    return out


def discarded(weights: torch.Tensor, layout: WindowLayout, ratio: float) -> torch.Tensor:
    """The window weights with each sample's entries ``<=`` the k-th smallest entry between real tokens set to 0
    (``k = int(entries * ratio)``); unchanged when ``k == 0``."""
    valid = layout.tokens >= 0
    pairs = valid[:, :, None] & valid[:, None, :]
    entries = weights[:, pairs]  # (B, entries)
    count = int(entries.shape[1] * ratio)
    if count == 0:
        return weights
    cut = entries.kthvalue(count, dim=1).values
    return torch.where(weights > cut[:, None, None, None], weights, torch.zeros_like(weights))


def to_finer_grid(vector: torch.Tensor, coarse: Sequence[int], fine: Sequence[int]) -> torch.Tensor:
    """A row vector on a merged (coarse) grid ``(B, prod(coarse))`` carried back to the grid it was merged
    from ``(B, prod(fine))``: each coarse token's value shared equally among its (up to 2^d) fine tokens."""
    if tuple(coarse) == tuple(fine):
        return vector
    axes = [torch.arange(f, device=vector.device) // 2 for f in fine]
    parents = torch.zeros(tuple(fine), dtype=torch.int64, device=vector.device)
    for axis, (index, size) in enumerate(zip(axes, coarse)):
        shape = [1] * len(fine)
        shape[axis] = -1
        parents = parents * int(size) + index.reshape(shape)
    parents = parents.reshape(-1)
    children = torch.bincount(parents, minlength=int(np.prod(coarse))).to(vector.dtype)
    return (vector / children)[:, parents]


def readout_vector(captured, row: torch.Tensor, method: str, last: int, discard_ratio: float) -> torch.Tensor:
    """``row^T R`` for ``method`` (raw | rollout | grad_rollout) over blocks ``0..last`` (see the module
    docstring). ``row``: ``(B, N_last)`` on block ``last``'s stage grid; returns ``(B, N)`` on that grid for
    ``raw``, on the first stage's grid otherwise. O(sum over blocks of windows * n^2)."""
    layouts = captured.windows
    if method == "raw":
        return vector_times_block(row, captured.layers[last], layouts[last])
    vector, grid = row, layouts[last].grid
    for block in range(last, -1, -1):
        layout = layouts[block]
        vector, grid = to_finer_grid(vector, grid, layout.grid), layout.grid
        if method == "grad_rollout":
            vector = vector + vector_times_block(vector, captured.relevances[block], layout)
            continue
        weights = captured.layers[block]
        if discard_ratio > 0:
            weights = discarded(weights, layout, discard_ratio)
        weighted = vector / (0.5 * block_row_sums(weights, layout) + 0.5)
        vector = 0.5 * vector_times_block(weighted, weights, layout) + 0.5 * weighted
    return vector


ADAPTER = SwinAdapter()
