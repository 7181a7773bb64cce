"""Synthetic volumes with a bright cube at a known RAS point, for the geometry oracle tests and
benchmarks/geometry_errors.py: LPS-stored axes, oblique directions, anisotropic spacing, non-cubic shapes.

Intensities are CT-like (air -1000 HU plus noise, cube +200 HU), so the card's intensity window maps
them to [0, 1]: non-negative, as the oracle ViT needs.
"""
from typing import Any, Dict, NamedTuple, Sequence, Tuple

import numpy as np

from AttentionMapLib.core.geometry import apply_affine, lps_to_ras, ras_to_ijk, rotation, voxel_spacing

CUBE_SIDE_MM = 12.0
MODELS = {"cubic32_p8": ((32, 32, 32), (8, 8, 8)), "noncubic32x48x24_p8": ((32, 48, 24), (8, 8, 8))}
INTENSITY = {"a_min": -1000, "a_max": 1000, "b_min": 0.0, "b_max": 1.0, "clip": True}
POSITIONS = ((0.72, 0.30, 0.62), (0.22, 0.81, 0.35))  # fractions of the volume, asymmetric on purpose


def _ijk_to_ras_from_lps(
    direction_lps: np.ndarray, spacing: Sequence[float], origin_lps: Sequence[float]
) -> np.ndarray:
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction_lps @ np.diag(spacing)
    ijk_to_lps[:3, 3] = origin_lps
    return lps_to_ras(ijk_to_lps)


OBLIQUE = rotation(2, 30.0) @ rotation(0, 20.0)
# name -> (shape IJK, ijk_to_ras); directions as a DICOM/NRRD file would store them (LPS)
CASES: Dict[str, Tuple[Tuple[int, int, int], np.ndarray]] = {
    "lps_axes": ((90, 70, 50), _ijk_to_ras_from_lps(np.eye(3), (1.0, 1.2, 1.5), (-40.0, 60.0, -100.0))),
    "oblique_30_20": ((80, 96, 60), _ijk_to_ras_from_lps(OBLIQUE, (1.1, 0.9, 1.3), (25.0, -30.0, 40.0))),
    "spacing_0.8x0.8x2.5": ((150, 130, 36), _ijk_to_ras_from_lps(np.eye(3), (0.8, 0.8, 2.5), (-60.0, -50.0, 10.0))),
    "shape_200x160x40_oblique": ((200, 160, 40), _ijk_to_ras_from_lps(OBLIQUE, (0.8, 0.8, 2.5), (-80.0, 20.0, -30.0))),
}


class CubeVolume(NamedTuple):
    array: np.ndarray  # float32 (I, J, K), HU
    ijk_to_ras: np.ndarray  # (4, 4)
    centre_ras: np.ndarray  # (3,) centroid of the cube's voxels


def cube_volume(case: str, position: Sequence[float], seed: int = 0) -> CubeVolume:
    """The case's volume with a CUBE_SIDE_MM cube centred near `position` (fractions of each axis)."""
    shape, ijk_to_ras = CASES[case]
    rng = np.random.default_rng(seed)
    array = (-1000.0 + 40.0 * rng.random(shape)).astype(np.float32)
    half = CUBE_SIDE_MM / 2.0 / voxel_spacing(ijk_to_ras)
    centre = np.asarray(position) * (np.asarray(shape) - 1)
    axes = [
        np.arange(max(0, int(np.ceil(c - h))), min(n, int(np.floor(c + h)) + 1)) for c, h, n in zip(centre, half, shape)
    ]
    array[np.ix_(*axes)] = 200.0
    centroid = np.array([a.mean() for a in axes])
    return CubeVolume(array, ijk_to_ras, apply_affine(ijk_to_ras, centroid))


def peak_error(result, centre_ras: np.ndarray) -> Dict[str, Any]:
    """How far the peak of a VolumeAttention lies from the cube centre.

    mm: distance of the peak token's centre from the cube centre; half_diagonal_mm: half the
    token's patch diagonal (the allowed bound); offset: (3,) signed offset of the cube centre from
    the peak token, in patches; patch_fraction: its largest magnitude (0.5 = on the patch border).
    """
    patch_mm = voxel_spacing(result.ijk_to_ras)
    peak = result.peak_ras()
    offset = ras_to_ijk(result.ijk_to_ras, centre_ras) - ras_to_ijk(result.ijk_to_ras, peak)
    return {
        "mm": float(np.linalg.norm(peak - centre_ras)),
        "half_diagonal_mm": float(0.5 * np.linalg.norm(patch_mm)),
        "offset": offset,
        "patch_fraction": float(np.abs(offset).max()),
    }
