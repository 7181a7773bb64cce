"""Evaluate the demo lung-nodule ViT on the fixed held-out set and on the two real tumours; write the card.

    # export the final training checkpoint, evaluate it, and write weights + card (all numbers from here):
    .venv/bin/python -m tools.evaluate_demo_model --checkpoint build/demo_training/checkpoint.pt --ship
    # re-evaluate the shipped model (prints JSON, writes nothing):
    .venv/bin/python -m tools.evaluate_demo_model

Held-out set: `demo_data.heldout_set(cts, pairs=PAIRS, seed=demo_data.HELDOUT_SEED)`: nodules centred in
z-slabs of lung1/lung2 that no training nodule touches, each crop also without its nodule.
Pointing game (rollout, `AttentionMapLib.explain`, target = "lesion", head mean): the peak token of the
6x6x6 map is a hit when its 16 mm patch contains nodule voxels; "within one patch" also counts the 26
neighbouring patches. Chance = the same hit rates for a peak drawn uniformly over the tokens.
Other lesion generators (`attentionmap_dev/lesions.py` FAMILIES): FAMILY_PAIRS held-out pairs per generator, centres
in the same slabs; each family says whether the training mixture `lesions.VARIED` draws its kind of lesion.
Real tumours: crops centred on each label's centroid and shifted by 24 mm along each axis; and the whole CT
in overlapping windows (stride 48 mm, inside the volume): the rollout peak of the window with the highest P(lesion).
Lesion-free held-out windows: every inference-grid window of the padded whole scan of lung1 that meets
lung1's held-out slab (no whole-scan training window does) plus `SCAN_RANDOM` random ones
(`demo_data.WholeScanSampler`, region "heldout", seed `SCAN_SEED`), tumour excluded: the false-alarm rate
P(lesion) > 0.5. lung2's slab windows are reported apart: the second training phase used lung2 whole.
Calibration: temperature scaling (`calibration.fit_temperature`) fitted on the even-numbered held-out
pairs and lesion-free held-out windows, its expected calibration error reported on the odd-numbered ones.
Whole scans (`attentionmap_dev/whole_scan.py`, through `explain_volume` as a user runs it): lung1 and lung2 as
shipped and re-gridded, with and without the card's default region; and three lesion-free scans (two lung
slabs, a whole head CT).
Every probability and map here is the card's default inference: averaged over the 8 flips of the model input
(`DEFAULT_FLIP_AXES`, written to the card as "default_flip_axes") and its 7 half-patch shifts
(`DEFAULT_SHIFT_AVERAGE`, "default_shift_average"), each view's map put back onto the input's tokens
(`views.explain_views_averaged`).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]

from attentionmap_dev import demo_data, lesions, scan_faces, whole_scan  # noqa: E402
from attentionmap_dev.whole_scan import (  # noqa: E402
    SCAN_HELDOUT,
    SCAN_RANDOM,
    SCAN_SEED,
    heldout_scan_windows,
    scan_window_logits,
)
from AttentionMapLib.core.calibration import expected_calibration_error, fit_temperature  # noqa: E402
from AttentionMapLib.core.flips import mean_view_probabilities  # noqa: E402
from AttentionMapLib.core.geometry import apply_affine  # noqa: E402
from AttentionMapLib.core.metrics import distance_to_mask_mm, mask_statistics, pointing_game  # noqa: E402
from AttentionMapLib.core.region import LungFieldRegion  # noqa: E402
from AttentionMapLib.core.views import explain_views_averaged  # noqa: E402
from AttentionMapLib.models import read_state_dict  # noqa: E402
from tools.train_demo_model import auc, auc_interval, build_network  # noqa: E402

MODELS_DIR = ROOT / "AttentionMap" / "AttentionMapLib" / "demo_model"
CARD_NAME = "demo_lung_nodule_vit.json"
WEIGHTS_NAME = "demo_lung_nodule_vit.safetensors"
PAIRS = 200
SUBSET_PAIRS = 6  # the small fixed subset the test suite re-checks
FAMILY_PAIRS = 100  # held-out pairs per other lesion generator
SHIFT_VOX = demo_data.CROP // 4  # 24 mm on the 2 mm grid
PATCH = 8
DEFAULT_REGION = {"kind": "lung_field", "hu_threshold": demo_data.LUNG_HU, "margin_mm": 16.0}
DEFAULT_FLIP_AXES = (0, 1, 2)  # the card's default flips: every number here is of the 8-view average
DEFAULT_SHIFT_AVERAGE = True  # the card's default: maps and probabilities also averaged over the 7 half-patch shifts
DESCRIPTION = (
    "Demo MONAI ViT answering 'is there a lung nodule in this 48^3 crop (2 mm voxels, 96 mm cube)?'. "
    "Trained on synthetic nodules inserted into two real chest CTs; a demonstration model for attention "
    "maps, not a clinical tool. Patch 8 -> a 6x6x6 token grid (16 mm patches). On a whole scan it runs in "
    "sliding windows (trained with whole-scan negatives); the volume-level P(lesion) is the highest "
    "calibrated window probability, the default region is the automatic lung field, every window is "
    "averaged (map and probability) over the 8 flips of its input (default_flip_axes) and its 7 half-patch "
    "shifts (default_shift_average), and overlapping windows are blended with Gaussian "
    "weights favouring their centres (preprocessing.spatial.blend); the metrics below were measured so."
)


def chance_rate(tokens: np.ndarray, tolerance: int) -> float:
    """Pointing-game hit rate of a peak drawn uniformly over the token grid, for one mask (n1, n2, n3)."""
    hits = [pointing_game(onehot, tokens, tolerance) for onehot in np.eye(tokens.size).reshape(-1, *tokens.shape)]
    return float(np.mean(hits))


def peak_hits(grids: np.ndarray, tokens: np.ndarray) -> Dict[str, np.ndarray]:
    """Per sample (grids, tokens: (N, n1, n2, n3)): peak in a nodule patch, peak within one patch, and the
    chance rates of both."""
    return {
        "hit": np.array([pointing_game(g, t, 0) for g, t in zip(grids, tokens)]),
        "hit_within_one_patch": np.array([pointing_game(g, t, 1) for g, t in zip(grids, tokens)]),
        "chance": np.array([chance_rate(t, 0) for t in tokens]),
        "chance_within_one_patch": np.array([chance_rate(t, 1) for t in tokens]),
    }


def run_model(model: torch.nn.Module, images: np.ndarray, method: str = "rollout", batch: int = 8):
    """P(lesion) (N,) and attention grids (N, 6, 6, 6) (normalize='none', target 1) for images (N, 1, 48, 48, 48),
    averaged over the card's views (`run_model_logits`)."""
    logits, grids = run_model_logits(model, images, method, batch)
    return mean_view_probabilities(logits)[:, 1], grids


def run_model_logits(model: torch.nn.Module, images: np.ndarray, method: str = "rollout", batch: int = 8,
                     shift_average: bool = DEFAULT_SHIFT_AVERAGE):
    """Logits (V, N, 2) of the V views of the card's flips (`DEFAULT_FLIP_AXES`) and, with ``shift_average``,
    half-patch shifts, and the attention grids (N, 6, 6, 6) averaged over the same views
    (`views.explain_views_averaged`; normalize='none', target 1)."""
    logits, grids = [], []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[s : s + batch]))
        grid, view_logits = explain_views_averaged(model, x, DEFAULT_FLIP_AXES, shift_average, normalize="none",
                                                   method=method, target=1)
        logits.append(view_logits)
        grids.append(grid)
    return np.concatenate(logits, axis=1), np.concatenate(grids)


def card_maps(model: torch.nn.Module, images: np.ndarray, method: str = "rollout") -> np.ndarray:
    """The card's attention grids (N, 6, 6, 6) of images (N, 1, 48, 48, 48) (`run_model_logits`), for a caller
    that does not read the probabilities."""
    return run_model_logits(model, images, method)[1]


def card_view_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Logits (V, N, 2) of windows (N, 1, 48, 48, 48) in the card's views (`run_model_logits`), no attention."""
    return scan_window_logits(model, images, flip_axes=DEFAULT_FLIP_AXES, shift_average=DEFAULT_SHIFT_AVERAGE)


def calibration_metrics(pair_logits: np.ndarray, pair_labels: np.ndarray, scan_logits: np.ndarray) -> Dict[str, object]:
    """Temperature fitted on the even-numbered held-out pairs and windows, ECE on the odd-numbered ones; logits
    (V, N, 2) per view (P = the mean over the views of softmax(logits / T))."""
    pair_index = np.arange(len(pair_labels)) // 2  # a positive and its negative twin share a pair number
    fit_pairs, check_pairs = pair_index % 2 == 0, pair_index % 2 == 1
    scan_index = np.arange(scan_logits.shape[1])
    fit_scan, check_scan = scan_index % 2 == 0, scan_index % 2 == 1
    logits = {"fit": np.concatenate([pair_logits[:, fit_pairs], scan_logits[:, fit_scan]], axis=1),
              "check": np.concatenate([pair_logits[:, check_pairs], scan_logits[:, check_scan]], axis=1)}
    labels = {"fit": np.concatenate([pair_labels[fit_pairs], np.zeros(fit_scan.sum(), int)]),
              "check": np.concatenate([pair_labels[check_pairs], np.zeros(check_scan.sum(), int)])}
    temperature = fit_temperature(logits["fit"], labels["fit"])

    def ece(t: float) -> float:
        return round(expected_calibration_error(mean_view_probabilities(logits["check"], t)[:, 1], labels["check"]), 4)

    return {
        "temperature": round(temperature, 4),
        "ece": ece(temperature),
        "ece_uncalibrated": ece(1.0),
        "fitted_on": f"{len(labels['fit'])} held-out crops (even-numbered held-out pairs, even-numbered lesion-free "
        "held-out windows)",
        "ece_on": f"{len(labels['check'])} other held-out crops (the odd-numbered ones); "
        "10 equal-width bins of P(lesion)",
    }


def heldout_metrics(model: torch.nn.Module, cts: Sequence[demo_data.LungCT], pairs: int,
                    lesion: Optional[lesions.LesionFamily] = None) -> Dict[str, object]:
    """Accuracy, AUC (with a 95 % bootstrap interval over the pairs) and pointing games (rollout and raw last
    layer) on the first `pairs` held-out pairs (their nodules drawn by `lesion` when given)."""
    logits, rollout, raw, grad, tokens, labels, radii = [], [], [], [], [], [], []
    for chunk in demo_data.heldout_batches(cts, pairs, lesion=lesion):
        lg, g = run_model_logits(model, chunk.images)
        positives = chunk.images[chunk.labels == 1]  # the pointing games read the positives' maps only
        r = card_maps(model, positives, method="raw")
        gr = card_maps(model, positives, method="grad_rollout")
        logits.append(lg)
        rollout.append(g)
        raw.append(r)
        grad.append(gr)
        tokens.append(demo_data.token_labels(chunk.masks, PATCH))
        labels.append(chunk.labels)
        radii.append(chunk.radii_mm)
    pair_logits, y = np.concatenate(logits, axis=1), np.concatenate(labels)
    p = mean_view_probabilities(pair_logits)[:, 1]
    pos = y == 1
    tok = np.concatenate(tokens)[pos]
    radius = np.concatenate(radii)[pos]
    roll = peak_hits(np.concatenate(rollout)[pos], tok)
    rawh = peak_hits(np.concatenate(raw), tok)
    gradh = peak_hits(np.concatenate(grad), tok)
    mass_ratio = [mask_statistics(g, t)["mass_ratio"] for g, t in zip(np.concatenate(rollout)[pos], tok)]
    out: Dict[str, object] = {
        "heldout_positives": int(pos.sum()),
        "heldout_negatives": int((~pos).sum()),
        "heldout_accuracy": float(((p > 0.5) == pos).mean()),
        "heldout_auc": auc(p, y),
        "heldout_auc_ci95": [round(v, 4) for v in auc_interval(p, y, np.arange(len(y)) // 2)],
        "heldout_sensitivity": float((p[pos] > 0.5).mean()),
        "heldout_specificity": float((p[~pos] <= 0.5).mean()),
        "rollout_pointing_game": float(roll["hit"].mean()),
        "rollout_pointing_game_chance": float(roll["chance"].mean()),
        "rollout_pointing_game_within_one_patch": float(roll["hit_within_one_patch"].mean()),
        "rollout_pointing_game_within_one_patch_chance": float(roll["chance_within_one_patch"].mean()),
        "rollout_mass_ratio_median": float(np.median(mass_ratio)),
        "grad_rollout_pointing_game": float(gradh["hit"].mean()),
        "grad_rollout_pointing_game_within_one_patch": float(gradh["hit_within_one_patch"].mean()),
        "raw_last_layer_pointing_game": float(rawh["hit"].mean()),
        "raw_last_layer_pointing_game_chance": float(rawh["chance"].mean()),
        "rollout_pointing_game_by_radius_mm": {},
    }
    for lo, hi in ((3, 7), (7, 11), (11, 15.01)):
        sel = (radius >= lo) & (radius < hi)
        out["rollout_pointing_game_by_radius_mm"][f"{lo}-{int(hi)}"] = {
            "n": int(sel.sum()),
            "hit": float(roll["hit"][sel].mean()) if sel.any() else None,
            "p_lesion_mean": float(p[pos][sel].mean()) if sel.any() else None,
        }
    out["_pair_logits"], out["_pair_labels"] = pair_logits, y  # for the calibration, not written to the card
    return out


def lesion_family_metrics(model: torch.nn.Module, cts: Sequence[demo_data.LungCT],
                          pairs: int = FAMILY_PAIRS) -> Dict[str, Dict[str, object]]:
    """For each `lesions.FAMILIES` generator: `pairs` held-out pairs (centres in the held-out slabs, radius
    U(3, 15) mm, seed HELDOUT_SEED) with its nodules; AUC, sensitivity at P > 0.5 (uncalibrated) and pointing."""
    out: Dict[str, Dict[str, object]] = {}
    for family in lesions.FAMILIES:
        m = heldout_metrics(model, cts, pairs, lesion=family)
        out[family.name] = {
            "in_training_mixture": family.trained,
            "generator": family.describe(),
            "pairs": pairs,
            "auc": round(float(m["heldout_auc"]), 4),
            "sensitivity": round(float(m["heldout_sensitivity"]), 4),
            "rollout_pointing_game": round(float(m["rollout_pointing_game"]), 4),
            "grad_rollout_pointing_game": round(float(m["grad_rollout_pointing_game"]), 4),
            "rollout_pointing_game_3_7_mm": m["rollout_pointing_game_by_radius_mm"]["3-7"]["hit"],
        }
    return out


def subset_values(model: torch.nn.Module, cts: Sequence[demo_data.LungCT]) -> Dict[str, object]:
    """Exact per-crop values on the first SUBSET_PAIRS held-out pairs (re-checked by the tests)."""
    subset = demo_data.heldout_set(cts, SUBSET_PAIRS)
    p, g = run_model(model, subset.images)
    peaks = g.reshape(len(g), -1).argmax(1)
    return {"pairs": SUBSET_PAIRS, "p_lesion": [round(float(v), 5) for v in p], "rollout_peak_token": peaks.tolist()}


def tumour_crops(ct: demo_data.LungCT) -> List[np.ndarray]:
    """Crop centres (I, J, K): the tumour centroid and the centroid shifted by +-24 mm along each axis."""
    centre = np.round(np.argwhere(ct.tumour).mean(0)).astype(int)
    shifts = [np.zeros(3, int)] + [s * SHIFT_VOX * np.eye(3, dtype=int)[a] for a in range(3) for s in (-1, 1)]
    return [centre + s for s in shifts]


def real_tumour_results(model: torch.nn.Module, ct: demo_data.LungCT) -> Dict[str, object]:
    """Per crop: P(lesion), rollout peak (RAS mm of the peak patch's centre), hit (peak patch holds tumour
    voxels), peak inside the label, distance (mm) from the peak to the nearest tumour voxel, hit chance."""
    crops = [demo_data.crop_around(ct, centre) for centre in tumour_crops(ct)]
    p, g = run_model(model, np.stack([image for image, _ in crops]))
    rows = []
    for (_, origin), prob, grid in zip(crops, p, g):
        sl = tuple(slice(o, o + demo_data.CROP) for o in origin)
        tokens = demo_data.token_labels(ct.tumour[sl][None], PATCH)[0]
        peak = np.array(np.unravel_index(int(grid.argmax()), grid.shape))
        peak_ras = apply_affine(ct.ijk_to_ras, origin + peak * PATCH + (PATCH - 1) / 2.0)
        distance = distance_to_mask_mm(peak_ras, ct.tumour, ct.ijk_to_ras)
        rows.append(
            {
                "crop_origin_ijk": origin.tolist(),
                "p_lesion": round(float(prob), 4),
                "peak_ras_mm": [round(float(v), 1) for v in peak_ras],
                "peak_patch_holds_tumour": pointing_game(grid, tokens, 0),
                "peak_inside_label": distance["inside"],
                "distance_to_tumour_mm": round(distance["nearest_mm"], 1),
                "hit_chance": round(chance_rate(tokens, 0), 4),
                "tumour_patches": int(tokens.sum()),
            }
        )
    return {
        "crops": rows,
        "peak_patch_holds_tumour": f"{sum(r['peak_patch_holds_tumour'] for r in rows)}/{len(rows)}",
        "peak_inside_label": f"{sum(r['peak_inside_label'] for r in rows)}/{len(rows)}",
        "hit_chance_mean": round(float(np.mean([r["hit_chance"] for r in rows])), 4),
        "median_distance_mm": float(np.median([r["distance_to_tumour_mm"] for r in rows])),
        "p_lesion_median": float(np.median([r["p_lesion"] for r in rows])),
    }


def window_origins(shape: Sequence[int]) -> List[np.ndarray]:
    """Crop corners tiling a volume with stride CROP // 2 (the card's overlap 0.5), the last flush with the end."""
    axes = [sorted(set(range(0, n - demo_data.CROP + 1, demo_data.CROP // 2)) | {n - demo_data.CROP}) for n in shape]
    return [np.array([a, b, c]) for a in axes[0] for b in axes[1] for c in axes[2]]


def top_window_result(model: torch.nn.Module, ct: demo_data.LungCT) -> Dict[str, object]:
    """Whole CT in overlapping windows: where the rollout peak of the window with the highest P(lesion) lands
    relative to the real tumour, and how many of the top 5 windows contain tumour voxels."""
    origins = window_origins(ct.hu.shape)
    images = np.stack(
        [
            demo_data.scale_intensity(ct.hu[tuple(slice(o, o + demo_data.CROP) for o in origin)])[None]
            for origin in origins
        ]
    )
    p = mean_view_probabilities(card_view_logits(model, images))[:, 1]
    order = np.argsort(-p, kind="stable")
    holds = [bool(ct.tumour[tuple(slice(o, o + demo_data.CROP) for o in origins[i])].any()) for i in order[:5]]
    best = order[0]
    grid = card_maps(model, images[best : best + 1])
    peak = np.array(np.unravel_index(int(grid[0].argmax()), grid[0].shape))
    peak_ras = apply_affine(ct.ijk_to_ras, origins[best] + peak * PATCH + (PATCH - 1) / 2.0)
    distance = distance_to_mask_mm(peak_ras, ct.tumour, ct.ijk_to_ras)
    return {
        "windows": len(origins),
        "top5_windows_holding_tumour": f"{sum(holds)}/5",
        "top_window_p_lesion": round(float(p[best]), 4),
        "top_window_peak_ras_mm": [round(float(v), 1) for v in peak_ras],
        "top_window_peak_inside_label": distance["inside"],
        "top_window_peak_distance_mm": round(distance["nearest_mm"], 1),
        "top_window_peak_to_centroid_mm": round(distance["centroid_mm"], 1),
    }


def load_shipped(card_path: Path) -> torch.nn.Module:
    """The network a card describes, weights read with weights_only=True."""
    card = json.loads(card_path.read_text())
    model = build_network(card["network"]["args"])
    model.load_state_dict(
        {k: v.float() for k, v in read_state_dict(card_path.parent / card["weights"]).items()}
    )
    return model.eval()


STEP = (
    "CPU (2 cores), torch threads {threads}. Each step: {pairs} crops once with and once without a synthetic "
    "nodule at the same place (a share {wall} of the nodules centred on the lung's rim, next to the pleura or "
    "the mediastinum){small}{scans}. AdamW (weight decay {wd}), linear warm-up over {warmup} samples to lr {lr}, then "
    "{schedule}; gradient norm clipped at 1; random flips.{curriculum} Loss = cross-entropy on the "
    "ViT's classification head + {token_weight} x token labelling: a Linear head (training only, not shipped) "
    "on the last block's patch tokens after the ViT's final LayerNorm predicts whether each 8^3 patch contains "
    "nodule voxels (BCE, positive weight {token_pos_weight}). {attention}The ViT's classification head and "
    "attention are unchanged; the shipped network is a plain MONAI ViT."
)
SCANS = (
    " plus {scan} lesion-free whole-scan windows cut from the padded model input exactly as sliding-window "
    "inference cuts them (starts on the inference grid, on the patch grid and anywhere; every body region, the "
    "air around the body, the table, the scan's cut faces and the padding){regridded}, a share {hard} of them "
    "hard negatives: windows the current model gives P(lesion) > {threshold} (mined on an {stride}-voxel start "
    "grid and the inference grid at the start of each phase and every {remine} min, moved by up to 4 voxels). "
    "No whole-scan window meets a widened real tumour box, nor the held-out slab of {heldout}"
)
REGRIDDED = (
    ", from the scans as shipped and from {n} random re-griddings of each (`demo_data.regridded_ct`: rotated up to "
    "{degrees[2]:g} degrees about S and {degrees[0]:g} about R and {degrees[1]:g} about A, "
    "{in_plane[0]:g}-{in_plane[1]:g} mm in-plane and {slices[0]:g}-{slices[1]:g} mm slices, then the card's "
    "preprocessing), so that the windows' "
    "interpolation, faces and padding vary as they do between scanners"
)


def _regridded_text(n: int) -> str:
    """REGRIDDED for `n` re-griddings per scan, with the ranges `demo_data.regridded_ct` draws from."""
    return REGRIDDED.format(n=n, degrees=demo_data.REGRID_MAX_DEGREES, in_plane=demo_data.REGRID_IN_PLANE_MM,
                            slices=demo_data.REGRID_SLICE_MM)


def _sampling_options_text(settings: Dict[str, object]) -> str:
    """The recipe's words for `--small-fraction`, `--varied-fraction` and `--face-fraction` (empty when 0 or not yet
    options)."""
    share = float(settings.get("small_fraction", 0) or 0)
    lo, hi = demo_data.SMALL_RADIUS_MM
    text = f"; a share {share:g} of the pairs with a small nodule (radius {lo:g}-{hi:g} mm)" if share else ""
    varied = float(settings.get("varied_fraction", 0) or 0)
    if varied:
        text += (f"; a share {varied:g} of the pairs with a nodule from the mixture `lesions.VARIED` instead of the "
                 f"demo generator ({lesions.VARIED.describe()})")
    faces = float(settings.get("face_fraction", 0) or 0)
    if faces:
        text += (f"; a share {faces:g} of the pairs (both crops alike, clear of the nodule) and of the whole-scan "
                 "windows cut by a random scan face (`scan_faces`: a plane within "
                 f"{scan_faces.FACE_TILT_DEGREES:g} degrees of an axis, padding beyond it)")
    return text


def _fine_tuned(phases: List[Dict[str, object]]) -> bool:
    """Did the training's first phase start from earlier weights (`--init-weights`)?"""
    return phases[0]["settings"].get("init_weights") not in (None, "None")


def recipe_text(phases: List[Dict[str, object]], previous: str = "", total: Optional[int] = None) -> str:
    """Human-readable recipe from the checkpoint's recorded settings: the first phase in full, then what
    each resumed phase changed. `previous`: the training text of the weights a fine-tune started from;
    `total`: the checkpoint's sample count (gives each phase's samples)."""
    first = phases[0]["settings"]
    w = float(first["cls_attention_weight"])
    attention = (
        f"PLUS an auxiliary loss (weight {w}) pulling the last layer's CLS attention (head mean) onto the "
        "nodule's patches for positive crops: this shapes the attention maps. "
        if w > 0
        else "No loss on the attention itself. "
    )
    scans = ""
    if int(first["scan_negatives"]) > 0:
        n = int(first.get("regridded_scans", 0) or 0)
        scans = SCANS.format(
            scan=first["scan_negatives"], hard=first["hard_fraction"], threshold=first["mine_threshold"],
            stride=first["mine_stride"], remine=first["remine_minutes"],
            heldout=first.get("scan_heldout", "None").replace("None", "every scan"),
            regridded=_regridded_text(n) if n else "")
    curriculum = int(first["curriculum_samples"])
    text = STEP.format(
        threads=first.get("threads", "2"), pairs=first["pairs_per_batch"], wall=first["wall_fraction"], scans=scans,
        small=_sampling_options_text(first),
        wd=first["weight_decay"], warmup=first["warmup_samples"], lr=first["lr"],
        schedule=(f"a linear fall to 0 at {first['decay_samples']} samples"
                  if int(first.get("decay_samples", 0) or 0) else "constant (no cosine)"),
        curriculum=(f" Curriculum: nodule radius 8-15 mm for the first {curriculum} samples, then 3-15 mm."
                    if curriculum else ""),
        token_weight=first["token_weight"], token_pos_weight=first["token_pos_weight"], attention=attention)
    if _fine_tuned(phases):
        text = f"Fine-tuned from earlier demo weights (a fresh optimiser). {text} The earlier weights: {previous}"
    else:
        text = f"From scratch. {text}"
    return text + _resumed(phases, first, total)


def _resumed(phases: List[Dict[str, object]], first: Dict[str, object], total: Optional[int] = None) -> str:
    """What each resumed phase changed, and how many samples it trained (`total`: the checkpoint's samples)."""
    text, explained = "", False
    ends = [phase["from_samples"] for phase in phases[2:]] + [total]
    for phase, end in zip(phases[1:], ends):
        changed = {
            k: v for k, v in phase["settings"].items()
            if first.get(k) != v and k not in ("resume", "minutes", "out_dir", "max_samples")
        }
        text += f" Resumed at sample {phase['from_samples']} with " + (
            ", ".join(f"{k}={v}" for k, v in changed.items()) or "the same settings"
        ) + f" for at most {phase['settings']['minutes']} min"
        if end is not None:
            trained = int(end) - int(phase["from_samples"])
            text += f" ({trained} samples" + (": the sample limit was already reached" if trained == 0 else "") + ")"
        text += "."
        n = int(changed.get("regridded_scans", 0) or 0)
        if n and not explained:
            text += f" Whole-scan windows from then on came {_regridded_text(n)[2:]}."
            explained = True
    return text


def write_card(checkpoint: Dict[str, object], metrics: Dict[str, object], out_dir: Path,
               calibration: Dict[str, object], previous: Optional[Dict[str, object]] = None) -> Path:
    """Write the weights (fp32 state_dict) and the model card JSON into out_dir; returns the card path.

    previous: the card of the weights a fine-tune started from (its training record is kept in the new card)."""
    previous_training = (previous or {}).get("training", {})
    previous_text = (f"{previous_training.get('recipe', '')} ({previous_training.get('samples')} samples, "
                     f"{previous_training.get('wall_time_s')} s; command: {previous_training.get('command')})")
    card = {
        "name": "demo_lung_nodule_vit",
        **evaluated_fields(metrics, calibration),
        "network": {"name": "ViT", "args": checkpoint["network_args"]},
        "weights": WEIGHTS_NAME,
        "classes": ["no lesion", "lesion"],
        "target": 1,
        "training_data": (
            "lung1_image.nrrd and lung2_image.nrrd (chest CT, 5 mm slices) from the pyradiomics 3.0.1 source "
            "distribution on PyPI (BSD-3-Clause), resampled to RAS 2 mm. Synthetic nodules: random ellipsoids, "
            "radius 3-15 mm (semi-axes x0.8-1.25, random orientation), sigmoid edge 0.5-1.5 mm, blurred along z "
            "with [1/4 1/2 1/4] like 5 mm slices, -300..100 HU with 10-30 HU noise, centred in the lung mask. "
            f"Crops {demo_data.CROP}^3 voxels. Negatives: the same crops without the nodule, and lesion-free windows "
            "of the whole scans as inference cuts them (every region, the padding at the faces; mined false alarms), "
            "also of random re-griddings of the scans (see the recipe). "
            "Held out: both real "
            "tumours (no training or held-out crop meets their bounding box widened by 8 mm) and an axial slab per "
            "CT ("
            + ", ".join(f"{k} K {a}-{b - 1}" for k, (a, b) in demo_data.HELDOUT_SLABS.items())
            + " on the RAS 2 mm grid) holding every held-out nodule centre; training "
            f"nodule centres stay {2 * demo_data.SLAB_MARGIN} mm or more from those slabs, so no training nodule "
            "touches them. The held-out crops share the two patients' anatomy with training (only two chest CTs "
            "exist here); a head CT of another patient (InVesalius, `sample_data.fetch_head_ct`) was never trained "
            "on and is evaluated as a lesion-free whole scan."
        ),
        "training": {
            "command": " && ".join(
                " ".join([".venv/bin/python -m tools.train_demo_model", *phase["argv"]])
                for phase in checkpoint["phases"]
            ),
            "seed": checkpoint["seed"],
            "samples": checkpoint["samples"],
            "steps": checkpoint["step"],
            "wall_time_s": round(float(checkpoint["wall_time_s"]), 1),
            "previous_samples": previous_training.get("samples"),
            "previous_wall_time_s": previous_training.get("wall_time_s"),
            "recipe": recipe_text(checkpoint["phases"], previous_text, checkpoint["samples"]),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().contiguous() for k, v in checkpoint["model"].items()}
    save_file(weights, str(out_dir / WEIGHTS_NAME))
    path = out_dir / CARD_NAME
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def evaluated_fields(metrics: Dict[str, object], calibration: Dict[str, object]) -> Dict[str, object]:
    """The card fields an evaluation writes (`write_card`) and rewrites (`update_card`): the description, the
    inference its numbers are of (preprocessing with the sliding windows and their blending, region, flips: what
    `as_loaded` runs), the calibration and the metrics."""
    return {"description": DESCRIPTION, "preprocessing": copy.deepcopy(demo_data.CARD_PREPROCESSING),
            "default_region": DEFAULT_REGION, "default_flip_axes": list(DEFAULT_FLIP_AXES),
            "default_shift_average": DEFAULT_SHIFT_AVERAGE,
            "calibration": calibration, "metrics": metrics}


def update_card(path: Path, metrics: Dict[str, object], calibration: Dict[str, object]) -> Path:
    """Rewrite a card's `evaluated_fields` in place, keeping every other field (weights, network, training
    record) and the order of its keys."""
    card = json.loads(path.read_text())
    fresh = evaluated_fields(metrics, calibration)
    order = list(card) + [key for key in fresh if key not in card]
    merged = {**card, **fresh}
    path.write_text(json.dumps({key: merged[key] for key in order}, indent=2) + "\n")
    return path


def as_loaded(model: torch.nn.Module):
    """The network with the demo card's preprocessing, classes and target, as `models.load_model` gives it."""
    from AttentionMapLib.models import LoadedModel

    return LoadedModel(network=model.eval(), preprocessing=copy.deepcopy(demo_data.CARD_PREPROCESSING),
                       classes=["no lesion", "lesion"], target=1, img_size=(demo_data.CROP,) * 3,
                       card={"default_flip_axes": list(DEFAULT_FLIP_AXES),
                             "default_shift_average": DEFAULT_SHIFT_AVERAGE,
                             "domain": json.loads((MODELS_DIR / CARD_NAME).read_text()).get("domain")},
                       source="evaluated weights")


def whole_scan_metrics(model: torch.nn.Module, temperature: float,
                       cts: Sequence[demo_data.LungCT]) -> Dict[str, object]:
    """Whole lung1 / lung2 (as shipped and re-gridded, with and without the lung field), lesion-free scans, and
    lesions of other generators inserted into the lesion-free lung slabs."""
    from AttentionMapLib.sample_data import fetch_sample_data

    paths = fetch_sample_data()
    regions = {
        "whole scan": None,
        "lung field": LungFieldRegion(DEFAULT_REGION["hu_threshold"], DEFAULT_REGION["margin_mm"]),
    }
    loaded = as_loaded(model)
    keep = ("case", "regridding", "region_setting", "windows", "p_lesion", "peak_patch_holds_tumour",
            "peak_to_tumour_mm", "mass_ratio", "peak_moved_mm", "peak_ras_mm", "label_centroid_shift_mm")
    rows = [{k: r[k] for k in keep} for r in whole_scan.whole_scan_rows(loaded, temperature, paths, regions, log=_log)]
    free = whole_scan.lesion_free_rows(loaded, temperature, paths, regions, log=_log)
    inserted = whole_scan.inserted_lesion_rows(loaded, temperature, paths, cts, log=_log)
    return {
        "whole_scans": rows,
        "lesion_free_scans": [{k: r.get(k) for k in ("scan", "shape", "region_setting", "windows", "p_lesion", "error")}
                              for r in free],
        "whole_scan_definition": whole_scan.__doc__.split("\n\n")[1].replace("\n", " "),
        "inserted_lesions": whole_scan.summarise_inserted_by_regridding(inserted),
        "inserted_lesions_no_lesion_p": {f"{r['scan']}, {r['regridding']}": r["p_lesion"] for r in inserted
                                         if r["family"] == whole_scan.NO_LESION},
        "inserted_lesions_definition": " ".join(whole_scan.inserted_lesion_rows.__doc__.split()),
    }


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate(
    model: torch.nn.Module, pairs: int, whole_scans: bool = True
) -> Tuple[Dict[str, object], Dict[str, object]]:
    """All card metrics for `model` (eval mode), and its calibration section."""
    cts = demo_data.load_demo_cts()
    _log("held-out pairs ...")
    metrics = heldout_metrics(model, cts, pairs)
    pair_logits, pair_labels = metrics.pop("_pair_logits"), metrics.pop("_pair_labels")
    _log("lesion-free held-out windows ...")
    images, kinds = heldout_scan_windows(cts)
    scan_logits = card_view_logits(model, images)
    calibration = calibration_metrics(pair_logits, pair_labels, scan_logits)
    p_scan = mean_view_probabilities(scan_logits)[:, 1]
    p_scan_calibrated = mean_view_probabilities(scan_logits, calibration["temperature"])[:, 1]
    metrics["heldout_scan_windows"] = {
        "windows": len(kinds),
        "inference_grid": int((kinds == "inference_grid").sum()),
        "random": int((kinds == "random").sum()),
        "false_alarm_rate": round(float((p_scan > 0.5).mean()), 4),
        "false_alarm_rate_calibrated": round(float((p_scan_calibrated > 0.5).mean()), 4),
        "p_lesion_max": round(float(p_scan.max()), 4),
        "definition": f"every inference-grid window of the padded whole scan of {', '.join(SCAN_HELDOUT)} meeting its "
        f"held-out slab, plus {SCAN_RANDOM} random ones (seed {SCAN_SEED}); tumour excluded; false alarm = "
        "P(lesion) > 0.5",
    }
    seen = [ct.name for ct in cts if ct.name not in SCAN_HELDOUT]
    seen_images, _ = heldout_scan_windows(cts, 0, heldout=seen)
    p_seen = mean_view_probabilities(card_view_logits(model, seen_images),
                                     calibration["temperature"])[:, 1]
    metrics["slab_windows_seen_in_training"] = {
        "scans": seen, "windows": len(p_seen), "false_alarm_rate_calibrated": round(float((p_seen > 0.5).mean()), 4),
        "note": "inference-grid windows meeting these scans' slabs; the whole-scan training used these scans whole",
    }
    _log("other lesion generators ...")
    metrics["lesion_families"] = lesion_family_metrics(model, cts)
    metrics["heldout_subset"] = subset_values(model, cts)
    _log("real tumour crops ...")
    metrics["real_tumours"] = {ct.name: real_tumour_results(model, ct) for ct in cts}
    metrics["real_tumours_whole_ct"] = {ct.name: top_window_result(model, ct) for ct in cts}
    if whole_scans:
        metrics.update(whole_scan_metrics(model, calibration["temperature"], cts))
    metrics["pointing_game_definition"] = (
        "rollout (head mean, discard 0, target 'lesion') on the 6x6x6 token grid; hit = peak patch contains nodule "
        "voxels; within one patch = peak in a nodule patch or one of its 26 neighbours; chance = hit rate of a "
        "uniformly random peak, averaged over the positives"
    )
    metrics["heldout_set"] = (
        f"attentionmap_dev.demo_data.heldout_set(load_demo_cts(), pairs={pairs}, seed={demo_data.HELDOUT_SEED}); "
        "reproduce with: .venv/bin/python -m tools.evaluate_demo_model"
    )
    return metrics, calibration


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="training checkpoint (default: the shipped card's weights)")
    p.add_argument("--ship", action="store_true", help="write weights + card into --out-dir (needs --checkpoint)")
    p.add_argument("--update-card", action="store_true",
                   help="re-evaluate the card's own weights with this tool's inference settings (flips, shifts, "
                        "region) and rewrite its description, inference defaults, calibration and metrics; weights "
                        "and training record unchanged")
    p.add_argument("--out-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--pairs", type=int, default=PAIRS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-whole-scans", action="store_true", help="skip the whole-scan runs (minutes)")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics and calibration here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.checkpoint is not None:
        checkpoint = torch.load(a.checkpoint, weights_only=True)
        model = build_network(checkpoint["network_args"])
        model.load_state_dict(checkpoint["model"])
        model.eval()
    elif a.ship:
        p.error("--ship needs --checkpoint")
    elif a.update_card and a.checkpoint is not None:
        p.error("--update-card re-evaluates the card's own weights: leave out --checkpoint")
    else:
        model = load_shipped(a.out_dir / CARD_NAME)
    metrics, calibration = evaluate(model, a.pairs, not a.no_whole_scans)
    print(json.dumps({"metrics": metrics, "calibration": calibration}, indent=2))
    if a.json is not None:
        a.json.write_text(json.dumps({"metrics": metrics, "calibration": calibration}, indent=1))
    if a.ship:
        previous_path = a.out_dir / CARD_NAME
        fine_tuned = _fine_tuned(checkpoint["phases"])
        previous = json.loads(previous_path.read_text()) if fine_tuned and previous_path.is_file() else None
        print(f"wrote {write_card(checkpoint, metrics, a.out_dir, calibration, previous)}")
    if a.update_card:
        print(f"wrote {update_card(a.out_dir / CARD_NAME, metrics, calibration)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
