"""One command for the explanation-quality evaluation: writes docs/EVALUATION.md, docs/evaluation.json and
docs/evaluation.png.

    nice -n 5 .venv/bin/python -m benchmarks.evaluate                 # the demo model, every case (minutes)
    .venv/bin/python -m benchmarks.evaluate --pairs 4 --out /tmp/e     # a few cases, to try the script

Same cases, same model, one run; nothing is edited by hand.

Cases (each a model-input crop with a lesion mask on the same voxels):
- held-out synthetic nodules: the first ``--pairs`` positive crops of ``demo_data.heldout_set`` (fixed seed,
  nodule centres in z-slabs no training nodule touches); the nodule-free twin crops are not scored (no mask);
- the real tumours of ``lung1`` and ``lung2``: a crop centred on each label's centroid and six crops shifted
  by a quarter crop along each axis (``demo_data.crop_around``);
- whole volumes (``lung1``, ``lung2``): ``volume.explain_volume`` with the card's sliding windows, the token
  grid resampled onto the label's voxel grid (attention maps only: the baselines and deletion/insertion
  need a single model input);
- whole scans as a user loads them (``attentionmap_dev/whole_scan.py``): lung1 and lung2 as shipped and
  re-gridded (flipped, oblique, anisotropic), with and without the card's default region, with the card's
  calibration; three lesion-free scans (two lung slabs, a whole head CT); the lesion-free held-out windows
  of ``tools/evaluate_demo_model.py``.

Maps: ``raw`` (last block, head mean), ``rollout``, ``grad_rollout`` (``AttentionMapLib.explain``), rollout
averaged over the card's views of the crop, its 8 flips and 7 half-patch shifts (``core.views.explain_views_averaged``:
the rule of ``explain_volume(..., flip_axes=(0, 1, 2), shift_average=True)``; deletion / insertion of that map are
measured on the crop as it is), and the
baselines of ``attentionmap_dev.baselines``: Grad-CAM (token grid, MONAI ``GradCAM``), occlusion sensitivity
(MONAI ``OcclusionSensitivity``), random. All on the token grid, min-max normalised, target = the card's
lesion class.

Metrics (``AttentionMapLib.core.metrics``): pointing game on the token grid (the peak patch contains lesion
voxels; and within one patch, i.e. the 26 neighbours count too), relevance mass accuracy (the map, each token's
value spread over its patch's voxels, inside the mask / in total) and its ratio to the mask's volume fraction
(1 = a uniform map), RISE deletion and insertion AUC of P(lesion) (blur baseline: see ``--baseline``), and the
seconds each map takes per case.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from attentionmap_dev import whole_scan
from benchmarks import measure

MAPS = ("raw", "rollout", "rollout_views", "grad_rollout", "gradcam", "occlusion", "random")
ATTENTION = ("raw", "rollout", "grad_rollout")
BASELINES = ("gradcam", "occlusion", "random")
LABELS = {"raw": "raw (last block)", "rollout": "rollout", "rollout_views": "rollout (8 flips + 7 shifts)",
          "grad_rollout": "grad_rollout", "gradcam": "Grad-CAM",
          "occlusion": "occlusion", "random": "random"}
GROUPS = ("held-out synthetic nodules", "lung1 tumour crops", "lung2 tumour crops")
BASELINE_CASES = 20  # held-out crops on which --baseline auto compares the deletion/insertion baselines


@dataclass
class Settings:
    model: str
    pairs: int
    steps: int
    baseline: str
    occlusion_mask: int
    occlusion_overlap: float
    workers: int
    seed: int


@dataclass
class Case:
    """One model input ``image`` (C, *img_size) float32 and its lesion ``mask`` (*img_size) bool."""

    name: str
    group: str
    image: np.ndarray
    mask: np.ndarray
    radius_mm: float


# ----------------------------------------------------------------------------------------------- cases
def build_cases(cts, pairs: int) -> List[Case]:
    from attentionmap_dev import demo_data

    cases: List[Case] = []
    for chunk in demo_data.heldout_batches(cts, pairs):
        for i in range(0, len(chunk.labels), 2):  # positive, then its nodule-free twin
            index = len(cases)
            cases.append(
                Case(f"heldout-{index:03d}", GROUPS[0], chunk.images[i], chunk.masks[i], float(chunk.radii_mm[i]))
            )
    for ct in cts:
        centre = np.round(np.argwhere(ct.tumour).mean(axis=0)).astype(int)
        shift = demo_data.CROP // 4
        offsets = [np.zeros(3, int)] + [
            sign * shift * np.eye(3, dtype=int)[axis] for axis in range(3) for sign in (-1, 1)
        ]
        for offset in offsets:
            image, origin = demo_data.crop_around(ct, centre + offset)
            mask = ct.tumour[tuple(slice(o, o + demo_data.CROP) for o in origin)]
            if mask.any():
                label = "centred" if not offset.any() else "shift " + ",".join(f"{o:+d}" for o in offset)
                cases.append(
                    Case(
                        f"{ct.name} {label}",
                        f"{ct.name} tumour crops",
                        image.astype(np.float32),
                        mask.copy(),
                        float("nan"),
                    )
                )
    return cases


# ----------------------------------------------------------------------------------------------- scoring
_STATE: Dict[str, Any] = {}


def _init_worker(settings: Settings) -> None:
    """Per process: one thread, the model, and the baselines (built once: Grad-CAM copies the model)."""
    import torch

    from attentionmap_dev.baselines import GradCAM, OcclusionSensitivity
    from AttentionMapLib.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(settings.model)
    _STATE.update(settings=settings, loaded=loaded, gradcam=GradCAM(loaded.network, "tokens"),
                  occlusion=OcclusionSensitivity(loaded.network, mask_size=[settings.occlusion_mask] * 3,
                                                 overlap=settings.occlusion_overlap, mode="gaussian"))


def _map_functions(case_index: int) -> Dict[str, Callable[[Any], np.ndarray]]:
    from attentionmap_dev.baselines import RandomMap
    from AttentionMapLib import explain
    from AttentionMapLib.core.views import explain_views_averaged

    loaded, target = _STATE["loaded"], _STATE["loaded"].target
    model = loaded.network
    functions: Dict[str, Callable[[Any], np.ndarray]] = {
        method: (lambda x, m=method: explain(model, x, method=m, target=target).grid[0]) for method in ATTENTION
    }
    functions["rollout_views"] = lambda x: explain_views_averaged(model, x, (0, 1, 2), True, method="rollout",
                                                                  target=target)[0][0]
    functions["gradcam"] = lambda x: _STATE["gradcam"](x, target)[0]
    functions["occlusion"] = lambda x: _STATE["occlusion"](x, target)[0]
    random_map = RandomMap(model, seed=_STATE["settings"].seed + case_index)
    functions["random"] = lambda x: random_map(x)[0]
    return functions


def score_case(job: Tuple[int, Case]) -> Dict[str, Any]:
    """Every map and metric for one case (runs in a worker)."""
    import torch

    from attentionmap_dev import demo_data
    from AttentionMapLib.core.engine import model_spec
    from AttentionMapLib.core.metrics import deletion_insertion, mask_statistics, pointing_game

    index, case = job
    settings, loaded = _STATE["settings"], _STATE["loaded"]
    model = loaded.network
    x = torch.from_numpy(case.image[None])
    spec = model_spec(model, loaded.img_size)
    tokens_mask = demo_data.token_labels(case.mask[None], spec.patch_size[0])[0]
    with torch.no_grad():
        probability = float(torch.softmax(model(x)[0].float(), dim=1)[0, loaded.target])
    record: Dict[str, Any] = {"name": case.name, "group": case.group, "radius_mm": case.radius_mm,
                              "p_lesion": probability, "mask_voxels": int(case.mask.sum()),
                              "chance_pointing": float(tokens_mask.mean()),
                              "chance_pointing_1": float(_dilate(tokens_mask).mean()), "maps": {}}
    for name, function in _map_functions(index).items():
        holder: Dict[str, np.ndarray] = {}
        wall, seconds = measure.timed(lambda holder=holder, function=function: holder.update(tokens=function(x)))
        tokens = holder["tokens"]
        voxels = _to_voxels(tokens, spec.patch_size)
        stats = mask_statistics(voxels, case.mask)
        scores = deletion_insertion(
            model,
            x,
            tokens,
            target=loaded.target,
            steps=settings.steps,
            baseline=settings.baseline,
            batch_size=settings.steps + 1,
        )
        record["maps"][name] = {
            "seconds": seconds,
            "wall_seconds": wall,
            "pointing": pointing_game(tokens, tokens_mask),
            "pointing_1": pointing_game(tokens, tokens_mask, 1),
            "mass_fraction": stats["mass_fraction"],
            "mass_ratio": stats["mass_ratio"],
            "deletion_auc": scores["deletion_auc"],
            "insertion_auc": scores["insertion_auc"],
        }
    record["volume_fraction"] = float(case.mask.mean())
    return record


def _to_voxels(tokens: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """Token grid (n1, n2, n3) -> input voxels: each token's value over its whole patch."""
    for axis, size in enumerate(patch):
        tokens = np.repeat(tokens, size, axis=axis)
    return tokens


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Token mask grown by one token in every direction (26-neighbourhood): 'within one patch'."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for shift in np.ndindex(3, 3, 3):
        out |= padded[
            shift[0] : shift[0] + mask.shape[0],
            shift[1] : shift[1] + mask.shape[1],
            shift[2] : shift[2] + mask.shape[2],
        ]
    return out


def baseline_probabilities(settings: Settings, cases: Sequence[Case]) -> Dict[str, float]:
    """Mean P(target) of each deletion/insertion baseline (the crop with every patch replaced), from
    ``metrics.deletion_insertion`` with one step: the end of its deletion curve is the baseline itself."""
    import torch

    from AttentionMapLib.core.engine import model_spec
    from AttentionMapLib.core.metrics import BASELINES, deletion_insertion
    from AttentionMapLib.models import load_model

    loaded = load_model(settings.model)
    flat = np.ones(model_spec(loaded.network, loaded.img_size).grid_shape)  # token grid: the blur's sigma is one patch
    probabilities: Dict[str, List[float]] = {"original": []}
    for case in cases:
        x = torch.from_numpy(case.image[None])
        for mode in BASELINES:
            scores = deletion_insertion(loaded.network, x, flat, target=loaded.target, steps=1, baseline=mode)
            probabilities.setdefault(mode, []).append(scores["deletion_curve"][-1])
        probabilities["original"].append(scores["deletion_curve"][0])
    return {mode: float(np.mean(values)) for mode, values in probabilities.items()}


def score_whole_scans(settings: Settings, paths: Dict[str, Path], cts, log: Callable[[str], None]) -> Dict[str, Any]:
    """attentionmap_dev/whole_scan.py with the card's calibration and default region (else the lung field), and the
    false-alarm rate on the lesion-free held-out windows."""
    import torch

    from attentionmap_dev.whole_scan import heldout_scan_windows, scan_window_logits
    from AttentionMapLib.core.calibration import card_temperature
    from AttentionMapLib.core.flips import card_flip_axes, mean_view_probabilities
    from AttentionMapLib.core.region import LungFieldRegion, card_default_region
    from AttentionMapLib.core.shifts import card_shift_average
    from AttentionMapLib.models import load_model

    torch.set_num_threads(max(1, settings.workers))
    loaded = load_model(settings.model)
    temperature = card_temperature(loaded.card, loaded.source)
    default = card_default_region(loaded.card, loaded.source) or LungFieldRegion()
    regions = {"whole scan": None, "lung field": default}
    images, kinds = heldout_scan_windows(cts)
    flips, shifts = card_flip_axes(loaded.card, loaded.source), card_shift_average(loaded.card, loaded.source)
    p = mean_view_probabilities(scan_window_logits(loaded.network, images, flip_axes=flips, shift_average=shifts),
                                temperature)[:, 1]
    return {
        "temperature": temperature, "region": default.describe(), "card_region": loaded.card.get("default_region"),
        "flip_axes": list(flips), "shift_average": shifts,
        "rows": whole_scan.whole_scan_rows(loaded, temperature, paths, regions, log),
        "lesion_free": whole_scan.lesion_free_rows(loaded, temperature, paths, regions, log),
        "inserted": whole_scan.inserted_lesion_rows(loaded, temperature, paths, cts, log),
        "heldout_windows": {"windows": len(p), "false_alarms": int((p > 0.5).sum()), "p_max": float(p.max())},
    }


def score_lesion_families(settings: Settings, cts, log: Callable[[str], None]) -> Dict[str, Dict[str, Any]]:
    """`tools.evaluate_demo_model.lesion_family_metrics`: the held-out slabs' pairs with other lesion generators."""
    import torch

    from AttentionMapLib.models import load_model
    from tools.evaluate_demo_model import lesion_family_metrics

    torch.set_num_threads(max(1, settings.workers))
    log("other lesion generators ...")
    return lesion_family_metrics(load_model(settings.model).network, cts)


def lesion_family_report(families: Dict[str, Dict[str, Any]], trained_with_mixture: bool) -> List[str]:
    """The other-generators section of EVALUATION.md."""
    lines = [
        "## Other lesion generators (held-out slabs)",
        "",
        "`attentionmap_dev/lesions.py`: the held-out slabs' crops (centres and radii drawn as for the held-out set) "
        "with nodules from generators other than the demo's slice-blurred solid ellipsoid. *In the training "
        "mixture*: the mixture `lesions.VARIED` (`train_demo_model --varied-fraction`) draws this kind of lesion; "
        + ("this model was trained with it. " if trained_with_mixture else "this model was not trained with it: every "
           "row measures a generator it never saw. ")
        + "Sensitivity at uncalibrated P(lesion) > 0.5; pointing as above (rollout and grad_rollout, peak patch holds "
        "nodule voxels).",
        "",
        "| generator | in the training mixture | pairs | AUC | sensitivity | rollout pointing | grad_rollout pointing "
        "| rollout pointing, radius 3-7 mm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, f in families.items():
        small = f["rollout_pointing_game_3_7_mm"]
        lines.append(
            f"| {name}: {f['generator']} | {'yes' if f['in_training_mixture'] else 'no'} | {f['pairs']} | "
            f"{f['auc']:.3f} | {_pct(f['sensitivity'])} | {_pct(f['rollout_pointing_game'])} | "
            f"{_pct(f['grad_rollout_pointing_game'])} | {'-' if small is None else _pct(small)} |"
        )
    return lines + [""]


def whole_scan_report(data: Dict[str, Any]) -> List[str]:
    """The whole-scan section of EVALUATION.md."""
    rows, free, held = data["rows"], data["lesion_free"], data["heldout_windows"]
    lines = [
        "## Whole scans, as a user loads them",
        "",
        "`attentionmap_dev/whole_scan.py`. " + "\n\n".join(whole_scan.__doc__.split("\n\n")[1:3]),
        "",
        f"Rollout, target lesion, calibration temperature {data['temperature']:.3g} (the card's); region: none "
        f"(*whole scan*) or *lung field* = {data['region']}"
        + (" (the card's default region)." if data["card_region"] else " (the card names no default region).")
        + (f" Flip averaging: the card's default, the {2 ** len(data['flip_axes'])} flips of the model input (axes "
           f"{', '.join(map(str, data['flip_axes']))}): every window's maps and probabilities are the mean over them."
           if data.get("flip_axes") else " No flip averaging (the card names none).")
        + (" Half-patch shift averaging: the card's default, every window's maps and probabilities are also averaged "
           "over the 7 views of the window with its content moved by half a patch (`core.shifts`: each view's map "
           "spread back onto the window's tokens)."
           if data.get("shift_average") else ""),
        "*P(lesion)*: the volume-level probability (the highest calibrated window probability over the windows that "
        "were run); *peak patch holds tumour*: the peak token's 16 mm patch holds tumour voxels; *moved*: distance "
        "from the as-shipped peak (same case, same region setting).",
        "",
        "| case | re-gridding | region | windows | P(lesion) | peak patch holds tumour | peak to tumour (mm) | mass "
        "ratio | moved (mm) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['regridding']} | {r['region_setting']} | {r['windows']} | {r['p_lesion']:.3f} | "
            f"{'yes' if r['peak_patch_holds_tumour'] else 'no'} | {r['peak_to_tumour_mm']:.1f} | "
            f"{r['mass_ratio']:.1f} | {r['peak_moved_mm']:.1f} |"
        )
    for setting in dict.fromkeys(r["region_setting"] for r in rows):
        subset = [r for r in rows if r["region_setting"] == setting]
        hits = sum(r["peak_patch_holds_tumour"] for r in subset)
        moved = max(r["peak_moved_mm"] for r in subset)
        lines += [
            "",
            f"- {setting}: peak patch holds tumour voxels in {hits}/{len(subset)} runs; the peak moves at most "
            f"{moved:.1f} mm between re-griddings (target: every run, at most 16 mm).",
        ]
    lines += ["", "Lesion-free scans (volume-level P(lesion); target < 0.5):", "",
              "| scan | region | windows | P(lesion) |", "|---|---|---|---|"]
    for r in free:
        value = f"{r['p_lesion']:.3f}" if "p_lesion" in r else f"error: {r.get('error')}"
        lines.append(f"| {r['scan']} ({'x'.join(map(str, r['shape']))} voxels) | {r['region_setting']} | "
                     f"{r.get('windows', '-')} | {value} |")
    lines += [
        "",
        f"Lesion-free held-out windows (`tools/evaluate_demo_model.py`: lung1's whole-scan windows meeting its "
        f"held-out slab, inference grid and random starts): {held['false_alarms']}/{held['windows']} with calibrated "
        f"P(lesion) > 0.5 ({100 * (1 - held['false_alarms'] / held['windows']):.1f} % below 0.5; target >= 95 %); "
        f"highest {held['p_max']:.3f}.",
        "",
    ]
    if data.get("inserted"):
        lines += inserted_report(data["inserted"])
    return lines


def inserted_report(rows: List[Dict[str, Any]]) -> List[str]:
    """Lesions of other generators inserted into the lesion-free lung slabs (whole_scan.inserted_lesion_rows)."""
    lo, hi = whole_scan.INSERTED_RADIUS_MM
    lines = [
        "### Lesions of other generators inserted into the lesion-free lung slabs",
        "",
        "`whole_scan.inserted_lesion_rows`: in each lesion-free lung slab above, lesions of each generator of the "
        "next section put into the scan on its own voxel grid (0.57-0.63 mm in-plane, 5 mm slices; each voxel "
        "averages the lesion over the volume it spans), centred in lung at least "
        f"{whole_scan.INSERTED_LUNG_DEPTH_MM:g} mm deep inside the scan's held-out slab, radius U({lo:g}, {hi:g}) mm, "
        f"seed {whole_scan.INSERTED_SEED}; then "
        "the whole slab explained as a user would (rollout, no region); then the same lesions (same centre, shape and "
        "density) drawn on the slab re-gridded *oblique* as above. *Peak patch holds the lesion*: as for the tumours "
        "above, with the lesion (occupancy > 0.5) as the label; *largest move*: the peak's largest distance from its "
        "position on the slab as it is, over that row's lesions.",
        "",
        "| re-gridding | generator | lesions | peak patch holds the lesion | volume-level P(lesion) > 0.5 "
        "| median peak to lesion (mm) | largest move (mm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, families in whole_scan.summarise_inserted_by_regridding(rows).items():
        for name, f in families.items():
            lines.append(f"| {kind} | {name} | {f['lesions']} | {f['peak_patch_holds_lesion']} | "
                         f"{f['p_lesion_above_half']} | {f['median_peak_to_lesion_mm']:.1f} | "
                         f"{f['largest_peak_move_mm']:.1f} |")
    lines += ["", "The same slabs without a lesion (volume-level P(lesion); the peak):", ""]
    for r in rows:
        if r["family"] == whole_scan.NO_LESION:
            peak = ", ".join(f"{v:.0f}" for v in r["peak_ras_mm"])
            lines.append(f"- {r['scan']}, {r['regridding']}: {r['p_lesion']:.3f}; peak at RAS ({peak}) mm")
    return lines + [""]


def score_volumes(settings: Settings, paths: Dict[str, Path], log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Whole-volume attention (sliding windows) against the tumour label, on the label's voxel grid."""
    import torch

    from AttentionMapLib.core.geometry import voxel_spacing
    from AttentionMapLib.core.metrics import distance_to_mask_mm, mask_statistics, pointing_game
    from AttentionMapLib.core.volume import explain_volume
    from AttentionMapLib.io import read_volume
    from AttentionMapLib.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(settings.model)
    rows = []
    for name in ("lung1", "lung2"):
        image, affine = read_volume(paths[f"{name}_image"])
        label, label_affine = read_volume(paths[f"{name}_label"])
        label = label > 0
        log(f"whole volume {name}: one sweep with gradients, three maps ...")
        holder: Dict[str, Any] = {}
        sweep = measure.timed(lambda holder=holder, image=image, affine=affine: holder.update(grad=explain_volume(
            loaded.network, image, affine, loaded.preprocessing, img_size=loaded.img_size, method="grad_rollout",
            target=loaded.target)))[1]
        grad = holder["grad"]
        results = {"grad_rollout": (grad, sweep)}
        for method in ("raw", "rollout"):  # re-read from the same capture, without running the network
            seconds = measure.timed(lambda m=method, holder=holder, grad=grad:
                                    holder.update(result=grad.fuse_again(method=m)))[1]
            results[method] = (holder["result"], seconds)
        # one patch (the token spacing in mm) in label voxels, per label axis
        tolerance = np.ceil(voxel_spacing(grad.ijk_to_ras).max() / voxel_spacing(label_affine)).astype(int)
        for method in ATTENTION:
            result, seconds = results[method]
            resampled = result.resample_to(label.shape, label_affine)
            stats = mask_statistics(resampled, label)
            distance = distance_to_mask_mm(result.peak_ras(), label, label_affine)
            rows.append(
                {
                    "case": name,
                    "map": method,
                    "seconds": seconds,
                    "windows": result.num_windows,
                    "p_lesion": float(result.probabilities[loaded.target])
                    if result.probabilities is not None
                    else float("nan"),
                    "pointing": stats["pointing_hit"],
                    "pointing_1": pointing_game(resampled, label, tolerance),
                    "peak_to_label_mm": distance["nearest_mm"],
                    "mass_fraction": stats["mass_fraction"],
                    "mass_ratio": stats["mass_ratio"],
                    "volume_fraction": stats["volume_fraction"],
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------- summary
def wilson(hits: int, n: int) -> Tuple[float, float]:
    """95 % Wilson interval of a proportion."""
    if n == 0:
        return float("nan"), float("nan")
    z, p = 1.96, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)  # exact 0 / 1 at the ends, not a rounding's -0


def mean_ci(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and the half-width of its normal 95 % interval (NaNs dropped)."""
    array = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if array.size == 0:
        return float("nan"), float("nan")
    half = 1.96 * array.std(ddof=1) / math.sqrt(array.size) if array.size > 1 else float("nan")
    return float(array.mean()), float(half)


def summarise(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per map: rates, means with 95 % intervals, median seconds, over the given records."""
    summary = {}
    n = len(records)
    for name in MAPS:
        maps = [r["maps"][name] for r in records]
        hits, hits1 = sum(m["pointing"] for m in maps), sum(m["pointing_1"] for m in maps)
        summary[name] = {
            "n": n,
            "pointing": hits / n,
            "pointing_ci": wilson(hits, n),
            "pointing_1": hits1 / n,
            "pointing_1_ci": wilson(hits1, n),
            **{
                key: mean_ci([m[key] for m in maps])
                for key in ("mass_fraction", "mass_ratio", "deletion_auc", "insertion_auc")
            },
            "seconds": float(np.median([m["seconds"] for m in maps])),
        }
    return summary


def paired(records: List[Dict[str, Any]], a: str, b: str, key: str, lower_is_better: bool) -> Tuple[int, int, int]:
    """(cases where a beats b, ties, cases where b beats a) on one metric."""
    wins = ties = losses = 0
    for r in records:
        x, y = float(r["maps"][a][key]), float(r["maps"][b][key])
        if x == y:
            ties += 1
        elif (x < y) == lower_is_better:
            wins += 1
        else:
            losses += 1
    return wins, ties, losses


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


# ----------------------------------------------------------------------------------------------- report
def _pct(value: float) -> str:
    return f"{100 * value:.0f} %"


def summary_table(summary: Dict[str, Dict[str, Any]]) -> List[str]:
    lines = [
        "| map | pointing game | within one patch | mass inside mask | mass / volume fraction | deletion AUC ↓ | "
        "insertion AUC ↑ | CPU s per case |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in MAPS:
        s = summary[name]
        ci, ci1 = s["pointing_ci"], s["pointing_1_ci"]
        lines.append(
            f"| {LABELS[name]} | {_pct(s['pointing'])} [{_pct(ci[0])}–{_pct(ci[1])}] | {_pct(s['pointing_1'])} "
            f"[{_pct(ci1[0])}–{_pct(ci1[1])}] | {s['mass_fraction'][0]:.3f} ± {s['mass_fraction'][1]:.3f} | "
            f"{s['mass_ratio'][0]:.2f} ± {s['mass_ratio'][1]:.2f} | {s['deletion_auc'][0]:.3f} ± "
            f"{s['deletion_auc'][1]:.3f} | {s['insertion_auc'][0]:.3f} ± {s['insertion_auc'][1]:.3f} | "
            f"{s['seconds']:.3f} |"
        )
    return lines


def chance_line(records: List[Dict[str, Any]]) -> str:
    return (
        "Chance (a peak drawn uniformly over the tokens): pointing "
        f"{_pct(np.mean([r['chance_pointing'] for r in records]))}, within one patch "
        f"{_pct(np.mean([r['chance_pointing_1'] for r in records]))}; mean mask volume fraction "
        f"{np.mean([r['volume_fraction'] for r in records]):.4f}; mean P(lesion) "
        f"{np.mean([r['p_lesion'] for r in records]):.2f} ({sum(r['p_lesion'] >= 0.5 for r in records)}/{len(records)} "
        "cases with P(lesion) ≥ 0.5)."
    )


def reading(records: List[Dict[str, Any]], summary: Dict[str, Dict[str, Any]]) -> List[str]:
    """Computed comparisons: best map per metric, attention against each baseline with sign tests, and
    where the attention maps win or lose (nodule size, detected or missed)."""
    lines = []
    metrics = (("pointing", False, "pointing game"), ("mass_ratio", False, "relevance mass ratio"),
               ("deletion_auc", True, "deletion AUC"), ("insertion_auc", False, "insertion AUC"))
    for key, lower, label in metrics:
        def value(name: str, key: str = key) -> float:
            return summary[name][key] if key == "pointing" else summary[name][key][0]

        ranked = sorted(MAPS, key=value, reverse=not lower)
        lines.append(f"- {label}: best {LABELS[ranked[0]]}, then " + ", ".join(LABELS[n] for n in ranked[1:]) + ".")
    for method in ATTENTION:
        for baseline in ("gradcam", "occlusion"):
            parts = []
            for key, lower, label in metrics:
                wins, ties, losses = paired(records, method, baseline, key, lower)
                parts.append(
                    f"{label} better in {wins}, worse in {losses}, tied in {ties} (sign test p = "
                    f"{sign_test_p(wins, losses):.2g})"
                )
            lines.append(f"- {LABELS[method]} vs {LABELS[baseline]}, per case: " + "; ".join(parts) + ".")
    synthetic = [r for r in records if r["group"] == GROUPS[0]]
    if synthetic:
        radii = np.array([r["radius_mm"] for r in synthetic])
        cut = float(np.median(radii))
        for label, subset in (
            (f"nodules of radius < {cut:.1f} mm (median)", [r for r in synthetic if r["radius_mm"] < cut]),
            (f"nodules of radius ≥ {cut:.1f} mm", [r for r in synthetic if r["radius_mm"] >= cut]),
            ("crops the model calls lesion (P ≥ 0.5)", [r for r in synthetic if r["p_lesion"] >= 0.5]),
            ("crops the model misses (P < 0.5)", [r for r in synthetic if r["p_lesion"] < 0.5]),
        ):
            if subset:
                rates = ", ".join(
                    f"{LABELS[n]} {_pct(np.mean([r['maps'][n]['pointing'] for r in subset]))}" for n in MAPS
                )
                lines.append(f"- held-out, {label} (n = {len(subset)}): pointing game {rates}.")
    return lines


def volume_table(rows: List[Dict[str, Any]]) -> List[str]:
    lines = [
        "| volume | map | windows | P(lesion) | peak in tumour | within one patch | peak to tumour (mm) | mass inside "
        "| mass / volume fraction | CPU s (sweep or re-read) |",
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {LABELS[r['map']]} | {r['windows']} | {r['p_lesion']:.2f} | "
            f"{'yes' if r['pointing'] else 'no'} | {'yes' if r['pointing_1'] else 'no'} | {r['peak_to_label_mm']:.1f} "
            f"| {r['mass_fraction']:.4f} | {r['mass_ratio']:.2f} | {r['seconds']:.1f} |"
        )
    return lines


def plot(records: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("pointing", "pointing game"),
        ("pointing_1", "within one patch"),
        ("mass_ratio", "mass / volume fraction"),
        ("deletion_auc", "deletion AUC (lower = better)"),
        ("insertion_auc", "insertion AUC (higher = better)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 3.8))
    for ax, (key, title) in zip(axes, panels):
        for offset, group in enumerate(GROUPS):
            subset = [r for r in records if r["group"] == group]
            if not subset:
                continue
            values = [np.nanmean([float(r["maps"][n][key]) for r in subset]) for n in MAPS]
            ax.bar(np.arange(len(MAPS)) + offset * 0.27, values, 0.27, label=f"{group} (n = {len(subset)})")
        ax.set_xticks(np.arange(len(MAPS)) + 0.27)
        ax.set_xticklabels([LABELS[n] for n in MAPS], rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BASELINE_TEXT = {"blur": "the crop smoothed by a Gaussian of one patch sigma, RISE's insertion start",
                 "mean": "the crop's mean intensity everywhere", "zero": "intensity 0 everywhere, i.e. -1000 HU: air"}


def baseline_choice(probabilities: Optional[Dict[str, float]], cases: int) -> str:
    """Why this baseline: the mean P(lesion) of every candidate baseline crop (``--baseline auto``)."""
    if not probabilities:
        return "Chosen on the command line."
    values = ", ".join(f"{mode} {p:.2f}" for mode, p in probabilities.items() if mode != "original")
    return (
        "Chosen automatically as the most lesion-free reference: mean P(lesion) of the fully replaced crop on the "
        f"first {cases} held-out positives: {values} (the original crops: {probabilities['original']:.2f}); a baseline "
        "the model itself calls a lesion would make both curves flat whatever the map."
    )


def write_report(result: Dict[str, Any], out: Path, command: str) -> None:
    s: Settings = Settings(**result["settings"])
    records = result["cases"]
    model = result["model"]
    choice = baseline_choice(result.get("baseline_probabilities"),
                             min(BASELINE_CASES, sum(r["group"] == GROUPS[0] for r in records)))
    lines = [
        "# Evaluation: do the attention maps point at what the model uses?",
        "",
        f"Generated by `{command}` (commit {result['commit']}, {result['started']}, {result['minutes']:.0f} min, "
        f"{s.workers} worker process(es) with one torch thread each, on a shared 2-core machine). Every number comes "
        "from this one run: same model, same cases. Do not edit by hand: rerun the command.",
        "",
        f"Model: `{s.model}` — {model['description']}",
        "",
        "## Set-up",
        "",
        f"- **Cases**: {sum(r['group'] == GROUPS[0] for r in records)} held-out synthetic nodules (the positive crops "
        f"of `demo_data.heldout_set`, seed {model['heldout_seed']}, nodule centres in z-slabs no training nodule "
        f"touches; radius 3–15 mm), and crops around the real tumours: {sum(r['group'] == GROUPS[1] for r in records)} "
        f"for lung1 (small), {sum(r['group'] == GROUPS[2] for r in records)} for lung2 (large): centred on the label's "
        "centroid and shifted by a quarter crop along each axis (crops without tumour voxels dropped). Plus both "
        "whole volumes with the card's sliding windows.",
        f"- **Maps** (token grid {model['grid']}, {model['patch']} voxel patches, min-max normalised, target = class "
        f'{model["target"]} "{model["target_name"]}"): raw = last block\'s CLS row, heads averaged; '
        "rollout (Abnar & Zuidema); rollout (8 flips + 7 shifts) = rollout of each of the crop's 8 axis flips and 7 "
        "half-patch shifts, each map flipped back or spread back onto the crop's tokens, the unnormalised maps "
        "averaged, then min-max (`core.views.explain_views_averaged`, the rule of `attention-map run --flip-average "
        "all --shift-average on`; 15 forward passes; deletion / insertion on the crop as it is); "
        "grad_rollout (Chefer et al.); Grad-CAM = MONAI `GradCAM` on the input of the last block's attention (patch "
        "tokens reshaped to the grid; after the last block only the CLS token reaches the head, so later layers have "
        "no patch gradient), raw ReLU map (MONAI's default post-processing inverts, it is not used); occlusion = "
        f"MONAI `OcclusionSensitivity`, {s.occlusion_mask}³-voxel boxes, overlap {s.occlusion_overlap}, Gaussian "
        "occlusion (box centre faded to 0 = air), importance = P(lesion) − P(lesion | occluded), averaged per patch; "
        "random = uniform noise (seeded).",
        "- **Pointing game**: the map's peak token is a hit when its patch holds lesion voxels; *within one patch* "
        "also accepts the 26 neighbouring patches. Rates with 95 % Wilson intervals.",
        "- **Relevance mass accuracy**: each token's value spread over its patch's voxels; mass inside the mask / "
        "total mass. *mass / volume fraction* divides by the mask's share of the crop: 1 = no better than a uniform "
        "map. Mean ± 95 % interval. Depends on the normalisation (min-max, as displayed): the floor of the map is "
        "subtracted.",
        f"- **Deletion / insertion** (RISE, `metrics.deletion_insertion`): patches ordered by the map, {s.steps} "
        "steps; deletion replaces the top patches of the crop by the baseline, insertion puts them into the "
        f"baseline, so insertion starts from the baseline crop: `{s.baseline}` ({BASELINE_TEXT[s.baseline]}). {choice} "
        "Trapezoid AUC of P(lesion) over the fraction of patches; lower deletion AUC / higher insertion AUC = the map "
        "ranks first what the model uses.",
        "- **CPU s per case**: median CPU seconds (one thread; the wall time on this shared machine is longer and is "
        "kept in evaluation.json) to compute the map for one crop: one forward for raw / rollout, forward + backward "
        "for grad_rollout and Grad-CAM, one forward per occlusion box.",
        "",
        "![evaluation](evaluation.png)",
        "",
    ]
    for group in GROUPS:
        subset = [r for r in records if r["group"] == group]
        if subset:
            lines += (
                [f"## {group} (n = {len(subset)})", "", chance_line(subset), ""]
                + summary_table(summarise(subset))
                + [""]
            )
    lines += (
        [
            "## Whole volumes (sliding windows, attention maps only)",
            "",
            "One sliding-window sweep with gradients per volume (`explain_volume(..., method='grad_rollout')`, its "
            "time in the grad_rollout row); raw and rollout are re-read from the same capture "
            "(`VolumeAttention.fuse_again`, the time of that re-read). A sweep without gradients is cheaper "
            "(docs/BENCHMARKS.md, end to end). The token grid is resampled (trilinear) onto the label's voxel grid; "
            "*within one patch*: the peak within one patch length (per axis, in label voxels) of the tumour; "
            "P(lesion): the volume-level probability (highest window).",
            "",
        ]
        + volume_table(result["volumes"])
        + [""]
    )
    if result.get("whole_scans"):
        lines += whole_scan_report(result["whole_scans"])
    if result.get("lesion_families"):
        lines += lesion_family_report(result["lesion_families"], model["trained_with_lesion_mixture"])
    synthetic = [r for r in records if r["group"] == GROUPS[0]]
    lines += ["## Reading (computed from the tables above)", "", "Held-out synthetic nodules unless stated:", ""]
    lines += reading(synthetic, summarise(synthetic)) if synthetic else ["- no held-out cases in this run."]
    real = [r for r in records if r["group"] != GROUPS[0]]
    if real:
        lines += ["", "Real-tumour crops (lung1 and lung2 together):", ""]
        lines += reading(real, summarise(real))
    lines += [
        "",
        "## What these numbers can and cannot say",
        "",
        "The pointing game and relevance mass ask whether a map lands on the lesion; deletion and insertion ask "
        "whether the map ranks first the regions the model's output depends on. The two can disagree: a model may "
        "rely on context around a lesion, and then a faithful map is not a well-localised one. The evaluation "
        "explains one small demo model trained on synthetic nodules in two patients' CTs; held-out crops share those "
        "patients' anatomy. "
        + (
            "Occlusion (box centres faded to 0) and deletion/insertion (patches set to 0) perturb the input the same "
            "way, which favours occlusion on those two metrics by construction. "
            if s.baseline == "zero"
            else ""
        )
        + "The random map gives the chance level of every metric on the same cases.",
        "",
    ]
    previous = (out / "EVALUATION.md").read_text() if (out / "EVALUATION.md").exists() else ""
    lines += [""] + [block + "\n" for block in measure.sections(previous)]  # written by their own scripts
    (out / "EVALUATION.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------------- main
def run(settings: Settings, log: Callable[[str], None] = print) -> Dict[str, Any]:
    from attentionmap_dev import demo_data
    from AttentionMapLib.core.engine import model_spec
    from AttentionMapLib.models import load_model
    from AttentionMapLib.sample_data import fetch_sample_data

    started, stamp, commit = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), _commit()
    loaded = load_model(settings.model)
    spec = model_spec(loaded.network, loaded.img_size)
    paths = fetch_sample_data()
    log("loading the sample CTs and drawing the held-out cases ...")
    cts = demo_data.load_demo_cts(paths)
    cases = build_cases(cts, settings.pairs)
    baselines = None
    if settings.baseline == "auto":
        baselines = baseline_probabilities(settings, [c for c in cases if c.group == GROUPS[0]][:BASELINE_CASES])
        settings.baseline = min((m for m in baselines if m != "original"), key=baselines.get)
        log(f"deletion/insertion baseline: {settings.baseline} (mean P(target) {baselines})")
    volumes = score_volumes(settings, paths, log)
    whole_scans = score_whole_scans(settings, paths, cts, log)
    families = score_lesion_families(settings, cts, log)
    log(f"{len(cases)} cases, {settings.workers} worker(s) ...")
    records: List[Dict[str, Any]] = []
    jobs = list(enumerate(cases))
    if settings.workers > 1:
        with multiprocessing.get_context("fork").Pool(settings.workers, _init_worker, (settings,)) as pool:
            for record in pool.imap(score_case, jobs):
                records.append(record)
                if len(records) % 10 == 0:
                    log(f"  {len(records)}/{len(cases)} cases, {(time.perf_counter() - started) / 60:.1f} min")
    else:
        _init_worker(settings)
        records = [score_case(job) for job in jobs]
    return {
        "settings": settings.__dict__,
        "commit": commit,
        "started": stamp,
        "minutes": (time.perf_counter() - started) / 60.0,
        "machine": measure.machine_description(),
        "model": {
            "description": loaded.card.get("description", ""),
            "grid": "x".join(map(str, spec.grid_shape)),
            "patch": "x".join(map(str, spec.patch_size)),
            "target": loaded.target,
            "target_name": loaded.classes[loaded.target] if loaded.target is not None else "",
            "heldout_seed": demo_data.HELDOUT_SEED,
            "trained_with_lesion_mixture": "lesions.VARIED" in json.dumps(loaded.card.get("training", {})),
        },
        "cases": records,
        "volumes": volumes,
        "whole_scans": whole_scans,
        "lesion_families": families,
        "baseline_probabilities": baselines,
    }


def _commit() -> str:
    """HEAD at the start of the run, plus the library files that differ from it (the code that ran)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=measure.REPO, capture_output=True, text=True).stdout.strip()

    changed = git("status", "--porcelain", "--", "AttentionMap/AttentionMapLib", "benchmarks").splitlines()
    return git("rev-parse", "--short", "HEAD") + (
        f" + uncommitted changes in {len(changed)} file(s)" if changed else ""
    )


def settings_from_arguments(argv: Optional[List[str]], description: str, model: Tuple[str, str],
                            defaults: Dict[str, Any], helps: Dict[str, str]) -> Tuple[Settings, argparse.Namespace]:
    """The command line of an evaluation script (this one, ``evaluate_segmentation``): its Settings, plus --out and
    --from-json. ``model``: the default model and its help; ``defaults`` / ``helps``: pairs, occlusion_mask,
    occlusion_overlap and their help texts, and the help of --baseline and --workers."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=model[0], help=model[1])
    parser.add_argument("--pairs", type=int, default=defaults["pairs"], help=helps["pairs"])
    parser.add_argument("--steps", type=int, default=8, help="deletion/insertion steps")
    parser.add_argument("--baseline", default="auto", choices=("auto", "blur", "mean", "zero"), help=helps["baseline"])
    parser.add_argument("--occlusion-mask", type=int, default=defaults["occlusion_mask"],
                        help="occlusion box edge (voxels)")
    parser.add_argument("--occlusion-overlap", type=float, default=defaults["occlusion_overlap"],
                        help=helps["occlusion_overlap"])
    parser.add_argument("--workers", type=int, default=2, help=helps["workers"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random maps (plus the case index)")
    parser.add_argument("--out", type=Path, default=measure.REPO / "docs")
    parser.add_argument("--from-json", type=Path, help="only rewrite the report from a saved JSON of a run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return Settings(args.model, args.pairs, args.steps, args.baseline, args.occlusion_mask, args.occlusion_overlap,
                    args.workers, args.seed), args


def main(argv: Optional[List[str]] = None) -> int:
    settings, args = settings_from_arguments(
        argv, __doc__.splitlines()[0],
        ("demo", "'demo' or a model card .json (a lung-nodule classifier on demo_data crops)"),
        {"pairs": 100, "occlusion_mask": 16, "occlusion_overlap": 0.25},
        {"pairs": "held-out synthetic nodules (positive crops) to score",
         "baseline": "deletion/insertion baseline; auto: the one with the lowest mean P(target) on the first "
                     f"{BASELINE_CASES} held-out crops (the most lesion-free reference)",
         "occlusion_overlap": "occlusion box overlap (0.25: 12-voxel stride)",
         "workers": "processes (one torch thread each)"})
    command = "python -m benchmarks.evaluate" + (f" --model {args.model}" if args.model != "demo" else "") + (
        f" --pairs {args.pairs}" if args.pairs != 100 else "")
    result = saved_result(args, lambda: run(settings), "evaluation.json")
    plot(result["cases"], args.out / "evaluation.png")
    write_report(result, args.out, command)
    print(f"wrote {args.out / 'EVALUATION.md'}")
    return 0


def saved_result(args: argparse.Namespace, compute: Callable[[], Dict[str, Any]], name: str) -> Dict[str, Any]:
    """The result of a run, as JSON data: read from --from-json, or computed and saved as ``args.out / name``."""
    if args.from_json:
        return json.loads(args.from_json.read_text())
    (args.out / name).write_text(json.dumps(compute(), indent=1, default=_json_default))
    return json.loads((args.out / name).read_text())


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    sys.exit(main())
