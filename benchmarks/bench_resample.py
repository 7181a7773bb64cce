"""Token grid onto the CT grid in the Slicer (GUI) process: numpy trilinear resampling against torch grid_sample.

    nice -n 5 .venv/bin/python -m benchmarks.bench_resample            # rewrites its section of docs/BENCHMARKS.md
    .venv/bin/python -m benchmarks.bench_resample --quick --out /tmp/r  # a small CT grid, to try the script

Segment statistics in the Slicer module resample the attention token grid onto the scanned volume's grid
(`AttentionGrid.resample_to`) and, with a region, sample the region's mask there too. Both run in the GUI
process, which never imports torch. The target is a realistic chest CT grid (512 x 512 x 130 voxels of
0.68 x 0.68 x 2.5 mm, stored LPS) under the token grid of a 2 mm model input with 16 mm patches
(21 x 21 x 19 tokens). Variants:

- ``torch``: the implementation before this benchmark (torch ``grid_sample``, slabs of 4 M voxels), kept here
  as the reference it replaced;
- ``numpy``: `geometry.resample_grid` (slabs of ``max_points`` voxels);
- ``nearest_whole`` / ``nearest``: the region mask (a box on the 168 x 168 x 152 model-input grid) sampled
  by nearest neighbour onto the CT grid, all voxels in one array (before) and `region.sample_nearest` in slabs.

Time: CPU seconds of one thread (torch and BLAS threads 1), median of the repeats, variants interleaved in one
process. Memory: one fresh process per variant, peak resident memory above the inputs (see ``measure``),
the float32 output grid (130 MiB) included.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from benchmarks import measure

SECTION = "resample"
TOKENS = (21, 21, 19)
TOKEN_MM = 16.0
CT_SHAPE = (512, 512, 130)
CT_SPACING = (0.68, 0.68, 2.5)
INPUT_SHAPE = (168, 168, 152)  # the 2 mm model input the tokens come from
SLABS = (4_000_000, 1_000_000, 262_144)
VARIANTS = ["torch"] + [f"numpy_{points}" for points in SLABS] + ["nearest_whole", "nearest"]


def torch_resample_grid(grid: np.ndarray, grid_ijk_to_ras: np.ndarray, shape: Tuple[int, int, int],
                        target_ijk_to_ras: np.ndarray, max_points: int = 4_000_000) -> np.ndarray:
    """The torch grid_sample version `geometry.resample_grid` replaced (same semantics), for comparison only."""
    import torch

    source = np.asarray(grid, dtype=np.float32)
    target_to_source = np.linalg.inv(grid_ijk_to_ras) @ target_ijk_to_ras
    steps = torch.from_numpy(target_to_source[:3, :3].T.astype(np.float32))
    origin = torch.from_numpy(target_to_source[:3, 3].astype(np.float32))
    n = torch.tensor(source.shape, dtype=torch.float32)
    along_i = torch.arange(shape[0], dtype=torch.float32)[:, None, None, None] * steps[0]
    along_j = torch.arange(shape[1], dtype=torch.float32)[None, :, None, None] * steps[1]
    volume = torch.from_numpy(np.ascontiguousarray(source))[None, None]
    scale = 2.0 / torch.clamp(n - 1.0, min=1.0)
    out = np.empty(shape, dtype=np.float32)
    slab = max(1, max_points // (shape[0] * shape[1]))
    for k0 in range(0, shape[2], slab):
        ks = torch.arange(k0, min(k0 + slab, shape[2]), dtype=torch.float32)[None, None, :, None]
        src = along_i + along_j + (ks * steps[2] + origin)
        inside = ((src >= -0.5) & (src <= n - 0.5)).all(dim=-1)
        coords = (torch.minimum(torch.clamp(src, min=0.0), n - 1.0) * scale - 1.0).flip(-1)
        sampled = torch.nn.functional.grid_sample(volume, coords[None], mode="bilinear", align_corners=True)[0, 0]
        out[:, :, k0:k0 + ks.shape[2]] = torch.where(inside, sampled, torch.zeros(())).numpy()
    return out


def nearest_whole(values: np.ndarray, values_ijk_to_ras: np.ndarray, shape: Tuple[int, int, int],
                  ijk_to_ras: np.ndarray) -> np.ndarray:
    """Nearest-neighbour sampling as `region.sample_nearest` did it before: every target voxel in one array."""
    from AttentionMapLib.core.geometry import apply_affine, ras_to_ijk

    index = np.indices(tuple(shape), dtype=np.float64).reshape(3, -1).T
    source = np.floor(ras_to_ijk(values_ijk_to_ras, apply_affine(ijk_to_ras, index)) + 0.5).astype(np.int64)
    inside = np.all((source >= 0) & (source < np.asarray(values.shape)), axis=1)
    out = np.zeros(len(index), dtype=bool)
    out[inside] = values[tuple(source[inside].T)] > 0
    return out.reshape(tuple(shape))


def scene(ct_shape: Tuple[int, int, int]) -> Dict[str, Any]:
    """Token grid (random values), its affine, the CT grid's affine (LPS-stored, centred on the same point) and a
    box region on the model-input grid (the middle 60 % of each axis, like a lung field)."""
    from AttentionMapLib.core.geometry import token_grid_affine

    input_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    input_affine[:3, 3] = -(np.asarray(INPUT_SHAPE) - 1) / 2.0 * 2.0
    ct_affine = np.diag([-CT_SPACING[0], -CT_SPACING[1], CT_SPACING[2], 1.0])
    ct_affine[:3, 3] = (np.asarray(ct_shape) - 1) / 2.0 * np.array([CT_SPACING[0], CT_SPACING[1], -CT_SPACING[2]])
    region = np.zeros(INPUT_SHAPE, dtype=bool)
    region[tuple(slice(int(0.2 * n), int(0.8 * n)) for n in INPUT_SHAPE)] = True
    return {"grid": np.random.default_rng(0).random(TOKENS).astype(np.float32),
            "grid_affine": token_grid_affine(input_affine, (8, 8, 8)), "ct_affine": ct_affine,
            "region": region, "input_affine": input_affine, "shape": tuple(ct_shape)}


def make_call(variant: str, s: Dict[str, Any]) -> Callable[[], np.ndarray]:
    from AttentionMapLib.core.geometry import resample_grid
    from AttentionMapLib.core.region import sample_nearest

    if variant == "torch":
        return lambda: torch_resample_grid(s["grid"], s["grid_affine"], s["shape"], s["ct_affine"])
    if variant.startswith("numpy_"):
        points = int(variant.split("_")[1])
        return lambda: resample_grid(s["grid"], s["grid_affine"], s["shape"], s["ct_affine"], max_points=points)
    if variant == "nearest_whole":
        return lambda: nearest_whole(s["region"], s["input_affine"], s["shape"], s["ct_affine"])
    return lambda: sample_nearest(s["region"], s["input_affine"], s["shape"], s["ct_affine"])


def _worker_main(request: Dict[str, Any]) -> Dict[str, Any]:
    """In a fresh process: peak memory of one cold call of one variant, or the times of every variant interleaved."""
    import torch

    torch.set_num_threads(1)
    s = scene(tuple(request["shape"]))
    if request["kind"] == "memory":
        call = make_call(request["variant"], s)
        if request["variant"] == "torch":
            torch.zeros(1)  # torch's own start-up memory is not the call's
        base = measure.rss_mib()
        ok = measure.reset_peak_rss()
        call()
        return {"peak_mib": measure.peak_rss_mib() - base, "method": "VmHWM reset" if ok else "VmHWM since start"}
    calls = {variant: make_call(variant, s) for variant in VARIANTS}
    results = {variant: [] for variant in VARIANTS}
    outputs = {}
    for _ in range(request["repeats"]):
        for variant, call in calls.items():
            start = time.process_time()
            outputs[variant] = call()
            results[variant].append(time.process_time() - start)
    reference = outputs["torch"]
    return {"cpu_s": results,
            "max_difference": {v: float(np.abs(outputs[v] - reference).max()) for v in VARIANTS if "numpy" in v},
            "nearest_equal": bool(np.array_equal(outputs["nearest"], outputs["nearest_whole"])),
            "inside": float(outputs["nearest"].mean())}


def run(quick: bool, repeats: int) -> Dict[str, Any]:
    shape = (128, 128, 40) if quick else CT_SHAPE
    script = Path(__file__)
    results: Dict[str, Any] = {"shape": list(shape), "repeats": repeats, "load_before": os.getloadavg()[0]}
    results["time"] = measure.run_worker(script, {"kind": "time", "shape": shape, "repeats": repeats}, threads=1)
    results["memory"] = {v: measure.run_worker(script, {"kind": "memory", "shape": shape, "variant": v}, threads=1)
                         for v in VARIANTS}
    results["load_after"] = os.getloadavg()[0]
    return results


def report(results: Dict[str, Any], machine: Dict[str, str], command: str) -> str:
    times = {v: measure.median(t) for v, t in results["time"]["cpu_s"].items()}
    shape = "x".join(map(str, results["shape"]))
    labels = {"torch": "trilinear, torch grid_sample (before), slabs of 4,000,000 voxels",
              "nearest_whole": "region mask, nearest neighbour, one array for all voxels (before)",
              "nearest": "region mask, nearest neighbour, slabs of 4,000,000 voxels (now)"}
    labels.update({f"numpy_{p}": f"trilinear, numpy (now), slabs of {p:,} voxels" for p in SLABS})
    lines = [
        "## Token grid onto the CT grid in the Slicer process (segment statistics)",
        "",
        f"Generated by `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); machine: {machine['cpu']}, "
        f"{machine['cores']} cores shared with other jobs (load average {results['load_before']:.1f} before, "
        f"{results['load_after']:.1f} after), torch {machine['torch']}, one thread.",
        "",
        f"Token grid {'x'.join(map(str, TOKENS))} ({TOKEN_MM:g} mm tokens of a 2 mm model input) onto a {shape} CT "
        f"grid of {' x '.join(f'{v:g}' for v in CT_SPACING)} mm (stored LPS). Time: CPU seconds of one thread, median "
        f"of {results['repeats']}, variants interleaved in one process; memory: one cold call in a fresh process, "
        "peak resident memory above the inputs (the float32 or bool output included). The Slicer process runs the "
        "numpy rows: torch is not imported there.",
        "",
        "| variant | time (s) | x torch | peak memory (MiB) | all times (s) |",
        "|---|---:|---:|---:|---|",
    ]
    for variant in VARIANTS:
        ratio = f"{times[variant] / times['torch']:.2f}" if variant == "torch" or "numpy" in variant else "-"
        all_times = ", ".join(f"{t:.2f}" for t in results["time"]["cpu_s"][variant])
        lines.append(f"| {labels[variant]} | {times[variant]:.2f} | {ratio} | "
                     f"{results['memory'][variant]['peak_mib']:.0f} | {all_times} |")
    differences = ", ".join(f"{v.split('_')[1]}: {d:.1e}" for v, d in results["time"]["max_difference"].items())
    lines += ["", f"Largest difference numpy - torch (by slab size): {differences}. Region mask, slabs against one "
              f"array: {'identical' if results['time']['nearest_equal'] else 'DIFFERENT'} "
              f"({results['time']['inside']:.1%} of the CT voxels inside)."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=measure.REPO / "docs", help="folder holding BENCHMARKS.md")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a 128 x 128 x 40 CT grid, to try the script")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker_main(json.loads(args.worker))))
        return 0
    results = run(args.quick, args.repeats)
    command = "python -m benchmarks.bench_resample" + (" --quick" if args.quick else "")
    measure.publish_section(args.out, SECTION, report(results, measure.machine_description(), command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
