"""Flip averaging (test-time augmentation): the views, flipping windows and token maps, averaging outputs.

A view is a tuple of model-input spatial axes (0, 1, 2 = the window's axes in the model's axis order)
that are flipped; ``flip_views((0, 1, 2))`` is every combination of them: 8 views, the first ``()``
(the window as it is). A window whose size is a multiple of the patch size flips onto whole tokens, so
a view's token map flipped back along the same axes lies exactly on the window's token grid.

``volume.explain_volume(..., flip_axes=...)`` applies the rule per window of a volume (its cache keeps every
view for re-fusion); `views.explain_views_averaged` applies it to one model input (the evaluation's crops).

A model card may name the flips its numbers were measured with (``"default_flip_axes": [0, 1, 2]``);
the command line and the Slicer module use them unless the user says otherwise (:func:`flip_axes_from_spec`).
The library's own ``flip_axes`` default stays () (no flips).
"""
from __future__ import annotations

import itertools
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import AttentionMapError
from .calibration import softmax

View = Tuple[int, ...]


def check_flip_axes(flip_axes: Sequence[int]) -> Tuple[int, ...]:
    """``flip_axes`` as a sorted tuple of distinct axes among 0, 1, 2; AttentionMapError otherwise."""
    try:
        axes = tuple(flip_axes)
    except TypeError:
        axes = None
    if axes is None or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) or a not in (0, 1, 2)
                           for a in axes) or len(set(axes)) != len(axes):
        raise AttentionMapError(
            f"flip_axes: expected distinct model-input axes among 0, 1, 2 (e.g. (0, 1, 2) = 8 flipped views, "
            f"() = no flip averaging), got {flip_axes!r}"
        )
    return tuple(sorted(int(a) for a in axes))


def card_flip_axes(card: Optional[Mapping[str, Any]], source: str = "model card") -> Tuple[int, ...]:
    """The flips a card names in ``"default_flip_axes"`` (sorted model-input axes), () when it names none."""
    value = (card or {}).get("default_flip_axes")
    if value is None:
        return ()
    try:
        return check_flip_axes(value if isinstance(value, list) else None)
    except AttentionMapError:
        raise AttentionMapError(f"{source}: default_flip_axes: expected a list of distinct model-input axes among "
                                f"0, 1, 2 (e.g. [0, 1, 2]: 8 flipped views), got {value!r}") from None


def flip_axes_from_spec(spec: Any, card: Optional[Mapping[str, Any]], source: str = "model card") -> Tuple[int, ...]:
    """Flip axes from plain data (what the command line and the Slicer module's worker get): None or "default":
    the card's (:func:`card_flip_axes`); "none": no flips; else a sequence of axes (`check_flip_axes`)."""
    if spec is None or spec == "default":
        return card_flip_axes(card, source)
    if spec == "none":
        return ()
    return check_flip_axes(spec)


def flip_views(flip_axes: Sequence[int]) -> Tuple[View, ...]:
    """Every combination of flips along ``flip_axes`` (validated): ``2 ** len(flip_axes)`` views, ``()`` first."""
    axes = check_flip_axes(flip_axes)
    return tuple(view for count in range(len(axes) + 1) for view in itertools.combinations(axes, count))


def flip_window(window: torch.Tensor, view: View) -> torch.Tensor:
    """``window`` (..., d1, d2, d3) flipped along the spatial axes of ``view`` (the last three dimensions)."""
    return torch.flip(window, [window.ndim - 3 + a for a in view]) if view else window


def unflip_map(token_map: np.ndarray, view: View) -> np.ndarray:
    """A view's token map (n1, n2, n3) flipped back onto the window's token grid (its own inverse)."""
    return np.flip(token_map, axis=view) if view else token_map


def flip_tokens(tokens: np.ndarray, view: View, grid_shape: Sequence[int]) -> np.ndarray:
    """Token indices (..., 3) of a window's grid ``grid_shape`` -> the same tokens' indices in the view."""
    flipped = np.array(tokens, dtype=int, copy=True)
    for axis in view:
        flipped[..., axis] = int(grid_shape[axis]) - 1 - flipped[..., axis]
    return flipped


def mean_view_probabilities(view_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(W, K): the mean over views of ``softmax(logits / temperature)``; view_logits (V, W, K)."""
    return np.mean([softmax(logits, temperature) for logits in np.asarray(view_logits)], axis=0)
