"""Test-time views of a window: the flips (`flips`) and the half-patch shifts (`shifts`) as one kind of object.

A :class:`WindowView` turns a window into the view the model sees, a token map of the view back onto the
window's token grid, and a window token into the view's query rows. :func:`window_views` lists the views of
a run: the flipped views (the first is the window as it is), then, with shift averaging, the 7 half-patch-shifted
views (unflipped). Each view's map put back and each view's ``softmax(logits / temperature)`` are averaged
with equal weights: the same rule in ``volume.explain_volume`` (per window of a volume) and in
:func:`explain_views_averaged` (one model input, the evaluation's crops).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

import numpy as np
import torch

from ..errors import AttentionMapError
from . import methods
from .engine import explain, model_spec
from .flips import flip_tokens, flip_views, flip_window, unflip_map
from .shifts import check_shift_average, half_patch_shifts, shift_window, shifted_query_rows, spread_back


@dataclass(frozen=True)
class WindowView:
    """A window flipped along the model-input axes ``flips``, then its content moved ``shift`` voxels per axis
    (`shifts.shift_window`; ``patch_size``: the model's, for the token shares of a shifted view)."""

    flips: Tuple[int, ...] = ()
    shift: Tuple[int, int, int] = (0, 0, 0)
    patch_size: Tuple[int, int, int] = (1, 1, 1)

    def window(self, x: torch.Tensor) -> torch.Tensor:
        """The view of ``x`` (..., d1, d2, d3): what the model is run on."""
        return shift_window(flip_window(x, self.flips), self.shift)

    def unview(self, token_map: np.ndarray) -> np.ndarray:
        """A view's token map(s) (..., n1, n2, n3) on the window's token grid (float64 when shifted)."""
        back = spread_back(token_map, self.shift, self.patch_size) if any(self.shift) else token_map
        return unflip_map(back, tuple(back.ndim - 3 + a for a in self.flips))

    def query_rows(self, token: Sequence[int], grid_shape: Sequence[int]) -> List[Tuple[Tuple[int, int, int], float]]:
        """The view's tokens holding the window's ``token`` (3,) and their weights (sum 1): its flipped index, then
        the one to eight tokens of the shifted view (`shifts.shifted_query_rows`; itself alone without a shift)."""
        flipped = tuple(int(v) for v in flip_tokens(np.asarray(token), self.flips, grid_shape))
        return shifted_query_rows(flipped, self.shift, self.patch_size, grid_shape)


def window_views(flip_axes: Sequence[int], shift_average: bool, patch_size: Sequence[int]) -> Tuple[WindowView, ...]:
    """The views of a run: ``2 ** len(flip_axes)`` flipped views (`flips.flip_views`, the unchanged window first),
    then with ``shift_average`` the half-patch-shifted views (`shifts.half_patch_shifts`, 7 for patches > 1)."""
    patch = tuple(int(p) for p in patch_size)
    views = [WindowView(flips=flips, patch_size=patch) for flips in flip_views(flip_axes)]
    if check_shift_average(shift_average):
        views += [WindowView(shift=shift, patch_size=patch) for shift in half_patch_shifts(patch)]
    return tuple(views)


def explain_views_averaged(model: torch.nn.Module, x: torch.Tensor, flip_axes: Sequence[int] = (),
                           shift_average: bool = False, normalize: str = "minmax",
                           **options: Any) -> Tuple[np.ndarray, np.ndarray]:
    """View averaging of one model input ``x`` (B, C, *img_size) (:func:`window_views`): (grid (B, n1, n2, n3)
    float32: the mean over the views of `engine.explain`'s unnormalised grid of each view put back
    (:meth:`WindowView.unview`), normalised once; view_logits (V, B, K) float32, for
    `flips.mean_view_probabilities`). ``options``: as `engine.explain`, without ``query`` (a window's query
    reads several rows of a shifted view: use ``volume.explain_volume``)."""
    if options.get("query") is not None:
        raise AttentionMapError("query: not available when averaging views of one model input; "
                                "use volume.explain_volume(..., query_ras=...), which reads each view's rows")
    patch = model_spec(model, input_size=tuple(x.shape[2:])).patch_size
    grids, logits = [], []
    for view in window_views(flip_axes, shift_average, patch):
        result = explain(model, view.window(x), normalize="none", **options)
        grids.append(view.unview(result.grid).astype(np.float64))
        logits.append(result.logits.detach().float().cpu().numpy())
    return methods.normalize_map(np.mean(grids, axis=0), normalize), np.stack(logits)
