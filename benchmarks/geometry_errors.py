"""Peak-position error of explain_volume on the geometry oracle, per geometry case, model and spatial mode.

The oracle ViT (Testing/oracle.py) attends, in layer 0, to the brightest patch, so the peak of the raw
layer-0 map should be the patch holding a bright 12 mm cube. For each case of Testing/geometry_cases.py
(LPS axes; oblique 30/20 deg; 0.8x0.8x2.5 mm; 200x160x40 oblique), each oracle model and each mode, the
cube is put at `--positions` random places and the table reports:

- err mm: mean and max distance between the peak token's centre and the cube centre;
- bound: half the token's patch diagonal in mm (the tests' limit);
- max frac: the largest per-axis offset of the cube centre from the peak token, in patches
  (<= 0.5: the cube centre lies inside the peak patch);
- bias: the mean signed per-axis offset in patches, largest axis (a half-patch geometry slip shows as ~0.5);
- hit: share of positions whose peak is the token containing the cube centre.

Usage: ``python -m benchmarks.geometry_errors [--positions 12] [--seed 0]`` (prints a markdown table).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from AttentionMapLib.core.volume import explain_volume
from Testing.geometry_cases import CASES, INTENSITY, MODELS, cube_volume, peak_error
from Testing.oracle import make_oracle_vit

PREPROCESSING = {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "intensity": INTENSITY}


def measure_case(model, img_size, case: str, mode: str, positions: np.ndarray) -> dict:
    errors, fractions, offsets, hits, windows = [], [], [], [], 0
    for index, position in enumerate(positions):
        volume = cube_volume(case, position, seed=index)
        result = explain_volume(model, volume.array, volume.ijk_to_ras, {**PREPROCESSING, "spatial": {"mode": mode}},
                                img_size=img_size, method="raw", layer=0)
        error = peak_error(result, volume.centre_ras)
        errors.append(error["mm"])
        fractions.append(error["patch_fraction"])
        offsets.append(error["offset"])
        hits.append(error["patch_fraction"] <= 0.5)
        bound, windows = error["half_diagonal_mm"], result.num_windows
    return {
        "mean_mm": float(np.mean(errors)), "max_mm": float(np.max(errors)), "bound_mm": bound,
        "max_fraction": float(np.max(fractions)), "bias": float(np.abs(np.mean(offsets, axis=0)).max()),
        "hit": float(np.mean(hits)), "windows": windows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=12, help="random cube positions per row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    positions = np.random.default_rng(args.seed).uniform(0.15, 0.85, size=(args.positions, 3))
    print(f"{args.positions} random cube positions per row; preprocessing {PREPROCESSING['orientation']} "
          f"{PREPROCESSING['spacing']} mm; raw layer-0 attention of the oracle ViT\n")
    print(
        "| case | model (img / patch) | mode | windows | err mm mean | err mm max | bound mm | max frac | bias | hit |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model_name, (img_size, patch_size) in MODELS.items():
        model = make_oracle_vit(img_size, patch_size, classification=True)
        for case in CASES:
            for mode in ("resize", "sliding_window"):
                r = measure_case(model, img_size, case, mode, positions)
                print(f"| {case} | {model_name} | {mode} | {r['windows']} | {r['mean_mm']:.1f} | {r['max_mm']:.1f} | "
                      f"{r['bound_mm']:.1f} | {r['max_fraction']:.2f} | {r['bias']:.2f} | {r['hit']:.0%} |")


if __name__ == "__main__":
    main()
