"""Timing and peak-memory helpers shared by the benchmark sections, and the isolated-worker protocol.

Memory (CPU): peak resident set size above a baseline, read from Linux's ``/proc/self/status``:
the baseline is ``VmRSS`` after the model and input exist, then the peak counter ``VmHWM`` is reset
(``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and read again after the measured call. Workers run
with ``MALLOC_MMAP_THRESHOLD_`` set so that glibc maps every block above 128 KiB separately and returns
it on free: resident memory then follows live tensors instead of the heap's high-water mark.
Memory (CUDA): ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
allocation before the call.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
MIB = 1024.0 * 1024.0
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def rss_mib() -> float:
    """Current resident set size of this process (MiB)."""
    return float(_status_kib("VmRSS") or 0) / 1024.0


def peak_rss_mib() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss` (MiB)."""
    return float(_status_kib("VmHWM") or 0) / 1024.0


def timed(fn: Callable[[], Any], sync: Callable[[], None] = lambda: None) -> Tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of one call of ``fn``; ``sync`` waits for the
    device (e.g. CUDA). With one thread the CPU time is what the call costs, whatever else the shared
    machine is running; the wall time is what the user waits."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def median(values: List[float]) -> float:
    return float(statistics.median(values))


def run_worker(script: Path, request: Dict[str, Any], threads: int, timeout: float = 3600.0) -> Dict[str, Any]:
    """Run ``python -m benchmarks.<script's name> --worker JSON`` from the repository root in a fresh process
    (``threads`` for torch and BLAS) and return the JSON object it prints on its last stdout line."""
    env = dict(os.environ)
    env.update(WORKER_ENV)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    completed = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{Path(script).stem}", "--worker", json.dumps(request)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
    )
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {request}:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def machine_description() -> Dict[str, str]:
    """CPU model, core count, torch/MONAI versions: printed with every result."""
    import platform

    import monai
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "torch": torch.__version__, "monai": monai.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


# ------------------------------------------------------ sections of docs/BENCHMARKS.md written by their own script


def _section_markers(name: str) -> Tuple[str, str]:
    return f"<!-- section:{name} -->", f"<!-- /section:{name} -->"


def replace_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between the markers of section ``name`` in ``path`` (appended if absent); the rest stays."""
    start, end = _section_markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def publish_section(folder: Path, name: str, body: str) -> None:
    """Write ``body`` as section ``name`` of ``folder/BENCHMARKS.md`` (`replace_section`) and print it."""
    replace_section(folder / "BENCHMARKS.md", name, body)
    print(body)


def sections(text: str) -> List[str]:
    """Every ``<!-- section:NAME -->`` ... ``<!-- /section:NAME -->`` block of a document, in order."""
    import re

    return [m.group(0) for m in re.finditer(r"<!-- section:([\w-]+) -->.*?<!-- /section:\1 -->", text, re.S)]
