"""Shared pieces of the reliability sweep (Testing/test_reliability_*.py): one tiny model card, a small
oblique scan, snapshots of folders (to prove nothing was written or changed) and the CLI runners."""
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
from monai.networks.nets import ViT

from AttentionMapLib.io import write_volume
from AttentionMapLib.outputs import STAGING_PREFIX

ROOT = Path(__file__).resolve().parent.parent
ARGS = {"in_channels": 1, "img_size": [16, 16, 16], "patch_size": [8, 8, 8], "hidden_size": 8, "mlp_dim": 8,
        "num_layers": 1, "num_heads": 2, "classification": True, "num_classes": 2, "post_activation": None}
PREPROCESSING = {"orientation": "RAS", "spacing": None,
                 "intensity": {"a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0, "clip": True},
                 "spatial": {"mode": "resize"}}
SHAPE = (20, 16, 12)  # not cubic


def card_dict(**changes) -> dict:
    card = {"network": {"name": "ViT", "args": dict(ARGS)}, "weights": "weights.pt", "preprocessing": PREPROCESSING,
            "classes": ["no lesion", "lesion"], "target": "lesion", "description": "tiny test model"}
    card.update(changes)
    return card


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """The state dict of the tiny ViT (8 tokens, one block), saved once for the session."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "weights.pt"
    torch.save(ViT(**ARGS).state_dict(), path)
    return path


def oblique_affine() -> np.ndarray:
    angle = np.radians(25)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    affine[:3, :3] = affine[:3, :3] @ np.diag([1.2, 0.9, 3.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return affine


def scan_array(seed: int = 0) -> np.ndarray:
    volume = np.random.default_rng(seed).integers(-1000, 400, SHAPE).astype(np.int16)
    volume[12:16, 4:8, 3:6] = 300
    return volume


@pytest.fixture
def work(tmp_path, tiny_weights) -> SimpleNamespace:
    """tmp_path holding inp/case1.nrrd (+ its label), model/card.json (+ weights.pt); out = tmp_path/out (absent)."""
    inp, model = tmp_path / "inp", tmp_path / "model"
    inp.mkdir()
    model.mkdir()
    write_volume(inp / "case1.nrrd", scan_array(), oblique_affine())
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[12:16, 4:8, 3:6] = 1
    write_volume(inp / "case1_label.nrrd", label, oblique_affine())
    shutil.copy(tiny_weights, model / "weights.pt")
    (model / "card.json").write_text(json.dumps(card_dict()))
    return SimpleNamespace(root=tmp_path, inp=inp, image=inp / "case1.nrrd", label=inp / "case1_label.nrrd",
                           card=model / "card.json", out=tmp_path / "out")


def snapshot(root: Path) -> Dict[str, str]:
    """Every entry under root (links not followed, pipes not opened): its kind and sha256 / link target."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = os.lstat(path)
            key = str(path.relative_to(root))
            if stat.S_ISLNK(info.st_mode):
                entries[key] = "link -> " + os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                entries[key] = "dir" if stat.S_ISDIR(info.st_mode) else f"special {stat.S_IFMT(info.st_mode)}"
    return entries


def leftovers(root: Path) -> List[str]:
    """Staging folders and partial files anywhere under root (none may outlive a run)."""
    return [str(p) for p in root.rglob("*") if p.name.startswith(STAGING_PREFIX) or ".partial" in p.name]


def one_line(stderr: str) -> str:
    """The single line a refused run prints on stderr."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def cli_subprocess(argv: List[str], preexec=None, env: Optional[dict] = None, **popen) -> subprocess.Popen:
    """`python -m AttentionMapLib.cli ARGV` as a real process (the worktree's package first on the path)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "AttentionMap"), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "AttentionMapLib.cli", *map(str, argv)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec, **popen)


def run_cli_subprocess(argv: List[str], timeout: float = 120, preexec=None) -> subprocess.CompletedProcess:
    process = cli_subprocess(argv, preexec=preexec)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"attention-map {argv} did not finish within {timeout} s (hang)") from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)
