"""Whole-volume benchmarks with a model card: file -> overlay NRRD end to end, and sliding-window scaling.

End to end (``lung2`` of the pyradiomics sample data): read the CT (``io.read_volume``), then
``volume.explain_volume`` (its own ``timings``: preprocess = the card's MONAI chain, geometry = window
placement and the token grid's affine, forward = capture over all windows, fuse = read-out and
blending), then write the token grid as NRRD (``io.write_volume``). Median of ``repeats`` runs per
method, in one process.

Stage times are wall-clock (``VolumeAttention.timings``); the CPU time of the whole run is reported too.

Sliding window: the same volume with the card's preprocessing switched to sliding-window mode at a
range of overlaps (more overlap, more windows); the CPU and wall time of ``explain_volume`` against the
window count.
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from benchmarks import measure

STAGES = ("read", "preprocess", "geometry", "forward", "fuse", "write")
OVERLAPS = (0.0, 0.25, 0.5, 0.625, 0.75)


def _load(model_source: str):
    from AttentionMapLib.models import load_model
    from AttentionMapLib.sample_data import fetch_sample_data

    return load_model(model_source), fetch_sample_data()


def end_to_end(model_source: str, case: str = "lung2", methods: Sequence[str] = ("rollout", "grad_rollout"),
               repeats: int = 3, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Per method: median seconds per stage over ``repeats`` runs, the window count and the grid shape."""
    from AttentionMapLib.core.volume import explain_volume
    from AttentionMapLib.io import read_volume, write_volume

    loaded, paths = _load(model_source)
    rows: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for method in methods:
            log(f"end to end {case} / {method} x {repeats} ...")
            runs: List[Dict[str, float]] = []
            for _ in range(repeats):
                cpu = time.process_time()
                start = time.perf_counter()
                array, ijk_to_ras = read_volume(paths[f"{case}_image"])
                read = time.perf_counter() - start
                result = explain_volume(
                    loaded.network,
                    array,
                    ijk_to_ras,
                    loaded.preprocessing,
                    img_size=loaded.img_size,
                    method=method,
                    target=loaded.target,
                )
                start = time.perf_counter()
                write_volume(Path(folder) / f"{case}_attention.nrrd", result.grid, result.ijk_to_ras)
                runs.append(
                    {
                        "read": read,
                        **result.timings,
                        "write": time.perf_counter() - start,
                        "cpu": time.process_time() - cpu,
                    }
                )
            stages = {s: measure.median([r[s] for r in runs]) for s in STAGES}
            rows[method] = {
                "stages": stages,
                "total": sum(stages.values()),
                "cpu_total": measure.median([r["cpu"] for r in runs]),
                "windows": result.num_windows,
                "grid_shape": list(result.grid.shape),
                "volume_shape": list(array.shape),
            }
    return {"case": case, "spatial": loaded.preprocessing.get("spatial", {}), "methods": rows}


def sliding_window(
    model_source: str,
    case: str = "lung2",
    overlaps: Sequence[float] = OVERLAPS,
    method: str = "rollout",
    repeats: int = 1,
    log: Callable[[str], None] = print,
) -> List[Dict[str, Any]]:
    """One row per overlap: window count and median seconds of ``explain_volume`` (and its forward part)."""
    from AttentionMapLib.core.volume import explain_volume
    from AttentionMapLib.io import read_volume

    loaded, paths = _load(model_source)
    array, ijk_to_ras = read_volume(paths[f"{case}_image"])
    rows = []
    for overlap in overlaps:
        preprocessing = copy.deepcopy(loaded.preprocessing)
        spatial = {"mode": "sliding_window", "overlap": float(overlap),
                   "sw_batch_size": int(preprocessing.get("spatial", {}).get("sw_batch_size", 4)),
                   "blend": preprocessing.get("spatial", {}).get("blend", "mean")}
        preprocessing["spatial"] = spatial
        seconds, cpu = [], []
        for _ in range(repeats):
            holder = {}
            wall, used = measure.timed(lambda holder=holder, preprocessing=preprocessing: holder.update(
                result=explain_volume(loaded.network, array, ijk_to_ras, preprocessing, img_size=loaded.img_size,
                                      method=method)))
            seconds.append(wall)
            cpu.append(used)
        windows = holder["result"].num_windows
        log(f"sliding window overlap {overlap}: {windows} windows, {measure.median(cpu):.1f} CPU s")
        rows.append({"overlap": float(overlap), "windows": windows, "seconds": measure.median(seconds),
                     "cpu_seconds": measure.median(cpu)})
    return rows
