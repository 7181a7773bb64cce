"""`attention-map cohort`: a whole data set explained on Dask (``dask.distributed``), from a laptop to a cluster.

Each case of the manifest is one Dask task carrying paths and options, never volumes. A worker loads the model
once and keeps it (:func:`worker_model`), runs the case exactly as ``attention-map run`` would with one input
(:func:`cli.run_with_model`: the same maps, overlay and summary) into ``DIR/.partial/``, and moves the finished
folder into place in one rename, ``DIR/cases/<case_id>/`` (with ``row.json``, the case's row of the table). A case
that fails records ``DIR/failed/<case_id>.json`` (its one-line error) and the cohort goes on. A rerun skips the
finished cases (resume) and the failed ones unless ``--retry-failed``. A worker that dies loses only its
in-flight case, which the scheduler gives to another worker (Dask's ``allowed-failures``, 3 by default; after that
the case is recorded as failed). Ctrl-C (or SIGTERM) cancels what is running and keeps what finished.

At the end, and after an interruption, the cohort table is written from the case folders, one row per manifest
case (``status`` ok / failed / not run): ``DIR/cohort.parquet`` and ``DIR/cohort.csv``, and a summary to look at,
``DIR/summary.png`` (distributions of the prediction and of the attention mass inside the labels, the cases whose
peak lies farthest from their label) inside ``DIR/summary.html`` (with the failed cases and their errors).

Default cluster: a ``LocalCluster`` of ``--workers`` processes with one task at a time each; every task sets
torch's threads to ``--threads-per-worker`` (default: the cores / the local workers; on a cluster, the worker
machine's cores / the tasks its worker runs at once), so workers do not oversubscribe the cores.
``--scheduler ADDRESS`` uses an existing cluster instead (``dask scheduler`` + ``dask worker`` on GPU machines, or
dask-jobqueue / dask-kubernetes); its workers need this package, the model files and the images at the same paths
(a shared file system).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import html
import io
import json
import os
import re
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import AttentionMapError
from .outputs import write_file

COLUMNS = ("image", "label", "mask", "case_id")
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TABLE = ("cohort.parquet", "cohort.csv", "summary.html", "summary.png")
STATUSES = ("ok", "failed", "not run")
WORST = 10  # cases listed in the summary by peak-to-label distance


@dataclass(frozen=True)
class CohortCase:
    """One manifest row: absolute paths; ``case_id`` names its folder."""

    case_id: str
    image: str
    label: Optional[str] = None
    mask: Optional[str] = None


# ---------------------------------------------------------------------------------------------- manifest
def read_manifest(path: Path) -> List[CohortCase]:
    """The cases of a manifest: CSV with a header row, or JSON lines (``.jsonl`` / ``.ndjson``), keys ``image``
    (required), ``label``, ``mask``, ``case_id`` (default: the image's name without its volume suffix). Relative
    paths are relative to the manifest's folder. AttentionMapError naming the manifest and line of a bad row."""
    from .cli import case_name

    path = Path(path)
    if not path.is_file():
        raise AttentionMapError(f"{path}: manifest not found; expected a CSV or JSON-lines file")
    rows = _json_lines(path) if path.suffix.lower() in (".jsonl", ".ndjson") else _csv_rows(path)
    cases: List[CohortCase] = []
    seen: Dict[str, int] = {}
    for line, row in rows:
        where = f"{path}, line {line}"
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise AttentionMapError(f"{where}: unknown column(s) {unknown}; expected image, and optionally "
                                    "label, mask, case_id")
        values = {k: (str(v).strip() if v is not None else "") for k, v in row.items()}
        if not values.get("image"):
            raise AttentionMapError(f"{where}: no image; every row names an image file or DICOM folder")
        image = _resolve(path, values["image"])
        case_id = values.get("case_id") or case_name(Path(image))
        if not CASE_ID.match(case_id):
            raise AttentionMapError(f"{where}: case_id {case_id!r} cannot name a folder; expected letters, digits, "
                                    "'.', '_' or '-' (at most 128, not starting with '.', '_' or '-')")
        if case_id in seen:
            raise AttentionMapError(f"{where}: case_id {case_id!r} is also on line {seen[case_id]}; each case needs "
                                    "its own (add a case_id column)")
        seen[case_id] = line
        cases.append(CohortCase(case_id, image, *(_resolve(path, values[k]) if values.get(k) else None
                                                  for k in ("label", "mask"))))
    if not cases:
        raise AttentionMapError(f"{path}: the manifest lists no case")
    return cases


def _csv_rows(path: Path) -> List[Tuple[int, Dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "image" not in [f.strip() for f in reader.fieldnames]:
            raise AttentionMapError(f"{path}: expected a CSV header row with an 'image' column (and optionally "
                                    f"label, mask, case_id), got {reader.fieldnames}")
        rows = []
        for row in reader:
            if None in row:
                raise AttentionMapError(f"{path}, line {reader.line_num}: more values than header columns")
            if any((v or "").strip() for v in row.values()):
                rows.append((reader.line_num, {k.strip(): v for k, v in row.items()}))
        return rows


def _json_lines(path: Path) -> List[Tuple[int, Dict[str, Any]]]:
    rows = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AttentionMapError(f"{path}, line {line}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise AttentionMapError(f"{path}, line {line}: expected an object with an image key")
        rows.append((line, row))
    return rows


def _resolve(manifest: Path, value: str) -> str:
    given = Path(value).expanduser()
    return str(given if given.is_absolute() else (manifest.resolve().parent / given))


# ---------------------------------------------------------------------------------------------- one case
_MODELS: Dict[Tuple[str, bool, str], Tuple[Any, str]] = {}


def worker_model(model: str, trust_bundle: bool, device_option: str) -> Tuple[Any, str, float]:
    """The model of this worker process, loaded at its first case and kept: (loaded, device, seconds spent
    loading now: 0 when it was kept). One model at a time (a new cohort's model replaces it)."""
    from .models import load_model, resolve_device

    key = (model, bool(trust_bundle), device_option)
    if key in _MODELS:
        return (*_MODELS[key], 0.0)
    t0 = time.perf_counter()
    _MODELS.clear()
    device = resolve_device(device_option, "--device")
    _MODELS[key] = (load_model(model, trust_bundle=trust_bundle, device=device), device)
    return (*_MODELS[key], time.perf_counter() - t0)


def _torch_threads(requested: Optional[int]) -> int:
    """``requested``, else this machine's cores / the tasks this Dask worker runs at once (on a machine running
    several worker processes, give ``--threads-per-worker``)."""
    if requested:
        return int(requested)
    try:
        from distributed import get_worker

        return max(1, (os.cpu_count() or 1) // max(1, int(get_worker().state.nthreads)))
    except (ImportError, ValueError, AttributeError):
        return max(1, os.cpu_count() or 1)


def run_case(case: CohortCase, options: Dict[str, Any], output_dir: str) -> Dict[str, Any]:
    """One case, on a Dask worker: `run` with this case as its one input, into ``DIR/.partial/``, then one rename
    to ``DIR/cases/<case_id>/``; or ``DIR/failed/<case_id>.json``. Returns the case's row (``row``)."""
    import torch

    from .cli import run_with_model

    started = time.perf_counter()
    out = Path(output_dir)
    staging = out / ".partial" / f"{case.case_id}.{uuid.uuid4().hex[:8]}"
    final = out / "cases" / case.case_id
    threads = _torch_threads(options.get("threads_per_worker"))
    torch.set_num_threads(threads)
    try:
        loaded, device, load_s = worker_model(options["model"], options["trust_bundle"], options["device"])
        args = argparse.Namespace(**{**options["run"], "inputs": [case.image],
                                     "label": [case.label] if case.label else None,
                                     "mask": [case.mask] if case.mask else None, "target_mask": None,
                                     "output_dir": staging})
        with contextlib.redirect_stdout(io.StringIO()):  # its "wrote N files" line names the staging folder
            run_with_model(args, loaded, device)
        summary_path = staging / "summary.json"
        text = summary_path.read_text().replace(json.dumps(str(staging))[1:-1], json.dumps(str(final))[1:-1])
        summary_path.write_text(text)  # its paths name the case's folder, not the staging one
        row = case_row(case, options, json.loads(text), device, threads, load_s,
                       time.perf_counter() - started)
        (staging / "row.json").write_text(json.dumps(row, indent=1))
        if final.exists():  # a forced rerun of a finished case: the new folder replaces it
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
        (out / "failed" / f"{case.case_id}.json").unlink(missing_ok=True)
        return row
    except Exception as exc:  # recorded, the cohort goes on (one line, as `run` would say it)
        shutil.rmtree(staging, ignore_errors=True)
        return record_failure(out, case, options, error_line(exc), time.perf_counter() - started)


def error_line(exc: BaseException) -> str:
    if isinstance(exc, AttentionMapError):
        return " ".join(str(exc).split())
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def record_failure(out: Path, case: CohortCase, options: Dict[str, Any], error: str,
                   seconds: float = float("nan")) -> Dict[str, Any]:
    """Write ``DIR/failed/<case_id>.json`` (atomically) and return the failed row."""
    row = {**empty_row(case, options), "status": "failed", "error": error, "seconds_total": seconds,
           "worker": _worker_address()}
    (out / "failed").mkdir(parents=True, exist_ok=True)
    write_file(out / "failed" / f"{case.case_id}.json", json.dumps(row, indent=1).encode(), [Path(case.image)],
               "--output-dir")
    return row


def _peak_rss_mib() -> Optional[float]:
    """The peak resident memory of this (worker) process so far, MiB; None where the system does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)  # bytes on macOS, else KiB


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "local"


# ---------------------------------------------------------------------------------------------- the table
def empty_row(case: CohortCase, options: Dict[str, Any]) -> Dict[str, Any]:
    """Every column, unset: the row of a case that did not run."""
    run = options["run"]
    return {
        "case_id": case.case_id, "image": case.image, "label": case.label, "mask": case.mask,
        "status": "not run", "error": None, "model": options["model"], "method": run["method"],
        "layer": run["layer"], "target": options["explain"].get("target"),
        "options": json.dumps(options["explain"], sort_keys=True),
        "predicted_class": None, "probability": None, "peak_r_mm": None, "peak_a_mm": None, "peak_s_mm": None,
        "region": None, "windows": None, "label_mass_fraction": None, "label_mass_ratio": None,
        "label_pointing": None, "label_peak_inside": None, "label_peak_distance_mm": None,
        "seconds_total": None, "seconds_read": None, "seconds_model_load": None, "device": None,
        "torch_threads": None, "worker": None, "worker_peak_rss_mib": None, "finished_utc": None,
    }


def case_row(case: CohortCase, options: Dict[str, Any], summary: Dict[str, Any], device: str, threads: int,
             load_s: float, seconds: float) -> Dict[str, Any]:
    """A finished case's row from its `run` summary (one case)."""
    record = summary["cases"][0]
    prediction = record.get("prediction") or {}
    label = record.get("label") or {}
    peak = record["peak_ras_mm"]
    return {**empty_row(case, options), "status": "ok", "predicted_class": prediction.get("class"),
            "probability": prediction.get("probability"), "peak_r_mm": peak[0], "peak_a_mm": peak[1],
            "peak_s_mm": peak[2], "region": (record.get("region") or {}).get("description"),
            "windows": record.get("num_windows"), "label_mass_fraction": label.get("mass_fraction"),
            "label_mass_ratio": label.get("mass_ratio"), "label_pointing": label.get("pointing_hit_one_patch"),
            "label_peak_inside": label.get("peak_inside"),
            "label_peak_distance_mm": label.get("peak_to_nearest_label_voxel_mm"),
            "seconds_total": seconds, "seconds_read": record["timings_s"].get("read"),
            "seconds_model_load": load_s, "device": device, "torch_threads": threads,
            "worker": _worker_address(), "worker_peak_rss_mib": _peak_rss_mib(),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def case_rows(cases: Sequence[CohortCase], out: Path, options: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per manifest case from what is on disk: a finished folder, else a failure record, else not run."""
    rows = []
    for case in cases:
        row = _read_json(out / "cases" / case.case_id / "row.json") or _read_json(out / "failed" /
                                                                                  f"{case.case_id}.json")
        rows.append(row if row is not None else empty_row(case, options))
    return rows


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_table(rows: List[Dict[str, Any]], out: Path) -> None:
    """``cohort.parquet`` and ``cohort.csv`` (one row per case, the columns of :func:`empty_row`), each written
    atomically (`outputs.write_file`)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_schema(rows))
    for name, write in (("cohort.parquet", pq.write_table), ("cohort.csv", pa_csv.write_csv)):
        sink = pa.BufferOutputStream()
        write(table, sink)
        write_file(out / name, sink.getvalue().to_pybytes(), _images(rows), "--output-dir")


def _images(rows: List[Dict[str, Any]]) -> List[Path]:
    """The rows' input images: an output must never replace one (`outputs.write_file`)."""
    return [Path(r["image"]) for r in rows]


def _schema(rows: List[Dict[str, Any]]):
    import pyarrow as pa

    kinds = {"label_pointing": pa.bool_(), "label_peak_inside": pa.bool_(), "windows": pa.int64(),
             "layer": pa.int64(), "target": pa.int64(), "torch_threads": pa.int64()}
    floats = {"probability", "peak_r_mm", "peak_a_mm", "peak_s_mm", "label_mass_fraction", "label_mass_ratio",
              "label_peak_distance_mm", "seconds_total", "seconds_read", "seconds_model_load", "worker_peak_rss_mib"}
    fields = []
    for name in rows[0]:
        kind = kinds.get(name, pa.float64() if name in floats else pa.string())
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


def write_summary(rows: List[Dict[str, Any]], out: Path, title: str) -> None:
    """``summary.png`` (three panels) and ``summary.html`` (counts, the picture, the worst cases by peak-to-label
    distance, the failed cases), each written atomically (`outputs.write_file`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    probabilities = [r["probability"] for r in ok if r["probability"] is not None]
    mass = [r["label_mass_ratio"] for r in ok if r["label_mass_ratio"] is not None]
    worst = sorted((r for r in ok if r["label_peak_distance_mm"] is not None),
                   key=lambda r: -r["label_peak_distance_mm"])[:WORST]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    axes[0].hist(probabilities, bins=20, range=(0, 1), color="tab:blue")
    axes[0].set_title(f"volume-level probability (n = {len(probabilities)})", fontsize=10)
    axes[1].hist(mass, bins=20, color="tab:orange")
    axes[1].axvline(1.0, color="k", lw=0.8, ls="--")
    axes[1].set_title(f"attention mass inside the label / its volume share (n = {len(mass)}; 1 = uniform)",
                      fontsize=9)
    axes[2].barh([r["case_id"] for r in worst][::-1], [r["label_peak_distance_mm"] for r in worst][::-1],
                 color="tab:red")
    axes[2].set_title(f"peak farthest from the label (mm), worst {len(worst)}", fontsize=10)
    axes[2].tick_params(axis="y", labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    picture = buffer.getvalue()
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    failed = [r for r in rows if r["status"] == "failed"]

    def cells(values: Sequence[Any]) -> str:
        return "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in values)

    page = [
        "<!doctype html><meta charset='utf-8'><title>AttentionMap cohort</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}</style>",
        f"<h1>AttentionMap cohort</h1><p>{html.escape(title)}</p>",
        "<p>" + ", ".join(f"{html.escape(s)}: {n}" for s, n in counts.items()) + f" (of {len(rows)} cases)</p>",
        f"<img alt='cohort summary' src='data:image/png;base64,{base64.b64encode(picture).decode()}'>",
        f"<h2>Peak farthest from the label (worst {len(worst)})</h2><table><tr><th>case</th><th>peak to label "
        "(mm)</th><th>pointing</th><th>mass ratio</th><th>probability</th></tr>",
        *[f"<tr>{cells([r['case_id'], _fmt(r['label_peak_distance_mm']), r['label_pointing'], _fmt(r['label_mass_ratio']), _fmt(r['probability'])])}</tr>"  # noqa: E501
          for r in worst],
        "</table>",
        f"<h2>Failed cases ({len(failed)})</h2><table><tr><th>case</th><th>image</th><th>error</th></tr>",
        *[f"<tr>{cells([r['case_id'], r['image'], r['error']])}</tr>" for r in failed],
        "</table>",
    ]
    for name, data in (("summary.png", picture), ("summary.html", "\n".join(page).encode())):
        write_file(out / name, data, _images(rows), "--output-dir")


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------- the command
def run_options(args: argparse.Namespace, loaded) -> Dict[str, Any]:
    """What every task carries: the model, the resolved explain options (for the table) and `run`'s own options
    (plain values: the namespace `run` would parse, less the per-case inputs)."""
    from .cli import resolved_options

    explain, _ = resolved_options(args, loaded)  # a bad option fails here, once, before any worker starts
    skip = {"func", "manifest", "scheduler", "workers", "threads_per_worker", "retry_failed", "output_dir",
            "target_mask"}
    run = {k: v for k, v in vars(args).items() if k not in skip}
    return {"model": args.model, "trust_bundle": bool(args.trust_bundle), "device": args.device,
            "threads_per_worker": args.threads_per_worker, "run": run,
            "explain": {k: v for k, v in explain.items() if k not in ("domain", "region")}}


def plan(cases: Sequence[CohortCase], out: Path, retry_failed: bool) -> Tuple[List[CohortCase], int, int]:
    """(cases to run, finished earlier, failed earlier and kept)."""
    todo, done, kept = [], 0, 0
    for case in cases:
        if (out / "cases" / case.case_id / "row.json").is_file():
            done += 1
        elif (out / "failed" / f"{case.case_id}.json").is_file() and not retry_failed:
            kept += 1
        else:
            todo.append(case)
    return todo, done, kept


def _say(message: str) -> None:
    print(f"attention-map: {' '.join(message.split())}", file=sys.stderr, flush=True)


@contextmanager
def dask_client(scheduler: Optional[str], workers: int) -> Iterator[Any]:
    """A Dask client: on the cluster at ``scheduler``, else on a new LocalCluster of ``workers`` processes with one
    task at a time each (closed on exit)."""
    import logging

    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise AttentionMapError(f"--scheduler {scheduler}: no Dask scheduler answers there ({exc})") from None
        try:
            yield client
        finally:
            client.close()
        return
    dashboard = ":0" if _has_module("bokeh") else None
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=dashboard,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def run_cohort(args: argparse.Namespace) -> int:
    """`attention-map cohort` (see the module docstring). Exit 0 when every case is ok, 1 when some failed, 130 /
    143 after Ctrl-C / SIGTERM (what finished is kept; rerun to resume)."""
    from .cli import roi_option
    from .models import load_model, resolve_device
    from .outputs import check_output_folder

    try:
        import distributed  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise AttentionMapError(f"cohort: needs Dask and pyarrow ({exc.name} is missing): pip install "
                                "'dask[distributed]' pyarrow") from None
    if args.workers is not None and args.workers < 1:
        raise AttentionMapError(f"--workers: expected 1 or more, got {args.workers}")
    if args.threads_per_worker is not None and args.threads_per_worker < 1:
        raise AttentionMapError(f"--threads-per-worker: expected 1 or more, got {args.threads_per_worker}")
    cases = read_manifest(args.manifest)
    if args.roi is not None and any(c.mask for c in cases):
        raise AttentionMapError("--roi: the manifest also gives masks (its mask column); use one or the other")
    roi_option(args.roi)
    out = check_output_folder(args.output_dir, TABLE, [Path(c.image) for c in cases])
    device = resolve_device(args.device, "--device")
    options = run_options(args, load_model(args.model, trust_bundle=args.trust_bundle, device=device))
    workers = args.workers or max(1, (os.cpu_count() or 1) // 4)
    if not args.scheduler and options["threads_per_worker"] is None:  # the local cores shared by the workers
        options["threads_per_worker"] = max(1, (os.cpu_count() or 1) // workers)
    todo, done, kept = plan(cases, out, args.retry_failed)
    _say(f"{len(cases)} cases: {done} finished earlier, {kept} failed earlier (kept; --retry-failed runs them "
         f"again), {len(todo)} to run")
    interrupted = None
    if todo:
        with dask_client(args.scheduler, workers) as client:  # a scheduler that does not answer: nothing written
            _prepare(out)
            link = getattr(client, "dashboard_link", None)
            if link and (args.scheduler or _has_module("bokeh")):
                _say(f"Dask dashboard: {link}")
            futures = {client.submit(run_case, case, options, str(out), key=f"attentionmap-{case.case_id}-"
                                     f"{uuid.uuid4().hex[:8]}", pure=False): case for case in todo}
            interrupted = _collect(client, futures, out, options)
    _prepare(out)
    rows = case_rows(cases, out, options)
    write_table(rows, out)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    write_summary(rows, out, f"{args.model}, method {args.method}: " + ", ".join(f"{s} {n}"
                                                                                  for s, n in counts.items()))
    _say(f"cohort: {counts['ok']} ok, {counts['failed']} failed, {counts['not run']} not run; table "
         f"{out / 'cohort.parquet'}, summary {out / 'summary.html'}")
    if interrupted is not None:
        _say(f"{interrupted}: the cases that finished are kept; run the same command again to resume")
        return 130 if interrupted == "interrupted (Ctrl-C)" else 143
    return 0 if counts["failed"] == 0 else 1


def _prepare(out: Path) -> None:
    """The cohort's folders, and no staging folder of a case that was in flight when an earlier run stopped."""
    for folder in ("cases", "failed"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / ".partial", ignore_errors=True)


def _collect(client, futures: Dict[Any, CohortCase], out: Path, options: Dict[str, Any]) -> Optional[str]:
    """Wait for the cases as they finish (a progress bar); a task Dask gives up on (its workers died) is recorded
    as failed. Returns None, or what interrupted the wait (the running cases are cancelled)."""
    from distributed import as_completed
    from tqdm import tqdm

    from .cli import Terminated

    bar = tqdm(total=len(futures), desc="cases", unit="case", disable=None)
    try:
        for future in as_completed(list(futures)):
            try:
                row = future.result()
            except Exception as exc:  # e.g. KilledWorker: the case took its workers down too often
                row = record_failure(out, futures[future], options, error_line(exc))
            bar.update(1)
            if row["status"] == "failed":
                bar.write(f"attention-map: {row['case_id']}: failed: {row['error']}")
        return None
    except KeyboardInterrupt:
        client.cancel(list(futures))
        return "interrupted (Ctrl-C)"
    except Terminated:
        client.cancel(list(futures))
        return "terminated (SIGTERM)"
    finally:
        bar.close()
