"""Which Python packages the Slicer module must install, decided from installed versions (no imports).

The module installs torch through the PyTorch extension (``PyTorchUtilsLogic.installTorch(
askConfirmation, forceComputationBackend, torchVersionRequirement)``, fepegar/SlicerPyTorch
PyTorchUtils.py), asking it for a torch inside MONAI's range, then MONAI and einops with
``pip install --no-deps`` at the versions this project is tested with, so pip can never replace the
torch the PyTorch extension chose (SlicerTotalSegmentator likewise keeps torch out of its pip
installs and checks versions, not only presence). One consent covers everything the plan lists.

Standard library only: it runs in the GUI process before torch or MONAI exist.
"""
import importlib.metadata
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

MONAI_VERSION = "1.6.1"  # requirements.lock; the version the test suite runs
EINOPS_VERSION = "0.8.2"
TORCH_MINIMUM = (2, 8)  # MONAI 1.6.1's metadata: Requires-Dist torch>=2.8.0
NUMPY_RANGE = ((1, 24), (3, 0))  # MONAI 1.6.1: numpy>=1.24,<3.0 (numpy belongs to Slicer: checked, never installed)
PACKAGES = ("torch", "monai", "einops", "numpy")


def parse_version(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """(major, minor, patch) from "2.8.0+cpu", "1.6.1", "2.1.0a0"; None for None or no leading number."""
    if not text:
        return None
    match = re.match(r"\s*(\d+(?:\.\d+)*)", text)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def installed_versions() -> Dict[str, Optional[str]]:
    """Installed version of each package (importlib.metadata: nothing is imported), None if absent."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass
class DependencyPlan:
    """What to do: ``torch_requirement`` for PyTorchUtils (None: torch is fine), ``pip_arguments`` for
    slicer.util.pip_install (None: nothing to install), ``problems`` that block the run (shown as they are)."""

    torch_requirement: Optional[str] = None
    pip_arguments: Optional[List[str]] = None
    reasons: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    @property
    def needed(self) -> bool:
        return self.torch_requirement is not None or self.pip_arguments is not None

    def consent_text(self) -> str:
        """The one question asked before anything is installed."""
        steps = list(self.reasons)
        if self.torch_requirement:
            steps.append(f"PyTorch {self.torch_requirement} through the PyTorch extension")
        if self.pip_arguments:
            steps.append("pip install " + " ".join(self.pip_arguments) + " (torch is left as it is)")
        return ("AttentionMap needs these Python packages (download and install may take several minutes):\n- "
                + "\n- ".join(steps) + "\n\nInstall them now?")


def plan_dependencies(versions: Dict[str, Optional[str]]) -> DependencyPlan:
    """The install plan for installed ``versions`` (name -> version string or None)."""
    plan = DependencyPlan()
    torch = parse_version(versions.get("torch"))
    minimum = ".".join(map(str, TORCH_MINIMUM))
    if torch is None or torch[:2] < TORCH_MINIMUM:
        plan.torch_requirement = f">={minimum}"
        if torch is not None:
            plan.reasons.append(
                f"PyTorch {versions['torch']} is older than MONAI {MONAI_VERSION} supports (>={minimum})"
            )
    pins = []
    if versions.get("monai") != MONAI_VERSION:
        pins.append(f"monai=={MONAI_VERSION}")
        if versions.get("monai"):
            plan.reasons.append(f"MONAI {versions['monai']} is replaced by {MONAI_VERSION}, the version AttentionMap "
                                "is tested with")
    if versions.get("einops") is None:
        pins.append(f"einops=={EINOPS_VERSION}")
    if pins:
        plan.pip_arguments = pins + ["--no-deps"]
    numpy = parse_version(versions.get("numpy"))
    low, high = NUMPY_RANGE
    if numpy is None or not low <= numpy[:2] < high:
        plan.problems.append(
            f"numpy {versions.get('numpy')} is outside MONAI {MONAI_VERSION}'s range "
            f"(>={'.'.join(map(str, low))},<{'.'.join(map(str, high))}); use a Slicer whose numpy fits"
        )
    return plan
