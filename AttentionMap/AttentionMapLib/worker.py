"""Background jobs: run the network off the GUI thread, hand results back through a queue.

The worker thread never touches MRML nodes, scene VTK objects or Qt widgets: it gets plain arrays
(copied on the caller's thread) and returns plain results. The caller polls ``BackgroundJob.poll()``
on its own thread (in Slicer: a ``qt.QTimer`` callback) and applies the results there.

Importing this module needs only the standard library; torch and MONAI are imported inside the job.
"""
import queue
import threading
import traceback
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .errors import AttentionMapError, Cancelled

PROGRESS, DONE, ERROR, CANCELLED = "progress", "done", "error", "cancelled"
FINAL_KINDS = (DONE, ERROR, CANCELLED)

JobFunction = Callable[[Callable[[float], None], Callable[[], bool]], Any]


class JobEvent(NamedTuple):
    """What a job reports: kind is progress (value: fraction 0..1), done (value: the result),
    error (value: the exception; ``detail`` holds its traceback) or cancelled (value: None)."""
    kind: str
    value: Any = None
    detail: str = ""


class BackgroundJob:
    """One function run in a daemon thread: ``fn(progress, is_cancelled) -> result``.

    ``progress(fraction)`` and ``is_cancelled()`` are safe to call from the thread. A job that was
    cancelled reports ``cancelled`` even if the function finished anyway, so its result is never applied.
    """

    def __init__(self, fn: JobFunction, name: str = "AttentionMap job") -> None:
        self._fn = fn
        self._events: "queue.Queue[JobEvent]" = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._final: Optional[JobEvent] = None

    def start(self) -> "BackgroundJob":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the function to stop at its next cancel check (between windows / batches)."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        """True once the final event (done / error / cancelled) has been returned by poll() or wait()."""
        return self._final is not None

    def poll(self) -> List[JobEvent]:
        """All events posted since the last call, oldest first (never blocks)."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return events
            if event.kind in FINAL_KINDS:
                self._final = event
            events.append(event)

    def wait(self, timeout: Optional[float] = None) -> JobEvent:
        """Block until the job ends and return its final event (for scripts and tests, not the GUI)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self._thread.name}: still running after {timeout} s")
        self.poll()
        assert self._final is not None
        return self._final

    def _run(self) -> None:
        try:
            result = self._fn(self._post_progress, self._cancel.is_set)
        except Cancelled:
            self._events.put(JobEvent(CANCELLED))
        except Exception as error:  # reported to the GUI thread, which shows it
            self._events.put(JobEvent(ERROR, error, traceback.format_exc()))
        else:
            self._events.put(JobEvent(CANCELLED) if self._cancel.is_set() else JobEvent(DONE, result))

    def _post_progress(self, fraction: float) -> None:
        self._events.put(JobEvent(PROGRESS, float(fraction)))


class ExplainResult(NamedTuple):
    """What an explain job returns: the loaded model (for class names) and the VolumeAttention."""
    model: Any
    attention: Any


class ModelCache:
    """Loaded models by (source, trust_bundle, device), so Apply does not reload the weights."""

    def __init__(self) -> None:
        self._models: Dict[Tuple[str, bool, str], Any] = {}
        self._lock = threading.Lock()

    def get(self, source: str, trust_bundle: bool, device: str) -> Any:
        from .models import load_model  # torch is imported only here, inside the job

        key = (str(source), bool(trust_bundle), device)
        with self._lock:
            if key not in self._models:
                self._models[key] = load_model(str(source), trust_bundle=trust_bundle, device=device)
            return self._models[key]


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA GPU is usable, else 'cpu'; 'cpu' / 'cuda' are checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise AttentionMapError(f"device: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise AttentionMapError("device 'cuda': no CUDA GPU is available to PyTorch; choose 'auto' or 'cpu'")
    return device


def _copies(array_ijk: np.ndarray, ijk_to_ras: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Copies of the input the job may keep: the caller's array can change once the job runs."""
    return np.array(array_ijk, copy=True), np.array(ijk_to_ras, dtype=np.float64, copy=True)


def explain_job(model_source: str, array_ijk: np.ndarray, ijk_to_ras: np.ndarray,
                explain_options: Optional[Dict[str, Any]] = None, trust_bundle: bool = False,
                device: str = "auto", cache: Optional[ModelCache] = None) -> BackgroundJob:
    """A started job that loads the model (cached) and runs volume.explain_volume on a copy of the array.

    ``array_ijk`` (I, J, K) or (C, I, J, K) and ``ijk_to_ras`` (4x4) are copied here, on the caller's
    thread. ``explain_options`` go to explain_volume (method, layer, head_fusion, head, discard_ratio,
    target, query_ras, normalize, ...); ``target`` may be a class index or name, None means the
    card's default. The result is an ExplainResult.
    """
    array, affine = _copies(array_ijk, ijk_to_ras)
    options = dict(explain_options or {})
    models = cache if cache is not None else ModelCache()

    def run(progress: Callable[[float], None], is_cancelled: Callable[[], bool]) -> ExplainResult:
        from .models import class_index
        from .volume import explain_volume

        resolved = resolve_device(device)
        model = models.get(model_source, trust_bundle, resolved)
        if is_cancelled():
            raise Cancelled("cancelled before the network ran")
        kwargs = {"img_size": model.img_size, **options}
        target = kwargs.get("target")  # None: the card's default (itself None: the predicted class)
        kwargs["target"] = model.target if target is None else class_index(target, model.classes, model.source)
        attention = explain_volume(model.network, array, affine, model.preprocessing, progress=progress,
                                   cancel=is_cancelled, device=resolved, **kwargs)
        return ExplainResult(model, attention)

    return BackgroundJob(run, name=f"AttentionMap explain ({model_source})").start()


def refuse_job(attention: Any, fusion_options: Dict[str, Any]) -> BackgroundJob:
    """A started job returning ``attention.refuse(**fusion_options)`` (a new VolumeAttention).

    Re-fusion reads only the cached head-fused attention (no network run) but can still take seconds
    (e.g. a discard ratio at ~1700 tokens), so it runs off the GUI thread too.
    """
    options = dict(fusion_options)
    return BackgroundJob(lambda progress, is_cancelled: attention.refuse(**options),
                         name="AttentionMap re-fusion").start()


def score_job(model: Any, array_ijk: np.ndarray, ijk_to_ras: np.ndarray, centre_ras: Optional[Sequence[float]],
              explain_options: Dict[str, Any], device: str = "auto") -> BackgroundJob:
    """A started job returning ``metrics.score_volume`` (deletion / insertion AUC) of the map for a
    loaded model on one model window centred on ``centre_ras``. The array is copied here, on the
    caller's thread; ``explain_options`` as for engine.explain (layer 0-based, target an index)."""
    array, affine = _copies(array_ijk, ijk_to_ras)
    options = dict(explain_options)

    def run(progress: Callable[[float], None], is_cancelled: Callable[[], bool]) -> Dict[str, Any]:
        from .metrics import score_volume

        return score_volume(model.network, array, affine, model.preprocessing, img_size=model.img_size,
                            centre_ras=centre_ras, device=resolve_device(device), **options)

    return BackgroundJob(run, name="AttentionMap score").start()
