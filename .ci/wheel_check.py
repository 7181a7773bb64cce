"""Run by .ci/wheel_test.sh with the wheel's venv, from a folder outside the checkout.

    python -I wheel_check.py ATTENTION_MAP_SCRIPT REPO

Checks that AttentionMapLib comes from the installed wheel (not the checkout), that the wheel carries the demo
model and no development code, then runs ``attention-map run --model demo`` (default region: the automatic lung
field) on a small synthetic chest CT (anisotropic, not cubic) written as NRRD, and checks its three outputs.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import AttentionMapLib
from AttentionMapLib.models import DEMO_CARD


def synthetic_chest(path: Path) -> None:
    """(I, J, K) = 80 x 64 x 40 voxels of 2.0 x 2.5 x 3.0 mm: air, an elliptic body (40 HU), two lungs (-820 HU)."""
    k, j, i = np.meshgrid(np.arange(40), np.arange(64), np.arange(80), indexing="ij")  # SimpleITK order (K, J, I)
    x, y = (i - 40) * 2.0, (j - 32) * 2.5
    hu = np.full(i.shape, -1000.0)
    hu[(x / 70) ** 2 + (y / 55) ** 2 <= 1] = 40.0
    for centre in (-32.0, 32.0):
        hu[((x - centre) / 24) ** 2 + (y / 35) ** 2 <= 1] = -820.0
    hu += np.random.default_rng(0).normal(0.0, 20.0, hu.shape)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing((2.0, 2.5, 3.0))
    image.SetOrigin((-80.0, -80.0, -60.0))
    sitk.WriteImage(image, str(path))


def main() -> int:
    script, repo = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    package = Path(AttentionMapLib.__file__).resolve().parent
    assert repo not in package.parents, f"AttentionMapLib imported from the checkout: {package}"
    assert Path(sys.prefix) in package.parents, f"AttentionMapLib not from the wheel's venv: {package}"
    weights = DEMO_CARD.with_suffix(".safetensors")
    assert DEMO_CARD.is_file() and weights.is_file(), f"no demo model in the wheel: {DEMO_CARD}"
    shipped = {p.stem for p in package.rglob("*.py")}
    assert not shipped & {"demo_data", "baselines"}, sorted(shipped & {"demo_data", "baselines"})
    assert importlib.util.find_spec("attentionmap_dev") is None, "attentionmap_dev is importable from the wheel's venv"

    synthetic_chest(Path("chest.nrrd"))
    run = subprocess.run([str(script), "run", "chest.nrrd", "--model", "demo", "--output-dir", "out"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"attention-map run failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    for name in ("summary.json", "chest_attention.nrrd", "chest_overlay.png"):
        assert (Path("out") / name).is_file() and (Path("out") / name).stat().st_size > 0, f"no out/{name}"
    summary = json.loads(Path("out/summary.json").read_text())
    attention = sitk.GetArrayFromImage(sitk.ReadImage("out/chest_attention.nrrd"))
    assert np.isfinite(attention).all() and attention.max() > 0, "empty or non-finite attention map"
    print(f"attention-map run --model demo: {run.stdout.strip()}; summary keys {sorted(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
