"""How well a map points at a region, and how much the model relies on what the map ranks first.

- `mask_statistics`, `pointing_game`: a map and a mask on the same voxel grid (resample the token
  grid first with ``VolumeAttention.resample_to``, or reduce the mask to the token grid).
- `distance_to_mask_mm`: a point (e.g. the attention peak, RAS mm) against a mask with its geometry;
  `within_mm`: the voxels within a distance of a mask (the region "around" a segment).
- `deletion_insertion`: RISE-style causal scores (Petsiuk et al. 2018) on the model input itself;
  `score_volume`: the same for a volume and a model card's preprocessing (CLI `attention-map score`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np

from ..errors import AttentionMapError, Cancelled
from .geometry import peak_index

Tolerance = Union[int, Sequence[int]]
BASELINES = ("blur", "mean", "zero")
Progress = Optional[Callable[[float], None]]
CancelCheck = Optional[Callable[[], bool]]


def _check_cancel(cancel: CancelCheck, where: str) -> None:
    if cancel is not None and cancel():
        raise Cancelled(f"cancelled {where}")


def _check_pair(attention: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if attention.shape != mask.shape:
        raise AttentionMapError(
            f"mask: shape {mask.shape} differs from the attention map's {attention.shape}; "
            "resample the map onto the mask's grid first (VolumeAttention.resample_to)"
        )
    inside = mask > 0
    if not inside.any():
        raise AttentionMapError("mask: empty (no voxel > 0), nothing to score against")
    return inside


def mask_statistics(attention: np.ndarray, mask: np.ndarray) -> Dict[str, Any]:
    """Attention against a mask on the same grid (any shape; mask voxels > 0 are inside).

    mass_fraction: sum inside / sum over all (relevance mass accuracy, Arras et al. 2022; NaN when the
    map sums to <= 0); mean / max: over the mask; volume_fraction: mask voxels / all voxels;
    mass_ratio: mass_fraction / volume_fraction (1 = no better than a uniform map);
    pointing_hit: the map's first maximum lies inside the mask.
    """
    values = np.asarray(attention, dtype=np.float64)
    inside = _check_pair(values, np.asarray(mask))
    total = float(values.sum())
    mass_fraction = float(values[inside].sum()) / total if total > 0 else float("nan")
    volume_fraction = float(inside.mean())
    return {
        "mass_fraction": mass_fraction,
        "mean": float(values[inside].mean()),
        "max": float(values[inside].max()),
        "volume_fraction": volume_fraction,
        "mass_ratio": mass_fraction / volume_fraction,
        "pointing_hit": bool(inside.flat[int(np.argmax(values))]),
    }


def pointing_game(attention: np.ndarray, mask: np.ndarray, tolerance: Tolerance = 0) -> bool:
    """True if the map's first maximum is within `tolerance` voxels (per axis, Chebyshev box) of the mask.

    On a token grid, tolerance=1 is the usual "within one patch"; on a finer grid pass the patch size
    in voxels per axis.
    """
    values = np.asarray(attention)
    inside = _check_pair(values, np.asarray(mask))
    tol = np.broadcast_to(np.asarray(tolerance, dtype=int), (values.ndim,))
    if np.any(tol < 0):
        raise AttentionMapError(f"tolerance: expected voxel counts >= 0, got {tolerance}")
    peak = peak_index(values)
    box = tuple(slice(max(0, p - t), p + t + 1) for p, t in zip(peak, tol))
    return bool(inside[box].any())


def distance_to_mask_mm(point_ras: Sequence[float], mask: np.ndarray, ijk_to_ras: np.ndarray) -> Dict[str, Any]:
    """Distances (mm) from a RAS point to a mask (I, J, K) with its (4, 4) ijk_to_ras.

    inside: the voxel containing the point is in the mask; nearest_mm: to the nearest mask voxel
    centre (0 when inside); centroid_mm: to the mask's centroid.
    """
    from .geometry import apply_affine, ras_to_ijk

    inside_mask = np.asarray(mask) > 0
    if inside_mask.ndim != 3 or not inside_mask.any():
        raise AttentionMapError(f"mask: expected a non-empty 3D mask (I, J, K), got shape {inside_mask.shape}")
    point = np.asarray(point_ras, dtype=np.float64)
    voxel = np.rint(ras_to_ijk(ijk_to_ras, point)).astype(int)
    inside = bool(np.all(voxel >= 0) and np.all(voxel < inside_mask.shape) and inside_mask[tuple(voxel)])
    centres = apply_affine(ijk_to_ras, np.argwhere(inside_mask))
    return {
        "inside": inside,
        "nearest_mm": 0.0 if inside else float(np.min(np.linalg.norm(centres - point, axis=1))),
        "centroid_mm": float(np.linalg.norm(centres.mean(axis=0) - point)),
    }


def within_mm(mask: np.ndarray, ijk_to_ras: np.ndarray, mm: float) -> np.ndarray:
    """bool (I, J, K): the voxels whose centre lies within ``mm`` (Euclidean, patient space) of a centre of a voxel
    of ``mask`` (I, J, K) > 0, the mask included: the region "around" a segment on any grid (anisotropic, oblique).

    One shifted OR per voxel offset inside the ellipsoid of radius ``mm`` (axis lengths and angles from
    ``ijk_to_ras`` (4, 4)), over the mask's bounding box grown by ``mm``: O(offsets x box voxels)."""
    inside = np.asarray(mask) > 0
    if inside.ndim != 3 or not inside.any():
        raise AttentionMapError(f"mask: expected a non-empty 3D mask (I, J, K), got shape {inside.shape}")
    if not float(mm) >= 0.0:
        raise AttentionMapError(f"mm: expected a distance >= 0, got {mm}")
    columns = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    # the largest index step per axis any offset within mm can take: mm times the row norms of the inverse
    reach = np.floor(float(mm) * np.linalg.norm(np.linalg.inv(columns), axis=1) + 1e-9).astype(int)
    found = np.argwhere(inside)
    low, high = np.maximum(found.min(0) - reach, 0), np.minimum(found.max(0) + reach + 1, inside.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    crop = inside[box]
    padded = np.pad(crop, [(int(r), int(r)) for r in reach])
    grown = np.zeros_like(crop)
    for offset in np.ndindex(*(2 * reach + 1)):
        if np.linalg.norm(columns @ (np.asarray(offset) - reach)) <= float(mm) + 1e-6:
            grown |= padded[tuple(slice(o, o + n) for o, n in zip(offset, crop.shape))]
    out = np.zeros(inside.shape, dtype=bool)
    out[box] = grown
    return out


def _area(fractions: np.ndarray, curve: np.ndarray) -> float:
    """Trapezoid rule."""
    return float(np.sum((curve[1:] + curve[:-1]) * np.diff(fractions)) / 2.0)


def _baseline(x, mode: str, block: Sequence[int]):
    import torch

    if mode == "zero":
        return torch.zeros_like(x)
    if mode == "mean":
        dims = tuple(range(2, x.ndim))
        return x.mean(dim=dims, keepdim=True).expand_as(x).clone()
    from monai.transforms import GaussianSmooth

    smooth = GaussianSmooth(sigma=[float(b) for b in block])
    return torch.stack([torch.as_tensor(smooth(sample)) for sample in x]).to(x.dtype)


def deletion_insertion(
    model: Any,
    x: Any,
    saliency: np.ndarray,
    target: Any = None,
    steps: int = 32,
    baseline: str = "blur",
    batch_size: int = 8,
    progress: Progress = None,
    cancel: CancelCheck = None,
) -> Dict[str, Any]:
    """RISE deletion and insertion scores of a map for one classifier input.

    x: torch tensor (1, C, *spatial), the model input. saliency: the map on the token grid (each
    element covers one block of x: spatial / saliency.shape voxels per axis) or on x's spatial grid.
    Blocks are ranked by saliency (highest first, ties by index) and, over `steps` + 1 points
    (fractions 0, 1/steps, ..., 1 of the blocks), deletion replaces the top-ranked blocks of x by the
    baseline, insertion puts the top-ranked blocks of x into the baseline. The baseline is the same
    for both: "blur" (default: x smoothed by a Gaussian of sigma = one block per axis, as RISE's
    insertion start), "mean" (x's mean per channel) or "zero". The curves are the softmax probability
    of `target` (default: the class predicted on x); for a segmentation network and a ``segment.SegmentTarget``,
    the mean softmax probability of its channel over its region (the region fixed on x: the mask, or the
    network's own segment of x). AUCs by the trapezoid rule over the fraction.
    Lower deletion AUC and higher insertion AUC mean the map ranks what the model uses first.
    Cost: 2 * (steps + 1) forward passes, in batches of `batch_size`. `cancel` is called before each
    batch (True: raise `Cancelled`); `progress` gets the fraction of batches done after each.
    """
    import torch

    from .engine import primary_output

    if baseline not in BASELINES:
        raise AttentionMapError(f"baseline: expected one of {', '.join(BASELINES)}, got {baseline!r}")
    if not isinstance(x, torch.Tensor) or x.ndim < 3 or x.shape[0] != 1:
        raise AttentionMapError(f"x: expected a torch tensor (1, C, *spatial), got {getattr(x, 'shape', type(x))}")
    if int(steps) < 1:
        raise AttentionMapError(f"steps: expected at least 1, got {steps}")
    spatial = tuple(int(s) for s in x.shape[2:])
    sal = np.asarray(saliency, dtype=np.float64)
    if sal.ndim != len(spatial) or any(s % n for s, n in zip(spatial, sal.shape)):
        raise AttentionMapError(
            f"saliency: shape {sal.shape} must divide the input's spatial shape {spatial} (token grid or voxel grid)"
        )
    block = tuple(s // n for s, n in zip(spatial, sal.shape))
    order = np.argsort(-sal.ravel(), kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    # rank of the block each voxel belongs to, on x's spatial grid
    voxel_rank = rank.reshape(sal.shape)
    for axis, size in enumerate(block):
        voxel_rank = np.repeat(voxel_rank, size, axis=axis)
    voxel_rank = torch.from_numpy(voxel_rank).to(x.device)
    counts = np.rint(np.linspace(0.0, 1.0, int(steps) + 1) * order.size).astype(int)
    fractions = counts / order.size
    with torch.no_grad():
        logits = primary_output(model(x), model)
        score, klass = _curve_score(logits, target)
        base = _baseline(x, baseline, block)
        curves = {}
        firsts = range(0, len(counts), int(batch_size))
        for curve, (name, start, end) in enumerate((("deletion", x, base), ("insertion", base, x))):
            probabilities = []
            for done, first in enumerate(firsts):
                _check_cancel(cancel, f"during the {name} curve, after {first} of {len(counts)} steps")
                chunk = counts[first:first + int(batch_size)]
                keep_end = torch.stack([voxel_rank < int(c) for c in chunk])[:, None]  # (b, 1, *spatial)
                batch = torch.where(keep_end, end, start)
                probabilities.append(score(primary_output(model(batch), model)).cpu().numpy())
                if progress is not None:
                    progress((curve * len(firsts) + done + 1) / (2 * len(firsts)))
            curves[name] = np.concatenate(probabilities)
    return {
        "target": klass,
        "baseline": baseline,
        "steps": int(steps),
        "fractions": fractions.tolist(),
        "deletion_curve": curves["deletion"].tolist(),
        "insertion_curve": curves["insertion"].tolist(),
        "deletion_auc": _area(fractions, curves["deletion"]),
        "insertion_auc": _area(fractions, curves["insertion"]),
    }


def _curve_score(logits: Any, target: Any) -> "tuple[Callable[[Any], Any], int]":
    """What a deletion / insertion curve reads from each output, and the class (or segment channel) it reads:
    class logits (B, K) give P(class) (B,); a dense output (B, C, *spatial) with a SegmentTarget gives the
    channel's mean probability over the region found on ``logits`` (x's output), (B,)."""
    import torch

    from .segment import SegmentTarget, check_not_empty, segment_region

    if isinstance(target, SegmentTarget):
        region = segment_region(logits, target)[:1]
        check_not_empty(region, target)
        weights = region / region.sum()
        channel = int(target.channel)
        return (lambda out: (torch.softmax(out.float(), dim=1)[:, channel] * weights).flatten(1).sum(dim=1)), channel
    if logits.ndim != 2:
        raise AttentionMapError(
            f"model: output shape {tuple(logits.shape)} is not class logits (B, K); deletion/insertion scores need a "
            "classifier, or a segment target (segment.SegmentTarget) for a segmentation network"
        )
    klass = int(logits.argmax(dim=1)[0]) if target is None else int(target)
    if not 0 <= klass < logits.shape[1]:
        raise AttentionMapError(f"target: expected 0..{logits.shape[1] - 1}, got {target}")
    return (lambda out: torch.softmax(out.float(), dim=1)[:, klass]), klass


def score_volume(
    model: Any,
    array_ijk: np.ndarray,
    ijk_to_ras: np.ndarray,
    preprocessing: Any,
    img_size: Optional[Sequence[int]] = None,
    centre_ras: Optional[Sequence[float]] = None,
    steps: int = 32,
    baseline: str = "blur",
    device: Optional[Any] = None,
    progress: Progress = None,
    cancel: CancelCheck = None,
    **explain_kwargs: Any,
) -> Dict[str, Any]:
    """`deletion_insertion` of the map `engine.explain` gives on a volume's model input.

    The volume (I, J, K) or (C, I, J, K) with its RAS ijk_to_ras goes through the card's preprocessing;
    resize cards are scored on the whole model input, sliding-window cards on one window of img_size
    centred on `centre_ras` (default: the volume's centre), moved inside the volume and onto whole
    patches. explain_kwargs: method, layer (0-based), head_fusion, head, discard_ratio, target,
    normalize. Returns deletion_insertion's dict plus "window_start" (model-input voxel index).
    `progress` / `cancel`: as for `deletion_insertion` (cancel is also checked before and after the map).
    """
    import torch

    from .engine import explain, model_spec
    from .geometry import ras_to_ijk
    from .preprocess import RESIZE, parse_preprocessing, preprocess_volume

    spec = model_spec(model, img_size)
    prep = parse_preprocessing(preprocessing)
    volume = preprocess_volume(array_ijk, ijk_to_ras, prep, spec.img_size, spec.patch_size, spec.in_channels)
    shape, size, patch = (np.asarray(v) for v in (volume.shape[1:], spec.img_size, spec.patch_size))
    start = np.zeros(len(size), dtype=int)
    if prep.mode != RESIZE:
        centre = (shape - 1) / 2.0 if centre_ras is None else ras_to_ijk(volume.affine.numpy(), centre_ras)
        start = (np.clip(np.rint(centre - size / 2.0), 0, shape - size) // patch * patch).astype(int)
    window = (slice(None),) + tuple(slice(int(a), int(a + n)) for a, n in zip(start, size))
    if device is None:
        device = next(model.parameters()).device
    x = volume.as_tensor()[window][None].to(device=device, dtype=torch.float32)
    _check_cancel(cancel, "before the map")
    result = explain(model, x, **explain_kwargs)
    scores = deletion_insertion(model, x, result.grid[0], target=explain_kwargs.get("target"), steps=steps,
                                baseline=baseline, progress=progress, cancel=cancel)
    return {**scores, "window_start": start.tolist()}
