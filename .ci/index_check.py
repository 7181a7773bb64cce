"""CI: the Slicer module's dependency plans against the package index, for every Slicer release and system.

For each Slicer release (dependencies.SLICER_RELEASES: its Python and numpy) on Windows, Linux and macOS (x86_64,
the architecture of Slicer's macOS builds), ``plan_dependencies`` with only Slicer's numpy installed either

- resolves: the index has a torch wheel inside the plan's torch requirement for that Python and platform, ``pip
  download --only-binary=:all: --require-hashes`` finds every pinned package for them with the sha256 the plan
  records (`dependencies.HASHES`; Requires-Python checked), and the pinned
  MONAI's declared numpy range admits that Slicer's numpy; or
- is refused before any download, with guidance (a worker Python), and the index confirms the reason (no torch
  from the series' minimum exists for that platform, or the oldest series' MONAI refuses that Python).

Prints the support table; exits 1 on any mismatch. Run with the project's Python (it needs ``packaging`` and the
package installed, as `make` installs it): ``.venv/bin/python .ci/index_check.py``. About 20 s: one ``pip
index`` and one ``pip download`` per Python x platform.
"""
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from AttentionMapLib.dependencies import (
    SERIES,
    SLICER_RELEASES,
    SYSTEMS,
    plan_dependencies,
    series_for,
)

# wheel platform tags each system accepts (pip's --platform takes each literally: a Linux with glibc 2.28, as
# Slicer's Linux builds need, also runs manylinux2014 = manylinux_2_17 wheels)
PLATFORM_TAGS = {"windows": ["win_amd64"], "linux": ["manylinux_2_28_x86_64", "manylinux2014_x86_64"],
                 "macos": ["macosx_11_0_x86_64"]}
# --isolated: PyPI itself, without this machine's pip configuration (its local mirrors publish no Requires-Python)
INDEX_ONLY = ["--isolated", "--only-binary=:all:", "--disable-pip-version-check"]


def pip(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *arguments], capture_output=True, text=True, timeout=600)


def platform_flags(tags: list) -> list:
    return [flag for tag in tags for flag in ("--platform", tag)]


def torch_versions(python: str, tags: list) -> list:
    done = pip("index", "versions", "torch", "--python-version", python, *platform_flags(tags), *INDEX_ONLY)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("Available versions:")), "")
    return [Version(v.strip()) for v in line.split(":", 1)[1].split(",") if v.strip()] if line else []


def download(python: str, tags: list, requirements: list, folder: str) -> subprocess.CompletedProcess:
    return pip("download", "--no-deps", "--python-version", python, *platform_flags(tags), *INDEX_ONLY,
               "-d", folder, *requirements)


def monai_numpy_range(folder: str, version: str) -> SpecifierSet:
    wheel = next(Path(folder).glob(f"monai-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.name == "numpy" and not requirement.marker:
                return requirement.specifier
    raise AssertionError(f"monai {version}'s metadata declares no numpy range")


def main() -> int:
    failures, rows, cache = [], [], {}
    for release, ((major, minor), numpy) in SLICER_RELEASES.items():
        python = f"{major}.{minor}"
        for system, (platform, machine) in SYSTEMS.items():
            tags = PLATFORM_TAGS[system]
            tag = tags[0]
            plan = plan_dependencies({"numpy": numpy}, python_version=(major, minor), platform=platform,
                                     machine=machine)
            key = (python, tag)
            if key not in cache:
                folder = tempfile.mkdtemp(prefix="index-check-")
                cache[key] = (torch_versions(python, tags), folder)
            torches, folder = cache[key]
            newest = max(torches) if torches else None
            if plan.problems:
                text = plan.problem_text()
                if "worker Python" not in text:
                    failures.append(f"Slicer {release} {system}: the refusal gives no guidance: {text}")
                if plan.torch_requirement or plan.pip_arguments:
                    failures.append(f"Slicer {release} {system}: refused, yet the plan lists installs")
                series = series_for((major, minor))
                reasons = []
                if series is None:
                    confirmed = download(python, tags, [f"monai=={SERIES[-1].monai}"], folder)
                    if confirmed.returncode != 0:
                        reasons.append(f"the index refuses monai {SERIES[-1].monai} for Python {python}")
                else:
                    minimum = ".".join(map(str, series.torch_minimum))
                    if not any(v in SpecifierSet(f">={minimum}") for v in torches):
                        reasons.append(f"no torch>={minimum} for {tag} (newest {newest})")
                if not reasons:
                    failures.append(f"Slicer {release} {system}: refused, but the index has everything: {text}")
                rows.append((release, system, "refused: " + "; ".join(reasons), text.splitlines()[0][:160]))
                continue
            requirement = SpecifierSet(plan.torch_requirement or ">=0")
            fitting = sorted(v for v in torches if v in requirement)
            if not fitting:
                failures.append(f"Slicer {release} {system}: no torch{plan.torch_requirement} for {tag}")
            pins = plan.pins
            requirements = Path(folder) / f"requirements-{release}-{system}.txt"
            requirements.write_text(plan.hashed_requirements())  # the wheels must have the recorded sha256
            done = download(python, tags, ["--require-hashes", "-r", str(requirements)], folder)
            if done.returncode != 0:
                failures.append(f"Slicer {release} {system}: pip download {pins} failed: {done.stderr.strip()[-400:]}")
            else:
                monai = next(p.split("==")[1] for p in pins if p.startswith("monai=="))
                if Version(numpy) not in monai_numpy_range(folder, monai):
                    failures.append(f"Slicer {release} {system}: MONAI {monai} does not admit numpy {numpy}")
            installs = f"torch {fitting[0]}..{fitting[-1]}" if fitting else "no torch"
            rows.append((release, system, "installs", f"{installs}; " + " ".join(pins)))
    print("| Slicer | system | plan | what |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(re.sub(r"\s+", " ", cell) for cell in row) + " |")
    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    print(f"index check: {len(rows) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
