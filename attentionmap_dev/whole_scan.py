"""Whole scans, as a user loads them: the demo model on lung1 / lung2 as shipped and re-gridded, and on
lesion-free scans, and the lesion-free held-out windows (`heldout_scan_windows`); shared by benchmarks/evaluate.py
(docs/EVALUATION.md) and tools/evaluate_demo_model.py (card).

Re-griddings (SimpleITK; image linear, label nearest neighbour; geometry checked: the tumour label's RAS
centroid must stay within `CENTROID_TOLERANCE_MM` of the original's):
- ``as shipped``: the file as it is;
- ``flipped``: the voxels stored in reverse along I and K (exact, no interpolation);
- ``oblique``: resampled onto a grid rotated 12 degrees about S and 8 degrees about R, 0.8 x 0.8 x 2.5 mm;
- ``anisotropic``: resampled onto an axis-aligned 1.4 x 0.7 x 3.5 mm grid.

Per run (`explain_volume` with the card's preprocessing, calibration, default flips and half-patch shifts, rollout,
target "lesion"):
peak patch holds tumour voxels (the label sampled by nearest neighbour onto the model-input grid, then per
token), distance from the peak to the nearest tumour voxel, relevance mass ratio on the label's grid,
the volume-level P(lesion) and its window, and how far the peak moved from the as-shipped run (RAS mm).

Lesion-free scans (honestly built; only two chest CTs exist here): the axial slabs of each scan beyond
its tumour's extent widened by `LESION_FREE_MARGIN_MM`: lung1 below its tumour (lower chest and upper
abdomen), lung2 above its tumour (upper chest, shoulders, neck); and a whole real CT of another patient and
body region that no training sample came from, InVesalius' head CT (`sample_data.fetch_head_ct`). The lung
slabs were seen in training as negatives except for their held-out slabs (see `demo_data.WholeScanSampler`).

Inserted lesions (`inserted_lesion_rows`): nodules of other generators (`lesions.FAMILIES`) put into those lung
slabs on their own voxel grids, inside the held-out slabs: does the whole-volume run find a lesion it was not
trained on, at the scanner's resolution?
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from attentionmap_dev import demo_data

REGRIDDINGS = ("as shipped", "flipped", "oblique", "anisotropic")
CENTROID_TOLERANCE_MM = 2.5
LESION_FREE_MARGIN_MM = 24.0
PATCH_MM = 16.0
SCAN_RANDOM = 400
SCAN_SEED = 20261130
INSERTED_PER_FAMILY = 3
INSERTED_SEED = 20261201
INSERTED_RADIUS_MM = (5.0, 15.0)
INSERTED_LUNG_DEPTH_MM = 5.0
INSERTED_REGRIDDINGS = ("as shipped", "oblique")
NO_LESION = "no lesion"  # the `family` of the rows that run each slab and re-gridding without a lesion
SCAN_HELDOUT = ("lung1",)  # scans whose slab no whole-scan training window met (train_demo_model --scan-heldout)


def regridded(image_path: Path, label_path: Path, kind: str) -> Dict[str, np.ndarray]:
    """{"image", "affine", "label" (bool), "label_affine"} of the scan re-gridded as `kind` (see REGRIDDINGS)."""
    import SimpleITK as sitk

    if kind not in REGRIDDINGS:
        raise ValueError(f"unknown re-gridding {kind!r}; expected one of {REGRIDDINGS}")
    scan = scan_arrays(*regrid_kind(sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path)), kind))
    if kind == "flipped":
        flip = np.diag([-1.0, 1.0, -1.0, 1.0])
        flip[0, 3], flip[2, 3] = scan["image"].shape[0] - 1, scan["image"].shape[2] - 1
        scan = {"image": np.ascontiguousarray(scan["image"][::-1, :, ::-1]), "affine": scan["affine"] @ flip,
                "label": np.ascontiguousarray(scan["label"][::-1, :, ::-1]),
                "label_affine": scan["label_affine"] @ flip}
    return scan


def scan_arrays(image, label) -> Dict[str, np.ndarray]:
    """{"image" (float32, IJK), "affine", "label" (bool), "label_affine"} of SimpleITK image and label."""
    from AttentionMapLib.io import image_arrays

    array, affine = image_arrays(image)
    mask, mask_affine = image_arrays(label)
    return {"image": array.astype(np.float32), "affine": affine, "label": mask > 0, "label_affine": mask_affine}


def regrid_kind(image, label, kind: str):
    """SimpleITK (image, label) resampled as `kind` ("oblique", "anisotropic"; any other kind: unchanged);
    label may be None (see `demo_data.regrid`)."""
    from AttentionMapLib.core.geometry import rotation

    if kind == "oblique":
        return demo_data.regrid(image, label, rotation(2, 12.0) @ rotation(0, 8.0), (0.8, 0.8, 2.5))
    if kind == "anisotropic":
        return demo_data.regrid(image, label, np.eye(3), (1.4, 0.7, 3.5))
    return image, label


def _regridded_array(array: np.ndarray, affine: np.ndarray, kind: str) -> Tuple[np.ndarray, np.ndarray]:
    """(array, ijk_to_ras) re-gridded as `kind` (see `regrid_kind`)."""
    from AttentionMapLib.io import array_image, image_arrays

    moved, _ = regrid_kind(array_image(array.astype(np.float32), affine), None, kind)
    return image_arrays(moved)


def label_centroid_ras(label: np.ndarray, affine: np.ndarray) -> np.ndarray:
    from AttentionMapLib.core.geometry import apply_affine

    return apply_affine(affine, np.argwhere(label).mean(0))


def lesion_free_scans(paths: Dict[str, Path]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{"lung1 below its tumour": (array, ijk_to_ras), "lung2 above its tumour": ..., "head CT (whole)": ...}:
    axial slabs of the lung scans (input voxel grids) beyond the tumour label's K extent widened by
    LESION_FREE_MARGIN_MM, and the whole InVesalius head CT (`sample_data.fetch_head_ct`), a scan that no
    training sample came from."""
    from AttentionMapLib.core.geometry import crop, voxel_spacing
    from AttentionMapLib.io import read_volume
    from AttentionMapLib.sample_data import fetch_head_ct

    out = {}
    for name, side in (("lung1", "below"), ("lung2", "above")):
        array, affine = read_volume(paths[f"{name}_image"])
        label, _ = read_volume(paths[f"{name}_label"])
        k = np.argwhere(label > 0)[:, 2]
        margin = int(np.ceil(LESION_FREE_MARGIN_MM / voxel_spacing(affine)[2]))
        lo, hi = k.min() - margin, k.max() + 1 + margin
        superior_is_up = affine[2, 2] > 0  # K runs inferior -> superior
        take_low = (side == "below") == superior_is_up
        start, stop = ([0, 0, 0], [*array.shape[:2], lo]) if take_low else ([0, 0, hi], list(array.shape))
        out[f"{name} {side} its tumour"] = crop(array, affine, start, stop)
    out["head CT (whole)"] = read_volume(fetch_head_ct())
    return out


def peak_token_holds_label(result, patch: Tuple[int, int, int], label: np.ndarray, label_affine: np.ndarray) -> bool:
    """Does the peak token's patch (`patch` voxels of the model-input grid) hold label voxels? The label is
    sampled by nearest neighbour at the model-input voxel centres."""
    from AttentionMapLib.core.geometry import peak_index
    from AttentionMapLib.core.region import sample_nearest, token_mask

    p = np.asarray(patch, dtype=np.float64)
    voxel_affine = result.ijk_to_ras.copy()  # token grid -> model-input voxel grid
    voxel_affine[:3, :3] = result.ijk_to_ras[:3, :3] / p
    voxel_affine[:3, 3] = result.ijk_to_ras[:3, 3] - voxel_affine[:3, :3] @ ((p - 1) / 2.0)
    shape = tuple(int(n) for n in np.array(result.grid.shape) * np.asarray(patch))
    on_model = sample_nearest(label, label_affine, shape, voxel_affine)
    return bool(token_mask(on_model, patch)[tuple(peak_index(result.grid))])


def run_scan(loaded, temperature: float, array: np.ndarray, affine: np.ndarray, region, method: str = "rollout",
             label: Optional[np.ndarray] = None, label_affine: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """One whole-scan explanation and its numbers (see the module docstring); label optional."""
    from AttentionMapLib.core.domain import card_domain
    from AttentionMapLib.core.engine import model_spec
    from AttentionMapLib.core.flips import card_flip_axes
    from AttentionMapLib.core.metrics import distance_to_mask_mm, mask_statistics
    from AttentionMapLib.core.shifts import card_shift_average
    from AttentionMapLib.core.volume import explain_volume

    start = time.perf_counter()
    result = explain_volume(loaded.network, array, affine, loaded.preprocessing, img_size=loaded.img_size,
                            method=method, target=loaded.target, region=region, temperature=temperature,
                            flip_axes=card_flip_axes(loaded.card, loaded.source),
                            shift_average=card_shift_average(loaded.card, loaded.source),
                            domain=card_domain(loaded.card, loaded.source))
    seconds = time.perf_counter() - start
    prediction = result.prediction(loaded.classes)
    row: Dict[str, Any] = {
        "method": method, "windows": result.num_windows, "seconds": seconds,
        "region": None if result.region is None else result.region.name,
        "p_lesion": prediction["probability"], "decisive_window_ras_mm": prediction["window_centre_ras_mm"],
        "confident": prediction.get("confident", True),
        "highest_p_unlike_training": prediction.get("highest_probability_unlike_training"),
        "peak_ras_mm": [float(v) for v in result.peak_ras()],
    }
    if label is not None:
        distance = distance_to_mask_mm(result.peak_ras(), label, label_affine)
        row.update({
            "peak_patch_holds_tumour": peak_token_holds_label(
                result, model_spec(loaded.network, loaded.img_size).patch_size, label, label_affine),
            "peak_to_tumour_mm": distance["nearest_mm"], "peak_inside_tumour": distance["inside"],
            "mass_ratio": mask_statistics(result.resample_to(label.shape, label_affine), label)["mass_ratio"],
        })
    return row


def whole_scan_rows(loaded, temperature: float, paths: Dict[str, Path], regions: Dict[str, Any],
                    log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Every case x re-gridding x region (rollout); `regions` maps a name to a region (None: whole scan)."""
    rows = []
    for case in ("lung1", "lung2"):
        reference_centroid = None
        peaks: Dict[str, np.ndarray] = {}
        for kind in REGRIDDINGS:
            scan = regridded(paths[f"{case}_image"], paths[f"{case}_label"], kind)
            centroid = label_centroid_ras(scan["label"], scan["label_affine"])
            reference_centroid = centroid if reference_centroid is None else reference_centroid
            shift = float(np.linalg.norm(centroid - reference_centroid))
            if shift > CENTROID_TOLERANCE_MM:
                raise RuntimeError(f"{case} {kind}: the label centroid moved {shift:.1f} mm; the re-gridding is wrong")
            for region_name, region in regions.items():
                log(f"whole scan {case} {kind} region={region_name} ...")
                row = run_scan(loaded, temperature, scan["image"], scan["affine"], region,
                               label=scan["label"], label_affine=scan["label_affine"])
                key = region_name
                peaks.setdefault(key, np.asarray(row["peak_ras_mm"]))
                row.update({"case": case, "regridding": kind, "region_setting": region_name,
                            "label_centroid_shift_mm": shift, "shape": list(scan["image"].shape),
                            "peak_moved_mm": float(np.linalg.norm(np.asarray(row["peak_ras_mm"]) - peaks[key]))})
                rows.append(row)
    return rows


def lesion_free_rows(loaded, temperature: float, paths: Dict[str, Path], regions: Dict[str, Any],
                     log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Volume-level P(lesion) of the lesion-free scans, per region setting."""
    rows = []
    for name, (array, affine) in lesion_free_scans(paths).items():
        for region_name, region in regions.items():
            log(f"lesion-free scan {name} region={region_name} ...")
            try:
                row = run_scan(loaded, temperature, array, affine, region)
            except Exception as exc:  # e.g. no lung field in a scan without lungs: reported, not hidden
                row = {"error": str(exc)}
            rows.append({"scan": name, "shape": list(array.shape), "region_setting": region_name, **row})
    return rows


def inserted_lesion_rows(loaded, temperature: float, paths: Dict[str, Path], cts: Sequence[demo_data.LungCT],
                         log: Callable[[str], None] = print, per_family: int = INSERTED_PER_FAMILY,
                         seed: int = INSERTED_SEED, families: Optional[Sequence[Any]] = None) -> List[Dict[str, Any]]:
    """Lesions of each `lesions.FAMILIES` generator (or of `families`) inserted into the lesion-free lung slabs on
    their own voxel grids (0.57-0.63 mm in-plane, 5 mm slices: `LesionFamily.weight_on_grid`, partial volume), then
    the whole slab explained (no region). Centres: lung voxels at least INSERTED_LUNG_DEPTH_MM inside the lung,
    within the scan's held-out slab (S range of `cts`' `heldout_s_mm`); radius U(INSERTED_RADIUS_MM). One row per
    lesion and re-gridding (INSERTED_REGRIDDINGS: the slab as it is, and re-gridded oblique as in `regridded`, the
    same lesion drawn again on that grid): `run_scan`'s numbers with the lesion (weight > 0.5) as the label, and how
    far the peak moved from the slab as it is; and per slab and re-gridding one row without a lesion (`family`
    NO_LESION: the volume-level P(lesion) and peak the lesions are compared with). Seeded: same seed, same lesions."""
    import SimpleITK as sitk

    from attentionmap_dev.lesions import FAMILIES
    from AttentionMapLib.core.geometry import apply_affine, voxel_spacing

    rng = np.random.default_rng(seed)
    s_ranges = {ct.name: ct.heldout_s_mm for ct in cts}
    rows = []
    for name, (array, affine) in lesion_free_scans(paths).items():
        scan = name.split()[0]
        if scan not in s_ranges:
            continue  # no lung to put a nodule in
        depth = np.maximum(np.round(INSERTED_LUNG_DEPTH_MM / voxel_spacing(affine)).astype(int), 1)
        lung = sitk.GetArrayFromImage(sitk.BinaryErode(
            sitk.GetImageFromArray(demo_data.lung_mask(array).astype(np.uint8)), [int(v) for v in depth[::-1]])) > 0
        ijk = np.argwhere(lung)
        s = apply_affine(affine, ijk.astype(np.float64))[:, 2]
        lo, hi = s_ranges[scan]
        ijk = ijk[(s >= lo) & (s <= hi)]
        grids = {kind: (array, affine) if kind == "as shipped" else _regridded_array(array, affine, kind)
                 for kind in INSERTED_REGRIDDINGS}
        for kind, (grid, grid_affine) in grids.items():
            log(f"no lesion in {name}, {kind} ...")
            rows.append({"scan": name, "family": NO_LESION, "regridding": kind,
                         **run_scan(loaded, temperature, grid, grid_affine, None)})
        for family in FAMILIES if families is None else families:
            for _ in range(per_family):
                centre = apply_affine(affine, ijk[rng.integers(len(ijk))].astype(np.float64))
                radius = float(rng.uniform(*INSERTED_RADIUS_MM))
                lesion_seed = int(rng.integers(2**31))
                first_peak = None
                for kind, (grid, grid_affine) in grids.items():
                    lesion_rng = np.random.default_rng(lesion_seed)  # the same lesion on every grid
                    weight = family.weight_on_grid(grid.shape, grid_affine, centre, radius, lesion_rng)
                    image = family.insert(grid, weight, lesion_rng)
                    log(f"inserted {family.name} r={radius:.1f} mm in {name}, {kind} ...")
                    row = run_scan(loaded, temperature, image, grid_affine, None, label=weight > 0.5,
                                   label_affine=grid_affine)
                    peak = np.asarray(row["peak_ras_mm"])
                    first_peak = peak if first_peak is None else first_peak
                    rows.append({"scan": name, "family": family.name, "regridding": kind, "radius_mm": radius,
                                 "centre_ras_mm": [float(v) for v in centre],
                                 "peak_moved_mm": float(np.linalg.norm(peak - first_peak)), **row})
    return rows


def summarise_inserted(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per family of `inserted_lesion_rows` (pass one re-gridding's rows): lesions, how many peak patches hold the
    lesion, how many volumes get P(lesion) > 0.5, the median peak-to-lesion distance and the largest peak movement
    from the slab as it is (mm); and "all" over every row."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["family"], []).append(r)
    groups["all"] = list(rows)
    return {
        name: {
            "lesions": len(g),
            "peak_patch_holds_lesion": int(sum(r["peak_patch_holds_tumour"] for r in g)),
            "p_lesion_above_half": int(sum(r["p_lesion"] > 0.5 for r in g)),
            "median_peak_to_lesion_mm": round(float(np.median([r["peak_to_tumour_mm"] for r in g])), 1),
            "largest_peak_move_mm": round(float(max(r.get("peak_moved_mm", 0.0) for r in g)), 1),
        }
        for name, g in groups.items() if g
    }


def summarise_inserted_by_regridding(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """`summarise_inserted` of each re-gridding's lesion rows: {re-gridding: {family or "all": numbers}}."""
    kinds = dict.fromkeys(r["regridding"] for r in rows)
    return {kind: summarise_inserted([r for r in rows if r["regridding"] == kind and r["family"] != NO_LESION])
            for kind in kinds}


def heldout_scan_windows(cts: Sequence[demo_data.LungCT], random: int = SCAN_RANDOM, seed: int = SCAN_SEED,
                         heldout: Sequence[str] = SCAN_HELDOUT):
    """Lesion-free windows meeting the slabs of `heldout` scans (see the module docstring):
    (images (N, 1, 48, 48, 48), kinds (N,) str)."""
    scans = demo_data.WholeScanSampler(cts, "heldout", heldout)
    images, kinds = [], []
    for ci in range(len(scans.cts)):
        for start in scans.inference_grid(ci):
            images.append(scans.window(ci, start))
            kinds.append("inference_grid")
    if random:
        drawn = scans.sample(np.random.default_rng(seed), random, flip=False)
        images += list(drawn.images[:, 0])
        kinds += ["random"] * random
    return np.stack(images)[:, None], np.array(kinds)


def scan_window_logits(model, images: np.ndarray, batch: int = 16, flip_axes: Sequence[int] = (),
                       shift_average: bool = False) -> np.ndarray:
    """Logits (V, N, 2) of the windows (N, 1, 48, 48, 48) in each view of `views.window_views` (the flips of
    ``flip_axes``, 1 without, then with ``shift_average`` the 7 half-patch shifts); forward passes only, no
    attention. P = `flips.mean_view_probabilities`."""
    import torch

    from AttentionMapLib.core.engine import model_spec
    from AttentionMapLib.core.views import window_views

    patch = model_spec(model, input_size=images.shape[2:]).patch_size
    views = []
    with torch.no_grad():
        for view in window_views(flip_axes, shift_average, patch):
            out = [model(view.window(torch.from_numpy(np.ascontiguousarray(images[s : s + batch]))))[0]
                   .float().numpy() for s in range(0, len(images), batch)]
            views.append(np.concatenate(out))
    return np.stack(views)
