"""Where to look: a region of the patient that restricts the sliding windows and the map.

Three kinds, all defined in patient space (RAS mm), so re-gridding, flipping or reorienting the input
does not change them:

- `MaskRegion`: a label volume (voxels > 0 inside) on its own voxel grid (any ijk_to_ras); sampled by
  nearest neighbour onto the model-input grid.
- `BoxRegion`: a box given by its RAS centre, its edge lengths (mm) and optionally its axes (3x3, columns
  are the unit directions of the box's edges in RAS; oblique boxes such as a rotated markups ROI).
- `LungFieldRegion`: an automatic lung field: the bounding box, on the model-input grid, of the lungs
  (`find_lungs`: air below `hu_threshold` enclosed by the body, in regions of lung density and size),
  widened by `margin_mm`. It is computed on the preprocessed volume (after orientation and spacing), never
  from voxel indices of the input. A scan without lungs is refused (`NoLungsFound`).

`region_mask` turns a region into a boolean mask on a voxel grid (C order (I, J, K) of that grid).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from ..errors import AttentionMapError
from .geometry import apply_affine, check_ijk_to_ras, grid_to_grid, source_index_slabs, voxel_spacing

MIN_SLICE_COMPONENT_MM2 = 400.0  # enclosed air pockets smaller than 4 cm^2 in a slice are not lung
# Lung parenchyma is air with tissue and vessels in it: the median of a lung's air region lies near -850 HU
# (-820..-870 in the project's chest CTs, down to about -930 with emphysema). Gas in the stomach or bowel, the
# airways, the sinuses or outside the body is air alone (its median near -1000 HU even with 5 mm slices).
LUNG_MEDIAN_HU = (-950.0, -500.0)
MIN_LUNG_ML = 100.0  # the largest lung region of a chest CT (one lung, or the part of it the scan holds)


class NoLungsFound(AttentionMapError):
    """The automatic lung field found no lungs: the input is not a chest CT in Hounsfield units."""


@dataclass(frozen=True)
class MaskRegion:
    """Voxels of `mask` (any numeric (I, J, K) array, > 0 inside) placed by `ijk_to_ras` (4, 4)."""

    mask: np.ndarray
    ijk_to_ras: np.ndarray
    name: str = "mask"

    def describe(self) -> str:
        return f"{self.name} (label volume {'x'.join(map(str, np.shape(self.mask)))}, nearest-neighbour)"


@dataclass(frozen=True)
class BoxRegion:
    """A box: centre (3,) RAS mm, size (3,) mm along its axes, axes (3, 3) unit columns in RAS (default identity)."""

    centre_ras: Sequence[float]
    size_mm: Sequence[float]
    axes: Optional[np.ndarray] = None
    name: str = "box"

    def describe(self) -> str:
        centre = ", ".join(f"{v:.1f}" for v in self.centre_ras)
        size = " x ".join(f"{v:.1f}" for v in self.size_mm)
        oblique = "" if self.axes is None or np.allclose(self.axes, np.eye(3)) else ", oblique"
        return f"{self.name} (RAS centre ({centre}) mm, size {size} mm{oblique})"


@dataclass(frozen=True)
class LungFieldRegion:
    """Automatic lung field (see the module docstring); needs an intensity range (HU) section in the card."""

    hu_threshold: float = -400.0
    margin_mm: float = 16.0

    def describe(self) -> str:
        return (f"automatic lung field (the lungs: air below {self.hu_threshold:g} HU enclosed by the body, of lung "
                f"density; bounding box widened by {self.margin_mm:g} mm)")


Region = Union[MaskRegion, BoxRegion, LungFieldRegion]


def enclosed_air(air: np.ndarray, min_component_voxels: int = 100, keep_fraction: float = 0.1) -> np.ndarray:
    """Enclosed air of a volume: bool (I, J, K) from `air` (bool (I, J, K), K the axial direction).

    Per axial (K) slice: air components that do not touch the slice border and hold at least
    `min_component_voxels`; then the 3D components of at least `keep_fraction` of the largest one (0.1 drops
    the trachea and small gas pockets of a chest CT). Per slice because a field of view that cuts the body
    would make a 3D "not touching the border" test remove the lungs. Density is not looked at: `find_lungs`.
    """
    import SimpleITK as sitk

    mask = np.zeros_like(air, dtype=bool)
    for k in range(air.shape[2]):
        labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(air[:, :, k].astype(np.uint8))))
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        keep = np.bincount(labels.ravel()) >= min_component_voxels
        keep[border] = False
        keep[0] = False
        mask[:, :, k] = keep[labels]
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    if counts.max() == 0:
        return mask
    keep = counts >= keep_fraction * counts.max()
    keep[0] = False
    return keep[labels]


def sample_nearest(values: np.ndarray, values_ijk_to_ras: np.ndarray, shape: Sequence[int],
                   ijk_to_ras: np.ndarray, max_points: int = 4_000_000) -> np.ndarray:
    """`values` (I, J, K) > 0 sampled by nearest neighbour at the voxel centres of another grid.

    Returns bool `shape`: True where the nearest voxel of `values` is inside its grid and > 0 (`nearest_values`).
    """
    return nearest_values(np.asarray(values) > 0, values_ijk_to_ras, shape, ijk_to_ras, max_points)


def nearest_values(values: np.ndarray, values_ijk_to_ras: np.ndarray, shape: Sequence[int],
                   ijk_to_ras: np.ndarray, max_points: int = 4_000_000) -> np.ndarray:
    """`values` (I, J, K) sampled by nearest neighbour at the voxel centres of another grid (`shape`, its
    `ijk_to_ras`): values' dtype, 0 where the nearest voxel is outside `values`' grid. The target is processed in
    slabs of at most `max_points` voxels (`geometry.source_index_slabs`)."""
    values = np.asarray(values)
    n = values.shape
    flat = values.ravel()
    strides = (n[1] * n[2], n[2], 1)
    out = np.empty(tuple(int(s) for s in shape), dtype=values.dtype)
    for ks, index in source_index_slabs(grid_to_grid(values_ijk_to_ras, ijk_to_ras), out.shape, max_points):
        inside = np.ones(index.shape[1:], dtype=bool)
        nearest_flat = np.zeros(index.shape[1:], dtype=np.intp)
        for a in range(3):
            nearest = np.floor(index[a] + 0.5)
            inside &= (nearest >= 0) & (nearest < n[a])
            nearest_flat += np.clip(nearest, 0, n[a] - 1).astype(np.intp) * strides[a]
        out[:, :, ks] = np.where(inside, flat.take(nearest_flat), 0)
    return out


def _box_mask(box: BoxRegion, shape: Sequence[int], ijk_to_ras: np.ndarray) -> np.ndarray:
    centre = np.asarray(box.centre_ras, dtype=np.float64)
    size = np.asarray(box.size_mm, dtype=np.float64)
    axes = np.eye(3) if box.axes is None else np.asarray(box.axes, dtype=np.float64)
    index = np.indices(tuple(shape), dtype=np.float64).reshape(3, -1).T
    local = (apply_affine(ijk_to_ras, index) - centre) @ axes  # coordinates along the box's axes
    return np.all(np.abs(local) <= size / 2.0, axis=1).reshape(tuple(shape))


def find_lungs(hu: np.ndarray, spacing_mm: Sequence[float], hu_threshold: float = -400.0) -> np.ndarray:
    """The lungs of a CT: bool (I, J, K) from `hu` (I, J, K) in Hounsfield units, K the axial direction.

    Candidates are the air (< `hu_threshold`) enclosed by the body, per axial slice (`enclosed_air`'s slice rule,
    pockets of at least 4 cm^2); of their 3D components, those whose median lies in LUNG_MEDIAN_HU (lung
    density: gas of the bowel, stomach, airways and sinuses is left out) and that hold at least 10 % of the
    largest such component (the trachea's walls and small pockets are left out). Raises NoLungsFound when
    the largest lung region is under MIN_LUNG_ML. O(voxels).
    """
    import SimpleITK as sitk

    spacing = np.asarray(spacing_mm, dtype=np.float64)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pocket = max(1, int(round(MIN_SLICE_COMPONENT_MM2 / (spacing[0] * spacing[1]))))
    candidates = enclosed_air(hu < hu_threshold, pocket, keep_fraction=0.0)
    labels = sitk.ConnectedComponent(sitk.GetImageFromArray(candidates.astype(np.uint8)))
    statistics = sitk.LabelIntensityStatisticsImageFilter()
    statistics.Execute(labels, sitk.GetImageFromArray(np.asarray(hu, dtype=np.float32)))
    low, high = LUNG_MEDIAN_HU
    sizes = {int(c): statistics.GetNumberOfPixels(c) for c in statistics.GetLabels()
             if low <= statistics.GetMedian(c) <= high}
    largest = max(sizes.values(), default=0)
    if largest * voxel_ml < MIN_LUNG_ML:
        found = "no enclosed air" if not statistics.GetLabels() else (
            f"the largest air region of lung density holds {largest * voxel_ml:.0f} mL" if sizes else
            "the air enclosed by the body is gas (median below "
            f"{low:g} HU), not lung")
        raise NoLungsFound(f"region: no lungs found ({found}; a lung region of at least {MIN_LUNG_ML:g} mL with a "
                           f"median between {low:g} and {high:g} HU is expected): the model expects a chest CT in "
                           "Hounsfield units. Give the region by hand (an ROI or a mask) or switch the default "
                           "region off, knowing that the model was not made for this scan")
    keep = np.zeros(int(sitk.GetArrayViewFromImage(labels).max()) + 1, dtype=bool)
    keep[[c for c, n in sizes.items() if n >= 0.1 * largest]] = True
    return keep[sitk.GetArrayFromImage(labels)]


def hu_from_model_input(image: np.ndarray, intensity: Optional[Mapping[str, Any]], what: str) -> np.ndarray:
    """Hounsfield units of the model input `image` (any shape): the card's intensity scaling undone (values it
    clipped stay clipped). `what` names the feature needing it in the error when the card maps no HU range."""
    if not intensity or "a_min" not in intensity:
        raise AttentionMapError(f"{what}: needs a card whose preprocessing.intensity maps a HU range (a_min, a_max, "
                                "b_min, b_max)")
    a_min, a_max, b_min, b_max = (float(intensity[k]) for k in ("a_min", "a_max", "b_min", "b_max"))
    return a_min + (image - b_min) / (b_max - b_min) * (a_max - a_min)


def _lung_field_mask(region: LungFieldRegion, image: np.ndarray, ijk_to_ras: np.ndarray,
                     intensity: Optional[Mapping[str, Any]]) -> np.ndarray:
    if not intensity or "a_min" not in intensity:
        raise AttentionMapError("region: the automatic lung field needs a card whose preprocessing.intensity maps a "
                                "HU range (a_min, a_max, b_min, b_max); give --roi or --mask instead")
    hu = hu_from_model_input(image, intensity, "region")
    spacing = voxel_spacing(ijk_to_ras)
    voxels = np.argwhere(find_lungs(hu, spacing, region.hu_threshold))
    margin = np.ceil(region.margin_mm / spacing).astype(int)
    start = np.maximum(voxels.min(axis=0) - margin, 0)
    stop = np.minimum(voxels.max(axis=0) + 1 + margin, image.shape)
    mask = np.zeros(image.shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    return mask


def region_mask(region: Region, image: np.ndarray, ijk_to_ras: np.ndarray,
                intensity: Optional[Mapping[str, Any]] = None) -> np.ndarray:
    """bool (I, J, K) mask of `region` on the grid of `image` (the preprocessed model input, (I, J, K)).

    ijk_to_ras (4, 4): that grid's geometry. intensity: the card's preprocessing.intensity (for the lung field).
    """
    shape = np.shape(image)
    if isinstance(region, MaskRegion):
        return sample_nearest(
            region.mask, check_ijk_to_ras(region.ijk_to_ras, "region mask ijk_to_ras"), shape, ijk_to_ras
        )
    if isinstance(region, BoxRegion):
        return _box_mask(region, shape, ijk_to_ras)
    if isinstance(region, LungFieldRegion):
        return _lung_field_mask(region, np.asarray(image), ijk_to_ras, intensity)
    raise AttentionMapError(f"region: expected a MaskRegion, BoxRegion or LungFieldRegion, got {type(region).__name__}")


def box_region(centre_ras: Sequence[float], size_mm: Sequence[float], axes: Optional[Any] = None,
               name: str = "box") -> BoxRegion:
    """A checked BoxRegion: finite centre, positive sizes, axes orthonormal (AttentionMapError otherwise)."""
    centre = np.asarray(centre_ras, dtype=np.float64)
    size = np.asarray(size_mm, dtype=np.float64)
    if centre.shape != (3,) or not np.all(np.isfinite(centre)):
        raise AttentionMapError(f"{name}: expected a centre of three finite RAS coordinates (mm), got {centre_ras!r}")
    if size.shape != (3,) or not np.all(np.isfinite(size)) or np.any(size <= 0):
        raise AttentionMapError(f"{name}: expected three positive sizes (mm), got {size_mm!r}")
    matrix = None
    if axes is not None:
        matrix = np.asarray(axes, dtype=np.float64)
        if matrix.shape != (3, 3) or not np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-4):
            raise AttentionMapError(f"{name}: expected 3x3 orthonormal axes (columns in RAS), got {axes!r}")
    return BoxRegion(tuple(centre.tolist()), tuple(size.tolist()), matrix, name)


def card_default_region(card: Optional[Mapping[str, Any]], source: str = "model card") -> Optional[Region]:
    """The region a card names in ``"default_region"`` (``{"kind": "lung_field", "hu_threshold": ..,
    "margin_mm": ..}``), or None when it names none."""
    section = (card or {}).get("default_region")
    if section is None:
        return None
    if not isinstance(section, Mapping) or section.get("kind") != "lung_field":
        raise AttentionMapError(f'{source}: default_region: expected {{"kind": "lung_field", ...}}, got {section!r}')
    unknown = sorted(set(section) - {"kind", "hu_threshold", "margin_mm"})
    if unknown:
        raise AttentionMapError(f"{source}: default_region: unknown key(s) {unknown}")
    values: Dict[str, float] = {}
    for key in ("hu_threshold", "margin_mm"):
        if key in section:
            value = section[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise AttentionMapError(f"{source}: default_region.{key}: expected a number, got {value!r}")
            values[key] = float(value)
    if values.get("margin_mm", 0.0) < 0:
        raise AttentionMapError(
            f"{source}: default_region.margin_mm: expected a number >= 0, got {values['margin_mm']}"
        )
    return LungFieldRegion(**values)


def region_from_spec(spec: Any, card: Optional[Mapping[str, Any]], source: str = "model card") -> Optional[Region]:
    """A region from plain data (what the Slicer module sends to its worker process).

    None or "default": the card's default region (None if it names none); "none": no region;
    {"kind": "box", "centre_ras", "size_mm", "axes" (3x3 columns, optional), "name"};
    {"kind": "mask", "mask" (array (I, J, K)), "ijk_to_ras" (4, 4), "name"}.
    """
    if spec is None or spec == "default":
        return card_default_region(card, source)
    if spec == "none":
        return None
    kind = spec.get("kind") if isinstance(spec, Mapping) else None
    if kind == "box":
        return box_region(spec["centre_ras"], spec["size_mm"], spec.get("axes"), spec.get("name", "ROI"))
    if kind == "mask":
        mask = np.asarray(spec["mask"])
        if mask.ndim != 3 or not np.any(mask > 0):
            raise AttentionMapError(f"{spec.get('name', 'mask')}: expected a non-empty 3D mask, got shape {mask.shape}")
        return MaskRegion(
            mask, check_ijk_to_ras(spec["ijk_to_ras"], "region mask ijk_to_ras"), spec.get("name", "mask")
        )
    raise AttentionMapError(f"region: expected 'default', 'none', a box or a mask, got {spec!r}")


def token_mask(voxel_mask: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """bool token grid (I/p1, J/p2, K/p3): does the token's patch hold a voxel of `voxel_mask` (I, J, K)?"""
    n = [s // p for s, p in zip(voxel_mask.shape, patch)]
    blocks = voxel_mask[: n[0] * patch[0], : n[1] * patch[1], : n[2] * patch[2]]
    return blocks.reshape(n[0], patch[0], n[1], patch[1], n[2], patch[2]).any(axis=(1, 3, 5))


@dataclass(frozen=True)
class AppliedRegion:
    """A region as applied to one model input.

    description: what the region is; name: a short name ("lung field", "ROI", a file name); voxels: bool (I, J, K)
    on the model-input grid with `ijk_to_ras`;
    windows_run / windows_skipped: windows meeting / not meeting it; tokens: bool token grid inside.
    The map is 0 on tokens outside and, resampled onto another grid, 0 at voxels outside.
    """

    description: str
    name: str
    voxels: np.ndarray
    ijk_to_ras: np.ndarray
    tokens: np.ndarray
    windows_run: int
    windows_skipped: int

    def on_grid(self, shape: Sequence[int], ijk_to_ras: np.ndarray) -> np.ndarray:
        """bool `shape`: the region sampled (nearest neighbour) at the voxel centres of another grid."""
        return sample_nearest(self.voxels, self.ijk_to_ras, shape, ijk_to_ras)

    def summary(self) -> Dict[str, Any]:
        """JSON-ready description for summary files."""
        return {"name": self.name, "description": self.description, "windows_run": self.windows_run,
                "windows_skipped": self.windows_skipped, "tokens_inside": int(self.tokens.sum()),
                "map_outside_region": 0.0}

