"""Background jobs in a worker process: the network never runs in the GUI process.

Inside Slicer a Python thread barely runs: PythonQt keeps the GIL while Qt's event loop idles
(commontk/PythonQt ``src/PythonQtThreadSupport.cpp``: ``_enableGILScope = false``), so a thread
only advances while the main thread runs Python. All torch work therefore runs in one long-lived
worker process (``worker_process``) started with Slicer's own Python; this module is its client
and imports neither torch nor MONAI.

``explain_job`` / ``fuse_again_job`` / ``score_job`` return a ``WorkerJob``: ``poll()`` (never blocks:
it reads only what has already arrived), ``cancel()``, ``wait(timeout)``; events are progress
(fraction 0..1), log (a line for the details area), done (the result, plain data), error (the
exception and the worker's traceback) and cancelled. The worker keeps its models and the last
explanation, so a re-fusion or a score sends a few options, not the volume.

A cancel not honoured within CANCEL_GRACE_S, a job timeout, a dead worker or Slicer closing kills
the worker's whole process group; the next job starts a fresh worker.
"""
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import stale
from . import worker_protocol as protocol
from .core.attention_grid import AttentionGrid
from .core.region import AppliedRegion
from .errors import AttentionMapError
from .worker_environment import PACKAGE_PARENT, child_environment  # noqa: F401 (PACKAGE_PARENT: scripts')
from .worker_process import SCRATCH_PREFIX

PROGRESS, LOG, DONE, ERROR, CANCELLED = "progress", "log", "done", "error", "cancelled"
FINAL_KINDS = (DONE, ERROR, CANCELLED)
CANCEL_GRACE_S = 5.0  # a cancel not honoured by then (e.g. inside a long forward pass) kills the worker
STARTUP_TIMEOUT_S = 60.0


class WorkerDied(RuntimeError):
    """The worker process ended while a job ran (crash, out of memory, killed)."""


class JobEvent(NamedTuple):
    """kind: progress (value: fraction), log (value: text), done (value: the result), error (value:
    the exception; ``detail``: the worker's traceback) or cancelled (value: None)."""
    kind: str
    value: Any = None
    detail: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """A model loaded in the worker, as the GUI needs it (plain data)."""

    classes: List[str]
    target: Optional[int]
    img_size: Tuple[int, ...]
    num_layers: int
    num_heads: int
    source: str
    notes: List[str]
    device: str  # where the network is (scores run there too)


@dataclass(frozen=True)
class AttentionData(AttentionGrid):
    """A VolumeAttention computed in the worker, as plain data: the shared fields (grid to window_weighting,
    `core.attention_grid.AttentionGrid`) and what the GUI needs of the rest.

    result_id names the worker's cached explanation that re-fusion and scores read. ``region`` is the worker's
    applied region with its voxel mask (sent once per explanation, kept by re-fusions), so ``resample_to`` here
    is 0 outside the region exactly as the worker's VolumeAttention.resample_to.
    """

    result_id: int
    prediction: Optional[Dict[str, Any]] = None  # volume.VolumeAttention.prediction: the volume-level output


class NetworkLabels(NamedTuple):
    """A segmentation network's own labels (``volume.VolumeAttention.segmentation``): int16 (I, J, K) on the
    model-input grid, placed by ``ijk_to_ras`` (4, 4)."""
    labels: np.ndarray
    ijk_to_ras: np.ndarray


class ExplainResult(NamedTuple):
    """What an explain job returns: the model (class names, layers, device), the attention, and for segmentation
    networks their own labels (None for class outputs)."""
    model: ModelInfo
    attention: AttentionData
    labels: Optional[NetworkLabels] = None


PYTHON_VARIABLE = "ATTENTIONMAP_WORKER_PYTHON"


def worker_python(configured: Optional[str] = None) -> str:
    """The interpreter the worker runs in: ``configured`` (the module's Worker Python setting), else
    $ATTENTIONMAP_WORKER_PYTHON, else Slicer's own Python (PythonSlicer) inside the application, else this one.

    Any Python 3.9+ with torch and MONAI will do (a conda environment with CUDA, a native arm64 Python on Apple
    silicon): the worker speaks plain data over a socket and gets this package on its path. Slicer's own Python is
    found as Slicer finds it (v5.12.3 Base/Python/slicer/util.py, ``shutil.which("PythonSlicer")``); inside the
    application ``sys.executable`` is PythonSlicer too (Base/QTCore/qSlicerCoreApplication.cxx), a launcher
    (CTKAppLauncher) that starts ``python-real`` as its child.
    """
    chosen = (configured or os.environ.get(PYTHON_VARIABLE, "")).strip()
    if chosen:
        what = "worker Python" if configured else PYTHON_VARIABLE
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            raise AttentionMapError(f"{what}: {chosen} is not an executable file; choose a Python interpreter "
                                    "(3.9 or later) that has torch and MONAI, or clear the setting")
        return chosen
    try:
        from slicer import app  # noqa: F401  (exists only in the Slicer application)
    except ImportError:
        return sys.executable
    found = shutil.which("PythonSlicer")
    if not found:
        raise AttentionMapError("worker: the PythonSlicer executable was not found on PATH; reinstall Slicer")
    return found


def describe_exit(returncode: Optional[int]) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if os.name == "nt" and returncode >= 0xC0000000:
        return f"crashed (Windows status 0x{returncode:08X})"
    return f"exit code {returncode}"


class WorkerProcess:
    """One worker process, its connection and its scratch folder (inputs travel as .npy files).

    Starting returns at once: the worker connects back (checked in ``connection()``, never blocking)
    with a random key it reads from stdin. One job at a time.
    """

    def __init__(self, python: Optional[str] = None, threads: Optional[int] = None,
                 startup_timeout: float = STARTUP_TIMEOUT_S) -> None:
        self.python = worker_python(python)
        stale.remove_stale(Path(tempfile.gettempdir()), SCRATCH_PREFIX)  # left by a GUI and worker that both died
        self.folder = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)  # 0700: this user's only
        stale.mark_owner(Path(self.folder))  # this GUI process: once it is gone, the next start removes the folder
        self.log_path = os.path.join(self.folder, "worker.log")
        key = os.urandom(protocol.AUTHKEY_BYTES)
        self._server, address = protocol.listen(self.folder)
        self._acceptor = protocol.Acceptor(self._server, key)
        self._conn: Any = None
        self.worker_pid: Optional[int] = None  # the Python's own pid (a launcher's child), known once connected
        self._startup_deadline = time.monotonic() + startup_timeout
        self.job: Optional["WorkerJob"] = None
        self._next_id = 1
        command = [self.python, "-m", "AttentionMapLib.worker_process", "--address", address,
                   "--parent-pid", str(os.getpid())]
        if threads is not None:
            command += ["--threads", str(int(threads))]
        env = child_environment()
        try:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                                env=env, cwd=self.folder, **_own_process_group())
        except OSError as error:
            self._server.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            raise AttentionMapError(f"worker: cannot start {command[0]} ({error})") from None
        self.process.stdin.write((key.hex() + "\n").encode("ascii"))
        self.process.stdin.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def connection(self) -> Any:
        """The authenticated connection, or None while the worker is still starting (never blocks: the handshake
        advances by what has arrived). Raises WorkerDied if the worker ended or did not connect within the
        startup timeout. Peers refused on the way are listed by ``take_refusals()``."""
        if self._conn is None:
            accepted = self._acceptor.poll()
            if accepted is not None:
                self._conn, self.worker_pid = accepted
                self._stop_listening()  # one worker, one connection: nobody else may connect now
                return self._conn
            if not self.alive:
                raise WorkerDied(f"the worker process ended while starting ({self.exit_description()})")
            if time.monotonic() > self._startup_deadline:
                self.kill()
                raise WorkerDied(f"the worker process did not start within {STARTUP_TIMEOUT_S:.0f} s")
        return self._conn

    def take_refusals(self) -> List[str]:
        """Connections refused since the last call (a peer without the key, a handshake not finished in time)."""
        refused, self._acceptor.refused = self._acceptor.refused, []
        return refused

    def crash_report(self) -> str:
        """faulthandler's report of a crash of the worker's Python ("Fatal Python error: ..." and every thread's
        stack) from its log, or ""; through a launcher this is all that says how its child died."""
        text = self._log_text()
        crash = text.rfind("Fatal Python error")
        return text[crash:] if crash >= 0 else ""

    def exit_description(self) -> str:
        """How the process ended; with the crash report's first line when the worker's Python wrote one (a
        launcher such as PythonSlicer exits 1 when its child crashed: CTKAppLauncher ctkAppLauncher.cpp)."""
        described = describe_exit(self.process.poll())
        crash = self.crash_report()
        if crash:
            return f"{described}; {crash.splitlines()[0]}"
        if self.worker_pid not in (None, self.process.pid) and self.process.poll() == 1:
            return f"{described} from the launcher; its Python (pid {self.worker_pid}) left no crash report"
        return described

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace").strip()
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The end of the worker's stdout / stderr: the crash report if there is one, else the last ``lines``."""
        return self.crash_report() or "\n".join(self._log_text().splitlines()[-lines:])

    def kill(self) -> None:
        """Stop the worker and every process it started, at once; remove its scratch folder.

        The process started here may be a launcher (PythonSlicer) whose child is the Python that runs the worker;
        the launcher forwards no signal (CTKAppLauncher has no signal handling), so killing its pid alone would
        leave that child running. Its process group goes (the whole tree on Windows), and the worker's own pid,
        reported in the handshake, is killed as well in case it left the group."""
        if self.alive:
            _kill_process_group(self.process)
        if self.worker_pid is not None and self.worker_pid != self.process.pid:
            _kill_pid(self.worker_pid)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._close()

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit; kill it (and its children) if it has not within ``timeout``."""
        if self._conn is not None and self.alive:
            try:
                protocol.send(self._conn, {"op": "shutdown"})
                self.process.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._stop_listening()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _stop_listening(self) -> None:
        self._acceptor.close_pending()
        self._server.close()
        protocol.remove_socket_file(self.folder)


def _own_process_group() -> Dict[str, Any]:
    """Popen arguments that put the worker into a process group of its own (killed as a whole)."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _kill_process_group(process: subprocess.Popen) -> None:
    if os.name == "nt":
        _kill_pid(process.pid)
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_pid(pid: int) -> None:
    """Kill process ``pid`` (with its tree on Windows: taskkill /T /F); nothing if it is gone."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, check=False)
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


Decoder = Callable[[Dict[str, Any], protocol.Arrays], Any]


class WorkerJob:
    """One request to the worker. The GUI calls ``poll()`` from its timer; scripts call ``wait()``.

    A job that was cancelled reports ``cancelled`` even if the worker finished it anyway, so its
    result is never applied. ``timeout`` (seconds, None: none) kills the worker when exceeded.
    """

    def __init__(self, worker: WorkerProcess, header: Dict[str, Any], decode: Decoder,
                 timeout: Optional[float] = None, input_path: Optional[str] = None) -> None:
        if worker.job is not None and not worker.job.finished:
            raise AttentionMapError("worker: a job is still running; one job at a time (cancel it or wait)")
        self.worker = worker
        self.id = worker.new_id()
        self._header = dict(header, id=self.id)
        self._decode = decode
        self._timeout = timeout
        self._input_path = input_path
        self._started = time.monotonic()
        self._sent = False
        self._cancel_time: Optional[float] = None
        self._final: Optional[JobEvent] = None
        worker.job = self

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_time is not None

    @property
    def finished(self) -> bool:
        """True once the final event (done / error / cancelled) has been returned by poll() or wait()."""
        return self._final is not None

    def cancel(self) -> None:
        """Ask the worker to stop at its next check (between windows or score batches); kill it after CANCEL_GRACE_S."""
        if self._final is not None or self._cancel_time is not None:
            return
        self._cancel_time = time.monotonic()
        if self._sent:
            try:
                protocol.send(self.worker.connection(), {"op": "cancel", "id": self.id})
            except (OSError, WorkerDied):
                pass  # the next poll() reports the dead worker

    def poll(self) -> List[JobEvent]:
        """All events that have arrived since the last call, oldest first (never waits)."""
        if self._final is not None:
            return []
        try:
            events = self._receive()
        except (WorkerDied, EOFError, OSError) as error:
            death = self._death(error)
            return [self._end(JobEvent(ERROR, death, self.worker.log_tail()), kill=True)]
        except Exception as error:  # a malformed message: never an exception out of poll(), the GUI's timer
            failure = protocol.ProtocolError(f"the worker sent a malformed message ({type(error).__name__}: {error}); "
                                             "it was stopped, the next run starts a fresh one")
            return [self._end(JobEvent(ERROR, failure, traceback.format_exc()), kill=True)]
        if self._final is not None:
            return events
        now = time.monotonic()
        if self._cancel_time is not None and (not self._sent or now - self._cancel_time > CANCEL_GRACE_S):
            events.append(self._end(JobEvent(CANCELLED), kill=self._sent))
        elif self._timeout is not None and now - self._started > self._timeout:
            error = TimeoutError(f"the job ran longer than {self._timeout:g} s: the worker process was stopped "
                                 "(the next run starts a fresh one)")
            events.append(self._end(JobEvent(ERROR, error), kill=True))
        return events

    def wait(self, timeout: Optional[float] = None) -> JobEvent:
        """Block until the job ends and return its final event (for scripts and tests, not the GUI).
        Raises TimeoutError if it has not ended within ``timeout`` seconds (the job keeps running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._final is None:
            self.poll()
            if self._final is not None:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"worker job {self._header.get('op')}: still running after {timeout} s")
            conn = self.worker._conn if self._sent else None
            if conn is not None:
                try:
                    conn.poll(0.1)
                except (OSError, EOFError):
                    pass
            else:
                time.sleep(0.02)
        return self._final

    # ------------------------------------------------------------ internals

    def _receive(self) -> List[JobEvent]:
        conn = self.worker.connection()
        refused = [JobEvent(LOG, f"Refused a connection to the worker's socket: {text}")
                   for text in self.worker.take_refusals()]
        if conn is None:
            if not self.worker.alive:
                raise WorkerDied("the worker process ended")
            return refused
        if not self._sent:
            if self._cancel_time is not None:
                return []
            protocol.send(conn, self._header)
            self._sent = True
        events = refused
        while self._final is None and conn.poll(0):
            header, arrays = protocol.receive(conn)
            if header.get("id") not in (self.id, None) and header.get("event") != LOG:
                continue  # a late event of an earlier, abandoned job
            kind = header.get("event")
            if kind == PROGRESS:
                events.append(JobEvent(PROGRESS, float(header["value"])))
            elif kind == LOG:
                events.append(JobEvent(LOG, str(header.get("message", ""))))
            elif kind == DONE:
                final = JobEvent(CANCELLED) if self.cancel_requested else JobEvent(DONE, self._decode(header["value"],
                                                                                                      arrays))
                events.append(self._end(final))
            elif kind == CANCELLED:
                events.append(self._end(JobEvent(CANCELLED)))
            elif kind == ERROR:
                events.append(self._end(JobEvent(ERROR, _error(header), str(header.get("detail", "")))))
        return events

    def _death(self, error: Exception) -> Exception:
        if isinstance(error, WorkerDied):
            return error
        process = self.worker.process
        for _ in range(20):  # the socket closes a moment before the exit status is known
            if process.poll() is not None:
                break
            time.sleep(0.01)
        return WorkerDied(f"the worker process stopped unexpectedly ({self.worker.exit_description()}); the next run "
                          "starts a fresh one")

    def _end(self, event: JobEvent, kill: bool = False) -> JobEvent:
        self._final = event
        if kill:
            self.worker.kill()
        if self._input_path is not None and os.path.exists(self._input_path):
            os.remove(self._input_path)  # the worker deletes it once read; not if it never got the job
        return event


def _error(header: Dict[str, Any]) -> Exception:
    """The worker's exception as one the GUI can show: AttentionMapError for bad input, else RuntimeError."""
    message = str(header.get("message", ""))
    if header.get("user_error"):
        return AttentionMapError(message)
    return RuntimeError(f"{header.get('type', 'Error')}: {message}")


# ---------------------------------------------------------------- decoding results

def _attention(fields: Dict[str, Any], arrays: protocol.Arrays, result_id: int,
               region: Optional[AppliedRegion]) -> AttentionData:
    return AttentionData(
        grid=arrays["grid"], ijk_to_ras=arrays["ijk_to_ras"], window_logits=arrays.get("window_logits"),
        probabilities=arrays.get("probabilities"), query_ras=arrays.get("query_ras"), result_id=int(result_id),
        target=fields["target"], method=fields["method"], layer=int(fields["layer"]), head=fields["head"],
        head_fusion=fields["head_fusion"], discard_ratio=float(fields["discard_ratio"]), normalize=fields["normalize"],
        num_windows=int(fields["num_windows"]), timings=dict(fields["timings"]),
        window_weighting=fields["window_weighting"], flip_axes=tuple(int(a) for a in fields.get("flip_axes", ())),
        shift_average=bool(fields.get("shift_average", False)), prediction=fields.get("prediction"), region=region)


def _explain_result(value: Dict[str, Any], arrays: protocol.Arrays) -> ExplainResult:
    model = dict(value["model"], img_size=tuple(value["model"]["img_size"]))
    region = protocol.region_from_message(value["attention"]["region"], arrays)
    labels = NetworkLabels(arrays["labels"], arrays["labels_ijk_to_ras"]) if "labels" in arrays else None
    return ExplainResult(ModelInfo(**model), _attention(value["attention"], arrays, value["result_id"], region),
                         labels)


def _refused(region: Optional[AppliedRegion]) -> Decoder:
    """Decoder of a re-fusion of a result whose applied region is ``region`` (the worker re-fuses only the
    explanation that result came from, so the region is the same and is not sent again)."""
    return lambda value, arrays: _attention(value["attention"], arrays, value["result_id"], region)


def _scores(value: Dict[str, Any], arrays: protocol.Arrays) -> Dict[str, Any]:
    return dict(value)


# ---------------------------------------------------------------- the shared worker and the entry points

_shared: Optional[WorkerProcess] = None
_python_setting: Optional[str] = None  # the module's Worker Python setting (None: worker_python's default)


def set_worker_python(path: Optional[str]) -> None:
    """Use the interpreter ``path`` for the shared worker from now on ("" or None: the default, see
    worker_python); a running worker of another interpreter is stopped (the next job starts the new one)."""
    global _python_setting
    _python_setting = (path or "").strip() or None
    if _shared is not None and _shared.python != worker_python(_python_setting):
        stop_shared_worker()


def configured_python() -> Optional[str]:
    """The worker Python chosen by the module's setting or $ATTENTIONMAP_WORKER_PYTHON; None: the default."""
    return _python_setting or os.environ.get(PYTHON_VARIABLE, "").strip() or None


def shared_worker() -> WorkerProcess:
    """The module's worker process, started on first use and again after it died or was stopped."""
    global _shared
    if _shared is None or not _shared.alive:
        if _shared is not None:
            _shared.kill()
        _shared = WorkerProcess(python=_python_setting)
    return _shared


def stop_shared_worker() -> None:
    """Stop the shared worker and its children (Slicer closing, scene closed, tests)."""
    global _shared
    if _shared is not None:
        _shared.close(timeout=2.0)
        _shared = None


atexit.register(stop_shared_worker)


def _plain_options(options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Options as JSON data: arrays and tuples (query point, flip axes) become lists of their own numbers."""
    return {k: (np.asarray(v).tolist() if isinstance(v, (np.ndarray, tuple)) else v)
            for k, v in (options or {}).items()}


def explain_job(model_source: str, array_ijk: np.ndarray, ijk_to_ras: np.ndarray,
                explain_options: Optional[Dict[str, Any]] = None, trust_bundle: bool = False,
                device: str = "auto", worker: Optional[WorkerProcess] = None,
                timeout: Optional[float] = None, region: Any = "default",
                segment: Optional[Dict[str, Any]] = None) -> WorkerJob:
    """Explain a volume in the worker: load the model (cached there), run volume.explain_volume.

    ``array_ijk`` (I, J, K) or (C, I, J, K) is written to the worker's scratch folder here (straight
    from its buffer, no copy in memory), so the caller may change it afterwards. ``explain_options``
    go to explain_volume (method, layer, head_fusion, head, discard_ratio, target, query_ras,
    normalize, ...); ``target`` may be a class index or name, None means the card's default.
    ``region`` (`region.region_from_spec`): "default" (the card's), "none", a box, or a mask (its array is
    written to the scratch folder like the input). ``explain_options["flip_axes"]``
    (`flips.flip_axes_from_spec`): absent or "default" (the card's default_flip_axes), "none", or axes;
    ``explain_options["shift_average"]`` (`shifts.shift_average_from_spec`): absent or "default" (the card's
    default_shift_average), "on", "off" or a bool.
    ``segment`` ("why this segment", `segment.SegmentTarget`): {"class": index or name, "region": a box or mask
    spec as ``region`` takes, or None for the network's own labels}; it replaces ``explain_options["target"]``.
    The card's calibration is applied in the worker.
    The result is an ExplainResult (plain data).
    """
    worker = worker or shared_worker()
    affine = np.asarray(ijk_to_ras, dtype=np.float64)
    if affine.shape != (4, 4):
        raise AttentionMapError(f"ijk_to_ras: expected a 4x4 matrix, got shape {affine.shape}")
    if worker.job is not None and not worker.job.finished:
        raise AttentionMapError("worker: a job is still running; one job at a time (cancel it or wait)")
    path = protocol.save_input(np.asarray(array_ijk), worker.folder, f"input-{worker._next_id}")
    region = _mask_to_file(region, worker, "region")
    header = {"op": "explain", "model_source": str(model_source), "trust_bundle": bool(trust_bundle),
              "device": device, "options": _plain_options(explain_options), "input": path,
              "ijk_to_ras": affine.tolist(), "region": _plain_options(region) if isinstance(region, dict) else region}
    if segment is not None:
        where = _mask_to_file(segment.get("region"), worker, "segment")
        header["segment"] = {"class": segment["class"],
                             "region": _plain_options(where) if isinstance(where, dict) else None}
    return WorkerJob(worker, header, _explain_result, timeout, input_path=path)


def _mask_to_file(spec: Any, worker: WorkerProcess, prefix: str) -> Any:
    """A region spec whose mask array is written to the worker's scratch folder (its path sent instead)."""
    if not (isinstance(spec, dict) and "mask" in spec):
        return spec
    path = protocol.save_input(np.asarray(spec["mask"], dtype=np.uint8), worker.folder, f"{prefix}-{worker._next_id}")
    return {**{k: v for k, v in spec.items() if k != "mask"}, "mask_path": path}


def fuse_again_job(attention: AttentionData, fusion_options: Dict[str, Any], worker: Optional[WorkerProcess] = None,
               timeout: Optional[float] = None) -> WorkerJob:
    """Re-read the worker's cached attention of ``attention`` (VolumeAttention.fuse_again options: method,
    layer, discard_ratio, query_ras, normalize) without running the network; the result is an AttentionData."""
    header = {"op": "fuse_again", "result_id": attention.result_id, "options": _plain_options(fusion_options)}
    return WorkerJob(worker or shared_worker(), header, _refused(attention.region), timeout)


def score_job(result: ExplainResult, centre_ras: Optional[Sequence[float]], explain_options: Dict[str, Any],
              worker: Optional[WorkerProcess] = None, timeout: Optional[float] = None) -> WorkerJob:
    """``metrics.score_volume`` (deletion / insertion AUC) of the worker's last explanation: its model
    on its input, on the device the network is on, one model window centred on ``centre_ras``.
    ``explain_options`` as for engine.explain (layer 0-based, target an index). The result is a dict
    (score_volume's, plus "device")."""
    header = {"op": "score", "result_id": result.attention.result_id, "options": _plain_options(explain_options),
              "centre_ras": None if centre_ras is None else np.asarray(centre_ras, dtype=np.float64).tolist()}
    return WorkerJob(worker or shared_worker(), header, _scores, timeout)
