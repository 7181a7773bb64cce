"""Reliability sweep, model cards: every field checked before anything is built, memory estimated.

Each bad card is refused by `load_model` with AttentionMapError naming the card file and the field,
before MONAI builds anything (a card that would allocate terabytes returns at once), and the card's
folder is unchanged. The memory estimate is checked against real MONAI networks.
"""
import json
import math
import shutil
import time

import numpy as np
import pytest
import torch
from monai.networks.nets import UNETR, ViT, ViTAutoEnc

from AttentionMapLib.errors import AttentionMapError
from AttentionMapLib.model_cards import (
    BLOCKWISE_SLAB_BYTES,
    MEMORY_LIMIT_BYTES,
    check_card,
    check_network_args,
    estimate_memory,
)
from AttentionMapLib.models import DEMO_CARD, SUPPORTED_NETWORKS, load_model
from reliability import ARGS, PREPROCESSING, card_dict, snapshot


def _args(**changes):
    return {"network": {"name": "ViT", "args": {**ARGS, **changes}}}


def _prep(**changes):
    return {"preprocessing": {**PREPROCESSING, **changes}}


# name -> (card changes, words the message must hold after "<card path>: ")
CASES = {
    "network missing": ({"network": None}, "network: expected an object with 'name'"),
    "network name unsupported": (
        {"network": {"name": "ResNet", "args": {}}},
        "network.name: 'ResNet' is not supported",
    ),
    "network name not a string": (
        {"network": {"name": ["ViT"], "args": {}}},
        "network: expected an object with 'name'",
    ),
    "network args not an object": ({"network": {"name": "ViT", "args": [1, 2]}}, "network.args: expected an object"),
    "unknown network argument": (_args(payload="x"), "network.args: unknown argument(s) ['payload'] for MONAI ViT"),
    "required argument missing": (
        {"network": {"name": "ViT", "args": {"in_channels": 1, "img_size": 16}}},
        "network.args: missing ['patch_size']",
    ),
    "num_heads 0": (_args(num_heads=0), "network.args.num_heads: expected an integer in 1..1024, got 0"),
    "num_heads negative": (_args(num_heads=-2), "network.args.num_heads: expected an integer in 1..1024, got -2"),
    "num_heads not dividing": (_args(num_heads=3), "network.args.num_heads: 3 does not divide hidden_size 8"),
    "hidden_size a string": (
        _args(hidden_size="8"),
        "network.args.hidden_size: expected an integer in 1..65536, got '8'",
    ),
    "hidden_size a bool": (_args(hidden_size=True), "network.args.hidden_size: expected an integer"),
    "hidden_size huge": (
        _args(hidden_size=65536, num_heads=1),
        "network.args (hidden_size=65536, mlp_dim=8, num_layers=1)",
    ),
    "num_layers 0": (_args(num_layers=0), "network.args.num_layers: expected an integer in 1..1024, got 0"),
    "num_layers huge": (
        _args(hidden_size=1024, mlp_dim=4096, num_layers=1024, num_heads=8),
        "network.args (hidden_size=1024, mlp_dim=4096, num_layers=1024)",
    ),
    "mlp_dim 0": (_args(mlp_dim=0), "network.args.mlp_dim: expected an integer"),
    "in_channels 0": (_args(in_channels=0), "network.args.in_channels: expected an integer in 1..64"),
    "num_classes 0": (_args(num_classes=0), "network.args.num_classes: expected an integer"),
    "spatial_dims 2": (_args(spatial_dims=2), "network.args.spatial_dims: expected an integer in 3..3"),
    "dropout above 1": (_args(dropout_rate=2.0), "network.args.dropout_rate: expected a number in [0, 1]"),
    "classification not bool": (_args(classification="yes"), "network.args.classification: expected true or false"),
    "proj_type unknown": (_args(proj_type="evil"), "network.args.proj_type: expected one of ['conv', 'perceptron']"),
    "pos_embed_type unknown": (
        _args(pos_embed_type="rope"),
        "network.args.pos_embed_type: expected one of ['fourier', 'learnable', 'none', 'sincos']",
    ),
    "img_size two axes": (
        _args(img_size=[16, 16]),
        "network.args.img_size: expected a positive integer or a list of three",
    ),
    "img_size zero": (_args(img_size=0), "network.args.img_size: expected a positive integer"),
    "patch_size not dividing": (
        _args(patch_size=[8, 8, 5]),
        "network.args.patch_size: the patch size (8, 8, 5) must divide",
    ),
    "img_size huge": (
        _args(img_size=[1024, 1024, 1024], patch_size=[8, 8, 8]),
        "network.args (img_size=[1024, 1024, 1024], hidden_size=8)",
    ),
    "tokens x layers huge": (
        _args(img_size=[256, 256, 256], patch_size=[4, 4, 4], num_layers=1024),
        "network.args (img_size=[256, 256, 256], hidden_size=8)",
    ),
    "UNETR img_size not /16": (
        {
            "network": {
                "name": "UNETR",
                "args": {
                    "in_channels": 1,
                    "out_channels": 2,
                    "img_size": 24,
                    "hidden_size": 8,
                    "mlp_dim": 8,
                    "num_heads": 2,
                },
            },
            "classes": None,
        },
        "network.args.img_size: the patch size (16, 16, 16) must divide",
    ),
    "UNETR feature_size 0": (
        {
            "network": {
                "name": "UNETR",
                "args": {
                    "in_channels": 1,
                    "out_channels": 2,
                    "img_size": 32,
                    "feature_size": 0,
                    "hidden_size": 8,
                    "mlp_dim": 8,
                    "num_heads": 2,
                },
            }
        },
        "network.args.feature_size: expected an integer in 1..4096, got 0",
    ),
    "ViTAutoEnc deconv_chns huge": (
        {
            "network": {
                "name": "ViTAutoEnc",
                "args": {
                    "in_channels": 1,
                    "img_size": 256,
                    "patch_size": 16,
                    "hidden_size": 8,
                    "mlp_dim": 8,
                    "num_layers": 1,
                    "num_heads": 2,
                    "deconv_chns": 4096,
                },
            },
            "classes": None,
        },
        "network.args (img_size=[256, 256, 256], hidden_size=8)",
    ),
    "weights a number": ({"weights": 5}, "weights: expected a file name relative to the card"),
    "weights empty": ({"weights": ""}, "weights: expected a file name relative to the card"),
    "weights missing": ({"weights": None}, "weights: expected a file name relative to the card"),
    "weights escape": ({"weights": "../../etc/passwd"}, "weights: '../../etc/passwd' resolves to"),
    "weights absolute": ({"weights": "/etc/passwd"}, "weights: '/etc/passwd' is an absolute path"),
    "target a list": ({"target": [1]}, "target: expected a class name, a class index, or null, got [1]"),
    "target out of range": ({"target": 5}, "target index 5 out of range 0..1"),
    "target not a class": ({"target": "tumour"}, "target 'tumour' is not a class"),
    "classes a string": ({"classes": "lesion"}, "classes: expected a list of class names"),
    "classes numbers": ({"classes": [0, 1]}, "classes: expected a list of class names"),
    "classes repeated": ({"classes": ["a", "A"]}, "classes: expected distinct names"),
    "classes count": ({"classes": ["a", "b", "c"], "target": None}, "classes: 3 name(s) for 2 network output(s)"),
    "description not text": ({"description": {"x": 1}}, "description: expected a string"),
    "preprocessing missing": ({"preprocessing": None}, "preprocessing: expected an object"),
    "preprocessing unknown key": (_prep(crop=True), "preprocessing.(top level): unknown key(s) ['crop']"),
    "spacing 0.001 mm": (
        _prep(spacing=[0.001, 0.001, 0.001]),
        "preprocessing.spacing: expected three spacings in 0.1..50 mm",
    ),
    "spacing zero": (_prep(spacing=[1, 0, 1]), "preprocessing.spacing: expected three positive numbers"),
    "spacing 0.15 mm (memory)": (
        _prep(spacing=[0.15, 0.15, 0.15]),
        "preprocessing.spacing [0.15, 0.15, 0.15] (a 400 mm field of view)",
    ),
    "sw_batch_size huge": (
        _prep(spatial={"mode": "sliding_window", "sw_batch_size": 10**9}),
        "network.args (img_size=[16, 16, 16], hidden_size=8)",
    ),
    "default_region a string": ({"default_region": "lungs"}, 'default_region: expected {"kind": "lung_field"'),
    "default_region unknown kind": ({"default_region": {"kind": "liver"}}, 'default_region: expected {"kind"'),
    "default_region unknown key": (
        {"default_region": {"kind": "lung_field", "radius": 3}},
        "default_region: unknown key(s) ['radius']",
    ),
    "default_region threshold text": (
        {"default_region": {"kind": "lung_field", "hu_threshold": "-400"}},
        "default_region.hu_threshold: expected a number, got '-400'",
    ),
    "default_region margin negative": (
        {"default_region": {"kind": "lung_field", "margin_mm": -1}},
        "default_region.margin_mm: expected a number >= 0, got -1",
    ),
    "calibration a number": ({"calibration": 0.8}, "calibration.temperature: expected a positive number, got None"),
    "calibration without temperature": (
        {"calibration": {"ece": 0.1}},
        "calibration.temperature: expected a positive number, got None",
    ),
    "calibration temperature 0": (
        {"calibration": {"temperature": 0}},
        "calibration.temperature: expected a positive number, got 0",
    ),
    "calibration temperature text": (
        {"calibration": {"temperature": "0.8"}},
        "calibration.temperature: expected a positive number, got '0.8'",
    ),
    "calibration temperature NaN": (
        {"calibration": {"temperature": float("nan")}},
        "calibration.temperature: expected a positive number, got nan",
    ),
    "calibration ece above 1": (
        {"calibration": {"temperature": 0.8, "ece": 4.3}},
        "calibration.ece: expected a number in [0, 1], got 4.3",
    ),
    "calibration fitted_on not text": (
        {"calibration": {"temperature": 0.8, "fitted_on": 451}},
        "calibration.fitted_on: expected a string, got 451",
    ),
    "domain of another kind": ({"domain": {"kind": "anatomy"}}, 'domain: expected {"kind": "lung_content", ...}'),
    "domain lung fraction above 1": (
        {"domain": {"kind": "lung_content", "min_lung_fraction": 3, "training": {}}},
        "domain.min_lung_fraction: expected a number in [0, 1], got 3",
    ),
    "domain training lung volumes reversed": (
        {"domain": {"kind": "lung_content", "min_lung_fraction": 0.03,
                    "training": {"lung_volume_ml": [3840, 2809], "field_of_view_mm": [[1, 2]] * 3,
                                 "intensity_hu_p1_p99": [-1000, 400]}}},
        "domain.training.lung_volume_ml: expected [low, high], two finite numbers, got [3840, 2809]",
    ),
    "domain without a HU range": (
        {"domain": {"kind": "lung_content", "min_lung_fraction": 0.03,
                    "training": {"lung_volume_ml": [1, 2], "field_of_view_mm": [[1, 2]] * 3,
                                 "intensity_hu_p1_p99": [-1000, 400]}},
         "preprocessing": {**PREPROCESSING, "intensity": {"normalize": "zscore"}}},
        "domain: needs preprocessing.intensity with a HU range",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_card_is_refused_naming_the_field(name, tmp_path, tiny_weights):
    changes, words = CASES[name]
    shutil.copy(tiny_weights, tmp_path / "weights.pt")
    card = card_dict(**changes)
    card = {k: v for k, v in card.items() if not (k == "weights" and v is None)}
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    before = snapshot(tmp_path)
    start = time.perf_counter()
    with pytest.raises(AttentionMapError) as refused:
        load_model(str(path))
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and words in message, message
    assert time.perf_counter() - start < 10.0  # refused from the numbers, nothing of that size was allocated
    assert snapshot(tmp_path) == before


def test_oversized_card_file_is_refused_unread(tmp_path):
    path = tmp_path / "card.json"
    path.write_text(json.dumps({**card_dict(), "padding": "x" * (2 ** 20)}))
    with pytest.raises(AttentionMapError, match=r"card.json: \d+ bytes; expected a JSON file of at most 1048576 bytes"):
        load_model(str(path))


@pytest.mark.parametrize("source, words", [(5, "model: expected 'demo', a model card path"),
                                           (None, "model: expected 'demo'")])
def test_model_source_of_the_wrong_type(source, words):
    with pytest.raises(AttentionMapError, match=words):
        load_model(source)


def _parameter_bytes(network) -> int:
    return 2 * 4 * sum(p.numel() for p in network.parameters())


@pytest.mark.parametrize("name, args", [
    ("ViT", {**ARGS, "hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 4}),
    ("ViT", {"in_channels": 2, "img_size": [32, 16, 16], "patch_size": [8, 4, 4], "hidden_size": 24, "mlp_dim": 40,
             "num_layers": 3, "num_heads": 3}),
    ("UNETR", {"in_channels": 1, "out_channels": 3, "img_size": 32, "feature_size": 12, "hidden_size": 48,
               "mlp_dim": 48, "num_heads": 4}),
    ("ViTAutoEnc", {"in_channels": 1, "img_size": 32, "patch_size": 16, "hidden_size": 32, "mlp_dim": 32,
                    "num_layers": 2, "num_heads": 2, "deconv_chns": 8}),
], ids=["ViT", "ViT anisotropic", "UNETR", "ViTAutoEnc"])
def test_parameter_estimate_matches_monai(name, args):
    """The closed-form parameter count (no network built) against MONAI's real network: within 2 %."""
    values = check_network_args(name, args)
    estimate = estimate_memory(name, values, spacing=None)["parameters"]
    network = {"ViT": ViT, "UNETR": UNETR, "ViTAutoEnc": ViTAutoEnc}[name](**args)
    assert estimate == pytest.approx(_parameter_bytes(network), rel=0.02)


def test_attention_estimate_is_the_smaller_of_the_full_and_blockwise_paths():
    values = check_network_args("ViT", {**ARGS, "img_size": [32, 32, 32], "num_layers": 3})
    sequence = math.prod(s // 8 for s in (32, 32, 32)) + 1  # + CLS
    full = 4 * 4 * 3 * (2 + 2) * sequence ** 2  # (heads + 2) N x N per block, batch 4
    assert estimate_memory("ViT", values, None, batch=4)["attention"] == full
    assert estimate_memory("ViT", values, [2.0, 2.0, 2.0])["preprocessing"] == 4 * 3 * 200 ** 3
    # 32768 tokens: 17 GiB of N x N matrices, but the block-wise path keeps 2 N x hidden per block
    values = check_network_args("ViT", {**ARGS, "img_size": [256, 256, 256]})
    sequence = 32 ** 3 + 1
    assert estimate_memory("ViT", values, None)["attention"] == 4 * 2 * sequence * 8 + BLOCKWISE_SLAB_BYTES
    check_card({"network": {"name": "ViT", "args": {**ARGS, "img_size": [256, 256, 256]}},
                "preprocessing": PREPROCESSING}, SUPPORTED_NETWORKS)  # accepted


def test_demo_card_passes_with_its_estimate_under_the_limit():
    card = json.loads(DEMO_CARD.read_text())
    name, args = check_card(card, SUPPORTED_NETWORKS)
    values = check_network_args(name, args)
    total = sum(estimate_memory(name, values, card["preprocessing"]["spacing"], batch=4).values())
    assert 0 < total < MEMORY_LIMIT_BYTES / 4
    assert load_model("demo").classes == card["classes"]


def test_weights_inside_a_subfolder_of_the_card_are_allowed(tmp_path, tiny_weights):
    (tmp_path / "weights").mkdir()
    shutil.copy(tiny_weights, tmp_path / "weights" / "tiny.pt")
    (tmp_path / "card.json").write_text(json.dumps(card_dict(weights="weights/tiny.pt")))
    loaded = load_model(str(tmp_path / "card.json"))
    reference = torch.load(tiny_weights, weights_only=True)
    assert all(torch.equal(v, reference[k]) for k, v in loaded.network.state_dict().items())


@pytest.mark.parametrize("text, words", [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),  # past the parser's recursion limit
    ('{"a": ' * 40 + "1" + "}" * 40, "JSON nested more than 32 deep"),  # within it, past any card's depth
    ('{"network": {"name": "ViT", "args": {"hidden_size": ' + "9" * 5000 + "}}}", "not a readable JSON file"),
], ids=["nested past the recursion limit", "nested 40 deep", "integer of 5000 digits"])
def test_hostile_json_cards_get_one_line_and_exit_2(tmp_path, text, words):
    """Cards under 1 MiB that break the JSON reader itself: RecursionError / ValueError become the card's one-line
    error (exit 2) in the command line, the library, and the GUI's card summary, never "internal error"."""
    from AttentionMapLib.module_logic import card_summary
    from reliability import one_line, run_cli_subprocess

    card = tmp_path / "card.json"
    card.write_text(text)
    assert card.stat().st_size < 2 ** 20
    with pytest.raises(AttentionMapError, match=words):
        load_model(str(card))
    with pytest.raises(AttentionMapError, match=words):
        card_summary(card)
    from AttentionMapLib.io import write_volume

    image = tmp_path / "ct.nrrd"
    write_volume(image, np.zeros((8, 8, 8), np.float32), np.eye(4))
    done = run_cli_subprocess(["run", image, "--model", card, "--output-dir", tmp_path / "out"])
    assert done.returncode == 2 and "card.json" in one_line(done.stderr) and words in done.stderr, done.stderr
