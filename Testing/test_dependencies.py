"""dependencies.plan_dependencies: what the Slicer module installs into Slicer's Python, per Slicer release and
system, or why it installs nothing and what to do instead. Standard library and pytest only (CI also runs this file
on Python 3.9 and 3.12 without torch); `.ci/index_check.py` asks the package index that the plans resolve."""
import sys

import pytest

from AttentionMapLib.dependencies import (
    MONAI_VERSION,
    SERIES,
    SLICER_RELEASES,
    SYSTEMS,
    installed_versions,
    parse_version,
    plan_dependencies,
)

FRESH_512 = {"numpy": "2.4.6"}  # a fresh Slicer 5.12: numpy only
PINS = SERIES[0].pins
GOOD = {"torch": "2.9.1+cpu", "monai": MONAI_VERSION, "numpy": "2.4.6", **PINS}
LINUX_312 = {"python_version": (3, 12), "platform": "linux", "machine": "x86_64"}


def test_versions_are_parsed_from_real_version_strings():
    assert parse_version("2.8.0+cpu") == (2, 8, 0)
    assert parse_version("2.1.0a0+git") == (2, 1, 0)
    assert parse_version("1.26") == (1, 26)
    assert parse_version(None) is None and parse_version("dev") is None


def test_the_defaults_are_this_interpreter():
    plan = plan_dependencies(installed_versions())
    same = plan_dependencies(installed_versions(), python_version=sys.version_info[:2], platform=sys.platform)
    assert plan == same


@pytest.mark.parametrize("release", ["5.12", "5.10", "5.8"])
def test_a_fresh_slicer_on_windows_or_linux_installs_torch_then_the_rest_without_deps(release):
    """5.12 / 5.10 (Python 3.12): MONAI 1.6.1 and torch >= 2.8; 5.8 (Python 3.9): MONAI 1.5.2 and torch >= 2.6 (pip
    takes 2.8.0, the last torch for Python 3.9). typing_extensions comes with torch, so it is not pinned then."""
    python, numpy = SLICER_RELEASES[release]
    series = SERIES[0] if release != "5.8" else SERIES[1]
    assert series.monai == ("1.6.1" if release != "5.8" else "1.5.2")
    for system in ("windows", "linux"):
        platform, machine = SYSTEMS[system]
        plan = plan_dependencies({"numpy": numpy}, python_version=python, platform=platform, machine=machine)
        assert not plan.problems and plan.needed
        minimum = ".".join(map(str, series.torch_minimum))
        assert plan.torch_requirement == f">={minimum}" and plan.torch_arguments == [f"torch>={minimum}"]
        pins = [f"{n}=={v}" for n, v in series.pins.items() if n != "typing_extensions"]
        assert plan.pip_arguments == [f"monai=={series.monai}"] + pins + ["--no-deps"]
        assert "nibabel" in " ".join(plan.pip_arguments)  # MONAI's Orientation needs it; Slicer lacks it
        text = plan.consent_text()
        assert f"torch>={minimum}" in text and "numpy and torch are left as they are" in text
    with_torch = plan_dependencies({"numpy": numpy, "torch": "2.8.0"}, python_version=python, platform="linux",
                                   machine="x86_64")
    assert with_torch.torch_requirement is None and "typing_extensions==4.16.0" in with_torch.pip_arguments


def test_nothing_to_install_when_everything_fits():
    plan = plan_dependencies(GOOD, **LINUX_312)
    assert not plan.needed and plan.torch_requirement is None and plan.pip_arguments is None and not plan.problems


def test_a_python_older_than_any_series_is_refused_before_any_download_with_what_to_do():
    for platform, machine in SYSTEMS.values():
        plan = plan_dependencies({"numpy": "1.24.4"}, python_version=(3, 8), platform=platform, machine=machine)
        assert plan.problems and not plan.needed and plan.pip_arguments is None and plan.torch_requirement is None
        text = plan.problem_text()
        assert "Python 3.8" in text and "Python 3.9 or later" in text and "Slicer 5.8 or later" in text
        assert "worker Python" in text and "ATTENTIONMAP_WORKER_PYTHON" in text


def test_macos_x86_64_is_refused_and_pointed_to_a_worker_python_arm64_installs():
    plan = plan_dependencies(FRESH_512, python_version=(3, 12), platform="darwin", machine="x86_64")
    assert plan.problems and not plan.needed
    assert plan_dependencies({"numpy": "1.26.4"}, python_version=(3, 9), platform="darwin", machine="x86_64").problems
    assert "macOS on Intel" in plan.problems[0] and "2.2.2" in plan.problems[0] and "Worker Python" in plan.problems[0]
    native = plan_dependencies(FRESH_512, python_version=(3, 12), platform="darwin", machine="arm64")
    assert not native.problems and native.torch_requirement == ">=2.8"
    present = plan_dependencies({**GOOD, "monai": None}, python_version=(3, 12), platform="darwin", machine="x86_64")
    assert not present.problems and present.pip_arguments[0] == f"monai=={MONAI_VERSION}"  # a torch that fits


@pytest.mark.parametrize("loaded", [False, True])
def test_a_torch_too_old_is_never_upgraded_in_place(loaded):
    plan = plan_dependencies({**GOOD, "torch": "2.2.2"}, torch_loaded=loaded, **LINUX_312)
    assert plan.problems and plan.torch_requirement is None and plan.pip_arguments is None
    text = plan.problems[0]
    assert "PyTorch 2.2.2" in text and "PyTorch Utils" in text and "restart Slicer" in text
    assert ("loaded in Slicer now" in text) == loaded


def test_monai_of_the_tested_series_is_kept_others_are_replaced_with_a_reason():
    kept = plan_dependencies({**GOOD, "monai": "1.6.0"}, **LINUX_312)  # e.g. installed by another extension
    assert not kept.needed
    other = plan_dependencies({**GOOD, "monai": "1.4.0"}, **LINUX_312)
    assert other.pip_arguments == [f"monai=={MONAI_VERSION}", "--no-deps"]
    assert "1.4.0" in other.consent_text() and "another extension" in other.consent_text()
    assert not plan_dependencies({**GOOD, "monai": "1.5.0"}, python_version=(3, 9), platform="win32",
                                 machine="AMD64").needed  # Slicer 5.8 keeps a MONAI 1.5.x
    missing = plan_dependencies({**GOOD, "einops": None, "safetensors": None}, **LINUX_312)
    assert missing.pip_arguments == [f"einops=={PINS['einops']}", f"safetensors=={PINS['safetensors']}", "--no-deps"]


def test_numpy_outside_monais_range_is_a_problem_never_an_install():
    plan = plan_dependencies({**GOOD, "numpy": "1.21.0"}, **LINUX_312)
    assert plan.problems and "numpy 1.21.0" in plan.problems[0] and not plan.needed


def test_every_pin_is_installed_only_with_its_recorded_hashes():
    """pip installs the --no-deps pins from a requirements file with --require-hashes (a wheel changed on the index
    or on the way is refused); every pin of every series has its hashes recorded (`.ci/index_check.py` downloads
    them with these hashes on each CI run)."""
    from AttentionMapLib.dependencies import HASHES

    for series in SERIES:
        for pin in [f"monai=={series.monai}"] + [f"{n}=={v}" for n, v in series.pins.items()]:
            assert HASHES.get(pin) and all(len(h) == 64 and int(h, 16) >= 0 for h in HASHES[pin]), pin
    plan = plan_dependencies({"numpy": "2.4.6"}, (3, 12), "win32", "AMD64")
    lines = plan.hashed_requirements().splitlines()
    assert [line.split()[0] for line in lines] == plan.pins and len(lines) == len(plan.pip_arguments) - 1
    assert all(" --hash=sha256:" in line for line in lines)
    assert plan.hashed_arguments("req.txt") == ["--no-deps", "--require-hashes", "-r", "req.txt"]
    assert "sha256" in plan.consent_text()
