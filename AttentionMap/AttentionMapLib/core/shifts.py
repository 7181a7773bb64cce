"""Half-patch shift averaging (test-time augmentation): the views, moving windows, putting maps back.

A view moves the content of a window by half a patch (``patch_size // 2`` voxels) towards higher indices
along a non-empty combination of its three model-input axes: 7 views (:func:`half_patch_shifts`). The
voxels vacated at the window's low faces repeat the window's first slice (:func:`shift_window`), so a
shifted view sees no content from outside the window and no artificial edge.

Why: the patch embedding cuts the window into fixed patches; a small lesion lying across a patch
boundary is split between tokens and a classifier trained on whole patches can miss it, and its attention
peak can land on the wrong side of the boundary. Averaging over the window and its half-patch shifts puts
every lesion near a patch centre in some view (the demo card's numbers with and without: docs/TRAINING.md).

A shifted view's token straddles two tokens of the window's grid along each moved axis: its share of the
window's token t - 1 is ``shift / patch``, of token t the rest. :func:`spread_back` puts a view's token map
back onto the window's tokens by those shares (attention mass is kept, except the share beyond the window's
low face, which is the repeated edge); :func:`shifted_query_rows` gives the view's tokens that hold a window
token's content, for a query row.

A model card may ask for it (``"default_shift_average": true``); the command line and the Slicer module then
use it unless the user says otherwise (:func:`shift_average_from_spec`). The library's default is off.
"""
from __future__ import annotations

import itertools
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import AttentionMapError

Shift = Tuple[int, int, int]


def half_patch_shifts(patch_size: Sequence[int]) -> Tuple[Shift, ...]:
    """The 7 shifts (voxels per model-input axis) of the views: every non-empty combination of the axes,
    each moved by ``patch // 2``; an axis whose patch is 1 voxel is never moved (fewer, distinct views)."""
    half = [int(p) // 2 for p in patch_size]
    shifts = {tuple(h if axis in axes else 0 for axis, h in enumerate(half))
              for count in range(1, 4) for axes in itertools.combinations(range(3), count)}
    return tuple(sorted(s for s in shifts if any(s)))


def shift_window(window: torch.Tensor, shift: Sequence[int]) -> torch.Tensor:
    """``window`` (..., d1, d2, d3) with its content moved ``shift[a]`` voxels towards higher indices along
    spatial axis a (the last three dimensions); voxel i takes voxel ``max(i - shift[a], 0)`` (the first slice
    repeated); same shape and dtype."""
    out = window
    for axis, amount in enumerate(shift):
        if amount:
            dim = window.ndim - 3 + axis
            index = torch.clamp(torch.arange(window.shape[dim], device=window.device) - int(amount), min=0)
            out = torch.index_select(out, dim, index)
    return out


def spread_back(token_map: np.ndarray, shift: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """A shifted view's token map(s) ``(..., n1, n2, n3)`` (content moved ``shift`` voxels, :func:`shift_window`)
    on the window's token grid, float64: along each moved axis, view token t gives ``shift / patch`` of its value
    to the window's token t - 1 (dropped for t = 0: the repeated edge) and the rest to token t. O(n1 n2 n3)."""
    out = np.asarray(token_map, dtype=np.float64)
    for axis, (amount, patch) in enumerate(zip(shift, patch_size)):
        if amount:
            share = int(amount) / int(patch)
            dim = out.ndim - 3 + axis
            moved = (1.0 - share) * out
            lower = [slice(None)] * out.ndim
            upper = [slice(None)] * out.ndim
            lower[dim], upper[dim] = slice(0, -1), slice(1, None)
            moved[tuple(lower)] += share * out[tuple(upper)]
            out = moved
    return out


def shifted_query_rows(token: Sequence[int], shift: Sequence[int], patch_size: Sequence[int],
                       grid_shape: Sequence[int]) -> List[Tuple[Tuple[int, int, int], float]]:
    """The tokens of a shifted view that hold the content of the window's ``token`` (3,), with weights summing
    to 1: along each moved axis view token t holds ``1 - shift / patch`` of it and token t + 1 the rest (token
    n is beyond the window: the content shifted out, not counted). The adjoint of :func:`spread_back`, so a
    query row read through these rows is the row of the window's token."""
    per_axis = []
    for t, amount, patch, n in zip(token, shift, patch_size, grid_shape):
        share = int(amount) / int(patch)
        options = [(int(t), 1.0 - share), (int(t) + 1, share)] if amount else [(int(t), 1.0)]
        per_axis.append([(index, weight) for index, weight in options if index < int(n) and weight > 0])
    rows = [(tuple(index for index, _ in combo), float(np.prod([weight for _, weight in combo])))
            for combo in itertools.product(*per_axis)]
    total = sum(weight for _, weight in rows)
    return [(index, weight / total) for index, weight in rows]


def check_shift_average(value: Any, source: str = "shift_average") -> bool:
    """``value`` as a bool; AttentionMapError unless it is True or False."""
    if not isinstance(value, (bool, np.bool_)):
        raise AttentionMapError(f"{source}: expected true or false (average the class probabilities over the "
                                f"7 half-patch-shifted views of each window), got {value!r}")
    return bool(value)


def card_shift_average(card: Optional[Mapping[str, Any]], source: str = "model card") -> bool:
    """Whether a card asks for half-patch shift averaging (``"default_shift_average"``; False when absent)."""
    value = (card or {}).get("default_shift_average")
    return False if value is None else check_shift_average(value, f"{source}: default_shift_average")


def shift_average_from_spec(spec: Any, card: Optional[Mapping[str, Any]], source: str = "model card") -> bool:
    """Shift averaging from plain data (the command line, the Slicer module's worker): None or "default": the
    card's (:func:`card_shift_average`); "on" / "off" or a bool: as said."""
    if spec is None or spec == "default":
        return card_shift_average(card, source)
    if spec in ("on", "off"):
        return spec == "on"
    return check_shift_average(spec, "shift_average (expected 'default', 'on', 'off' or a bool)")
