"""The worker process: loads models and runs every torch computation for the Slicer module.

Started by ``worker.WorkerProcess`` as ``python -m AttentionMapLib.worker_process --port P ...``
with the connection key as one hex line on stdin. It connects back to the GUI process, then serves
one request at a time (explain, fuse_again, score; see worker_protocol for the message format) and
answers with progress / done / error / cancelled / log events. It keeps the loaded models and the
last explanation (model, input, VolumeAttention), so a re-fusion or a score needs no transfer of
the volume and no new forward pass.

A reader thread takes the GUI's messages as they come: "cancel" sets a flag checked between windows
(explain) or forward batches (score), and a closed connection (the GUI process is gone) ends this
process at once. A watchdog thread ends it too when the parent process disappears, so no worker
outlives Slicer.
"""
import argparse
import faulthandler
import os
import queue
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import worker_protocol as protocol
from .errors import AttentionMapError, Cancelled
from .models import resolve_device
from .stale import process_alive, process_start

WATCHDOG_INTERVAL_S = 1.0
SCRATCH_PREFIX = "AttentionMap-worker-"


THREADS_VARIABLE = "ATTENTIONMAP_WORKER_THREADS"


def default_threads() -> int:
    """Torch threads in the worker: $ATTENTIONMAP_WORKER_THREADS if set, else all cores but one, which
    stays free for the GUI (with torch's default of every core, a busy GUI and worker fight over them)."""
    configured = os.environ.get(THREADS_VARIABLE, "").strip()
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise AttentionMapError(f"{THREADS_VARIABLE}: expected a positive whole number, got {configured!r}")
        return int(configured)
    return max(1, (os.cpu_count() or 2) - 1)


def orphaned_exit() -> None:
    """End this process at once because the GUI is gone, removing the scratch folder it would have
    removed (the worker runs inside it: worker.WorkerProcess starts it with that folder as cwd)."""
    folder = os.getcwd()
    if os.path.basename(folder).startswith(SCRATCH_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


@dataclass
class _LastExplanation:
    """What a re-fusion or a score of the last explanation needs (kept in this process only)."""

    job_id: int
    model: Any  # models.LoadedModel
    attention: Any  # volume.VolumeAttention
    array: np.ndarray
    ijk_to_ras: np.ndarray


def attention_message(attention: Any, classes: Optional[List[str]] = None,
                      with_region: bool = True) -> Tuple[Dict[str, Any], protocol.Arrays]:
    """A VolumeAttention as plain data: (JSON fields, arrays grid / ijk_to_ras / probabilities / ...), with the
    applied region (`worker_protocol.region_message`) unless ``with_region`` is False (a re-fusion: the GUI keeps
    the region of the result it re-fuses)."""
    fields = {key: getattr(attention, key) for key in ("target", "method", "layer", "head_fusion", "head",
                                                        "discard_ratio", "normalize", "num_windows",
                                                        "window_weighting")}
    fields["flip_axes"] = [int(a) for a in attention.flip_axes]
    fields["shift_average"] = bool(attention.shift_average)
    fields["timings"] = dict(attention.timings)
    fields["prediction"] = attention.prediction(classes or [])
    region_fields, region_arrays = protocol.region_message(attention.region if with_region else None)
    fields["region"] = region_fields
    arrays = {"grid": attention.grid, "ijk_to_ras": attention.ijk_to_ras, **region_arrays}
    for key in ("probabilities", "window_logits", "query_ras"):
        if getattr(attention, key) is not None:
            arrays[key] = np.asarray(getattr(attention, key))
    return fields, arrays


def model_message(model: Any, device: str) -> Dict[str, Any]:
    """What the GUI shows about a loaded model (plain data)."""
    from .core.engine import model_spec

    spec = model_spec(model.network, model.img_size)
    return {"classes": list(model.classes), "target": model.target, "img_size": list(model.img_size),
            "num_layers": spec.num_layers, "num_heads": spec.num_heads, "source": model.source,
            "notes": list(model.notes), "device": device}


def _with_mask(spec: Any) -> Any:
    """A region spec from the GUI with its mask read back (and removed) from the scratch file it names."""
    if isinstance(spec, dict) and "mask_path" in spec:
        return {**spec, "mask": protocol.load_input(spec["mask_path"])}
    return spec


class WorkerServer:
    """Serves the requests of one GUI connection until it closes."""

    def __init__(self, conn: Any, threads: int) -> None:
        self._conn = conn
        self._threads = threads
        self._requests: "queue.Queue[Tuple[Dict[str, Any], protocol.Arrays]]" = queue.Queue()
        self._cancelled: set = set()
        self._current = -1
        self._models: Dict[Tuple[str, bool, str], Any] = {}
        self._last: Optional[_LastExplanation] = None
        self._torch_ready = False
        self._sending = threading.Lock()  # the reader thread answers malformed requests while a job runs

    def _send(self, header: Dict[str, Any], arrays: Optional[protocol.Arrays] = None) -> None:
        with self._sending:
            protocol.send(self._conn, header, arrays)

    # ------------------------------------------------------------ threads

    def read_forever(self) -> None:
        """Reader thread: cancel requests act at once, the rest is queued; a closed connection exits."""
        while True:
            try:
                header, arrays = protocol.receive(self._conn)
            except (EOFError, OSError):
                orphaned_exit()  # the GUI process closed the connection or died
            except Exception as error:  # a malformed request: answered with an error, and the worker goes on
                self._send({"event": "error", "id": None, "type": type(error).__name__, "user_error": False,
                            "message": f"a malformed request: {error}", "detail": traceback.format_exc()})
                continue
            if header.get("op") == "cancel":
                self._cancelled.add(header.get("id"))
            elif header.get("op") == "shutdown":
                os._exit(0)
            else:
                self._requests.put((header, arrays))

    def serve(self) -> None:
        threading.Thread(target=self.read_forever, name="requests", daemon=True).start()
        while True:
            header, arrays = self._requests.get()
            self._handle(header, arrays)

    # ------------------------------------------------------------ requests

    def _handle(self, header: Dict[str, Any], arrays: protocol.Arrays) -> None:
        job_id = int(header.get("id", -1))
        self._current = job_id
        handler = {"explain": self._explain, "fuse_again": self._fuse_again, "score": self._score}.get(header.get("op"))
        try:
            if handler is None:
                raise protocol.ProtocolError(f"worker: unknown request {header.get('op')!r}")
            self._prepare_torch()
            if self._is_cancelled():
                raise Cancelled("cancelled before it started")
            fields, out = handler(header, arrays)
            if self._is_cancelled():
                raise Cancelled("cancelled")
            self._send({"event": "done", "id": job_id, "value": fields}, out)
        except Cancelled:
            self._send({"event": "cancelled", "id": job_id})
        except Exception as error:  # reported to the GUI, which shows it; the worker stays usable
            self._send({"event": "error", "id": job_id, "type": type(error).__name__,
                        "user_error": isinstance(error, AttentionMapError), "message": str(error),
                        "detail": traceback.format_exc()})
        finally:
            self._cancelled.discard(job_id)

    def _is_cancelled(self) -> bool:
        return self._current in self._cancelled

    def _progress(self, fraction: float) -> None:
        self._send({"event": "progress", "id": self._current, "value": float(fraction)})

    def _log(self, message: str) -> None:
        self._send({"event": "log", "id": self._current, "message": message})

    def _prepare_torch(self) -> None:
        if self._torch_ready:
            return
        start = time.perf_counter()
        import torch

        torch.set_num_threads(self._threads)
        self._torch_ready = True
        self._log(
            f"PyTorch {torch.__version__} imported in {time.perf_counter() - start:.1f} s; "
            f"{torch.get_num_threads()} thread(s); CUDA {'available' if torch.cuda.is_available() else 'not available'}"
        )

    def _model(self, source: str, trust_bundle: bool, device: str) -> Any:
        from .models import load_model

        key = (source, trust_bundle, device)
        if key not in self._models:
            start = time.perf_counter()
            self._models[key] = load_model(source, trust_bundle=trust_bundle, device=device)
            self._log(f"Loaded model {source} on {device} in {time.perf_counter() - start:.1f} s")
        return self._models[key]

    def _explain(self, header: Dict[str, Any], arrays: protocol.Arrays) -> Tuple[Dict[str, Any], protocol.Arrays]:
        from .core.region import region_from_spec
        from .core.segment import SegmentTarget
        from .core.volume import explain_volume
        from .explain_options import ExplainOptions

        region = _with_mask(header.get("region", "default"))
        array = protocol.load_input(header["input"])
        ijk_to_ras = np.asarray(header["ijk_to_ras"], dtype=np.float64)
        device = resolve_device(header.get("device", "auto"))
        model = self._model(str(header["model_source"]), bool(header.get("trust_bundle")), device)
        message = dict(header.get("options") or {})
        if isinstance(region, dict):
            message["region"] = region_from_spec(region, model.card, model.source)
        elif region is not None:
            message["region"] = region
        segment = header.get("segment")
        if segment is not None:  # why this segment: the class over a box / mask, or over the network's own labels
            where = _with_mask(segment.get("region"))
            message["target"] = SegmentTarget(segment["class"],
                                              None if where is None else region_from_spec(where, None, "segment"))
        self._last = None  # a failed or cancelled run leaves nothing to re-fuse
        options = ExplainOptions.from_message(message).resolve(model)
        attention = explain_volume(model.network, array, ijk_to_ras, model.preprocessing,
                                   **{"img_size": model.img_size, **options}, progress=self._progress,
                                   cancel=self._is_cancelled, device=device)
        self._last = _LastExplanation(self._current, model, attention, array, ijk_to_ras)
        fields, out = attention_message(attention, model.classes)
        if attention.segmentation is not None:  # the network's own labels, sent once per explanation
            out.update(labels=attention.segmentation, labels_ijk_to_ras=attention.segmentation_ijk_to_ras)
        return {"model": model_message(model, device), "attention": fields, "result_id": self._current}, out

    def _last_of(self, header: Dict[str, Any]) -> _LastExplanation:
        last = self._last
        if last is None or last.job_id != header.get("result_id"):
            raise AttentionMapError("the worker no longer holds this result (it was restarted or ran another "
                                    "volume since): press Apply to run the network again")
        return last

    def _fuse_again(self, header: Dict[str, Any], arrays: protocol.Arrays) -> Tuple[Dict[str, Any], protocol.Arrays]:
        last = self._last_of(header)
        options = dict(header.get("options") or {})
        attention = last.attention.fuse_again(**options)
        last.attention = attention
        fields, out = attention_message(attention, last.model.classes, with_region=False)
        return {"attention": fields, "result_id": last.job_id}, out

    def _score(self, header: Dict[str, Any], arrays: protocol.Arrays) -> Tuple[Dict[str, Any], protocol.Arrays]:
        """Deletion / insertion of the last explanation's input on the device its network is on."""
        from .core.metrics import score_volume

        last = self._last_of(header)
        model = last.model
        scores = score_volume(model.network, last.array, last.ijk_to_ras, model.preprocessing,
                              img_size=model.img_size, centre_ras=header.get("centre_ras"),
                              progress=self._progress, cancel=self._is_cancelled, **dict(header.get("options") or {}))
        return {**scores, "device": str(next(model.network.parameters()).device)}, {}


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="unix:PATH or tcp:HOST:PORT (worker_protocol.listen)")
    parser.add_argument("--parent-pid", type=int, required=True, help="the GUI process (not the launcher)")
    parser.add_argument("--threads", type=int, default=None, help=f"torch threads (default: ${THREADS_VARIABLE}, "
                        "else all cores but one)")
    args = parser.parse_args(argv)
    started = process_start(args.parent_pid)
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    faulthandler.enable()  # a crash writes its Python traceback to stderr (the worker's log file)

    def watchdog() -> None:
        # the GUI is watched by its pid, never by who our parent is: Slicer starts the worker through PythonSlicer, a
        # launcher whose child is this Python (CTKAppLauncher ctkAppLauncher.cpp: a QProcess), so our parent is the
        # launcher; a different start time of that pid (a zombie, or the pid reused) means the GUI is gone
        while process_alive(args.parent_pid, started):
            time.sleep(WATCHDOG_INTERVAL_S)
        orphaned_exit()

    threading.Thread(target=watchdog, name="watchdog", daemon=True).start()
    conn = protocol.connect(args.address, authkey)
    WorkerServer(conn, max(1, args.threads) if args.threads is not None else default_threads()).serve()


if __name__ == "__main__":
    main()
