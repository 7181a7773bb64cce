"""One numbering of layers and heads for the command line and the Slicer module (numbering.layer_index)."""
import ast
import inspect

import numpy as np
import pytest
import torch
from monai.networks.nets import ViT

from AttentionMapLib import AttentionMapError, cli, explain
from AttentionMapLib.core.numbering import layer_index
from test_static_slicer import module_ast, ui_widgets


def test_user_layers_count_from_one_and_negative_from_the_end():
    assert [layer_index(k, 4) for k in (1, 2, 3, 4)] == [0, 1, 2, 3]
    assert [layer_index(k, 4) for k in (-1, -2, -3, -4)] == [3, 2, 1, 0]
    for bad in (0, 5, -5):
        with pytest.raises(AttentionMapError, match=rf"--layer {bad}: expected 1..4 \(first to last block\) or -4..-1"):
            layer_index(bad, 4)
    with pytest.raises(AttentionMapError, match=r"^layer 0: expected 1 or more"):
        layer_index(0, name="layer")
    with pytest.raises(AttentionMapError, match="expected a whole number"):
        layer_index(1.5, 4)


def test_gui_conversion_without_the_model_reads_the_same_block_as_the_cli_conversion():
    """The module converts before it knows the model (negative layers stay negative); the command line
    converts with L known. Every user layer gives the same map both ways, and a different map from its
    neighbour (so a shifted conversion would be seen)."""
    torch.manual_seed(0)
    model = ViT(in_channels=1, img_size=(16, 16, 16), patch_size=8, hidden_size=32, mlp_dim=32, num_layers=3,
                num_heads=2, classification=True, post_activation=None).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    maps = {}
    for user in (1, 2, 3, -1, -2, -3):
        gui = explain(model, x, method="raw", layer=layer_index(user), normalize="none").grid
        command_line = explain(model, x, method="raw", layer=layer_index(user, 3), normalize="none").grid
        np.testing.assert_array_equal(gui, command_line)
        maps[user] = command_line
    for k in (1, 2, 3):
        np.testing.assert_array_equal(maps[k], maps[k - 4])
    assert not np.allclose(maps[1], maps[2]) and not np.allclose(maps[2], maps[3])


def test_cli_and_slicer_module_both_convert_through_layer_index():
    assert "layer_index(args.layer" in inspect.getsource(cli.explain_options)
    fusion = next(n for n in ast.walk(module_ast()) if isinstance(n, ast.FunctionDef) and n.name == "fusionOptions")
    assert "layer_index(" in ast.unparse(fusion)
    explain_options = next(n for n in ast.walk(module_ast())
                           if isinstance(n, ast.FunctionDef) and n.name == "explainOptions")
    assert "'head': p.head if single else None" in ast.unparse(explain_options)  # heads: no conversion


def test_slicer_head_box_counts_from_zero_like_the_cli():
    _, props = ui_widgets()["headSpinBox"]
    assert props["minimum"].find("number").text == "0"
    info = next(n for n in ast.walk(module_ast()) if isinstance(n, ast.FunctionDef) and n.name == "_showModelInfo")
    assert "self.ui.headSpinBox.maximum = summary.num_heads - 1" in ast.unparse(info)
    fields = {n.target.id: ast.unparse(n.annotation) for n in ast.walk(module_ast())
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    assert fields["head"] == "Annotated[int, WithinRange(0, 63)]"
