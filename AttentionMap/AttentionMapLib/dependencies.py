"""Which Python packages the Slicer module installs into Slicer's Python, decided per environment (no imports).

``plan_dependencies(installed, python_version=, platform=, machine=)`` (defaults: the running interpreter) says
what to install, or why nothing can be installed and what to do instead. Facts it rests on (read from the
package index and the Slicer sources; `.ci/index_check.py` asks the index again on every CI run):

- Slicer 5.12 and 5.10 ship Python 3.12.10 with numpy 2.4.6 / 2.0.2; 5.8 ships Python 3.9.10 with numpy 1.26.4
  (Slicer CMakeLists.txt ``Slicer_REQUIRED_PYTHON_VERSION``, SuperBuild/External_python-numpy.cmake, at each tag).
- MONAI 1.6.1 declares ``Requires-Python >=3.10``, ``torch>=2.8``, ``numpy>=1.24,<3.0``; pip checks
  Requires-Python even with ``--no-deps``, so it cannot install into Slicer 5.8's Python 3.9.
- torch 2.8 and later have wheels for Windows and Linux x86_64 and macOS arm64, none for macOS x86_64 (the index
  stops at 2.2.2 there, built against numpy 1), which Slicer's official macOS builds are.
- nibabel is not in Slicer's Python and MONAI's ``Orientation`` needs it; safetensors reads the demo weights.

torch is installed with its own dependencies (never numpy: torch does not require it); MONAI, einops, nibabel and
safetensors with ``--no-deps``, so pip never replaces Slicer's numpy or the torch already there. An installed torch
that is too old is never upgraded in place (its libraries may be loaded in Slicer, and Windows cannot replace a
loaded DLL): the problem points to PyTorch Utils and a restart. An installed MONAI within the tested series is
kept, whoever installed it. Where nothing can be installed, a worker Python (``worker.worker_python``) runs the
network in another interpreter.

Standard library only: it runs in the GUI process before torch or MONAI exist.
"""
import importlib.metadata
import platform as platform_module
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

MONAI_VERSION = "1.6.1"  # requirements.lock; the version the test suite runs
MONAI_SERIES = ((1, 6), (1, 7))  # an installed MONAI in [1.6, 1.7) is kept (another extension may have put it there)
MINIMUM_PYTHON = (3, 10)  # MONAI 1.6.1's Requires-Python
TORCH_MINIMUM = (2, 8)  # MONAI 1.6.1's metadata: Requires-Dist torch>=2.8.0
NUMPY_RANGE = ((1, 24), (3, 0))  # MONAI 1.6.1: numpy>=1.24,<3.0 (numpy belongs to Slicer: checked, never installed)
PINS = {  # installed with --no-deps when absent; each has wheels for Python 3.10+ on every system (index_check)
    "einops": "0.8.2",
    "nibabel": "5.4.2",
    "safetensors": "0.8.0",
    "packaging": "26.4",  # nibabel's one dependency besides numpy (importlib_resources only before Python 3.9)
}
PACKAGES = ("torch", "monai", "numpy") + tuple(PINS)
WORKER_PYTHON_HINT = ("or set a worker Python that has torch and MONAI (the module's Advanced > Worker Python, or "
                      "ATTENTIONMAP_WORKER_PYTHON): the network then runs there, nothing is installed into Slicer")

# the Slicer releases the module is checked against: version -> (Python, numpy)
SLICER_RELEASES = {"5.12": ((3, 12), "2.4.6"), "5.10": ((3, 12), "2.0.2"), "5.8": ((3, 9), "1.26.4")}
# systems of Slicer's official builds: name -> (sys.platform, platform.machine())
SYSTEMS = {"windows": ("win32", "AMD64"), "linux": ("linux", "x86_64"), "macos": ("darwin", "x86_64")}


def parse_version(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """(major, minor, patch) from "2.8.0+cpu", "1.6.1", "2.1.0a0"; None for None or no leading number."""
    if not text:
        return None
    match = re.match(r"\s*(\d+(?:\.\d+)*)", text)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def _dotted(version: Tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def installed_versions(names: Tuple[str, ...] = PACKAGES) -> Dict[str, Optional[str]]:
    """Installed version of each package (importlib.metadata: nothing is imported), None if absent."""
    versions: Dict[str, Optional[str]] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass
class DependencyPlan:
    """What to do: ``torch_requirement`` (a PEP 440 specifier; None: the installed torch is fine), installed with
    its dependencies; ``pip_arguments`` for slicer.util.pip_install (None: nothing else to install);
    ``problems`` (non-empty: nothing is downloaded, each says what to do instead)."""

    torch_requirement: Optional[str] = None
    pip_arguments: Optional[List[str]] = None
    reasons: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    @property
    def needed(self) -> bool:
        return not self.problems and (self.torch_requirement is not None or self.pip_arguments is not None)

    @property
    def torch_arguments(self) -> Optional[List[str]]:
        """pip arguments that install torch with its dependencies (None: torch is fine)."""
        return None if self.torch_requirement is None else [f"torch{self.torch_requirement}"]

    def consent_text(self) -> str:
        """The one question asked before anything is installed."""
        steps = list(self.reasons)
        if self.torch_requirement:
            steps.append(f"pip install torch{self.torch_requirement} (PyTorch from the package index: the CPU build "
                         "on Windows and macOS, CUDA on Linux; for a CUDA build on Windows install PyTorch with "
                         "PyTorch Utils first)")
        if self.pip_arguments:
            steps.append("pip install " + " ".join(self.pip_arguments) + " (numpy and torch are left as they are)")
        return ("AttentionMap needs these Python packages (download and install may take several minutes):\n- "
                + "\n- ".join(steps) + "\n\nInstall them now?")

    def problem_text(self) -> str:
        return "\n".join(self.problems)


def plan_dependencies(installed: Dict[str, Optional[str]], python_version: Optional[Tuple[int, int]] = None,
                      platform: Optional[str] = None, machine: Optional[str] = None,
                      torch_loaded: bool = False) -> DependencyPlan:
    """The install plan for ``installed`` (name -> version string or None) in an environment: ``python_version``
    (major, minor), ``platform`` (sys.platform) and ``machine`` (platform.machine()), by default this
    interpreter's. ``torch_loaded``: torch is imported in this process already (its files cannot be replaced)."""
    python_version = tuple(python_version or sys.version_info[:2])
    platform = platform or sys.platform
    machine = (machine or platform_module.machine()).lower()
    plan = DependencyPlan()
    numpy = parse_version(installed.get("numpy"))
    low, high = NUMPY_RANGE
    if numpy is None or not low <= numpy[:2] < high:
        plan.problems.append(f"numpy {installed.get('numpy')} is outside MONAI {MONAI_VERSION}'s range "
                             f"(>={_dotted(low)},<{_dotted(high)}): use Slicer 5.10 or later, {WORKER_PYTHON_HINT}")
    if python_version < MINIMUM_PYTHON:
        plan.problems.append(
            f"This Slicer runs Python {_dotted(python_version)} (Slicer 5.8 or older); MONAI {MONAI_VERSION} needs "
            f"Python {_dotted(MINIMUM_PYTHON)} or later, so it cannot be installed here. Use Slicer 5.10 or later, "
            f"{WORKER_PYTHON_HINT}.")
    torch = parse_version(installed.get("torch"))
    minimum = _dotted(TORCH_MINIMUM)
    if torch is not None and torch[:2] < TORCH_MINIMUM:
        plan.problems.append(
            f"PyTorch {installed['torch']} is older than {minimum}, which MONAI {MONAI_VERSION} needs. AttentionMap "
            "does not upgrade it in place" + (" (it is loaded in Slicer now)" if torch_loaded else "")
            + f": open Modules > Utilities > PyTorch Utils, install PyTorch with the version requirement >={minimum}, "
            f"restart Slicer and press Apply again; {WORKER_PYTHON_HINT}.")
    elif torch is None and platform == "darwin" and machine in ("x86_64", "i386"):
        plan.problems.append(
            f"PyTorch {minimum} or later has no build for macOS on Intel (x86_64), the architecture of Slicer's macOS "
            "builds (also under Rosetta on Apple silicon): the package index stops at torch 2.2.2, built against "
            f"numpy 1, and this Slicer has numpy {installed.get('numpy')}. Set a worker Python that has torch and "
            "MONAI (the module's Advanced > Worker Python, or ATTENTIONMAP_WORKER_PYTHON), for example a native "
            "Python 3.12 with `pip install torch monai einops nibabel safetensors SimpleITK` (on Apple silicon it "
            "uses the GPU through MPS).")
    if plan.problems:
        return plan
    if torch is None:
        plan.torch_requirement = f">={minimum}"
    pins = []
    monai = parse_version(installed.get("monai"))
    if monai is None or not MONAI_SERIES[0] <= monai[:2] < MONAI_SERIES[1]:
        pins.append(f"monai=={MONAI_VERSION}")
        if monai is not None:
            plan.reasons.append(f"MONAI {installed['monai']} (installed, perhaps by another extension) is replaced by "
                                f"{MONAI_VERSION}: AttentionMap is tested with {_dotted(MONAI_SERIES[0])}.x")
    pins += [f"{name}=={version}" for name, version in PINS.items() if installed.get(name) is None]
    if pins:
        plan.pip_arguments = pins + ["--no-deps"]
    return plan
