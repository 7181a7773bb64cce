"""Cut faces: training crops cut by a random plane, as a partial scan's face cuts the windows at its border.

A scan that ends inside the chest (a limited field of view, a slab, a re-gridded oblique scan whose slices no
longer line up with the body) shows the model windows where lung and its vessels stop at a flat face and padding
follows. A vessel cut by a face ends in a blob, the look of a nodule. The whole-scan negatives only hold the two
scans' own faces; `cut_faces` puts a face anywhere: a plane with a random normal (half the time near S, the
direction of axial slices; tilted up to FACE_TILT_DEGREES), at a random depth, with everything beyond it set to
the model input's padding value (0 = air after intensity scaling), its edge hard or one voxel of partial volume.
A pair (the same crop with and without a nodule) gets the same face, placed so that the nodule and
FACE_MARGIN_VOX voxels around it stay in front of it: the face never hides or cuts the nodule, so it is not a cue
for either class.

Arrays are (I, J, K) voxel grids of the model input (RAS, 2 mm), K = inferior -> superior.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np

from attentionmap_dev.demo_data import CROP, CropSet

FACE_TILT_DEGREES = 15.0
FACE_MARGIN_VOX = 2.0
FACE_MIN_KEPT_VOX = 8.0  # the face leaves at least this depth of the crop in front of it
_CENTRES = (np.stack(np.meshgrid(*[np.arange(CROP, dtype=np.float32)] * 3, indexing="ij"), -1) - (CROP - 1) / 2.0)


def face_normal(rng: np.random.Generator) -> np.ndarray:
    """A unit normal (3,) pointing out of the kept side: half the time along +-K, else along a random axis, then
    tilted by up to FACE_TILT_DEGREES in a random direction."""
    axis = 2 if rng.random() < 0.5 else int(rng.integers(3))
    normal = np.zeros(3)
    normal[axis] = 1.0 if rng.random() < 0.5 else -1.0
    side = rng.normal(size=3)
    side -= side.dot(normal) * normal
    side /= np.linalg.norm(side)
    tilt = np.deg2rad(rng.uniform(0.0, FACE_TILT_DEGREES))
    return np.cos(tilt) * normal + np.sin(tilt) * side


def face_keep(rng: np.random.Generator, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 (CROP, CROP, CROP) in 0..1: the share of each voxel in front of a random face (1 kept, 0 padding).

    The face's depth is uniform such that at least FACE_MIN_KEPT_VOX voxels along the normal are kept; with a
    nodule `mask` (bool, CROP^3) it is moved beyond the nodule's farthest voxel plus FACE_MARGIN_VOX (possibly out
    of the crop: then nothing is cut). Half the faces are hard, half have one voxel of linear partial volume.
    """
    normal = face_normal(rng).astype(np.float32)
    depth = _CENTRES @ normal  # signed distance (voxels) of each voxel centre along the normal
    reach = float(np.abs(normal).sum()) * (CROP - 1) / 2.0
    offset = float(rng.uniform(-reach + FACE_MIN_KEPT_VOX, reach - FACE_MIN_KEPT_VOX))
    if mask is not None and mask.any():
        offset = max(offset, float(depth[mask].max()) + FACE_MARGIN_VOX)
    if rng.random() < 0.5:
        return (depth <= offset).astype(np.float32)
    return np.clip(offset + 0.5 - depth, 0.0, 1.0).astype(np.float32)


def cut_faces(batch: CropSet, rng: np.random.Generator, fraction: float, group: int = 1) -> CropSet:
    """`batch` with a share `fraction` of its groups of `group` consecutive crops (2: positive then negative of a
    `CropSampler.batches` pair; 1: independent windows) cut by one face each (`face_keep`, clear of every mask in
    the group). Returns a new CropSet; `batch` is not modified. Cost: O(CROP^3) per cut crop."""
    if len(batch.labels) % group:
        raise ValueError(f"batch of {len(batch.labels)} crops is not made of groups of {group}")
    images = batch.images.copy()
    for first in range(0, len(images), group):
        if rng.random() >= fraction:
            continue
        members = slice(first, first + group)
        keep = face_keep(rng, batch.masks[members].any(0))
        images[members] *= keep
    return replace(batch, images=images)
