"""Whole-scan peak stability of a card's model under random re-griddings, per window blending.

    nice -n 5 .venv/bin/python -m benchmarks.regridding_stability [--seeds 7 11] [--per-seed 4] [--blends mean gaussian]

For lung1 and lung2 (the pyradiomics sample CTs with their tumour labels): the scan as shipped, the card's
``oblique`` and ``anisotropic`` re-griddings (`attentionmap_dev.whole_scan.REGRIDDINGS`) and ``--per-seed`` random
re-griddings per seed (`demo_data.regrid`: rotated up to ``MAX_DEGREES`` about each axis, ``IN_PLANE_MM`` and
``SLICE_MM`` spacings; wider than the training's `demo_data.REGRID_*` ranges). Each is explained as a user would
(`explain_volume`, rollout, the card's calibration, default flips and half-patch shifts, no region) once per blend
(the card's ``preprocessing.spatial.blend`` replaced). Prints a markdown table: runs whose peak patch holds tumour
voxels (`whole_scan.peak_token_holds_label`), the largest distance of a holding run's peak from the as-shipped peak,
and the misses with their volume-level P(lesion). Minutes on 2 cores (each run one sliding-window sweep x the card's
views).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Dict, List, Sequence

import numpy as np
import torch

from attentionmap_dev import demo_data, whole_scan

MAX_DEGREES = 15.0
IN_PLANE_MM = (0.6, 1.6)
SLICE_MM = (1.0, 5.0)
CARD_REGRIDDINGS = ("as shipped", "oblique", "anisotropic")


def random_regriddings(image_path, label_path, rng: np.random.Generator, count: int,
                       seed: int) -> Dict[str, Dict[str, np.ndarray]]:
    """`count` random re-griddings of a scan and its label drawn from `rng` (made from `seed`), named by their
    seed, rotation (degrees) and spacing (mm)."""
    import SimpleITK as sitk

    image, label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    scans = {}
    for _ in range(count):
        degrees, direction, spacing = demo_data.random_grid(rng, (MAX_DEGREES,) * 3, IN_PLANE_MM, SLICE_MM)
        name = f"seed {seed}: {np.round(degrees).astype(int).tolist()} deg, {np.round(spacing, 1).tolist()} mm"
        scans[name] = whole_scan.scan_arrays(*demo_data.regrid(image, label, direction, spacing))
    return scans


def measure(loaded, scans: Dict[str, Dict[str, np.ndarray]], blend: str) -> List[Dict[str, object]]:
    """One row per scan (the first is the reference): holds, distance moved from the first run's peak, P(lesion)."""
    from AttentionMapLib.core.calibration import card_temperature

    spatial = {**loaded.preprocessing["spatial"], "blend": blend}
    blended = replace(loaded, preprocessing={**loaded.preprocessing, "spatial": spatial})
    temperature = card_temperature(loaded.card, loaded.source)
    rows, reference = [], None
    for name, scan in scans.items():
        row = whole_scan.run_scan(blended, temperature, scan["image"], scan["affine"], None,
                                  label=scan["label"], label_affine=scan["label_affine"])
        peak = np.asarray(row["peak_ras_mm"])
        reference = peak if reference is None else reference
        rows.append({"scan": name, "holds": row["peak_patch_holds_tumour"], "p_lesion": row["p_lesion"],
                     "moved_mm": float(np.linalg.norm(peak - reference))})
        print(f"  {blend} {name}: holds {rows[-1]['holds']}, moved {rows[-1]['moved_mm']:.1f} mm, "
              f"P(lesion) {row['p_lesion']:.3f}", flush=True)
    return rows


def table(results: Dict[str, Dict[str, List[Dict[str, object]]]]) -> str:
    lines = ["| case | blend | peak patch holds tumour | largest move, card's re-griddings (mm) | "
             "largest move, random, holding runs (mm) | misses (P(lesion)) |", "|---|---|---|---:|---:|---|"]
    for case, by_blend in results.items():
        for blend, rows in by_blend.items():
            card = [r["moved_mm"] for r in rows if r["scan"] in CARD_REGRIDDINGS and r["holds"]]
            other = [r["moved_mm"] for r in rows if r["scan"] not in CARD_REGRIDDINGS and r["holds"]]
            misses = ", ".join(f"{r['scan']} ({r['p_lesion']:.2f})" for r in rows if not r["holds"]) or "none"
            lines.append(f"| {case} | {blend} | {sum(bool(r['holds']) for r in rows)}/{len(rows)} | "
                         f"{max(card, default=float('nan')):.1f} | {max(other, default=float('nan')):.1f} | {misses} |")
    return "\n".join(lines)


def main(argv: Sequence[str] = None) -> int:
    from AttentionMapLib.models import load_model
    from AttentionMapLib.sample_data import fetch_sample_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 11])
    parser.add_argument("--per-seed", type=int, default=4)
    parser.add_argument("--blends", nargs="+", default=["mean", "gaussian"], choices=("mean", "gaussian"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded, paths = load_model(args.model), fetch_sample_data()
    results: Dict[str, Dict[str, List[Dict[str, object]]]] = {}
    rngs = {seed: np.random.default_rng(seed) for seed in args.seeds}  # each seed draws lung1's, then lung2's
    for case in ("lung1", "lung2"):
        image, label = paths[f"{case}_image"], paths[f"{case}_label"]
        scans = {kind: whole_scan.regridded(image, label, kind) for kind in CARD_REGRIDDINGS}
        for seed, rng in rngs.items():
            scans.update(random_regriddings(image, label, rng, args.per_seed, seed))
        print(f"{case}: {len(scans)} scans", flush=True)
        results[case] = {blend: measure(loaded, scans, blend) for blend in args.blends}
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
