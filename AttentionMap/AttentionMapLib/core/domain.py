"""The inputs a model was made for, as its card states them, and how far an input is from them.

A card may carry a ``"domain"`` section (the demo card's, written by ``tools/fit_domain.py``)::

    "domain": {
        "kind": "lung_content",
        "min_lung_fraction": 0.03,      # the least lung any training nodule crop held
        "hu_threshold": -400.0,         # air below it, in lung regions (`region.find_lungs`), is lung
        "training": {                   # facts about the training scans, for the input statement
            "lung_volume_ml": [2809.0, 3840.0],
            "field_of_view_mm": [[292.0, 321.0], [292.0, 321.0], [240.0, 305.0]],   # R, A, S extents
            "intensity_hu_p1_p99": [-1024.0, 375.0]
        },
        "fitted_on": "..."
    }

Per window (on the model-input grid): the fraction of its voxels inside the input's lungs. A window holding
less than ``min_lung_fraction`` is unlike every window the model learnt to call a lesion in: its probability
is not a confident answer, and the volume-level prediction comes from the other windows (none: no confident
answer). Per input: its lung volume, field of view and intensity range beside the training scans'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import AttentionMapError
from .geometry import voxel_spacing


@dataclass(frozen=True)
class Domain:
    """A card's domain section, checked (see the module docstring)."""

    min_lung_fraction: float
    hu_threshold: float
    lung_volume_ml: Tuple[float, float]
    field_of_view_mm: Tuple[Tuple[float, float], ...]
    intensity_hu_p1_p99: Tuple[float, float]


def _number_pair(value: Any, name: str, source: str) -> Tuple[float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) for v in value)
            or value[0] > value[1]):
        raise AttentionMapError(f"{source}: domain.{name}: expected [low, high], two finite numbers, got {value!r}")
    return float(value[0]), float(value[1])


def card_domain(card: Optional[Mapping[str, Any]], source: str = "model card") -> Optional[Domain]:
    """The card's domain section (None when it has none); AttentionMapError naming the field otherwise."""
    section = (card or {}).get("domain")
    if section is None:
        return None
    if not isinstance(section, Mapping) or section.get("kind") != "lung_content":
        raise AttentionMapError(f'{source}: domain: expected {{"kind": "lung_content", ...}}, got {section!r}'[:300])
    unknown = sorted(set(section) - {"kind", "min_lung_fraction", "hu_threshold", "training", "fitted_on"})
    if unknown:
        raise AttentionMapError(f"{source}: domain: unknown key(s) {unknown}")
    fraction = section.get("min_lung_fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise AttentionMapError(f"{source}: domain.min_lung_fraction: expected a number in [0, 1], got {fraction!r}")
    threshold = section.get("hu_threshold", -400.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
        raise AttentionMapError(f"{source}: domain.hu_threshold: expected a number (HU), got {threshold!r}")
    training = section.get("training")
    if not isinstance(training, Mapping):
        raise AttentionMapError(f"{source}: domain.training: expected an object, got {training!r}"[:300])
    fov = training.get("field_of_view_mm")
    if not isinstance(fov, (list, tuple)) or len(fov) != 3:
        raise AttentionMapError(f"{source}: domain.training.field_of_view_mm: expected three [low, high] pairs "
                                f"(R, A, S), got {fov!r}"[:300])
    return Domain(
        min_lung_fraction=float(fraction),
        hu_threshold=float(threshold),
        lung_volume_ml=_number_pair(training.get("lung_volume_ml"), "training.lung_volume_ml", source),
        field_of_view_mm=tuple(_number_pair(v, "training.field_of_view_mm", source) for v in fov),
        intensity_hu_p1_p99=_number_pair(training.get("intensity_hu_p1_p99"), "training.intensity_hu_p1_p99",
                                         source),
    )


def field_of_view_mm(shape: Sequence[int], ijk_to_ras: np.ndarray) -> np.ndarray:
    """Extent (3,) in mm of a voxel grid along R, A and S: its bounding box in patient space (voxel faces)."""
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    return np.abs(matrix) @ np.asarray(shape, dtype=np.float64)


def lung_fractions(lungs: np.ndarray, starts: np.ndarray, window: Sequence[int]) -> np.ndarray:
    """(W,) fraction of each window's voxels in `lungs` (bool (I, J, K)); starts (W, 3) voxel indices. O(voxels)
    through a summed-volume table, whatever the overlap."""
    table = np.zeros(tuple(s + 1 for s in lungs.shape), dtype=np.int64)
    table[1:, 1:, 1:] = lungs.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
    lo = np.asarray(starts, dtype=int).reshape(-1, 3)
    hi = lo + np.asarray(window, dtype=int)
    total = np.zeros(len(lo), dtype=np.int64)
    for corner in np.ndindex(2, 2, 2):
        index = tuple(np.where(np.array(corner)[a] == 1, hi[:, a], lo[:, a]) for a in range(3))
        total += (-1) ** (3 - sum(corner)) * table[index]
    return total / float(np.prod(window))


@dataclass(frozen=True)
class DomainCheck:
    """How one input compares with the card's domain.

    window_lung_fraction: (W,) per window run; eligible: (W,) bool, windows holding at least min_lung_fraction
    of lung; report: JSON-ready statement (lungs, field of view and intensities beside the training scans').
    """

    window_lung_fraction: np.ndarray
    eligible: np.ndarray
    report: Dict[str, Any]


def check_domain(domain: Domain, hu: np.ndarray, ijk_to_ras: np.ndarray, input_shape: Sequence[int],
                 input_ijk_to_ras: np.ndarray, input_values: np.ndarray, starts: np.ndarray,
                 window: Sequence[int]) -> DomainCheck:
    """Compare an input with `domain`.

    hu: (I, J, K) the model input in HU (the card's intensity scaling undone; clipped) with `ijk_to_ras`;
    input_shape / input_ijk_to_ras: the user's volume's grid; input_values: its voxels (any shape, for the
    intensity range); starts (W, 3): the windows run, on the model-input grid; window: their size.
    """
    from .region import MIN_LUNG_ML, NoLungsFound, find_lungs

    try:
        lungs = find_lungs(hu, voxel_spacing(ijk_to_ras), domain.hu_threshold)
    except NoLungsFound:
        lungs = np.zeros(np.shape(hu), dtype=bool)
    fractions = lung_fractions(lungs, starts, window)
    eligible = fractions >= domain.min_lung_fraction
    lungs_ml = float(lungs.sum() * np.prod(voxel_spacing(ijk_to_ras)) / 1000.0)
    fov = field_of_view_mm(input_shape, input_ijk_to_ras)
    values = np.asarray(input_values, dtype=np.float64).ravel()
    p1, p99 = (float(v) for v in np.percentile(values[np.isfinite(values)], (1.0, 99.0)))
    unlike = []
    low, high = domain.lung_volume_ml
    if not lungs.any():
        unlike.append(f"no lungs (no air region of lung density of {MIN_LUNG_ML:g} mL or more; training scans: "
                      f"{low:.0f}-{high:.0f} mL of lung)")
    elif lungs_ml < 0.5 * low:
        unlike.append(f"lungs {lungs_ml:.0f} mL (training scans: {low:.0f}-{high:.0f} mL)")
    far = [f"{axis} {v:.0f} mm" for axis, v, (a, b) in zip("RAS", fov, domain.field_of_view_mm)
           if v < 0.5 * a or v > 2.0 * b]
    if far:
        ranges = " x ".join(f"{a:.0f}-{b:.0f}" for a, b in domain.field_of_view_mm)
        unlike.append(f"field of view {', '.join(far)} (training scans: {ranges} mm)")
    t1, t99 = domain.intensity_hu_p1_p99
    span = t99 - t1
    if abs(p1 - t1) > 0.25 * span or abs(p99 - t99) > 0.25 * span:
        unlike.append(f"intensities {p1:.0f}..{p99:.0f} at the 1st..99th percentile (training scans: "
                      f"{t1:.0f}..{t99:.0f} HU)")
    report = {
        "lungs_ml": lungs_ml,
        "field_of_view_mm": [float(v) for v in fov],
        "intensity_p1_p99": [p1, p99],
        "training": {"lung_volume_ml": list(domain.lung_volume_ml),
                     "field_of_view_mm": [list(r) for r in domain.field_of_view_mm],
                     "intensity_hu_p1_p99": list(domain.intensity_hu_p1_p99)},
        "min_lung_fraction": domain.min_lung_fraction,
        "windows_with_lung": int(eligible.sum()),
        "windows": int(len(eligible)),
        "unlike_training": unlike,
        "summary": ("like the training scans" if not unlike else "unlike the training scans: " + "; ".join(unlike)),
    }
    return DomainCheck(fractions, eligible, report)
