"""Voxel-grid geometry: axis-order and patient-space conventions, token-grid affines, export resampling.

Conventions used across the library:
- arrays are indexed (I, J, K) (channels first when there are channels: (C, I, J, K)), as MONAI does;
  Slicer's ``arrayFromVolume`` gives (K, J, I) (vector volumes (K, J, I, C)): see `kji_to_ijk`.
- a grid's geometry is one (4, 4) float64 ``ijk_to_ras`` matrix mapping a voxel index (i, j, k, 1) to
  the RAS millimetre position of that voxel's centre. Files and DICOM use LPS: see `lps_to_ras`.
"""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import numpy as np

from ..errors import AttentionMapError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def kji_to_ijk(array: np.ndarray) -> np.ndarray:
    """Reverse all axes: (K, J, I) -> (I, J, K), and Slicer's vector (K, J, I, C) -> (C, I, J, K).

    Self-inverse (`ijk_to_kji` is the same function). Returns a view, not a copy.
    """
    return np.asarray(array).transpose()


ijk_to_kji = kji_to_ijk


def lps_to_ras(matrix: np.ndarray) -> np.ndarray:
    """A (4, 4) matrix mapping into LPS mapped into RAS instead (negate the first two output rows).

    Self-inverse, so it also turns an ijk_to_ras matrix into ijk_to_lps.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise AttentionMapError(f"matrix: expected a 4x4 matrix, got shape {m.shape}")
    return _LPS_TO_RAS @ m


def rotation(axis: int, degrees: float) -> np.ndarray:
    """(3, 3) right-handed rotation by `degrees` about array axis 0, 1 or 2 (for oblique test and re-gridded grids)."""
    t = np.deg2rad(degrees)
    i, j = [a for a in range(3) if a != axis]
    m = np.eye(3)
    m[i, i] = m[j, j] = np.cos(t)
    m[i, j], m[j, i] = -np.sin(t), np.sin(t)
    return m


def check_ijk_to_ras(matrix: object, name: str = "ijk_to_ras") -> np.ndarray:
    """Return `matrix` as a (4, 4) float64 array, or raise AttentionMapError if it is not a usable affine.

    Usable: shape (4, 4), finite, last row (0, 0, 0, 1), and a 3x3 part that is far from singular
    (smallest singular value above 1e-6 of the largest, and above 1e-6 mm).
    """
    try:
        m = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise AttentionMapError(f"{name}: expected a 4x4 numeric matrix, got {type(matrix).__name__} ({exc})") from None
    if m.shape != (4, 4):
        raise AttentionMapError(f"{name}: expected a 4x4 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise AttentionMapError(f"{name}: contains NaN or infinite values:\n{m}")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise AttentionMapError(f"{name}: last row must be (0, 0, 0, 1), got {m[3].tolist()}")
    singular = np.linalg.svd(m[:3, :3], compute_uv=False)
    if singular[-1] <= 1e-6 * singular[0] or singular[-1] <= 1e-6:
        raise AttentionMapError(
            f"{name}: degenerate (non-invertible) 3x3 part, singular values {singular.tolist()}; "
            "expected voxel spacings > 0 along three independent directions"
        )
    return m


def voxel_spacing(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Voxel size in mm along I, J, K: the lengths of the matrix's first three columns, shape (3,)."""
    return np.linalg.norm(np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3], axis=0)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points (..., 3) through a (4, 4) matrix; returns float64 (..., 3)."""
    m = np.asarray(matrix, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    return p @ m[:3, :3].T + m[:3, 3]


def ras_to_ijk(ijk_to_ras: np.ndarray, points_ras: np.ndarray) -> np.ndarray:
    """Continuous voxel indices (..., 3) of RAS points (..., 3) on the grid with this ijk_to_ras."""
    return apply_affine(np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64)), points_ras)


def token_grid_affine(
    voxel_ijk_to_ras: np.ndarray, patch_size: Sequence[int], offset_voxels: Sequence[int] = (0, 0, 0)
) -> np.ndarray:
    """ijk_to_ras of a token grid whose token (0, 0, 0) covers voxels offset .. offset + patch - 1.

    Token index t maps to voxel index offset + t * patch + (patch - 1) / 2: the centre of its patch,
    so each token-grid voxel centre is the centre of the patch it summarises. Shape (4, 4), float64.
    """
    p = np.asarray(patch_size, dtype=np.float64)
    token_to_voxel = np.diag([*p, 1.0])
    token_to_voxel[:3, 3] = np.asarray(offset_voxels, dtype=np.float64) + (p - 1.0) / 2.0
    return np.asarray(voxel_ijk_to_ras, dtype=np.float64) @ token_to_voxel


def crop(
    array: np.ndarray, ijk_to_ras: np.ndarray, start: Sequence[int], stop: Sequence[int]
) -> Tuple[np.ndarray, np.ndarray]:
    """Voxels ``start..stop`` (exclusive) of the last three (I, J, K) axes, with the ijk_to_ras that keeps
    every kept voxel at its RAS position (the origin moves to voxel ``start``). Returns a copy."""
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    moved = np.array(ijk_to_ras, dtype=np.float64)
    moved[:3, 3] = apply_affine(moved, np.asarray(start, dtype=np.float64))
    return np.array(array[(Ellipsis,) + box]), moved


def peak_index(grid: np.ndarray) -> Tuple[int, int, int]:
    """(i, j, k) of the largest value of a 3D grid (first one in C order on ties)."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(grid)), grid.shape))


def grid_to_grid(source_ijk_to_ras: np.ndarray, target_ijk_to_ras: np.ndarray) -> np.ndarray:
    """(4, 4) float64 matrix mapping a target voxel index to the continuous index of the source grid at the
    same RAS point (both matrices checked with `check_ijk_to_ras`)."""
    return np.linalg.inv(check_ijk_to_ras(source_ijk_to_ras, "grid ijk_to_ras")) @ check_ijk_to_ras(
        target_ijk_to_ras, "target ijk_to_ras"
    )


def source_index_slabs(
    target_to_source: np.ndarray, shape_ijk: Sequence[int], max_points: int, dtype: type = np.float64
) -> Iterator[Tuple[slice, np.ndarray]]:
    """The target grid `shape_ijk` (I, J, K) in slabs along K of at most `max_points` voxels (at least one
    K plane): (slice of K, source indices (3, I, J, k) of `dtype`), row a of the second the source index
    along source axis a of every target voxel of the slab, through `target_to_source` (`grid_to_grid`)."""
    m = np.asarray(target_to_source, dtype=np.float64)
    ni, nj, nk = (int(s) for s in shape_ijk)
    steps, origin = m[:3, :3].astype(dtype), m[:3, 3].astype(dtype)
    in_plane = (np.arange(ni, dtype=dtype)[None, :, None, None] * steps[:, 0, None, None, None]
                + np.arange(nj, dtype=dtype)[None, None, :, None] * steps[:, 1, None, None, None]
                + origin[:, None, None, None])  # (3, I, J, 1)
    slab = max(1, int(max_points) // (ni * nj))
    for k0 in range(0, nk, slab):
        ks = np.arange(k0, min(k0 + slab, nk), dtype=dtype)
        yield slice(k0, k0 + len(ks)), in_plane + ks[None, None, None, :] * steps[:, 2, None, None, None]


def resample_grid(
    grid: np.ndarray,
    grid_ijk_to_ras: np.ndarray,
    shape_ijk: Sequence[int],
    target_ijk_to_ras: np.ndarray,
    max_points: int = 4_000_000,
) -> np.ndarray:
    """Trilinear resampling of a 3D grid (I, J, K) onto another voxel grid (numpy only: no torch in the GUI process).

    Inside the grid's box (voxel centres +- half a voxel) values are interpolated between voxel
    centres and held constant in the outer half voxel; outside the box the result is 0. The target
    is processed in slabs along its K axis of at most `max_points` voxels, so memory stays bounded.
    Returns float32 of shape `shape_ijk`.
    """
    source = np.ascontiguousarray(grid, dtype=np.float32)
    if source.ndim != 3:
        raise AttentionMapError(f"grid: expected a 3D array (I, J, K), got shape {source.shape}")
    shape = tuple(int(s) for s in shape_ijk)
    if len(shape) != 3 or min(shape) < 1:
        raise AttentionMapError(f"shape_ijk: expected three positive sizes, got {tuple(shape_ijk)}")
    target_to_source = grid_to_grid(grid_ijk_to_ras, target_ijk_to_ras)
    out = np.empty(shape, dtype=np.float32)
    for ks, index in source_index_slabs(target_to_source, shape, max_points, np.float64):
        out[:, :, ks] = _trilinear(source, index)
    return out


def _trilinear(source: np.ndarray, index: np.ndarray) -> np.ndarray:
    """float32 (I, J, k): `source` (n1, n2, n3) at continuous indices `index` (3, I, J, k) (overwritten):
    trilinear between voxel centres, the nearest rim value in the outer half voxel, 0 beyond it."""
    n = source.shape
    strides = (n[1] * n[2], n[2], 1)
    flat = source.ravel()
    inside = np.ones(index.shape[1:], dtype=bool)
    base = np.zeros(index.shape[1:], dtype=np.intp)
    weights = []
    for a in range(3):
        position = index[a]
        inside &= (position >= -0.5) & (position <= n[a] - 0.5)
        np.clip(position, 0.0, n[a] - 1, out=position)
        low = np.minimum(np.floor(position), max(n[a] - 2, 0))
        weights.append((position - low).astype(np.float32))  # weight of the upper neighbour, 0..1
        base += low.astype(np.intp) * strides[a]
    upper = [strides[a] if n[a] > 1 else 0 for a in range(3)]  # a one-voxel axis has no upper neighbour

    def along_k(offset: int) -> np.ndarray:
        low = flat.take(base + offset if offset else base)
        return low + weights[2] * (flat.take(base + (offset + upper[2])) - low)

    def along_jk(offset: int) -> np.ndarray:
        low = along_k(offset)
        return low + weights[1] * (along_k(offset + upper[1]) - low)

    low = along_jk(0)
    value = low + weights[0] * (along_jk(upper[0]) - low)
    return np.where(inside, value, np.float32(0))
