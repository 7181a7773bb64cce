"""Volume -> model input: the model card's ``preprocessing`` section as a chain of MONAI transforms.

The section (JSON), every key checked::

    {"orientation": "RAS",                      # axis codes, or null = keep the volume's axes
     "spacing": [1.5, 1.5, 2.0],                # mm along the oriented axes, or null = keep
     "intensity": {"a_min": -1000, "a_max": 1000, "b_min": 0.0, "b_max": 1.0, "clip": true},
                  # or {"normalize": "zscore", "nonzero": false}  (mean/std over nonzero voxels or all)
                  # or null = unchanged
     "spatial": {"mode": "resize", "interpolation": "trilinear"}}
               # or {"mode": "sliding_window", "overlap": 0.25, "sw_batch_size": 4, "blend": "mean"}

Transforms run on a ``MetaTensor`` (C, I, J, K) whose affine is the RAS ijk_to_ras, so MONAI tracks
the geometry through Orientation, Spacing, Resize and padding: the output's ``.affine`` is the exact
ijk_to_ras of the model-input voxel grid. No resampling is written by hand here.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import AttentionMapError
from .geometry import check_ijk_to_ras, voxel_spacing

RESIZE = "resize"
SLIDING_WINDOW = "sliding_window"
_BLENDS = ("mean", "gaussian")
_INTERPOLATIONS = ("trilinear", "area", "nearest")
_AXIS_PAIRS = ("LR", "PA", "IS")


@dataclass(frozen=True)
class Preprocessing:
    """A checked ``preprocessing`` section (see the module docstring for the JSON form)."""

    orientation: Optional[str] = None
    spacing: Optional[Tuple[float, float, float]] = None
    intensity: Optional[Dict[str, Any]] = None  # {"a_min",...,"clip"} or {"normalize": "zscore", "nonzero"}
    mode: str = RESIZE
    interpolation: str = "trilinear"  # resize mode only
    overlap: float = 0.25  # sliding window only: fraction of a window shared with its neighbour
    sw_batch_size: int = 4  # sliding window only: windows per forward pass
    blend: str = "mean"  # sliding window only: "mean" or "gaussian" weights where windows overlap

    @property
    def pad_value(self) -> float:
        """Intensity used for padding: b_min after a range scaling, else 0."""
        return float(self.intensity["b_min"]) if self.intensity and "b_min" in self.intensity else 0.0


def _fail(key: str, expected: str, got: Any) -> AttentionMapError:
    return AttentionMapError(f"preprocessing.{key}: expected {expected}, got {got!r}")


def _check_keys(section: Mapping, key: str, allowed: Sequence[str], required: Sequence[str] = ()) -> None:
    if not isinstance(section, Mapping):
        raise _fail(key, "an object", section)
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise AttentionMapError(f"preprocessing.{key}: unknown key(s) {unknown}; allowed: {list(allowed)}")
    missing = [k for k in required if k not in section]
    if missing:
        raise AttentionMapError(f"preprocessing.{key}: missing key(s) {missing}")


def _number(section: Mapping, key: str, where: str) -> float:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise _fail(f"{where}.{key}", "a finite number", value)
    return float(value)


def _orientation(value: Any) -> Optional[str]:
    if value is None:
        return None
    codes = value.upper() if isinstance(value, str) else ""
    pairs = sorted(pair for c in codes for pair in _AXIS_PAIRS if c in pair)
    if len(codes) != 3 or pairs != sorted(_AXIS_PAIRS):
        raise _fail("orientation", "three axis codes, one of L/R, one of P/A, one of I/S (e.g. 'RAS'), or null", value)
    return codes


def _spacing(value: Any) -> Optional[Tuple[float, float, float]]:
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0 for v in value
    )
    if not ok:
        raise _fail("spacing", "three positive numbers in mm, or null", value)
    return tuple(float(v) for v in value)


def _intensity(value: Any) -> Optional[Dict[str, Any]]:
    if value is None:
        return None
    if isinstance(value, Mapping) and "normalize" in value:
        _check_keys(value, "intensity", ("normalize", "nonzero"), ("normalize",))
        if value["normalize"] != "zscore":
            raise _fail("intensity.normalize", "'zscore'", value["normalize"])
        nonzero = value.get("nonzero", False)
        if not isinstance(nonzero, bool):
            raise _fail("intensity.nonzero", "true or false", nonzero)
        return {"normalize": "zscore", "nonzero": nonzero}
    names = ("a_min", "a_max", "b_min", "b_max")
    _check_keys(value, "intensity", (*names, "clip"), names)
    out: Dict[str, Any] = {k: _number(value, k, "intensity") for k in names}
    if out["a_max"] <= out["a_min"]:
        raise _fail("intensity.a_max", f"a value above a_min={out['a_min']}", value["a_max"])
    clip = value.get("clip", True)
    if not isinstance(clip, bool):
        raise _fail("intensity.clip", "true or false", clip)
    out["clip"] = clip
    return out


def _spatial(value: Any) -> Dict[str, Any]:
    _check_keys(value, "spatial", ("mode", "interpolation", "overlap", "sw_batch_size", "blend"), ("mode",))
    mode = value["mode"]
    if mode == RESIZE:
        _check_keys(value, "spatial", ("mode", "interpolation"))
        interpolation = value.get("interpolation", "trilinear")
        if interpolation not in _INTERPOLATIONS:
            raise _fail("spatial.interpolation", f"one of {list(_INTERPOLATIONS)}", interpolation)
        return {"mode": mode, "interpolation": interpolation}
    if mode != SLIDING_WINDOW:
        raise _fail("spatial.mode", f"'{RESIZE}' or '{SLIDING_WINDOW}'", mode)
    _check_keys(value, "spatial", ("mode", "overlap", "sw_batch_size", "blend"))
    overlap = _number(value, "overlap", "spatial") if "overlap" in value else 0.25
    if not 0.0 <= overlap < 1.0:
        raise _fail("spatial.overlap", "a number in [0, 1)", value["overlap"])
    batch = value.get("sw_batch_size", 4)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise _fail("spatial.sw_batch_size", "a positive integer", batch)
    blend = value.get("blend", "mean")
    if blend not in _BLENDS:
        raise _fail("spatial.blend", f"one of {list(_BLENDS)}", blend)
    return {"mode": mode, "overlap": overlap, "sw_batch_size": batch, "blend": blend}


def parse_preprocessing(section: Any) -> Preprocessing:
    """Check a ``preprocessing`` dict (JSON) and return it as `Preprocessing`; AttentionMapError if invalid."""
    if isinstance(section, Preprocessing):
        return section
    if not isinstance(section, Mapping):
        raise AttentionMapError(f"preprocessing: expected an object (dict), got {type(section).__name__}")
    _check_keys(section, "(top level)", ("orientation", "spacing", "intensity", "spatial"), ("spatial",))
    return Preprocessing(
        orientation=_orientation(section.get("orientation")),
        spacing=_spacing(section.get("spacing")),
        intensity=_intensity(section.get("intensity")),
        **_spatial(section["spatial"]),
    )


def resampling_transforms(prep: Preprocessing):
    """MONAI Compose: Orientation, Spacing (bilinear), intensity scaling, each only where the card asks."""
    from monai.transforms import Compose, NormalizeIntensity, Orientation, ScaleIntensityRange, Spacing

    chain = []
    if prep.orientation:
        chain.append(Orientation(axcodes=prep.orientation, labels=None))
    if prep.spacing:
        chain.append(Spacing(pixdim=prep.spacing, mode="bilinear"))
    if prep.intensity and "normalize" in prep.intensity:
        chain.append(NormalizeIntensity(nonzero=prep.intensity["nonzero"], channel_wise=True))
    elif prep.intensity:
        chain.append(ScaleIntensityRange(**prep.intensity))
    return Compose(chain)


def fitting_transforms(prep: Preprocessing, img_size: Sequence[int], patch_size: Sequence[int]):
    """MONAI Compose fitting the resampled volume to the model.

    resize: Resize to img_size. sliding_window: SpatialPad up to img_size, then DivisiblePad to a
    multiple of the patch size (both symmetric, with `Preprocessing.pad_value`), so windows can start
    on whole patches.
    """
    from monai.transforms import Compose, DivisiblePad, Resize, SpatialPad

    if prep.mode == RESIZE:
        return Compose([Resize(spatial_size=tuple(img_size), mode=prep.interpolation)])
    return Compose(
        [
            SpatialPad(spatial_size=tuple(img_size), value=prep.pad_value),
            DivisiblePad(k=tuple(patch_size), value=prep.pad_value),
        ]
    )


def check_volume(array_ijk: Any, in_channels: int) -> np.ndarray:
    """The caller's array as a new float32 (C, I, J, K) array, or AttentionMapError.

    Accepts (I, J, K), or (C, I, J, K) with C = in_channels. Refuses 2D data (fewer than three spatial
    axes, or a spatial axis of size 1) and NaN/infinite voxels (refused, not replaced: a silently
    filled hole could move the map; replace them yourself, e.g. with np.nan_to_num, if that is meant).
    """
    array = np.asarray(array_ijk)
    if array.dtype.kind not in "biuf":
        raise AttentionMapError(f"array_ijk: expected a numeric array, got dtype {array.dtype}")
    if array.ndim < 3:
        kind = "a 2D image" if array.ndim == 2 else f"a {array.ndim}D array"
        raise AttentionMapError(f"array_ijk: got shape {array.shape}, {kind}; expected a 3D volume "
                                "(I, J, K) with more than one voxel along each axis")
    channels = 1 if array.ndim == 3 else array.shape[0]
    if array.ndim > 4 or channels != in_channels:
        expected = "(I, J, K) or (1, I, J, K)" if in_channels == 1 else f"({in_channels}, I, J, K)"
        raise AttentionMapError(
            f"array_ijk: got shape {array.shape}; the model expects {in_channels} channel(s): "
            f"an array {expected} (channels first)"
        )
    single = sum(1 for n in array.shape[-3:] if n < 2)
    if single:
        kind = "a 2D image" if single == 1 else f"{single} of its 3 axes hold a single voxel"
        raise AttentionMapError(f"array_ijk: got shape {array.shape} ({kind}); expected a 3D volume (I, J, K) "
                                "with more than one voxel along each axis")
    volume = np.array(array, dtype=np.float32, copy=True).reshape((-1, *array.shape[-3:]))
    bad = ~np.isfinite(volume)
    if bad.any():
        first = np.argwhere(bad)[0].tolist()
        raise AttentionMapError(
            f"array_ijk: {int(bad.sum())} NaN or infinite voxel(s) (first at channel, i, j, k = {first}); "
            "expected finite intensities. Replace them before explaining (e.g. np.nan_to_num(array, nan=-1000))"
        )
    return volume


def preprocess_volume(
    array_ijk: Any,
    ijk_to_ras: Any,
    preprocessing: Any,
    img_size: Sequence[int],
    patch_size: Sequence[int],
    in_channels: int = 1,
):
    """Run the card's chain on a volume; returns the model-input MetaTensor (C, *spatial), float32.

    Its ``.affine`` (torch float64, (4, 4)) is the RAS ijk_to_ras of the model-input grid. In resize
    mode spatial == img_size; in sliding-window mode spatial is at least img_size and a multiple of
    patch_size. Raises AttentionMapError for bad input or a volume smaller than one patch after
    resampling; warns (UserWarning) when the volume is constant after intensity scaling.
    """
    import torch
    from monai.data import MetaTensor

    prep = parse_preprocessing(preprocessing)
    matrix = check_ijk_to_ras(ijk_to_ras)
    volume = check_volume(array_ijk, in_channels)
    image = MetaTensor(torch.from_numpy(volume), affine=torch.from_numpy(matrix), meta={"space": "RAS"})
    resampled = resampling_transforms(prep)(image)
    shape = np.asarray(resampled.shape[1:])
    patch = np.asarray(patch_size)
    if np.any(shape < patch):
        spacing = voxel_spacing(resampled.affine.numpy())
        raise AttentionMapError(
            f"array_ijk: after resampling the volume is {tuple(shape.tolist())} voxels "
            f"({tuple(np.round(shape * spacing, 1).tolist())} mm "
            f"at spacing {tuple(np.round(spacing, 3).tolist())} mm); "
            f"the model needs at least one patch: {tuple(patch.tolist())} voxels "
            f"({tuple(np.round(patch * spacing, 1).tolist())} mm) along each axis"
        )
    if float(resampled.max()) == float(resampled.min()):
        warnings.warn(
            f"array_ijk: the volume is constant ({float(resampled.min()):g}) after preprocessing; "
            "the attention map carries no information about the image",
            UserWarning,
            stacklevel=2,
        )
    return fitting_transforms(prep, img_size, patch_size)(resampled)
