"""Synthetic lesion families beyond the demo generator (`demo_data.nodule_weight` + `demo_data.insert_nodule`).

The demo generator draws one look: a solid ellipsoid (-300..100 HU) blurred along K like a 5 mm slice. A model
trained on it alone may learn that look rather than "a nodule"; these families vary shape, density and slice
blur. `VARIED` is the training mixture (`tools/train_demo_model --varied-fraction`); `FAMILIES` are reported
by the evaluation, each saying whether `VARIED` draws that kind of lesion (spiculated and Gaussian-profile
lesions never are: they measure generalisation to a generator training never saw).

A family draws a soft occupancy weight (float32 (I, J, K), 0..1, zero farther than MAX_REACH_VOX voxels from
the centre; the nodule mask is weight > 0.5) on the 2 mm grid, then blends a HU level plus Gaussian noise
(sd U(0, 30) HU) into the crop. Every shape stays within the 22 mm reach for radii up to 15 mm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np

from attentionmap_dev.demo_data import (
    AXIS_SCALE,
    MAX_REACH_VOX,
    SPACING_MM,
    blend_lesion,
    ellipsoid_occupancy,
    local_offsets_mm,
    place,
    random_rotation,
    slice_blur,
)

DENSITY_HU: Dict[str, Tuple[float, float]] = {
    "solid": (-300.0, 100.0),
    "ground glass": (-700.0, -400.0),
    "calcified": (200.0, 800.0),
}
SHARP_EDGE_MM = (0.1, 1.5)
NOISE_SD_HU = (0.0, 30.0)
REACH_MM = MAX_REACH_VOX * SPACING_MM
SPIKE_LENGTH = 1.4  # x radius: 21 mm at 15 mm, inside the 22 mm reach
GAUSS_SIGMA = 0.6  # x radius


def _ellipsoid(d: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    axes = radius * rng.uniform(*AXIS_SCALE, size=3)
    return ellipsoid_occupancy(d @ random_rotation(rng), axes, rng.uniform(*SHARP_EDGE_MM))


def _lobulated(d: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """3-5 overlapping spheres of radius x U(0.5, 0.75), centres radius x U(0.2, 0.5) from the centre."""
    w = np.zeros(d.shape[:-1])
    for _ in range(int(rng.integers(3, 6))):
        u = rng.standard_normal(3)
        offset = u / np.linalg.norm(u) * radius * rng.uniform(0.2, 0.5)
        r = radius * rng.uniform(0.5, 0.75)
        w = np.maximum(w, ellipsoid_occupancy(d - offset, np.full(3, r), rng.uniform(*SHARP_EDGE_MM)))
    return w


def _spiculated(d: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A core sphere of 0.8 x radius with 6-12 straight spikes, their half-width tapering from 1.5 mm to 0.5 mm."""
    w = ellipsoid_occupancy(d, np.full(3, 0.8 * radius), rng.uniform(*SHARP_EDGE_MM))
    length = SPIKE_LENGTH * radius
    for _ in range(int(rng.integers(6, 13))):
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        t = d @ u
        perp = np.linalg.norm(d - t[..., None] * u, axis=-1)
        half_width = 1.5 - np.clip(t / length, 0.0, 1.0)
        spike = np.clip(half_width - perp + 0.5, 0.0, 1.0) * ((t > 0) & (t < length))
        w = np.maximum(w, spike)
    return w


def _gaussian(d: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian profile of sd 0.6 x radius (no edge), cut below 0.05 (inside the reach)."""
    w = np.exp(-0.5 * (np.linalg.norm(d, axis=-1) / (GAUSS_SIGMA * radius)) ** 2)
    return np.where(w < 0.05, 0.0, w)


SHAPES = {"ellipsoid": _ellipsoid, "lobulated": _lobulated, "spiculated": _spiculated, "gaussian": _gaussian}


@dataclass(frozen=True)
class LesionFamily:
    """A lesion generator: shapes and densities drawn uniformly from the tuples (repeat a name to weight it),
    blurred along K like a 5 mm slice with probability `slice_blur`. `trained`: `VARIED` draws this kind."""

    name: str
    shapes: Tuple[str, ...]
    densities: Tuple[str, ...]
    slice_blur: float
    trained: bool

    def _shape(self, rng: np.random.Generator):
        """One of `shapes`, drawn uniformly: a function (offsets mm (..., 3), radius mm, rng) -> occupancy (...)."""
        return SHAPES[self.shapes[int(rng.integers(len(self.shapes)))]]

    def weight(self, shape: Sequence[int], centre: Sequence[float], radius_mm: float,
               rng: np.random.Generator) -> np.ndarray:
        """Soft occupancy, float32 `shape` (I, J, K), of one lesion of nominal radius `radius_mm` at `centre`."""
        box, d = local_offsets_mm(shape, centre)
        w = self._shape(rng)(d, radius_mm, rng)
        if rng.random() < self.slice_blur:
            w = slice_blur(w)
        return place(shape, box, w)

    def weight_on_grid(self, shape: Sequence[int], ijk_to_ras: np.ndarray, centre_ras: Sequence[float],
                       radius_mm: float, rng: np.random.Generator) -> np.ndarray:
        """Partial-volume occupancy, float32 `shape` (I, J, K), of one lesion centred at `centre_ras` (mm) on any
        voxel grid (`ijk_to_ras`: oblique, anisotropic): the shape, drawn once, is averaged over sample points at
        most 1 mm apart inside each voxel, so a 5 mm slice averages what it spans (no `slice_blur` here: the
        grid's own slices blur). Zero beyond the reach (MAX_REACH_VOX x 2 mm) of the centre. Cost: the voxels in
        the reach times the sample points per voxel."""
        linear = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        centre_ijk = np.linalg.solve(linear, np.asarray(centre_ras, dtype=np.float64) - ijk_to_ras[:3, 3])
        reach = np.ceil(REACH_MM / spacing).astype(int) + 1
        lo = np.maximum(np.floor(centre_ijk).astype(int) - reach, 0)
        hi = np.minimum(np.floor(centre_ijk).astype(int) + reach + 2, shape)
        if np.any(hi <= lo):
            raise ValueError(f"lesion centre {list(centre_ras)} mm lies outside the grid")
        per_axis = [(np.arange(n) + 0.5) / n - 0.5 for n in np.ceil(spacing).astype(int)]
        sub = np.stack(np.meshgrid(*per_axis, indexing="ij"), -1).reshape(-1, 3)  # voxel-fraction offsets
        voxels = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)  # (i, j, k, 3)
        d = (voxels[..., None, :] + sub - centre_ijk) @ linear.T  # (i, j, k, samples, 3) mm
        w = self._shape(rng)(d, radius_mm, rng).mean(-1)
        w[np.linalg.norm((voxels - centre_ijk) @ linear.T, axis=-1) > REACH_MM] = 0.0
        out = np.zeros(tuple(shape), dtype=np.float32)
        out[tuple(slice(a, b) for a, b in zip(lo, hi))] = w
        return out

    def insert(self, hu: np.ndarray, weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A copy of `hu` with the lesion blended in by `weight`; `hu` is not modified."""
        lo, hi = DENSITY_HU[self.densities[int(rng.integers(len(self.densities)))]]
        return blend_lesion(hu, weight, rng.uniform(lo, hi), rng.uniform(*NOISE_SD_HU), rng)

    def describe(self) -> str:
        counts = {d: self.densities.count(d) for d in dict.fromkeys(self.densities)}
        dens = ", ".join(f"{d} {DENSITY_HU[d][0]:g}..{DENSITY_HU[d][1]:g} HU ({n}/{len(self.densities)})"
                         for d, n in counts.items())
        return (f"{'/'.join(dict.fromkeys(self.shapes))}; {dens}; slice blur p={self.slice_blur:g}; "
                f"noise sd {NOISE_SD_HU[0]:g}-{NOISE_SD_HU[1]:g} HU")


VARIED = LesionFamily(
    "varied (training mixture)", ("ellipsoid", "lobulated"),
    ("solid", "solid", "solid", "solid", "ground glass", "calcified"), 0.5, True,
)
FAMILIES: Tuple[LesionFamily, ...] = (
    LesionFamily("sharp solid ellipsoid", ("ellipsoid",), ("solid",), 0.0, True),
    LesionFamily("lobulated", ("lobulated",), ("solid",), 0.5, True),
    LesionFamily("ground glass", ("ellipsoid",), ("ground glass",), 0.5, True),
    LesionFamily("calcified", ("ellipsoid",), ("calcified",), 0.5, True),
    LesionFamily("spiculated", ("spiculated",), ("solid",), 0.5, False),
    LesionFamily("Gaussian profile", ("gaussian",), ("solid",), 0.5, False),
)
