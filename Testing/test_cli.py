"""attention-map CLI end to end: real MONAI ViTs (oracle and random) from cards written in tmp, real files."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import ViT

from AttentionMapLib.cli import main
from AttentionMapLib.core.geometry import apply_affine
from AttentionMapLib.errors import AttentionMapError
from AttentionMapLib.io import read_volume, write_volume
from oracle import make_oracle_vit

ROOT = Path(__file__).resolve().parent.parent
IMG, PATCH = (32, 32, 32), (8, 8, 8)
SHAPE = (48, 40, 20)
CUBE = (slice(30, 38), slice(8, 16), slice(12, 16))  # asymmetric, so a flipped axis would miss it
PREPROCESSING = {"orientation": "RAS", "spacing": None,
                 "intensity": {"a_min": -1000, "a_max": 400, "b_min": 0.0, "b_max": 1.0, "clip": True},
                 "spatial": {"mode": "resize"}}


def vit_args(hidden: int) -> dict:
    return {"in_channels": 1, "img_size": list(IMG), "patch_size": list(PATCH), "hidden_size": hidden,
            "mlp_dim": hidden, "num_layers": 2, "num_heads": 2, "classification": True, "num_classes": 2,
            "post_activation": None}


def write_card(folder: Path, network: torch.nn.Module, args: dict) -> Path:
    folder.mkdir()
    torch.save(network.state_dict(), folder / "weights.pt")
    card = {"network": {"name": "ViT", "args": args}, "weights": "weights.pt", "preprocessing": PREPROCESSING,
            "classes": ["no lesion", "lesion"], "target": "lesion", "description": "test model"}
    (folder / "card.json").write_text(json.dumps(card))
    return folder / "card.json"


@pytest.fixture
def oracle_card(tmp_path):
    """The oracle ViT (hidden 16): every query (CLS included) attends to the brightest patch."""
    return write_card(tmp_path / "oracle", make_oracle_vit(IMG, PATCH, classification=True), vit_args(16))


@pytest.fixture
def random_card(tmp_path):
    torch.manual_seed(0)
    return write_card(tmp_path / "random", ViT(**vit_args(32)), vit_args(32))


def oblique_affine() -> np.ndarray:
    angle = np.radians(20)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine[:3, :3] = affine[:3, :3] @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [-20.0, 30.0, -50.0]
    return affine


@pytest.fixture
def scan(tmp_path):
    """An oblique, anisotropic, non-cubic 'CT' (HU, int16) with a bright cube and its label."""
    volume = np.full(SHAPE, -1000, dtype=np.int16)
    volume += np.random.default_rng(0).integers(-5, 6, SHAPE).astype(np.int16)
    volume[CUBE] = 200
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[CUBE] = 1
    folder = tmp_path / "scan"
    folder.mkdir()
    write_volume(folder / "case1.nrrd", volume, oblique_affine())
    write_volume(folder / "case1_label.nrrd", label, oblique_affine())
    return folder


def digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def run_cli(*argv: str) -> int:
    return main([str(a) for a in argv])


def test_run_writes_grid_resampled_map_overlay_and_summary(scan, oracle_card, tmp_path):
    image, label, out = scan / "case1.nrrd", scan / "case1_label.nrrd", tmp_path / "out"
    before = digest(scan)
    assert run_cli("run", image, "--model", oracle_card, "--label", label, "--resample", "--output-dir", out) == 0
    assert digest(scan) == before  # inputs never written
    summary = json.loads((out / "summary.json").read_text())
    case = summary["cases"][0]
    assert case["case"] == "case1" and summary["options"]["method"] == "rollout"
    # the token grid re-read from its NRRD: its peak, mapped by its own geometry, is summary.json's peak
    grid, grid_affine = read_volume(out / "case1_attention.nrrd")
    assert grid.shape == tuple(case["grid_shape"]) == (4, 4, 4)
    peak = apply_affine(grid_affine, np.unravel_index(np.argmax(grid), grid.shape))
    np.testing.assert_allclose(peak, case["peak_ras_mm"], atol=1e-4)
    # the oracle looks at the bright cube: the peak lies in the label, and mass concentrates there
    assert case["label"]["peak_inside"] is True and case["label"]["peak_to_nearest_label_voxel_mm"] == 0.0
    assert case["label"]["pointing_hit_one_patch"] is True
    assert case["label"]["mass_ratio"] > 5.0
    cube_centre = apply_affine(oblique_affine(), [33.5, 11.5, 13.5])
    assert case["label"]["peak_to_label_centroid_mm"] == pytest.approx(np.linalg.norm(peak - cube_centre))
    resampled, resampled_affine = read_volume(out / "case1_attention_resampled.nrrd")
    assert resampled.shape == SHAPE
    np.testing.assert_allclose(resampled_affine, oblique_affine(), atol=1e-5)
    assert set(case["timings_s"]) == {"read", "preprocess", "forward", "fuse", "geometry", "resample", "write",
                                      "render"}
    assert case["probabilities"].keys() == {"no lesion", "lesion"}
    from matplotlib.image import imread

    picture = imread(out / "case1_overlay.png")
    assert picture.ndim == 3 and picture.shape[0] > 200 and picture.shape[1] > 600


def test_two_inputs_share_one_scale_and_get_a_montage(scan, random_card, tmp_path):
    volume, affine = read_volume(scan / "case1.nrrd")
    write_volume(scan / "case2.nii.gz", volume[::-1].copy(), affine)
    before = digest(scan)
    out = tmp_path / "out"
    assert run_cli("run", scan / "case1.nrrd", scan / "case2.nii.gz", "--model", random_card,
                   "--normalize", "none", "--method", "raw", "--layer", "1", "--output-dir", out) == 0
    assert digest(scan) == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["layer"] == 0 and summary["options"]["layer_cli"] == 1  # 1-based on the CLI
    grids = [read_volume(out / f"{name}_attention.nrrd")[0] for name in ("case1", "case2")]
    low, high = summary["colour_scale"]
    assert low <= min(g.min() for g in grids) and high >= max(g.max() for g in grids)  # joint range
    assert sorted(p.name for p in out.iterdir()) == [
        "case1_attention.nrrd", "case1_overlay.png", "case2_attention.nrrd", "case2_overlay.png",
        "montage.png", "summary.json"]


def write_dicom_series(folder: Path, volume: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """One CT slice per file, geometry in the DICOM tags (LPS), as a scanner would write them."""
    import SimpleITK as sitk

    from AttentionMapLib.core.geometry import kji_to_ijk, lps_to_ras

    folder.mkdir()
    lps = lps_to_ras(ijk_to_ras)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    image = sitk.GetImageFromArray(np.ascontiguousarray(kji_to_ijk(volume)))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection(direction.ravel().tolist())
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
    for k in range(volume.shape[2]):
        piece = image[:, :, k]
        position = lps[:3, :3] @ np.array([0.0, 0.0, k]) + lps[:3, 3]
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0013": str(k + 1),
            "0018|0050": f"{spacing[2]:.6f}",
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
        }
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)


def test_dicom_series_input_gives_the_same_map_as_nrrd(scan, oracle_card, tmp_path):
    volume, affine = read_volume(scan / "case1.nrrd")
    write_dicom_series(tmp_path / "dicom_case", volume, affine)
    dicom_volume, dicom_affine = read_volume(tmp_path / "dicom_case")
    np.testing.assert_array_equal(dicom_volume, volume)
    np.testing.assert_allclose(dicom_affine, affine, atol=1e-4)
    before = digest(tmp_path / "dicom_case")
    assert run_cli("run", tmp_path / "dicom_case", "--model", oracle_card, "--output-dir", tmp_path / "a") == 0
    assert run_cli("run", scan / "case1.nrrd", "--model", oracle_card, "--output-dir", tmp_path / "b") == 0
    assert digest(tmp_path / "dicom_case") == before
    from_dicom = json.loads((tmp_path / "a" / "summary.json").read_text())["cases"][0]
    from_nrrd = json.loads((tmp_path / "b" / "summary.json").read_text())["cases"][0]
    assert from_dicom["case"] == "dicom_case"
    np.testing.assert_allclose(from_dicom["peak_ras_mm"], from_nrrd["peak_ras_mm"], atol=1e-3)


def bad_arguments(scan: Path, card: Path, tmp: Path):
    (tmp / "notes.txt").write_text("not a volume")
    write_volume(tmp / "flat.nrrd", np.zeros((40, 36, 1), dtype=np.int16), np.eye(4))
    write_volume(tmp / "small_label.nrrd", np.ones((8, 8, 8), dtype=np.uint8), np.eye(4))
    image = scan / "case1.nrrd"
    return {
        "missing input": (["run", tmp / "absent.nrrd", "--model", card], "absent.nrrd: no such file"),
        "unreadable input": (["run", tmp / "notes.txt", "--model", card], "notes.txt: SimpleITK could not read"),
        "2D second input": (["run", image, tmp / "flat.nrrd", "--model", card], "2D image"),
        "label grid": (
            ["run", image, "--label", tmp / "small_label.nrrd", "--model", card],
            "small_label.nrrd: the mask",
        ),
        "target": (["run", image, "--target", "tumour", "--model", card], "--target: target 'tumour' is not a class"),
        "layer 0": (["run", image, "--layer", "0", "--model", card], "--layer 0: expected 1..2 (first to last block)"),
        "layer range": (["run", image, "--layer", "-3", "--model", card], "the model has 2 blocks"),
        "model": (["run", image, "--model", tmp / "nomodel.json"], "nomodel.json: no such model"),
        "flip average": (["run", image, "--flip-average", "0,3", "--model", card],
                         "--flip-average: expected 'all', 'none' or distinct model-input axes among 0, 1, 2"),
    }


@pytest.mark.parametrize("case", ["missing input", "unreadable input", "2D second input", "label grid", "target",
                                  "layer 0", "layer range", "model", "flip average"])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(case, scan, oracle_card, tmp_path, capsys):
    argv, message = bad_arguments(scan, oracle_card, tmp_path)[case]
    out = tmp_path / "out"
    before = digest(scan)
    assert run_cli(*argv, "--output-dir", out) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attention-map: error: ") and message in lines[0], lines
    assert not out.exists()  # no partial outputs (the 2D case fails after case1's files were written)
    assert digest(scan) == before


def test_console_entry_point_reports_one_line(tmp_path):
    code = "import sys; from AttentionMapLib.cli import main; sys.exit(main())"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "AttentionMap")}
    done = subprocess.run([sys.executable, "-c", code, "run", str(tmp_path / "absent.nrrd"), "--output-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"attention-map: error: {tmp_path / 'absent.nrrd'}: no such file or folder"
    ]
    usage = subprocess.run([sys.executable, "-c", code, "run", "x.nrrd"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1
    assert "--output-dir" in usage.stderr


def test_score_reports_deletion_and_insertion(scan, random_card, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("run", scan / "case1.nrrd", "--model", random_card, "--output-dir", out) == 0
    probability = json.loads((out / "summary.json").read_text())["cases"][0]["probabilities"]["lesion"]
    report_path = tmp_path / "score.json"
    assert run_cli("score", scan / "case1.nrrd", "--model", random_card, "--steps", "8", "--output", report_path) == 0
    assert "deletion AUC" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["target"] == 1 and report["baseline"] == "blur"
    assert len(report["deletion_curve"]) == len(report["insertion_curve"]) == 9
    # the score runs on the same model input as `run`: the first deletion point is run's probability
    assert report["deletion_curve"][0] == pytest.approx(probability, abs=1e-5)
    assert report["insertion_curve"][-1] == pytest.approx(probability, abs=1e-5)
    assert 0.0 <= report["deletion_auc"] <= 1.0 and 0.0 <= report["insertion_auc"] <= 1.0


def test_sample_data_lists_cached_files(tmp_path, capsys):
    from AttentionMapLib.sample_data import SAMPLE_NAMES

    for name in SAMPLE_NAMES:
        (tmp_path / f"{name}.nrrd").write_bytes(b"")
    assert run_cli("sample-data", "--cache-dir", tmp_path) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"lung1_image\t{tmp_path / 'lung1_image.nrrd'}"
    assert len(lines) == len(SAMPLE_NAMES)


def test_demo_script_reports_peak_against_the_tumour(scan, oracle_card, tmp_path, monkeypatch, capsys):
    """tools/demo.py (what `make demo` runs) on a sample-data cache whose lung2 is the synthetic scan."""
    import hashlib
    import importlib.util
    import shutil

    from AttentionMapLib.sample_data import MANIFEST, SAMPLE_NAMES, SDIST_SHA256

    cache = tmp_path / "cache" / "sample-data"
    cache.mkdir(parents=True)
    for name in SAMPLE_NAMES:
        (cache / f"{name}.nrrd").write_bytes(b"")
    shutil.copy(scan / "case1.nrrd", cache / "lung2_image.nrrd")
    shutil.copy(scan / "case1_label.nrrd", cache / "lung2_label.nrrd")
    # the cache's record of what it holds (checked on every use): these files, from the default archive
    lines = [f"{SDIST_SHA256} archive"] + [
        f"{hashlib.sha256((cache / f'{n}.nrrd').read_bytes()).hexdigest()} {n}.nrrd" for n in SAMPLE_NAMES]
    (cache / MANIFEST).write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("ATTENTIONMAP_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("demo", ROOT / "tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "demo-output"
    assert demo.main(["--model", str(oracle_card), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "lung2_image_overlay.png") in printed and str(out / "lung2_image_attention.nrrd") in printed
    assert "INSIDE the tumour label" in printed
    assert "Volume-level P(lesion) = " in printed and "Region: the whole scan" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "lung2_image_attention.nrrd", "lung2_image_overlay.png", "summary.json"]


def test_cuda_out_of_memory_falls_back_to_cpu_with_auto(capsys):
    from types import SimpleNamespace

    from AttentionMapLib.cli import explain_with_fallback

    loaded = SimpleNamespace(network=torch.nn.Linear(2, 2))
    devices = []

    def call(device):
        devices.append(device)
        if device == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "map"

    assert explain_with_fallback(loaded, "cuda", True, call) == ("map", "cpu")
    assert devices == ["cuda", "cpu"]
    assert "CUDA out of memory; running on the CPU instead" in capsys.readouterr().err
    with pytest.raises(torch.cuda.OutOfMemoryError):  # --device cuda: no silent fallback
        explain_with_fallback(loaded, "cuda", False, call)


def _unetr_card(tmp_path, preprocessing) -> Path:
    from monai.networks.nets import UNETR

    args = {"in_channels": 1, "out_channels": 2, "img_size": 32, "feature_size": 8, "hidden_size": 32,
            "mlp_dim": 32, "num_heads": 2}
    folder = tmp_path / "unetr"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(UNETR(**args).state_dict(), folder / "weights.pt")
    card = {"network": {"name": "UNETR", "args": args}, "weights": "weights.pt", "preprocessing": preprocessing}
    (folder / "card.json").write_text(json.dumps(card))
    return folder / "card.json"


def test_run_with_a_dense_output_model(scan, tmp_path):
    """UNETR: no class probabilities; the map of output channel 1 (grad_rollout) is still written and drawn."""
    card = _unetr_card(tmp_path, PREPROCESSING)
    out = tmp_path / "out"
    assert run_cli("run", scan / "case1.nrrd", "--model", card, "--method", "grad_rollout",
                   "--output-dir", out) == 0
    case = json.loads((out / "summary.json").read_text())["cases"][0]
    assert case["probabilities"] is None and case["target"] == 1 and case["grid_shape"] == [2, 2, 2]
    assert (out / "case1_overlay.png").stat().st_size > 0


def test_run_explains_a_segment_from_a_mask_a_box_or_the_networks_own_labels(scan, tmp_path):
    """--target-class with --target-mask: the library's SegmentTarget over the mask placed in patient space, only
    the windows meeting it run; --target-roi: a RAS box; alone: the network's own labels."""
    from AttentionMapLib import SegmentTarget, explain_volume, load_model
    from AttentionMapLib.core.region import MaskRegion

    sliding = {**PREPROCESSING, "spatial": {"mode": "sliding_window", "overlap": 0.0}}
    card = _unetr_card(tmp_path, sliding)
    image, label = scan / "case1.nrrd", scan / "corner_label.nrrd"
    corner = np.zeros(SHAPE, dtype=np.uint8)
    corner[:6, :6, :6] = 1  # meets one window of four
    write_volume(label, corner, oblique_affine())
    common = ["--model", card, "--method", "grad_rollout", "--normalize", "none"]
    assert run_cli("run", image, *common, "--output-dir", tmp_path / "all") == 0
    assert run_cli("run", image, *common, "--target-class", "1", "--target-mask", label,
                   "--output-dir", tmp_path / "mask") == 0
    everything = json.loads((tmp_path / "all" / "summary.json").read_text())["cases"][0]
    case = json.loads((tmp_path / "mask" / "summary.json").read_text())["cases"][0]
    assert case["segment"]["channel"] == 1 and case["segment"]["region"].startswith("corner_label.nrrd")
    assert everything["segment"] is None and (case["num_windows"], everything["num_windows"]) == (1, 4)
    array, affine = read_volume(image)
    mask, mask_affine = read_volume(label)
    loaded = load_model(str(card))
    expected = explain_volume(loaded.network, array, affine, loaded.preprocessing, img_size=loaded.img_size,
                              method="grad_rollout", normalize="none",
                              target=SegmentTarget(1, MaskRegion(mask, mask_affine)))
    written, _ = read_volume(tmp_path / "mask" / "case1_attention.nrrd")
    np.testing.assert_allclose(written, expected.grid, rtol=1e-5)

    centre = apply_affine(affine, np.array([33.5, 11.5, 13.5]))  # the cube's centre
    assert run_cli("run", image, *common, "--target-class", "1", "--target-roi", *centre, 8, 8, 8,
                   "--output-dir", tmp_path / "roi") == 0
    roi = json.loads((tmp_path / "roi" / "summary.json").read_text())["cases"][0]
    assert roi["segment"]["region"].startswith("segment ROI") and roi["num_windows"] >= 1
    assert run_cli("run", image, *common, "--target-class", "1", "--output-dir", tmp_path / "own") == 0
    own = json.loads((tmp_path / "own" / "summary.json").read_text())["cases"][0]
    assert own["segment"] == {"channel": 1, "region": "the network's own labels"}


def test_run_explains_a_swinunetr_segment_from_its_card(scan, tmp_path):
    """A SwinUNETR card (img_size at the card's top level) runs end to end: its own labels of class 1 and a mask."""
    from monai.networks.nets import SwinUNETR

    args = {"in_channels": 1, "out_channels": 2, "feature_size": 12, "depths": [1, 1, 1, 1],
            "num_heads": [3, 3, 3, 3], "window_size": [4, 4, 4], "norm_name": "batch"}
    folder = tmp_path / "swin"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(SwinUNETR(**args).state_dict(), folder / "weights.pt")
    card = {"network": {"name": "SwinUNETR", "args": args}, "weights": "weights.pt", "img_size": [32, 32, 32],
            "preprocessing": {**PREPROCESSING, "spatial": {"mode": "sliding_window", "overlap": 0.0}},
            "classes": ["background", "cube"]}
    (folder / "card.json").write_text(json.dumps(card))
    for extra in (["--target-class", "cube"], ["--target-class", "1", "--target-mask", scan / "case1_label.nrrd"]):
        out = tmp_path / f"out{len(extra)}"
        assert run_cli("run", scan / "case1.nrrd", "--model", folder / "card.json", "--method", "grad_rollout",
                       *extra, "--segmentation", "--output-dir", out) == 0
        case = json.loads((out / "summary.json").read_text())["cases"][0]
        assert case["target"] == 1 and case["segment"]["channel"] == 1
        assert case["grid_shape"] == [24, 20, 16]  # the RAS-reoriented input padded to 32-voxel windows, 2-voxel tokens
        labels, labels_affine = read_volume(out / "case1_segmentation.nrrd")
        assert labels.shape == SHAPE and np.allclose(labels_affine, oblique_affine(), atol=1e-4)
        assert sum(case["segmentation"].values()) == labels.size and set(case["segmentation"]) <= {"background", "cube"}


@pytest.mark.parametrize("extra,message", [
    (["--target-mask", "LABEL"], "--target-mask / --target-roi: give the class to explain with --target-class"),
    (["--target-class", "1", "--target", "1"], "--target-class: give either --target"),
    (["--target-class", "1", "--target-mask", "LABEL", "LABEL"], "--target-mask: got 2 mask(s) for 1 input(s)"),
])
def test_bad_segment_options_exit_2_and_write_nothing(scan, tmp_path, capsys, extra, message):
    card = _unetr_card(tmp_path, PREPROCESSING)
    label = str(scan / "case1_label.nrrd")
    argv = [a.replace("LABEL", label) for a in extra]
    assert run_cli("run", scan / "case1.nrrd", "--model", card, *argv, "--output-dir", tmp_path / "out") == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_segmentation_of_a_classifier_is_refused_and_nothing_is_written(scan, oracle_card, tmp_path, capsys):
    assert run_cli("run", scan / "case1.nrrd", "--model", oracle_card, "--segmentation",
                   "--output-dir", tmp_path / "out") == 2
    assert "--segmentation: this model gives class outputs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_segment_of_a_classifier_is_refused_and_nothing_is_written(scan, oracle_card, tmp_path, capsys):
    assert run_cli("run", scan / "case1.nrrd", "--model", oracle_card, "--target-class", "1",
                   "--output-dir", tmp_path / "out") == 2
    assert "a segment target needs a dense output" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _sliding_card(tmp_path, **extra) -> Path:
    torch.manual_seed(1)
    card = write_card(tmp_path / "sliding", ViT(**vit_args(32)), vit_args(32))
    data = json.loads(card.read_text())
    data["preprocessing"] = {**PREPROCESSING, "spatial": {"mode": "sliding_window", "overlap": 0.25}}
    data.update(extra)
    card.write_text(json.dumps(data))
    return card


def test_roi_mask_calibration_and_the_volume_level_prediction(scan, tmp_path):
    """--roi skips the windows outside the box and zeroes the map outside it; --mask likewise with a label
    volume; the volume-level P(lesion) is the highest calibrated window probability, with its window."""
    from AttentionMapLib.core.volume import explain_volume
    from AttentionMapLib.models import load_model

    card = _sliding_card(tmp_path, calibration={"temperature": 2.0})
    image, label_path = scan / "case1.nrrd", scan / "case1_label.nrrd"
    volume, affine = read_volume(image)
    loaded = load_model(str(card))
    plain = explain_volume(loaded.network, volume, affine, loaded.preprocessing, img_size=loaded.img_size, target=1)
    assert plain.num_windows == 4
    calibrated = np.exp(plain.window_logits / 2.0) / np.exp(plain.window_logits / 2.0).sum(1, keepdims=True)

    corner = apply_affine(affine, [3.0, 3.0, 10.0])  # near voxel (3, 3, 10): only the first window holds it
    out = tmp_path / "roi"
    assert run_cli("run", image, "--model", card, "--roi", *corner, 6, 6, 6, "--resample", "--output-dir", out) == 0
    case = json.loads((out / "summary.json").read_text())["cases"][0]
    assert case["region"]["windows_run"] == 1 and case["region"]["windows_skipped"] == 3
    assert case["region"]["map_outside_region"] == 0.0 and case["region"]["name"] == "ROI"
    resampled, _ = read_volume(out / "case1_attention_resampled.nrrd")
    ras = apply_affine(affine, np.indices(SHAPE).reshape(3, -1).T.astype(float))
    far = np.any(np.abs(ras - corner) > 3.0 + 2 * 2.5, axis=1).reshape(SHAPE)  # outside the box by > a voxel
    assert np.all(resampled[far] == 0) and resampled.max() > 0
    assert case["prediction"]["temperature"] == 2.0 and case["prediction"]["windows"] == 1

    out = tmp_path / "mask"
    assert run_cli("run", image, "--model", card, "--mask", label_path, "--resample", "--output-dir", out) == 0
    case = json.loads((out / "summary.json").read_text())["cases"][0]
    label, _ = read_volume(label_path)
    resampled, _ = read_volume(out / "case1_attention_resampled.nrrd")
    assert np.all(resampled[label == 0] == 0) and resampled[label > 0].max() > 0  # same grid: exactly the mask
    prediction = case["prediction"]
    kept = np.isin(np.round(plain.window_centres_ras, 6).tolist(), np.round([prediction["window_centre_ras_mm"]], 6))
    assert kept.all(axis=1).sum() == 1
    windows_run = case["region"]["windows_run"]
    assert prediction["windows"] == windows_run and prediction["class"] == "lesion"
    best = int(np.flatnonzero(kept.all(axis=1))[0])
    assert prediction["probability"] == pytest.approx(calibrated[best, 1], abs=1e-6)
    if windows_run == 4:
        assert prediction["probability"] == pytest.approx(calibrated[:, 1].max(), abs=1e-6)

    out = tmp_path / "whole"
    assert run_cli("run", image, "--model", card, "--output-dir", out) == 0
    case = json.loads((out / "summary.json").read_text())["cases"][0]
    assert case["region"] is None and case["prediction"]["probability"] == pytest.approx(
        calibrated[:, 1].max(), abs=1e-6
    )
    assert np.allclose(case["prediction"]["window_centre_ras_mm"], plain.window_centres_ras[calibrated[:, 1].argmax()])


def test_flip_average_lands_in_the_summary_and_equals_the_library_run(scan, tmp_path):
    from AttentionMapLib.core.volume import explain_volume
    from AttentionMapLib.models import load_model

    card = _sliding_card(tmp_path, calibration={"temperature": 2.0})
    image = scan / "case1.nrrd"
    volume, affine = read_volume(image)
    loaded = load_model(str(card))
    direct = explain_volume(loaded.network, volume, affine, loaded.preprocessing, img_size=loaded.img_size, target=1,
                            temperature=2.0, flip_axes=(0, 2), normalize="percentile")
    out = tmp_path / "flips"
    assert run_cli("run", image, "--model", card, "--flip-average", "2,0", "--output-dir", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    case = summary["cases"][0]
    assert summary["options"]["flip_axes"] == [0, 2]
    assert case["probabilities"]["lesion"] == pytest.approx(float(direct.probabilities[1]), abs=1e-6)
    assert case["prediction"]["rule"].endswith(", calibrated, each the mean over 4 flipped views")
    np.testing.assert_allclose(case["peak_ras_mm"], direct.peak_ras(), atol=1e-4)
    out = tmp_path / "all"
    assert run_cli("run", image, "--model", card, "--flip-average", "all", "--output-dir", out) == 0
    assert json.loads((out / "summary.json").read_text())["options"]["flip_axes"] == [0, 1, 2]
    out = tmp_path / "none"
    assert run_cli("run", image, "--model", card, "--output-dir", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["flip_axes"] == [] and "flipped" not in summary["cases"][0]["prediction"]["rule"]
    # a card naming default flips: used without the option, 'none' switches them off, a bad value names the card
    (tmp_path / "flips by default").mkdir()
    card = _sliding_card(tmp_path / "flips by default", calibration={"temperature": 2.0}, default_flip_axes=[2, 0])
    out = tmp_path / "card default"
    assert run_cli("run", image, "--model", card, "--output-dir", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["flip_axes"] == [0, 2]
    assert summary["cases"][0]["probabilities"]["lesion"] == pytest.approx(float(direct.probabilities[1]), abs=1e-6)
    out = tmp_path / "switched off"
    assert run_cli("run", image, "--model", card, "--flip-average", "none", "--output-dir", out) == 0
    assert json.loads((out / "summary.json").read_text())["options"]["flip_axes"] == []
    (tmp_path / "bad flips").mkdir()
    card = _sliding_card(tmp_path / "bad flips", default_flip_axes=[0, 3])
    with pytest.raises(AttentionMapError, match=r"default_flip_axes: expected a list of distinct model-input axes "
                                                r"among 0, 1, 2 \(e.g. \[0, 1, 2\]: 8 flipped views\), got \[0, 3\]"):
        load_model(str(card))


def test_shift_average_lands_in_the_summary_and_equals_the_library_run(scan, tmp_path):
    from AttentionMapLib.core.volume import explain_volume
    from AttentionMapLib.models import load_model

    card = _sliding_card(tmp_path, calibration={"temperature": 2.0}, default_shift_average=True)
    image = scan / "case1.nrrd"
    volume, affine = read_volume(image)
    loaded = load_model(str(card))
    common = dict(img_size=loaded.img_size, target=1, temperature=2.0, normalize="percentile")
    direct = explain_volume(loaded.network, volume, affine, loaded.preprocessing, shift_average=True, **common)
    plain = explain_volume(loaded.network, volume, affine, loaded.preprocessing, **common)
    out = tmp_path / "card default"
    assert run_cli("run", image, "--model", card, "--output-dir", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    case = summary["cases"][0]
    assert summary["options"]["shift_average"] is True
    assert case["probabilities"]["lesion"] == pytest.approx(float(direct.probabilities[1]), abs=1e-6)
    assert case["prediction"]["rule"].endswith(", calibrated, each the mean over 7 half-patch-shifted views")
    np.testing.assert_allclose(case["peak_ras_mm"], direct.peak_ras(), atol=1e-4)
    out = tmp_path / "off"
    assert run_cli("run", image, "--model", card, "--shift-average", "off", "--output-dir", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["shift_average"] is False and "shifted" not in summary["cases"][0]["prediction"]["rule"]
    assert summary["cases"][0]["probabilities"]["lesion"] == pytest.approx(float(plain.probabilities[1]), abs=1e-6)
    assert abs(float(plain.probabilities[1]) - float(direct.probabilities[1])) > 1e-4  # the two runs differ
    with pytest.raises(SystemExit):
        run_cli("run", image, "--model", card, "--shift-average", "maybe", "--output-dir", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_default_region_is_used_shown_and_switchable_off(scan, tmp_path, capsys):
    card = _sliding_card(tmp_path, default_region={"kind": "lung_field"})
    image = scan / "case1.nrrd"
    # a cube in air has no lung field: the card's default region fails with a message naming the way out
    assert run_cli("run", image, "--model", card, "--output-dir", tmp_path / "a") == 2
    assert "no lungs found" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert run_cli("run", image, "--model", card, "--roi", "none", "--output-dir", tmp_path / "b") == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["cases"][0]["region"] is None and summary["options"]["region"] == [None]
    assert run_cli("run", image, "--model", card, "--roi", "1", "2", "3", "--output-dir", tmp_path / "c") == 2
    assert "expected six numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # one or the other (argparse usage error)
        run_cli("run", image, "--model", card, "--roi", "0", "0", "0", "5", "5", "5", "--mask", image,
                "--output-dir", tmp_path / "d")
    assert exited.value.code == 2 and "not allowed with argument --roi" in capsys.readouterr().err


def test_run_holds_one_case_at_a_time_so_its_memory_does_not_grow_with_the_inputs(random_card, tmp_path):
    """Peak numpy memory (tracemalloc, which numpy reports its buffers to) of a run over four inputs stays within
    a small margin of a run over one: each case's volume, attention and resampled map are freed once its maps are
    written, and the overlays and the shared scale need only each case's planes and value range."""
    import tracemalloc

    shape = (160, 144, 72)  # each case: 3.3 MB of int16 input and 6.6 MB of map on its grid
    rng = np.random.default_rng(3)
    inputs = []
    for index in range(4):
        volume = rng.integers(-1000, 400, shape).astype(np.int16)
        inputs.append(tmp_path / f"case{index}.nrrd")
        write_volume(inputs[-1], volume, oblique_affine())
    case_bytes = np.prod(shape) * (2 + 4)

    def peak(paths) -> int:
        out = tmp_path / f"out{len(paths)}"
        tracemalloc.start()
        try:
            assert run_cli("run", *paths, "--model", random_card, "--resample", "--normalize", "none",
                           "--output-dir", out) == 0
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    one, four = peak(inputs[:1]), peak(inputs)
    assert four - one < 0.5 * case_bytes, (one, four, case_bytes)
    summary = json.loads((tmp_path / "out4" / "summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == [f"case{i}" for i in range(4)]
    low, high = summary["colour_scale"]
    for index in range(4):  # every case's map lies on the shared scale kept as two numbers per case
        grid = read_volume(tmp_path / "out4" / f"case{index}_attention_resampled.nrrd")[0]
        assert low <= grid.min() and grid.max() <= high
