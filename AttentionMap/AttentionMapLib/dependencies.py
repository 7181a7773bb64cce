"""Which Python packages the Slicer module installs into Slicer's Python, decided per environment (no imports).

``plan_dependencies(installed, python_version=, platform=, machine=)`` (defaults: the running interpreter) says
what to install, or why nothing can be installed and what to do instead. Facts it rests on (read from the
package index and the Slicer sources; `.ci/index_check.py` asks the index again on every CI run):

- Slicer 5.12 and 5.10 ship Python 3.12.10 with numpy 2.4.6 / 2.0.2; 5.8 ships Python 3.9.10 with numpy 1.26.4
  (Slicer CMakeLists.txt ``Slicer_REQUIRED_PYTHON_VERSION``, SuperBuild/External_python-numpy.cmake, at each tag).
- MONAI 1.6.1 declares ``Requires-Python >=3.10``, ``torch>=2.8``, ``numpy>=1.24,<3.0``; pip checks
  Requires-Python even with ``--no-deps``, so Slicer 5.8's Python 3.9 gets MONAI 1.5.2 (``>=3.9``, torch>=2.4.1,
  the same numpy range), with torch 2.8.0, the last torch with Python 3.9 wheels.
- torch 2.8 and later have wheels for Windows and Linux x86_64 and macOS arm64, none for macOS x86_64 (the index
  stops at 2.2.2 there, built against numpy 1), which Slicer's official macOS builds are.
- nibabel is not in Slicer's Python and MONAI's ``Orientation`` needs it (it imports packaging and
  typing_extensions); safetensors reads the demo weights.

torch is installed with its own dependencies (never numpy: torch does not require it); MONAI, einops, nibabel,
safetensors and nibabel's dependencies with ``--no-deps``, so pip never replaces Slicer's numpy or the torch already
there. An installed torch that is too old is never upgraded in place (its libraries may be loaded in Slicer, and
Windows cannot replace a loaded DLL): the problem points to PyTorch Utils and a restart. An installed MONAI of the
tested minor series is kept, whoever installed it. Where nothing can be installed, a worker Python
(``worker.worker_python``) runs the network in another interpreter.

Standard library only: it runs in the GUI process before torch or MONAI exist.
"""
import importlib.metadata
import platform as platform_module
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Series:
    """What the module installs into a Slicer whose Python is at least ``python``: MONAI ``monai`` (an installed
    MONAI of the same minor series is kept), torch from ``torch_minimum``, and ``pins`` with --no-deps."""

    python: Tuple[int, int]
    monai: str
    torch_minimum: Tuple[int, int]
    pins: Dict[str, str]

    @property
    def monai_series(self) -> Tuple[int, ...]:
        return parse_version(self.monai)[:2]


# newest first; each pin has wheels for its Pythons on Windows, Linux and macOS (`.ci/index_check.py` asks)
SERIES = (
    # Slicer 5.10 / 5.12 (Python 3.12): MONAI 1.6.1 needs Python >= 3.10 and torch >= 2.8; numpy >= 1.24, < 3
    Series((3, 10), "1.6.1", (2, 8), {"einops": "0.8.2", "nibabel": "5.4.2", "safetensors": "0.8.0",
                                      "packaging": "26.4", "typing_extensions": "4.16.0"}),
    # Slicer 5.8 (Python 3.9): MONAI 1.5.2 (Python >= 3.9, torch >= 2.4.1); torch >= 2.6, where torch.load(
    # weights_only=True) is safe (CVE-2025-32434); torch 2.8.0 is the last with Python 3.9 wheels
    Series((3, 9), "1.5.2", (2, 6), {"einops": "0.8.2", "nibabel": "5.3.3", "safetensors": "0.7.0",
                                     "packaging": "26.3", "typing_extensions": "4.16.0"}),
)
# sha256 of the wheels on PyPI of every --no-deps pin, for the platforms and Pythons Slicer installs into (Windows and
# Linux x86_64; Python 3.12 and 3.9): pip installs them with --require-hashes, so a file changed on the index or on
# the way is refused. `.ci/index_check.py` downloads every pin with these hashes on each CI run.
HASHES: Dict[str, Tuple[str, ...]] = {
    "monai==1.6.1": ("dbd3b1dd309e752e0477ed73fde03b92f80ac74bfb8a8c4260f018b5d6ab2b0b",),
    "monai==1.5.2": ("6c4f75d47a88c1e37521bce4b7cb1540c6f4e5ca1d43910c60f61fc2ef4ddab2",),
    "einops==0.8.2": ("54058201ac7087911181bfec4af6091bb59380360f069276601256a76af08193",),
    "nibabel==5.4.2": ("553482c5f1e1034fc312edf6fb7f32236c0056439845d1c29293b7e8c98d4854",),
    "nibabel==5.3.3": ("e8b17423ee8464da3b69e6a15799eb19f2350a7d38377026d527b6b84938adac",),
    "safetensors==0.8.0": ("096ec1a98435df7beb08853bb5aa9081a84f23d0adc67ed1a0a10550f608373f",  # cp310-abi3 win_amd64
                           "fd6f3f93c9a0a7cc2788ee63fb763353d4bd2e89b0751bc78fcf7dda00bea774"),  # manylinux2014 x86_64
    "safetensors==0.7.0": ("d1239932053f56f3456f32eb9625590cc7582e905021f94636202a864d470755",  # cp38-abi3 win_amd64
                           "dac7252938f0696ddea46f5e855dd3138444e82236e3be475f54929f0c510d48"),  # manylinux2014 x86_64
    "packaging==26.4": ("81383611a09c1bc0b08b76e0fd5829d7c6824c65b27a6aee339da133f4233ea2",),
    "packaging==26.3": ("d7193f7c8e4e93f444fde0262bf90af30e16fa0ad0ad44cb553c87339b23cd1c",),
    "typing_extensions==4.16.0": ("481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8",),
}
MONAI_VERSION = SERIES[0].monai  # requirements.lock; the main test suite runs it (CI also runs the engine on 1.5.2)
NUMPY_RANGE = ((1, 24), (3, 0))  # MONAI 1.5.2 and 1.6.1: numpy>=1.24,<3.0 (numpy belongs to Slicer: never installed)
PINNED = ("einops", "nibabel", "safetensors", "packaging", "typing_extensions")
PACKAGES = ("torch", "monai", "numpy") + PINNED
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
    def pins(self) -> List[str]:
        """The ``name==version`` requirements installed with --no-deps ([] when none)."""
        return [a for a in self.pip_arguments or [] if not a.startswith("--")]

    def hashed_requirements(self) -> str:
        """The pins as a requirements file, each with the sha256 of its wheels (HASHES), for --require-hashes."""
        return "".join(pin + "".join(f" --hash=sha256:{h}" for h in HASHES[pin]) + "\n" for pin in self.pins)

    @staticmethod
    def hashed_arguments(requirements_file: str) -> List[str]:
        """pip arguments installing `hashed_requirements` written to ``requirements_file``: nothing else, and only
        files of the recorded hashes."""
        return ["--no-deps", "--require-hashes", "-r", str(requirements_file)]

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
            steps.append("pip install " + " ".join(self.pip_arguments) + " (numpy and torch are left as they are; each "
                         "file is checked against its recorded sha256)")
        return ("AttentionMap needs these Python packages (download and install may take several minutes):\n- "
                + "\n- ".join(steps) + "\n\nInstall them now?")

    def problem_text(self) -> str:
        return "\n".join(self.problems)


def series_for(python_version: Tuple[int, ...]) -> Optional[Series]:
    """The newest series whose Python minimum ``python_version`` meets; None when it meets none."""
    return next((series for series in SERIES if tuple(python_version[:2]) >= series.python), None)


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
    series = series_for(python_version)
    if series is None:
        plan.problems.append(
            f"This Slicer runs Python {_dotted(python_version)}; MONAI needs Python {_dotted(SERIES[-1].python)} or "
            f"later, so it cannot be installed here. Use Slicer 5.8 or later, {WORKER_PYTHON_HINT}.")
        return plan
    numpy = parse_version(installed.get("numpy"))
    low, high = NUMPY_RANGE
    if numpy is None or not low <= numpy[:2] < high:
        plan.problems.append(f"numpy {installed.get('numpy')} is outside MONAI {series.monai}'s range "
                             f"(>={_dotted(low)},<{_dotted(high)}): use Slicer 5.8 or later, {WORKER_PYTHON_HINT}")
    torch = parse_version(installed.get("torch"))
    minimum = _dotted(series.torch_minimum)
    if torch is not None and torch[:2] < series.torch_minimum:
        plan.problems.append(
            f"PyTorch {installed['torch']} is older than {minimum}, which AttentionMap needs with MONAI {series.monai} "
            "(and for a safe torch.load). AttentionMap does not upgrade it in place"
            + (" (it is loaded in Slicer now)" if torch_loaded else "")
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
    if monai is None or monai[:2] != series.monai_series:
        pins.append(f"monai=={series.monai}")
        if monai is not None:
            plan.reasons.append(f"MONAI {installed['monai']} (installed, perhaps by another extension) is replaced by "
                                f"{series.monai}: AttentionMap is tested with {_dotted(series.monai_series)}.x here")
    brought_by_torch = {"typing_extensions"} if plan.torch_requirement else set()  # a dependency of torch
    pins += [f"{name}=={version}" for name, version in series.pins.items()
             if installed.get(name) is None and name not in brought_by_torch]
    if pins:
        plan.pip_arguments = pins + ["--no-deps"]
    return plan
