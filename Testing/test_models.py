"""models.load_model: model cards, safe weights, key-mismatch reports, MONAI bundles behind a trust flag."""
import builtins
import json
from pathlib import Path

import pytest
import torch
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.nets import ViT

from AttentionMapLib.errors import AttentionMapError
from AttentionMapLib.models import load_model

ARGS = {"in_channels": 1, "img_size": [16, 16, 16], "patch_size": 8, "hidden_size": 32, "mlp_dim": 64,
        "num_layers": 1, "num_heads": 2, "classification": True, "num_classes": 2, "post_activation": None}
PREPROCESSING = {"orientation": "RAS", "spacing": None,
                 "intensity": {"a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0, "clip": True},
                 "spatial": {"mode": "resize"}}


def tiny_vit(**changes) -> ViT:
    torch.manual_seed(0)
    return ViT(**{**ARGS, **changes})


def write_card(folder: Path, weights_name: str = "model.pt", args=None, **extra) -> Path:
    card = {"network": {"name": "ViT", "args": args or ARGS}, "weights": weights_name,
            "preprocessing": PREPROCESSING, "classes": ["no lesion", "lesion"], "target": "lesion",
            "description": "tiny random ViT for tests", **extra}
    path = folder / "card.json"
    path.write_text(json.dumps(card))
    return path


def assert_same_weights(network, reference) -> None:
    """Every weight equal, except MONAI 1.4 / 1.5's unused cross-attention weights (no part in the forward)."""
    theirs = reference.state_dict()
    for key, value in network.state_dict().items():
        assert ".cross_attn." in key or ".norm_cross_attn." in key or torch.equal(value, theirs[key]), key


def test_card_loads_network_preprocessing_classes_and_target(tmp_path):
    reference = tiny_vit()
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    loaded = load_model(str(write_card(tmp_path)))
    assert isinstance(loaded.network, ViT) and not loaded.network.training
    assert_same_weights(loaded.network, reference)
    assert loaded.classes == ["no lesion", "lesion"]
    assert loaded.target == 1  # "lesion" resolved to its index
    assert loaded.img_size == (16, 16, 16)
    assert loaded.preprocessing == PREPROCESSING
    assert loaded.card["description"] == "tiny random ViT for tests"
    x = torch.rand(1, 1, 16, 16, 16)
    assert torch.allclose(loaded.network(x)[0], reference.eval()(x)[0])


def test_safetensors_and_wrapped_checkpoints_load(tmp_path):
    from safetensors.torch import save_file

    reference = tiny_vit()
    state = reference.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    assert_same_weights(load_model(str(write_card(tmp_path, "model.safetensors"))).network, reference)
    for wrapped in ({"state_dict": state, "epoch": 3}, {"model": state}):
        torch.save(wrapped, tmp_path / "model.pt")
        assert_same_weights(load_model(str(write_card(tmp_path))).network, reference)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "model.pt")
    loaded = load_model(str(write_card(tmp_path)))
    assert_same_weights(loaded.network, reference)
    assert any("module." in note for note in loaded.notes)


class _CreatesFile:
    """Unpickling this object calls open(path, "w"): it creates a file, i.e. runs code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned.txt"
    torch.save({"weights": torch.zeros(2), "payload": _CreatesFile(marker)}, tmp_path / "model.pt")
    with pytest.raises(AttentionMapError, match=r"model\.pt: refused.*arbitrary Python objects"):
        load_model(str(write_card(tmp_path)))
    assert not marker.exists()
    # control: the same file really runs code when loaded unsafely
    control = tmp_path / "control"
    control.mkdir()
    torch.save({"payload": _CreatesFile(control / "ran.txt")}, control / "model.pt")
    torch.load(str(control / "model.pt"), weights_only=False)
    assert (control / "ran.txt").exists()


def test_key_mismatches_are_listed(tmp_path):
    state = tiny_vit().state_dict()
    state.pop("norm.weight")
    state["extra.bias"] = torch.zeros(3)
    state["cls_token"] = torch.zeros(1, 1, 7)
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(AttentionMapError) as info:
        load_model(str(write_card(tmp_path)))
    message = str(info.value)
    assert "missing 1: norm.weight" in message
    assert "unexpected 1: extra.bias" in message
    assert "shape mismatch 1: cls_token: checkpoint (1, 1, 7) vs network (1, 1, 32)" in message


def test_old_monai_checkpoint_with_cross_attention_keys_is_mapped(tmp_path):
    reference = tiny_vit()
    state = reference.state_dict()
    stale = TransformerBlock(32, 64, 2, with_cross_attention=True).cross_attn.state_dict()
    assert stale  # MONAI 1.4 stored these in every block
    kept = "blocks.0.cross_attn.to_q.weight" in state  # MONAI 1.5 keeps them in the network; 1.6 does not
    state.update({f"blocks.0.cross_attn.{k}": v for k, v in stale.items()})
    torch.save(state, tmp_path / "model.pt")
    loaded = load_model(str(write_card(tmp_path)))
    assert_same_weights(loaded.network, reference)
    assert kept or any("cross-attention" in note for note in loaded.notes)
    x = torch.rand(1, 1, 16, 16, 16)
    assert torch.allclose(loaded.network(x)[0], reference.eval()(x)[0])


def test_a_newer_monai_checkpoint_without_cross_attention_keys_loads_where_monai_keeps_them(tmp_path):
    """MONAI 1.5's TransformerBlock holds cross-attention weights it uses only with_cross_attention=True; a MONAI
    1.6 checkpoint (the demo's) lacks them. Simulated on any MONAI by removing them from the checkpoint."""
    reference = tiny_vit()
    state = {k: v for k, v in reference.state_dict().items() if ".cross_attn." not in k and "norm_cross" not in k}
    state["blocks.0.attn.out_proj.weight"] = state["blocks.0.attn.out_proj.weight"] + 1.0  # the weights are read
    torch.save(state, tmp_path / "model.pt")
    loaded = load_model(str(write_card(tmp_path)))
    assert torch.equal(loaded.network.state_dict()["blocks.0.attn.out_proj.weight"],
                       state["blocks.0.attn.out_proj.weight"])
    if len(state) < len(reference.state_dict()):  # MONAI 1.5: the network keeps them
        assert any("unused cross-attention weights" in note for note in loaded.notes)
    crossed = tiny_vit()
    crossed.blocks[0].with_cross_attention = True  # used there: missing ones are an error, not a fill-in
    from AttentionMapLib.models import load_weights

    if len(state) < len(reference.state_dict()):
        with pytest.raises(AttentionMapError, match="missing"):
            load_weights(crossed, tmp_path / "model.pt")


@pytest.mark.parametrize(
    "card, message",
    [
        ({"network": {"name": "ResNet", "args": {}}}, "not supported; expected one of ViT, UNETR, ViTAutoEnc"),
        (
            {"network": {"name": "ViT", "args": {**ARGS, "hidden_size": 33}}},
            "network.args.num_heads: 2 does not divide",
        ),
        ({"network": {"name": "ViT", "args": ARGS}, "preprocessing": PREPROCESSING}, "weights: expected a file name"),
        (
            {"network": {"name": "ViT", "args": ARGS}, "weights": "absent.pt", "preprocessing": PREPROCESSING},
            "absent.pt: weights file not found",
        ),
        (
            {
                "network": {"name": "ViT", "args": ARGS},
                "weights": "model.pt",
                "preprocessing": {"spatial": {"mode": "crop"}},
            },
            r"card.json: preprocessing.spatial.mode: expected 'resize' or 'sliding_window'",
        ),
    ],
)
def test_bad_cards_name_the_problem(tmp_path, card, message):
    torch.save(tiny_vit().state_dict(), tmp_path / "model.pt")
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    with pytest.raises(AttentionMapError, match=message):
        load_model(str(path))


def test_unreadable_card_and_unknown_source(tmp_path):
    bad = tmp_path / "card.json"
    bad.write_text("{not json")
    with pytest.raises(AttentionMapError, match="card.json: not a readable JSON file"):
        load_model(str(bad))
    with pytest.raises(AttentionMapError, match="no such model"):
        load_model(str(tmp_path / "nowhere"))


def test_bad_target_name(tmp_path):
    torch.save(tiny_vit().state_dict(), tmp_path / "model.pt")
    with pytest.raises(AttentionMapError, match="target 'tumour' is not a class"):
        load_model(str(write_card(tmp_path, target="tumour")))


def make_bundle(folder: Path, marker: Path) -> ViT:
    """A MONAI bundle whose config evaluates a Python expression that creates `marker`."""
    reference = tiny_vit()
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    torch.save(reference.state_dict(), folder / "models" / "model.pt")
    config = {
        "touch": f"$open({str(marker)!r}, 'w').close()",
        "network_def": {"_target_": "monai.networks.nets.ViT", **ARGS, "_requires_": "@touch"},
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    metadata = {"description": "bundle for tests",
                "network_data_format": {"outputs": {"pred": {"channel_def": {"1": "nodule", "0": "background"}}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    return reference


def test_bundle_refused_without_trust_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran.txt"
    make_bundle(tmp_path / "bundle", marker)
    with pytest.raises(AttentionMapError, match="--trust-bundle"):
        load_model(str(tmp_path / "bundle"))
    assert not marker.exists()


def test_bundle_loads_with_trust(tmp_path):
    marker = tmp_path / "ran.txt"
    reference = make_bundle(tmp_path / "bundle", marker)
    loaded = load_model(str(tmp_path / "bundle"), trust_bundle=True)
    assert marker.exists()  # trusted: the bundle's expression ran, as MONAI would run it
    assert_same_weights(loaded.network, reference)
    assert loaded.classes == ["background", "nodule"]  # metadata channel_def, ordered by index
    assert loaded.img_size == (16, 16, 16)
    assert loaded.preprocessing["spatial"] == {"mode": "resize"}  # documented default
    assert loaded.card["description"] == "bundle for tests"
    extra = {"preprocessing": PREPROCESSING, "classes": ["no lesion", "lesion"], "target": "lesion"}
    (tmp_path / "bundle" / "configs" / "attentionmap.json").write_text(json.dumps(extra))
    loaded = load_model(str(tmp_path / "bundle"), trust_bundle=True)
    assert (loaded.preprocessing, loaded.classes, loaded.target) == (PREPROCESSING, ["no lesion", "lesion"], 1)


def test_bundle_without_config_is_not_a_bundle(tmp_path):
    (tmp_path / "configs").mkdir()
    with pytest.raises(AttentionMapError, match="not a MONAI bundle"):
        load_model(str(tmp_path), trust_bundle=True)


def test_demo_model_loads():
    loaded = load_model("demo")
    assert isinstance(loaded.network, ViT) and not loaded.network.training
    assert len(loaded.classes) == 2 and loaded.target in (0, 1)
    with torch.no_grad():
        logits = loaded.network(torch.zeros(1, 1, *loaded.img_size))[0]
    assert logits.shape == (1, 2)


@pytest.mark.parametrize("name, args", [
    ("UNETR", {"in_channels": 1, "out_channels": 2, "img_size": 32, "feature_size": 8, "hidden_size": 32,
               "mlp_dim": 32, "num_heads": 2}),
    ("ViTAutoEnc", {"in_channels": 1, "img_size": [16, 16, 16], "patch_size": 4, "hidden_size": 32, "mlp_dim": 32,
                    "num_layers": 1, "num_heads": 2}),
])
def test_other_monai_transformers_load_from_cards(tmp_path, name, args):
    import monai.networks.nets as nets

    torch.manual_seed(0)
    reference = getattr(nets, name)(**args)
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    card = {"network": {"name": name, "args": args}, "weights": "model.pt", "preprocessing": PREPROCESSING}
    (tmp_path / "card.json").write_text(json.dumps(card))
    loaded = load_model(str(tmp_path / "card.json"))
    assert type(loaded.network) is type(reference)
    assert_same_weights(loaded.network, reference)
    assert loaded.img_size == ((32,) * 3 if name == "UNETR" else (16, 16, 16))
    assert loaded.classes == [] and loaded.target is None  # no class names, no classification head


def test_pt_checkpoints_are_refused_on_torch_before_2_6_and_safetensors_load_everywhere(tmp_path, monkeypatch):
    """torch.load(weights_only=True) can run code before PyTorch 2.6 (CVE-2025-32434): a .pt card is refused there
    with the installed version and the CVE named; the same weights as .safetensors load on any torch."""
    from safetensors.torch import save_file

    from AttentionMapLib.models import DEMO_CARD, torch_load_is_safe

    assert [torch_load_is_safe(v) for v in ("2.2.2", "2.5.1+cu121", "2.6.0", "2.13.0+cpu", "10.0", "x")] == [
        False, False, True, True, True, False]
    reference = tiny_vit()
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(AttentionMapError, match=r"model\.pt: refused, PyTorch 2\.5\.1 .*CVE-2025-32434"):
        load_model(str(write_card(tmp_path)))
    assert_same_weights(load_model(str(write_card(tmp_path, "model.safetensors"))).network, reference)
    assert json.loads(DEMO_CARD.read_text())["weights"].endswith(".safetensors")  # the demo loads on any torch
    assert load_model("demo").network is not None


SWIN_ARGS = {"in_channels": 1, "out_channels": 3, "feature_size": 12, "depths": [1, 1, 1, 1],
             "num_heads": [3, 3, 3, 3], "window_size": [4, 4, 4], "norm_name": "batch"}


def test_a_swinunetr_card_loads_with_its_img_size_and_its_memory_is_estimated(tmp_path):
    from monai.networks.nets import SwinUNETR

    from AttentionMapLib.model_cards import check_swin_args, estimate_swin_memory

    torch.manual_seed(0)
    reference = SwinUNETR(**SWIN_ARGS)
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    card = {"network": {"name": "SwinUNETR", "args": SWIN_ARGS}, "weights": "model.pt", "img_size": [32, 32, 64],
            "preprocessing": PREPROCESSING, "classes": ["background", "nodule", "vessel"]}
    (tmp_path / "card.json").write_text(json.dumps(card))
    loaded = load_model(str(tmp_path / "card.json"))
    assert type(loaded.network) is SwinUNETR and loaded.img_size == (32, 32, 64)
    assert_same_weights(loaded.network, reference)
    from AttentionMapLib.module_logic import card_summary

    assert card_summary(tmp_path / "card.json") == (["background", "nodule", "vessel"], 4, 3)  # the module's ranges
    for args in (SWIN_ARGS, {"in_channels": 4, "out_channels": 14, "feature_size": 48}):
        values = check_swin_args(args, 96)
        counted = estimate_swin_memory(values, None)["parameters"] / 8
        actual = sum(p.numel() for p in SwinUNETR(**args).parameters())
        assert abs(counted - actual) / actual < 0.01, (args, counted, actual)


@pytest.mark.parametrize("change,message", [
    ({"img_size": [32, 32, 48]}, r"img_size: \[32, 32, 48\] must be divisible by patch_size \*\* 5 = 32"),
    ({"img_size": None}, "network.args.img_size: expected a positive integer or a list of three"),
    ({"args": {"feature_size": 20}}, "network.args.feature_size: expected a multiple of 12"),
    ({"args": {"num_heads": [5, 3, 3, 3]}}, "network.args.num_heads: 5 heads do not divide stage 0's 12 channels"),
    ({"args": {"depths": [2, 2, 2]}}, "network.args.depths: expected a list of four integers"),
    ({"args": {"use_hyena": True}}, r"unknown argument\(s\) \['use_hyena'\]"),
    ({"args": {"window_size": 0}}, "network.args.window_size: expected an integer or a list of three"),
    ({"img_size": [512, 512, 512], "args": {"feature_size": 48}}, "the card would need about"),
])
def test_bad_swinunetr_cards_are_refused_naming_the_field(tmp_path, change, message):
    args = {**SWIN_ARGS, "patch_size": 2, **change.get("args", {})}
    card = {"network": {"name": "SwinUNETR", "args": args}, "weights": "model.pt",
            "img_size": change.get("img_size", [64, 64, 64]), "preprocessing": PREPROCESSING}
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "card.json").write_text(json.dumps(card))
    with pytest.raises(AttentionMapError, match=message):
        load_model(str(tmp_path / "card.json"))


def test_a_swinunetr_bundle_as_the_model_zoo_ships_it_is_explained(tmp_path):
    """A bundle laid out like MONAI's swin_unetr_btcv_segmentation (network_def a SwinUNETR, the input size in the
    metadata's spatial_shape, classes in channel_def) loads with trust and is explained through its windows; its
    attentionmap.json may also declare attention modules (here MONAI ViT's, to show the section is read)."""
    import numpy as np
    from monai.networks.nets import SwinUNETR

    from AttentionMapLib import explain_volume

    folder = tmp_path / "swin_bundle"
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    args = {"in_channels": 1, "out_channels": 3, "feature_size": 12, "depths": [1, 1, 1, 1],
            "num_heads": [3, 3, 3, 3], "norm_name": "batch"}
    torch.manual_seed(0)
    torch.save(SwinUNETR(**args).state_dict(), folder / "models" / "model.pt")
    (folder / "configs" / "inference.json").write_text(json.dumps(
        {"network_def": {"_target_": "SwinUNETR", **args}}))
    (folder / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {
        "inputs": {"image": {"spatial_shape": [32, 32, 32]}},
        "outputs": {"pred": {"channel_def": {"0": "background", "1": "spleen", "2": "kidney"}}}}}))
    loaded = load_model(str(folder), trust_bundle=True)
    assert isinstance(loaded.network, SwinUNETR) and loaded.img_size == (32, 32, 32)
    assert loaded.classes == ["background", "spleen", "kidney"]
    result = explain_volume(loaded.network, np.random.default_rng(0).random((40, 32, 32)).astype(np.float32),
                            np.eye(4), {"spatial": {"mode": "sliding_window"}}, img_size=loaded.img_size,
                            method="grad_rollout", target=2)
    assert result.grid.shape == (20, 16, 16) and result.target == 2 and result.segmentation.shape == (40, 32, 32)
    (folder / "configs" / "attentionmap.json").write_text(json.dumps(
        {"attention": {"module_class": "WindowAttention", "kind": "softmax", "attention_output": "missing",
                       "patch_size": [2, 2, 2]}}))
    with pytest.raises(AttentionMapError, match=r"attentionmap.json: attention: WindowAttention has no submodule"):
        load_model(str(folder), trust_bundle=True)
