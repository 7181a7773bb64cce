"""Is an interpreter fit to run the worker? Asked by running it, never by importing torch into the GUI process.

``check_worker_python(path)`` runs ``path -m AttentionMapLib.worker_environment`` (this file, with the package
on its path). That child reports, as one JSON line, its Python version and platform, the versions of the
packages the worker needs (``importlib.metadata``), and the devices torch can use there (it imports torch, in
its own process). The GUI turns the report into ``WorkerPythonInfo``: what to show, and the problems that
block a run, each saying what to do.

Standard library only at import time (the GUI side runs on Slicer's Python 3.9 or 3.12 without torch).
"""
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .dependencies import installed_versions, parse_version
from .errors import AttentionMapError

# what the worker imports: the network (torch, MONAI and MONAI's einops / nibabel), the demo weights (safetensors),
# the arrays (numpy) and the automatic lung field (SimpleITK)
WORKER_PACKAGES = ("torch", "monai", "einops", "nibabel", "numpy", "safetensors", "SimpleITK")
MINIMUM_PYTHON = (3, 9)
PROBE_TIMEOUT_S = 120.0  # importing torch with CUDA on a cold disk can take tens of seconds
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)  # the folder holding AttentionMapLib


def child_environment() -> Dict[str, str]:
    """This process's environment with the package's folder first on PYTHONPATH: another interpreter started with
    it (the worker, its probe) imports this very AttentionMapLib."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_PARENT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def probe() -> Dict[str, object]:
    """This interpreter's report (run in the candidate worker Python; imports torch when it is there)."""
    report: Dict[str, object] = {
        "executable": sys.executable, "python": platform.python_version(), "platform": sys.platform,
        "machine": platform.machine(), "packages": installed_versions(WORKER_PACKAGES), "cuda": False, "mps": False,
        "error": None,
    }
    if report["packages"]["torch"]:
        try:
            import torch

            report["cuda"] = bool(torch.cuda.is_available())
            backend = getattr(torch.backends, "mps", None)
            report["mps"] = bool(backend is not None and backend.is_available())
        except Exception as error:  # a broken install: reported, not raised
            report["error"] = f"import torch failed: {type(error).__name__}: {error}"
    return report


@dataclass
class WorkerPythonInfo:
    """A candidate worker interpreter as the GUI shows it: ``problems`` non-empty means it cannot run the worker."""

    path: str
    python: str = ""
    platform: str = ""
    machine: str = ""
    packages: Dict[str, Optional[str]] = field(default_factory=dict)
    cuda: bool = False
    mps: bool = False
    problems: List[str] = field(default_factory=list)

    @property
    def auto_device(self) -> str:
        """What device "auto" gives there (models.resolve_device): CUDA, then Apple's MPS, else the CPU."""
        return "cuda" if self.cuda else "mps" if self.mps else "cpu"

    def summary(self) -> str:
        versions = ", ".join(f"{name} {self.packages.get(name) or 'missing'}" for name in ("torch", "monai", "numpy"))
        text = f"Python {self.python} ({self.platform} {self.machine}): {versions}; device auto = {self.auto_device}"
        return text + ("" if not self.problems else "\nProblems:\n- " + "\n- ".join(self.problems))


def assess(path: str, report: Dict[str, object]) -> WorkerPythonInfo:
    """The probe's ``report`` as WorkerPythonInfo with its problems (each says what to do)."""
    packages = {str(k): (None if v is None else str(v)) for k, v in dict(report.get("packages") or {}).items()}
    info = WorkerPythonInfo(path=path, python=str(report.get("python", "")), platform=str(report.get("platform", "")),
                            machine=str(report.get("machine", "")), packages=packages,
                            cuda=bool(report.get("cuda")), mps=bool(report.get("mps")))
    if (parse_version(info.python) or ())[:2] < MINIMUM_PYTHON:
        info.problems.append(f"{path} is Python {info.python}; the worker needs Python 3.9 or later")
    missing = [name for name in WORKER_PACKAGES if not packages.get(name)]
    if missing:
        info.problems.append(f"{path} lacks {', '.join(missing)}: install them into that environment, e.g. "
                             f"`{path} -m pip install {' '.join(missing)}` (torch: see pytorch.org for a CUDA build)")
    if report.get("error"):
        info.problems.append(f"{path}: {report['error']}")
    return info


def check_worker_python(path: str, timeout: float = PROBE_TIMEOUT_S) -> WorkerPythonInfo:
    """Run the interpreter ``path`` once and assess it; raises AttentionMapError when it cannot be run at all."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise AttentionMapError(f"worker Python: {path} is not an executable file")
    try:
        done = subprocess.run([path, "-m", "AttentionMapLib.worker_environment"], capture_output=True, text=True,
                              timeout=timeout, env=child_environment(), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise AttentionMapError(f"worker Python: {path} could not be run ({error})") from None
    lines = done.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
        if not isinstance(report, dict):
            raise ValueError("not a JSON object")
    except (IndexError, ValueError):
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise AttentionMapError(f"worker Python: {path} is not a usable Python (exit code {done.returncode}: "
                                f"{detail})") from None
    return assess(path, report)


if __name__ == "__main__":
    print(json.dumps(probe()))
