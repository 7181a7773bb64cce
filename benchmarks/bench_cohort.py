"""Cohort throughput: `attention-map cohort` on a LocalCluster with 1 and 2 workers against the sequential `run`.

    nice -n 5 .venv/bin/python -m benchmarks.bench_cohort          # rewrites its section of docs/BENCHMARKS.md
    .venv/bin/python -m benchmarks.bench_cohort --copies 1         # 8 cases, to try the script

Cases: lung1 and lung2 (pyradiomics sample CTs with their tumour labels), each re-gridded four ways
(``attentionmap_dev.whole_scan.REGRIDDINGS``: as shipped, flipped, oblique, anisotropic) and stored ``--copies``
ways (1: as computed; 2: also with its J axis reversed; 3: also with I and J reversed; the affine says so), as
NRRD files with a CSV manifest: 24 cases by default. Each configuration runs the same command line from a fresh
process on the demo card, ``--views``: ``one`` (no flip or shift averaging: one forward pass per window) or
``card`` (the card's default flip and shift averaging). Reported: wall time, cases per minute, the median task
time per case (the table's ``seconds_total``), the per-case overhead against the sequential run, the model loads,
and the peak memory of each worker process (``worker_peak_rss_mib``) and of the sequential run.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from benchmarks import measure

SECTION = "cohort"


def write_cases(folder: Path, copies: int) -> Path:
    """NRRD images and labels of the re-gridded, re-stored sample CTs, and their manifest; returns the manifest."""
    from attentionmap_dev import whole_scan
    from AttentionMapLib.io import write_volume
    from AttentionMapLib.sample_data import fetch_sample_data

    paths = fetch_sample_data()
    lines = ["image,label,case_id"]
    for name in ("lung1", "lung2"):
        for kind in whole_scan.REGRIDDINGS:
            scan = whole_scan.regridded(paths[f"{name}_image"], paths[f"{name}_label"], kind)
            for copy, axes in enumerate(((), (1,), (0, 1))[:copies]):
                image, affine = _reversed(scan["image"], scan["affine"], axes)
                label, label_affine = _reversed(scan["label"].astype(np.uint8), scan["label_affine"], axes)
                case = f"{name}-{kind.replace(' ', '-')}-{copy}"
                write_volume(folder / f"{case}.nrrd", image.astype(np.int16), affine)
                write_volume(folder / f"{case}_label.nrrd", label, label_affine)
                lines.append(f"{case}.nrrd,{case}_label.nrrd,{case}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


def _reversed(array: np.ndarray, affine: np.ndarray, axes) -> "tuple[np.ndarray, np.ndarray]":
    """The same voxels stored with ``axes`` reversed; the affine moved so that each voxel keeps its place."""
    flip = np.eye(4)
    for axis in axes:
        flip[axis, axis], flip[axis, 3] = -1.0, array.shape[axis] - 1
    return np.ascontiguousarray(np.flip(array, axes) if axes else array), affine @ flip


def timed_command(command: List[str]) -> Dict[str, Any]:
    """Run a command; wall seconds, exit status and the peak memory of its largest process (MiB, Linux: the
    largest descendant waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, cwd=str(measure.REPO))
    wall = time.perf_counter() - t0
    if completed.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": wall, "returncode": completed.returncode,
            "peak_rss_mib": after / 1024.0 if after > before else None}


def timed_parts(record: Dict[str, Any]) -> float:
    """Seconds of a case's timed parts in its `run` summary: read, preprocess, forward, fuse, geometry, resample,
    write, render."""
    return float(sum(v for v in record["timings_s"].values() if isinstance(v, (int, float))))


def run(copies: int, views: str, log=print) -> Dict[str, Any]:
    import pyarrow.parquet as pq

    options = ["--model", "demo"] + (["--flip-average", "none", "--shift-average", "off"] if views == "one" else [])
    results: Dict[str, Any] = {"views": views, "configurations": []}
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as scratch:
        folder = Path(scratch)
        manifest = write_cases(folder, copies)
        cases = len(manifest.read_text().splitlines()) - 1
        results["cases"] = cases
        cli = [sys.executable, "-m", "AttentionMapLib.cli"]
        images = [str(folder / line.split(",")[0]) for line in manifest.read_text().splitlines()[1:]]
        labels = [str(folder / line.split(",")[1]) for line in manifest.read_text().splitlines()[1:]]
        log(f"{cases} cases; sequential run ...")
        sequential = timed_command([*cli, "run", *images, "--label", *labels, *options, "--output-dir",
                                    str(folder / "run")])
        summary = json.loads((folder / "run" / "summary.json").read_text())
        per_case = [timed_parts(c) for c in summary["cases"]]
        results["configurations"].append({"name": "run (sequential, 2 torch threads)", "workers": 1, **sequential,
                                          "cases_per_minute": 60.0 * cases / sequential["wall_s"],
                                          "case_seconds": per_case, "model_loads": 1,
                                          "worker_peak_rss_mib": sequential["peak_rss_mib"]})
        for workers in (1, 2):
            log(f"cohort, {workers} worker(s) ...")
            out = folder / f"cohort{workers}"
            measured = timed_command([*cli, "cohort", str(manifest), *options, "--workers", str(workers),
                                      "--output-dir", str(out)])
            rows = pq.read_table(out / "cohort.parquet").to_pylist()
            ok = [r for r in rows if r["status"] == "ok"]
            results["configurations"].append({
                "name": f"cohort, {workers} local worker(s) x {2 // workers} torch thread(s)", "workers": workers,
                **measured, "cases_per_minute": 60.0 * cases / measured["wall_s"], "ok": len(ok),
                "case_seconds": [r["seconds_total"] for r in ok],
                "timed_parts": [timed_parts(json.loads((out / "cases" / r["case_id"] / "summary.json").read_text())
                                            ["cases"][0]) for r in ok],
                "model_loads": sum(r["seconds_model_load"] > 0 for r in ok),
                "model_load_s": max(r["seconds_model_load"] for r in ok),
                "worker_peak_rss_mib": max(r["worker_peak_rss_mib"] or 0.0 for r in ok)})
    for c in results["configurations"]:
        c["case_median_s"] = statistics.median(c["case_seconds"])
        c["timed_median_s"] = statistics.median(c.get("timed_parts", c["case_seconds"]))
        c["outside_cases_s"] = c["wall_s"] - sum(c["case_seconds"]) / c["workers"]
    return results


def report(results: Dict[str, Any], machine: Dict[str, str]) -> str:
    configurations = results["configurations"]
    lines = [
        "## Cohort: `attention-map cohort` on Dask against the sequential `run`",
        "",
        f"`python -m benchmarks.bench_cohort`; {machine.get('cpu', '')}, {machine.get('cores', '')} cores, shared. "
        f"{results['cases']} cases: lung1 and lung2 (pyradiomics sample CTs, with their tumour labels), each "
        "re-gridded as shipped, flipped, oblique and anisotropic, and stored with none, one or two of its axes "
        "reversed (NRRD). The demo card, rollout, "
        + ("no flip or shift averaging (one forward pass per window). " if results["views"] == "one" else
           "with the card's flip and shift averaging. ")
        + "Every configuration is one command from a fresh process (Python start, model load and, for the "
        "cohorts, the LocalCluster's start included).",
        "",
        "| configuration | wall (s) | cases / min | median case (s) | its timed parts (s) | outside the cases (s) | "
        "model loads | peak memory per process (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in configurations:
        lines.append(f"| {c['name']} | {c['wall_s']:.0f} | {c['cases_per_minute']:.1f} | {c['case_median_s']:.1f} | "
                     f"{c['timed_median_s']:.1f} | {c['outside_cases_s']:.0f} | {c['model_loads']} | "
                     f"{c['worker_peak_rss_mib']:.0f} |")
    run_, one, two = configurations
    lines += [
        "",
        "*Median case*: the sequential run's timed parts of a case; a cohort's task time on its worker "
        "(`seconds_total`: also the checks `run` makes before it computes, which read the volume and label a first "
        "time, and the case's folder and row). *Its timed parts*: read, preprocess, forward, fuse, geometry, "
        "resample, write, render, as the case's `summary.json` records them. *Outside the cases*: the wall time not "
        "spent in cases (per worker): Python and package imports, model loads, the cluster's start and stop, "
        f"scheduling, the table and summary. One worker with `run`'s two torch threads: {one['cases_per_minute']:.1f} "
        f"cases / min against the sequential run's {run_['cases_per_minute']:.1f}; two local workers with one "
        f"thread each: {two['cases_per_minute']:.1f}, {two['cases_per_minute'] / one['cases_per_minute']:.2f}x one "
        "worker on this 2-core machine. A case's timed parts take longer in a Dask worker than in `run`'s process "
        f"({one['timed_median_s']:.1f} s against {run_['timed_median_s']:.1f} s with the same two torch threads): "
        "the forward pass and the resampling, not the cohort's own steps. Not yet explained; Dask's worker "
        "environment (OMP / MKL / OpenBLAS threads 1, `MALLOC_TRIM_THRESHOLD_`) accounts for part of the "
        "resampling's share in a one-case test, not for the forward's. *Peak memory*: the largest resident size of "
        "the run's process, or of a cohort worker process (`worker_peak_rss_mib` in the table).",
        "",
        "On paper, N GPU workers (`dask worker` on each GPU machine, `--scheduler` on the command line): each case "
        "is independent and carries only paths, so the cohort's rate is N times one worker's, less the scheduler's "
        "few milliseconds per task, until the shared file system that serves the images and the case folders "
        "becomes the limit; each worker pays one model load. A 1,000-scan audit at one worker's rate "
        f"({60.0 / one['case_median_s']:.1f} cases / min here on 2 CPU cores) takes "
        f"{1000 * one['case_median_s'] / 3600.0:.1f} h; with N workers, that divided by N.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=3, choices=(1, 2, 3), help="stored copies per re-gridding")
    parser.add_argument("--views", default="one", choices=("one", "card"))
    parser.add_argument("--out", type=Path, default=measure.REPO / "docs")
    parser.add_argument("--from-json", type=Path, help="only rewrite the section from a saved benchmarks_cohort.json")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        machine = results.pop("machine")
    else:
        results = run(args.copies, args.views)
        machine = measure.machine_description()
        (args.out / "benchmarks_cohort.json").write_text(json.dumps({"machine": machine, **results}, indent=1))
    measure.publish_section(args.out, SECTION, report(results, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
