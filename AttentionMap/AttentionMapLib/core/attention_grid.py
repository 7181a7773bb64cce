"""The fields every attention result shares: a token grid placed in RAS, the outputs and the options that made it.

Torch-free (numpy, `geometry` and `region` only): `volume.VolumeAttention` (the engine's result) and
`worker.AttentionData` (the same result as plain data in the GUI process) both derive from `AttentionGrid` and add
only their own fields. Both carry the applied region, so a map resampled in the GUI process (segment statistics) is
0 outside the region exactly as in the worker.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .geometry import apply_affine, peak_index, resample_grid
from .region import AppliedRegion


@dataclass(frozen=True)
class AttentionGrid:
    """An attention map on the token grid of a volume, placed in patient space, with what produced it.

    grid: float32 (I, J, K) over the global token grid. ijk_to_ras: (4, 4) float64 mapping a grid
    index to the RAS mm centre of the patch it summarises. window_logits: (W, K) model outputs per
    window for class outputs (None for dense outputs such as UNETR's). probabilities: (K,) the
    volume-level class probabilities: the softmax (with the card's temperature) of the decisive window,
    the one with the highest probability of the target class (None for dense outputs).
    target: class (output index) the gradients were taken for (grad_rollout), else the caller's
    target or None. method, layer (0-based, resolved), head_fusion, head (None: heads fused),
    discard_ratio, normalize: the fusion options (see `engine.explain`). query_ras: (3,) the RAS point
    whose token row was read out (None: CLS row, or mean of rows without CLS); in sliding-window mode
    only windows holding that point contribute, other tokens are 0. num_windows: how many windows were
    run. timings: seconds per stage {"preprocess", "forward", "fuse", "geometry"}.
    window_weighting: "probability" when each window's map was weighted by the window's probability
    for the target class before blending (sliding window, class outputs), else "none".
    flip_axes: the model-input axes whose flips were averaged (every combination: 2 ** len views; () = none).
    shift_average: whether the maps and the window probabilities also average the 7 half-patch-shifted views
    (`shifts`).
    region: the applied region (`region.AppliedRegion`: its voxel mask on the model-input grid), None: the whole
    input; the grid is 0 on tokens outside it and `resample_to` is 0 at voxels outside it.
    """

    grid: np.ndarray
    ijk_to_ras: np.ndarray
    window_logits: Optional[np.ndarray]
    probabilities: Optional[np.ndarray]
    target: Optional[int]
    method: str
    layer: int
    head_fusion: str
    head: Optional[int]
    discard_ratio: float
    normalize: str
    query_ras: Optional[np.ndarray]
    num_windows: int
    timings: Dict[str, float]
    window_weighting: str
    flip_axes: Tuple[int, ...]
    shift_average: bool
    region: Optional[AppliedRegion]

    def peak_ras(self) -> np.ndarray:
        """RAS position (3,) in mm of the centre of the grid's highest token."""
        return apply_affine(self.ijk_to_ras, np.asarray(peak_index(self.grid), dtype=np.float64))

    def resample_to(self, shape_ijk: Sequence[int], ijk_to_ras: np.ndarray) -> np.ndarray:
        """The grid resampled (trilinear, 0 outside the grid's box and, with a region, 0 at voxels whose nearest
        model-input voxel is outside the region) onto another voxel grid (`shape_ijk` with its (4, 4) `ijk_to_ras`);
        float32 (I, J, K)."""
        resampled = resample_grid(self.grid, self.ijk_to_ras, shape_ijk, ijk_to_ras)
        if self.region is not None:
            resampled[~self.region.on_grid(shape_ijk, ijk_to_ras)] = 0.0
        return resampled
