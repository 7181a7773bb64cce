"""Overlay pictures: axial, coronal and sagittal slices through the attention peak, one PNG per case
and a montage (one row per case) with one shared colour scale.

Slices are taken after reorienting the volume to the nearest RAS axes (nibabel `io_orientation`; an
oblique volume is shown along its closest axes) and drawn in millimetres in radiological convention:
patient right on the left of axial and coronal views, anterior on the left of sagittal views,
anterior / superior up. Matplotlib is used through its object API (no pyplot, no global backend).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import AttentionMapError

LUNG_WINDOW = (-1350.0, 150.0)  # width 1500, level -600 HU: lung parenchyma and nodules
COLORMAP = "inferno"
MAX_ALPHA = 0.65  # opacity of the highest attention; the bottom quarter of the scale is fully transparent
# (horizontal axis, vertical axis, slice axis) in RAS-reoriented voxel indices; horizontal is drawn inverted.
# horizontal < vertical, so a slice array is indexed (horizontal, vertical).
VIEWS = (("axial", 0, 1, 2), ("coronal", 0, 2, 1), ("sagittal", 1, 2, 0))


@dataclass
class OverlayCase:
    """One case to draw. volume, attention and label share one voxel grid (I, J, K) with ijk_to_ras."""

    name: str
    volume: np.ndarray
    attention: np.ndarray
    ijk_to_ras: np.ndarray
    peak_ras: Sequence[float]
    title: str
    label: Optional[np.ndarray] = None


def intensity_window(volume: np.ndarray) -> Tuple[float, float]:
    """Display range: the lung window for CT in HU (1st percentile below -500), else the 1st..99th percentile."""
    low, high = np.percentile(volume, (1.0, 99.0))
    if low < -500.0:
        return LUNG_WINDOW
    return (float(low), float(high) if high > low else float(low) + 1.0)


def shared_scale(attention_maps: Sequence[np.ndarray]) -> Tuple[float, float]:
    """One colour scale / display window (lowest, highest value) for several maps: their joint min and max
    (a constant value v gives (v, v + 1)). Used by the overlays and by the Slicer module's multi-case view."""
    return joint_range([(float(np.min(a)), float(np.max(a))) for a in attention_maps])


def joint_range(ranges: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """The scale of `shared_scale` from each map's (lowest, highest) value: two numbers per map are enough."""
    if not ranges:
        raise AttentionMapError("multi-case: expected at least one attention map")
    low = min(r[0] for r in ranges)
    high = max(r[1] for r in ranges)
    return low, high if high > low else low + 1.0


@dataclass(frozen=True)
class ViewPlane:
    """One view through the peak, on the nearest-RAS axes: image, heat and label are (horizontal, vertical)."""

    view: str
    slice_index: int
    image: np.ndarray
    heat: np.ndarray
    label: Optional[np.ndarray]
    spacing_mm: Tuple[float, float]
    peak: Tuple[int, int]


@dataclass(frozen=True)
class OverlaySlices:
    """What one case's picture needs and nothing more: its three planes (a few MB for a whole CT), the display
    window, and the whole map's (lowest, highest) value for a shared colour scale. Lets `attention-map run` free
    each case's volumes once its maps are written."""

    name: str
    title: str
    window: Tuple[float, float]
    value_range: Tuple[float, float]
    planes: Tuple[ViewPlane, ...]


def overlay_slices(case: OverlayCase) -> OverlaySlices:
    """The three planes of `case` through its peak (see the module docstring for the orientation)."""
    from .core.geometry import ras_to_ijk, voxel_spacing

    volume, attention, label, affine = _reorient(case)
    spacing = voxel_spacing(affine)
    peak = np.clip(np.rint(ras_to_ijk(affine, case.peak_ras)).astype(int), 0, np.array(volume.shape) - 1)
    planes = []
    for view, h, v, s in VIEWS:
        index = [slice(None)] * 3
        index[s] = int(peak[s])
        at = tuple(index)
        planes.append(ViewPlane(view, int(peak[s]), np.array(volume[at]), np.array(attention[at]),
                                None if label is None else np.array(label[at]),
                                (float(spacing[h]), float(spacing[v])), (int(peak[h]), int(peak[v]))))
    value_range = (float(np.min(case.attention)), float(np.max(case.attention)))
    return OverlaySlices(case.name, case.title, intensity_window(volume), value_range, tuple(planes))


def _as_slices(case: Union[OverlayCase, OverlaySlices]) -> OverlaySlices:
    return case if isinstance(case, OverlaySlices) else overlay_slices(case)


def write_overlay(path: Path, case: Union[OverlayCase, OverlaySlices],
                  scale: Optional[Tuple[float, float]] = None) -> Path:
    """PNG with the three views of one case; scale defaults to the map's own range."""
    return write_montage(path, [case], scale)


def write_montage(path: Path, cases: Sequence[Union[OverlayCase, OverlaySlices]],
                  scale: Optional[Tuple[float, float]] = None) -> Path:
    """PNG with one row of three views per case, all on one colour scale (default: the joint range)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    rows = [_as_slices(c) for c in cases]
    low, high = scale if scale is not None else joint_range([r.value_range for r in rows])
    norm = Normalize(vmin=low, vmax=high)
    figure = Figure(figsize=(13.0, 4.6 * len(rows)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), 3, squeeze=False)
    for row_axes, row in zip(axes, rows):
        draw_case(row_axes, row, norm)
    figure.colorbar(ScalarMappable(norm=norm, cmap=COLORMAP), ax=axes.ravel().tolist(), fraction=0.025,
                    pad=0.02, label="attention")
    path = Path(path)
    figure.savefig(str(path), dpi=100)
    return path


def _reorient(case: OverlayCase) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], np.ndarray]:
    """Volume, attention, label on the nearest-RAS axes, and the new ijk_to_ras."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    volume = case.volume[0] if case.volume.ndim == 4 else case.volume  # first channel of a (C, I, J, K) volume
    orientation = io_orientation(case.ijk_to_ras)
    affine = np.asarray(case.ijk_to_ras, dtype=np.float64) @ inv_ornt_aff(orientation, volume.shape)
    label = None if case.label is None else apply_orientation(case.label, orientation)
    return apply_orientation(volume, orientation), apply_orientation(case.attention, orientation), label, affine


def draw_case(axes, case: OverlaySlices, norm) -> None:
    """Draw the three views of one case into three matplotlib Axes (colours scaled by `norm`)."""
    from matplotlib import colormaps

    cmap = colormaps[COLORMAP]
    for ax, plane in zip(axes, case.planes):
        heat = norm(plane.heat)
        rgba = cmap(np.clip(heat, 0.0, 1.0))
        rgba[..., 3] = MAX_ALPHA * np.clip((np.asarray(heat) - 0.25) / 0.75, 0.0, 1.0)  # low values transparent
        (sh, sv), (ph, pv) = plane.spacing_mm, plane.peak
        extent = (-0.5 * sh, (plane.image.shape[0] - 0.5) * sh, -0.5 * sv, (plane.image.shape[1] - 0.5) * sv)
        ax.imshow(plane.image.T, cmap="gray", vmin=case.window[0], vmax=case.window[1], origin="lower",
                  extent=extent, interpolation="nearest")
        ax.imshow(np.transpose(rgba, (1, 0, 2)), origin="lower", extent=extent, interpolation="nearest")
        if plane.label is not None and np.any(plane.label > 0):
            xs = np.arange(plane.label.shape[0]) * sh
            ys = np.arange(plane.label.shape[1]) * sv
            ax.contour(xs, ys, (plane.label > 0).T.astype(np.float32), levels=[0.5], colors="cyan", linewidths=1.0)
        ax.plot(ph * sh, pv * sv, marker="+", color="lime", markersize=14, mew=2)
        ax.invert_xaxis()
        ax.set_title(f"{plane.view} (slice {plane.slice_index})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel(case.name, fontsize=10)
    axes[1].text(0.5, 1.12, case.title, transform=axes[1].transAxes, ha="center", fontsize=10)


def prediction_title(name: str, method: str, prediction: Optional[Dict[str, Any]]) -> str:
    """e.g. "lung2 - rollout - P(lesion)=0.83 in the window at RAS (-70, 95, -240) mm (highest of 120)"
    from `VolumeAttention.prediction` (None for dense outputs: name and method only; no confident answer: says so).
    """
    if prediction is None:
        return f"{name} - {method}"
    if prediction["probability"] is None:
        return (f"{name} - {method} - no confident P({prediction['class']}): no window like the training windows "
                f"(highest {prediction['highest_probability_unlike_training']:.2f})")
    x, y, z = prediction["window_centre_ras_mm"]
    where = f" in the window at RAS ({x:.0f}, {y:.0f}, {z:.0f}) mm" if prediction["windows"] > 1 else ""
    of = f" (highest of {prediction['windows']})" if prediction["windows"] > 1 else ""
    return f"{name} - {method} - P({prediction['class']})={prediction['probability']:.2f}{where}{of}"
