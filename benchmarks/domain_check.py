"""Scans the demo model was not made for, and the chest CTs it was: the card's domain (issue 28, item 13).

    nice -n 5 .venv/bin/python -m benchmarks.domain_check [--out docs]

Lesion-free scans of other body regions and modalities, each as shipped and re-gridded (`whole_scan` kinds
"oblique" and "anisotropic"): lung2's upper abdomen (its slices below the lowest slice of its lungs, and five more
holding the lung bases, with the stomach's gas), the InVesalius head CT, and the pyradiomics MRs (brain1, brain2,
breast1). Each runs as a user runs it (`explain_volume`, rollout, the card's calibration, flips, shifts and domain)
with the card's default region (the automatic lung field: refused, or the P(lesion) it gives) and with no region
(the volume-level answer and the input statement). Then lung1 and lung2 with their tumours, as shipped and
re-gridded, with the lung field: the volume-level P(lesion) and the peak against `docs/evaluation.json` (the
whole-scan evaluation before the domain existed), the windows holding lung, and how far the lung field reaches
below the lowest lung voxel. Writes the ``domain`` section of docs/EVALUATION.md and docs/domain_check.json.
About 15 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from benchmarks import measure

SECTION = "domain"
KINDS = ("as shipped", "oblique", "anisotropic")


def other_scans() -> Dict[str, tuple]:
    """name -> (array, ijk_to_ras) of the lesion-free scans of other body regions and modalities."""
    from AttentionMapLib.core.geometry import voxel_spacing
    from AttentionMapLib.core.region import find_lungs
    from AttentionMapLib.io import read_volume
    from AttentionMapLib.sample_data import fetch_head_ct, fetch_sample_data

    paths = fetch_sample_data()
    array, affine = read_volume(paths["lung2_image"])
    lowest = int(np.argwhere(find_lungs(array.astype(np.float32), voxel_spacing(affine)))[:, 2].min())
    scans = {"lung2 upper abdomen": (array[:, :, : lowest + 5].copy(), affine), "head CT": read_volume(fetch_head_ct())}
    for name in ("brain1", "brain2", "breast1"):
        scans[f"{name} MR"] = read_volume(paths[f"{name}_image"])
    return scans


def regridded(array: np.ndarray, affine: np.ndarray, kind: str):
    from attentionmap_dev.whole_scan import _regridded_array

    return (array, affine) if kind == "as shipped" else _regridded_array(array, affine, kind)


def explain(loaded, array, affine, region):
    from AttentionMapLib.core.calibration import card_temperature
    from AttentionMapLib.core.domain import card_domain
    from AttentionMapLib.core.flips import card_flip_axes
    from AttentionMapLib.core.shifts import card_shift_average
    from AttentionMapLib.core.volume import explain_volume

    return explain_volume(loaded.network, array, affine, loaded.preprocessing, img_size=loaded.img_size,
                          method="rollout", target=loaded.target, region=region,
                          temperature=card_temperature(loaded.card, loaded.source),
                          flip_axes=card_flip_axes(loaded.card, loaded.source),
                          shift_average=card_shift_average(loaded.card, loaded.source),
                          domain=card_domain(loaded.card, loaded.source))


def answer(result, classes) -> Dict[str, Any]:
    prediction = result.prediction(classes)
    return {"windows": int(result.num_windows), "p_lesion": prediction["probability"],
            "confident": prediction.get("confident"),
            "highest_unlike_training": prediction.get("highest_probability_unlike_training"),
            "windows_with_lung": prediction["domain"]["windows_with_lung"], "input": prediction["domain"]["summary"]}


def other_rows(loaded, log) -> List[Dict[str, Any]]:
    from AttentionMapLib.core.region import NoLungsFound, card_default_region

    rows = []
    for name, (array, affine) in other_scans().items():
        for kind in KINDS:
            moved, moved_affine = regridded(array, affine, kind)
            log(f"{name} {kind} ...")
            row: Dict[str, Any] = {"scan": name, "regridding": kind, "shape": list(moved.shape)}
            try:
                row["lung_field"] = answer(explain(loaded, moved, moved_affine, card_default_region(loaded.card)),
                                           loaded.classes)
            except NoLungsFound as exc:
                row["lung_field"] = {"refused": str(exc)}
            row["no_region"] = answer(explain(loaded, moved, moved_affine, None), loaded.classes)
            rows.append(row)
    return rows


def chest_rows(loaded, log) -> List[Dict[str, Any]]:
    """lung1 / lung2 with the lung field, against the recorded whole-scan evaluation."""
    from attentionmap_dev import whole_scan
    from AttentionMapLib.core.geometry import apply_affine, voxel_spacing
    from AttentionMapLib.core.region import card_default_region, find_lungs, hu_from_model_input
    from AttentionMapLib.sample_data import fetch_sample_data

    recorded = {(r["case"], r["regridding"]): r for r in json.loads(
        (measure.REPO / "docs" / "evaluation.json").read_text())["whole_scans"]["rows"]
        if r["region_setting"] == "lung field"}
    paths = fetch_sample_data()
    rows = []
    for case in ("lung1", "lung2"):
        for kind in ("as shipped", "flipped", "oblique", "anisotropic"):
            log(f"{case} {kind} ...")
            scan = whole_scan.regridded(paths[f"{case}_image"], paths[f"{case}_label"], kind)
            result = explain(loaded, scan["image"], scan["affine"], card_default_region(loaded.card))
            field = result.region
            lungs = find_lungs(hu_from_model_input(_model_input(loaded, scan), loaded.preprocessing["intensity"],
                                                   "lungs"), voxel_spacing(field.ijk_to_ras))
            below_mm = (np.argwhere(lungs)[:, 2].min() - np.argwhere(field.voxels)[:, 2].min()) * \
                voxel_spacing(field.ijk_to_ras)[2]
            before = recorded.get((case, kind), {})
            peak = np.asarray(result.peak_ras())
            rows.append({"case": case, "regridding": kind, **answer(result, loaded.classes),
                         "p_lesion_before": before.get("p_lesion"),
                         "peak_moved_from_before_mm": float(np.linalg.norm(peak - before["peak_ras_mm"]))
                         if before else None,
                         "field_below_lowest_lung_mm": float(below_mm),
                         "lowest_lung_s_mm": float(apply_affine(field.ijk_to_ras, np.argwhere(lungs))[:, 2].min())})
    return rows


def _model_input(loaded, scan) -> np.ndarray:
    from AttentionMapLib.core.engine import model_spec
    from AttentionMapLib.core.preprocess import preprocess_volume

    spec = model_spec(loaded.network, loaded.img_size)
    return preprocess_volume(scan["image"], scan["affine"], loaded.preprocessing, spec.img_size,
                             spec.patch_size).as_tensor()[0].numpy()


def _p(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(data: Dict[str, Any], command: str) -> str:
    lines = [
        "## Scans the model was not made for (the card's domain)",
        "",
        f"Generated by `{command}` (commit {data['commit']}, {data['started']}, {data['minutes']:.0f} min); numbers "
        "in docs/domain_check.json. The card's `domain` section (`tools/fit_domain.py`): a window must hold at least "
        f"{data['min_lung_fraction']:.0%} lung (the least of 3,000 training nodule crops) to give the volume-level "
        "answer; the automatic lung field must find lungs (`region.find_lungs`: enclosed air of lung density, the "
        "largest region at least 100 mL).",
        "",
        "Lesion-free scans of other body regions and modalities (target: refused, or P(lesion) < 0.5 / no "
        "confident answer):",
        "",
        "| scan | re-gridding | lung field (card default) | no region: answer | highest P in a window unlike "
        "training | input statement |",
        "|---|---|---|---|---:|---|",
    ]
    for row in data["other"]:
        field = row["lung_field"]
        shown = "refused: no lungs found" if "refused" in field else f"P = {_p(field['p_lesion'])}"
        free = row["no_region"]
        said = "no confident answer" if free["p_lesion"] is None else f"P = {_p(free['p_lesion'])}"
        lines.append(f"| {row['scan']} ({'x'.join(map(str, row['shape']))}) | {row['regridding']} | {shown} | "
                     f"{said} | {_p(free['highest_unlike_training'])} | {free['input']} |")
    lines += [
        "",
        "Chest CTs with tumours, lung field (the whole-scan evaluation above, before the domain existed: P(lesion) "
        "and peak):",
        "",
        "| case | re-gridding | windows | holding lung | P(lesion) | before | peak moved (mm) | field below the "
        "lowest lung voxel (mm) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["chest"]:
        moved = row["peak_moved_from_before_mm"]
        lines.append(f"| {row['case']} | {row['regridding']} | {row['windows']} | {row['windows_with_lung']} | "
                     f"{_p(row['p_lesion'])} | {_p(row['p_lesion_before'])} | "
                     f"{'-' if moved is None else f'{moved:.1f}'} | {row['field_below_lowest_lung_mm']:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    import torch

    from AttentionMapLib.core.domain import card_domain
    from AttentionMapLib.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=measure.REPO / "docs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    loaded = load_model("demo")
    data = {"commit": measure_commit(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "min_lung_fraction": card_domain(loaded.card, loaded.source).min_lung_fraction,
            "other": other_rows(loaded, print), "chest": chest_rows(loaded, print)}
    data["minutes"] = (time.time() - started) / 60.0
    (args.out / "domain_check.json").write_text(json.dumps(data, indent=1))
    measure.replace_section(args.out / "EVALUATION.md", SECTION, report(data, "python -m benchmarks.domain_check"))
    print(report(data, "python -m benchmarks.domain_check"))
    return 0


def measure_commit() -> str:
    import subprocess

    done = subprocess.run(["git", "-C", str(measure.REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True)
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
