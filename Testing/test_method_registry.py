"""The method registry: a new method is one readout function plus one register line, and every consumer
(engine, explain_volume, the command line, its help) sees it; the table itself needs no torch."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import ViT

from AttentionMapLib import AttentionMapError, explain, explain_volume
from AttentionMapLib.cli import main
from AttentionMapLib.core.method_registry import Method, get_method, method_names, register, unregister

MODULE_DIR = Path(__file__).resolve().parent.parent / "AttentionMap"


def uniform(captured, row, last, discard_ratio, has_cls):
    """Toy method: every token 1, or 2 when the capture carries gradients (shows what was captured)."""
    return torch.full_like(row, 2.0 if captured.has_gradients else 1.0)


@pytest.fixture
def toy_methods():
    register(Method("uniform", "uniform map (toy)", False, uniform))
    register(Method("uniform_grad", "uniform map from a capture with gradients (toy)", True,
                    "test_method_registry:uniform"))  # an import path, resolved on first use
    yield
    unregister("uniform")
    unregister("uniform_grad")


def small_vit() -> ViT:
    torch.manual_seed(0)
    return ViT(in_channels=1, img_size=(16, 16, 32), patch_size=8, hidden_size=32, mlp_dim=32, num_layers=2,
               num_heads=2, classification=True, post_activation=None).eval()


def help_text(capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_a_registered_method_reaches_the_cli_help_and_explain(toy_methods, capsys):
    text = " ".join(help_text(capsys).split())
    assert "{raw,rollout,grad_rollout,uniform,uniform_grad}" in text
    assert "uniform: uniform map (toy)" in text
    x = torch.randn(2, 1, 16, 16, 32)
    for path in ("full", "blockwise"):
        plain = explain(small_vit(), x, method="uniform", normalize="none", attention_path=path)
        assert plain.grid.shape == (2, 2, 2, 4) and np.all(plain.grid == 1.0), path
        with_gradients = explain(small_vit(), x, method="uniform_grad", normalize="none", attention_path=path)
        assert np.all(with_gradients.grid == 2.0), path  # needs_gradients made the capture run a backward pass


def test_a_registered_method_runs_through_explain_volume(toy_methods):
    array = np.random.default_rng(0).normal(size=(20, 18, 36)).astype(np.float32)
    affine = np.diag([0.9, 1.1, 2.0, 1.0])
    result = explain_volume(small_vit(), array, affine, {"spatial": {"mode": "resize"}}, img_size=(16, 16, 32),
                            method="uniform_grad", normalize="none")
    assert result.method == "uniform_grad" and np.all(result.grid == 2.0)


def test_unregistered_method_is_gone_everywhere(capsys):
    register(Method("uniform", "uniform map (toy)", False, uniform))
    with pytest.raises(AttentionMapError, match="already registered"):
        register(Method("uniform", "again", False, uniform))
    unregister("uniform")
    assert "uniform" not in help_text(capsys)
    with pytest.raises(AttentionMapError, match=r"method: expected one of raw, rollout, grad_rollout, got 'uniform'"):
        explain(small_vit(), torch.randn(1, 1, 16, 16, 32), method="uniform")
    with pytest.raises(AttentionMapError, match="method: expected one of"):
        get_method(["rollout"])


def test_built_in_methods_and_their_gradient_needs():
    assert method_names()[:3] == ("raw", "rollout", "grad_rollout")
    assert [get_method(m).needs_gradients for m in ("raw", "rollout", "grad_rollout")] == [False, False, True]


def test_the_table_needs_no_torch_and_imports_readouts_lazily():
    script = textwrap.dedent("""
        import sys
        for blocked in ("torch", "monai", "einops"):
            sys.modules[blocked] = None
        from AttentionMapLib.core.method_registry import get_method, method_names
        readouts_imported = "AttentionMapLib.core.readouts" in sys.modules
        print(method_names(), get_method("grad_rollout").needs_gradients, readouts_imported)
    """)
    # the module's folder alone on the path, as Slicer puts it
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(MODULE_DIR)})
    assert result.stdout.strip() == "('raw', 'rollout', 'grad_rollout') True False", result.stdout + result.stderr
