"""AttentionMapLib.worker: the worker process the Slicer module runs the network in.

Real worker processes (started as the module starts them), a real MONAI ViT loaded from a model
card on disk, real explain_volume / fuse_again / score_volume compared with the same calls made here.
Crash, kill, timeout and parent-death tests check that no process survives.
"""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest
import torch

from AttentionMapLib import AttentionMapError, worker
from AttentionMapLib import worker_protocol as protocol
from AttentionMapLib.core.attention_grid import AttentionGrid
from AttentionMapLib.core.volume import VolumeAttention, explain_volume
from AttentionMapLib.worker import CANCELLED, DONE, ERROR, LOG, PROGRESS, WorkerDied, WorkerProcess, explain_job
from AttentionMapLib.worker_process import resolve_device
from oracle import make_oracle_vit
from processes import process_gone, wait_gone

IMG_SIZE = (16, 16, 16)
PATCH = (4, 4, 4)
PREPROCESSING = {"orientation": "RAS", "spacing": None,
                 "intensity": {"a_min": 0.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
                 "spatial": {"mode": "sliding_window", "overlap": 0.0, "sw_batch_size": 1}}
ARGS = {"in_channels": 1, "img_size": list(IMG_SIZE), "patch_size": list(PATCH), "hidden_size": 16,
        "mlp_dim": 16, "num_layers": 2, "num_heads": 2, "classification": True, "num_classes": 2,
        "post_activation": None}


def write_card(folder: Path, model: torch.nn.Module) -> Path:
    torch.save(model.state_dict(), folder / "oracle.pt")
    card = {"network": {"name": "ViT", "args": ARGS}, "weights": "oracle.pt", "preprocessing": PREPROCESSING,
            "classes": ["background", "bright"], "target": 1}
    path = folder / "oracle.json"
    path.write_text(json.dumps(card))
    return path


@pytest.fixture(scope="module")
def oracle_card(tmp_path_factory):
    """A model card + weights on disk for the oracle ViT (sliding window of 16^3), and the network."""
    model = make_oracle_vit(IMG_SIZE, PATCH, classification=True, num_layers=2)
    return write_card(tmp_path_factory.mktemp("card"), model), model


@pytest.fixture(scope="module")
def shared():
    """One worker process for the tests that do not kill it (one torch thread: the machine is shared)."""
    process = WorkerProcess(threads=1)
    yield process
    process.close()


def volume(windows_along_i: int = 2):
    """(16 * windows) x 16 x 16 voxels, anisotropic, a bright block: that many windows of 16^3 along I."""
    array = np.full((16 * windows_along_i, 16, 16), 0.1, np.float32)
    array[22:26, 4:8, 8:12] = 1.0
    affine = np.diag([1.0, 1.2, 1.5, 1.0])
    affine[:3, 3] = (10.0, -5.0, 3.0)
    return array, affine


def oblique_grid_over(affine: np.ndarray, shape: tuple, target_shape: tuple) -> np.ndarray:
    """ijk_to_ras of a grid rotated 30 degrees about S and 20 about R, spacing (0.8, 1.3, 2.1) mm, of
    `target_shape`, centred on the volume (`affine`, `shape`)."""
    a, b = np.radians(30), np.radians(20)
    about_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_r = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    oblique = np.eye(4)
    oblique[:3, :3] = about_s @ about_r @ np.diag([0.8, 1.3, 2.1])
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]
    oblique[:3, 3] = centre - oblique[:3, :3] @ ((np.asarray(target_shape) - 1) / 2.0)
    return oblique


def events_until_final(job, seconds: float = 120.0):
    events, deadline = [], time.monotonic() + seconds
    while not job.finished and time.monotonic() < deadline:
        events += job.poll()
        time.sleep(0.01)
    assert job.finished, f"no final event within {seconds} s: {events}"
    return events


# ---------------------------------------------------------------- protocol

def connection_pair():
    left, right = socket.socketpair()
    return Connection(left.detach()), Connection(right.detach())


def test_protocol_carries_numbers_and_refuses_objects(tmp_path):
    a, b = connection_pair()
    grid = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    protocol.send(a, {"event": "done", "value": {"n": np.int64(3), "x": np.float32(0.5)}},
                  {"grid": grid, "empty": np.zeros((0, 3)), "mask": grid > 5})
    header, arrays = protocol.receive(b)
    assert header == {"event": "done", "value": {"n": 3, "x": 0.5}}
    np.testing.assert_array_equal(arrays["grid"], grid)
    assert arrays["grid"].dtype == np.float32 and arrays["empty"].shape == (0, 3)
    np.testing.assert_array_equal(arrays["mask"], grid > 5)
    with pytest.raises(TypeError, match="not plain data"):
        protocol.send(a, {"value": object()})
    # a peer announcing an object array or sending something that is not JSON is refused
    a.send_bytes(json.dumps({"arrays": [{"name": "x", "dtype": "|O", "shape": [1]}]}).encode())
    with pytest.raises(protocol.ProtocolError, match="only numbers"):
        protocol.receive(b)
    a.send_bytes(b"\x80\x04 a pickle")
    with pytest.raises(protocol.ProtocolError, match="not JSON"):
        protocol.receive(b)
    # inputs on disk: numbers only, deleted once read
    path = protocol.save_input(grid, str(tmp_path), "input")
    np.testing.assert_array_equal(protocol.load_input(path), grid)
    assert not os.path.exists(path)
    np.save(tmp_path / "objects.npy", np.array([{"code": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        protocol.load_input(str(tmp_path / "objects.npy"))
    with pytest.raises(AttentionMapError, match="numeric"):
        protocol.save_input(np.array(["a"], dtype=object), str(tmp_path), "bad")


def test_an_applied_region_crosses_exactly_as_packed_bits():
    """region_message / region_from_message through a real connection: the voxel mask (5 x 3 x 7 = 105 voxels, not
    a multiple of 8) comes back equal in one byte per 8 voxels, with its geometry, tokens and counts."""
    from AttentionMapLib.core.region import AppliedRegion

    rng = np.random.default_rng(2)
    affine = np.diag([1.1, 0.9, 1.6, 1.0])
    affine[:3, 3] = (4.0, -2.0, 7.0)
    region = AppliedRegion(description="ROI (oblique)", name="ROI", voxels=rng.random((5, 3, 7)) > 0.5,
                           ijk_to_ras=affine, tokens=rng.random((2, 1, 3)) > 0.5, windows_run=3, windows_skipped=1)
    fields, arrays = protocol.region_message(region)
    assert arrays["region_voxels"].nbytes == 14  # ceil(105 / 8)
    a, b = connection_pair()
    protocol.send(a, {"region": fields}, arrays)
    header, received = protocol.receive(b)
    back = protocol.region_from_message(header["region"], received)
    assert back.voxels.dtype == bool and np.array_equal(back.voxels, region.voxels)
    assert np.array_equal(back.tokens, region.tokens) and np.array_equal(back.ijk_to_ras, affine)
    assert back.summary() == region.summary() and back.description == region.description
    assert protocol.region_message(None) == (None, {}) and protocol.region_from_message(None, {}) is None


# ---------------------------------------------------------------- jobs against direct calls

def test_explain_job_equals_a_direct_run_and_the_callers_array_is_free(oracle_card, shared):
    path, model = oracle_card
    array, affine = volume()
    original = array.copy()
    job = explain_job(str(path), array, affine, {"method": "rollout", "target": "bright"}, device="cpu",
                      worker=shared)
    array[:] = 0.0  # the caller changes its array once the job was started: the worker has its own
    final = job.wait(120)
    assert final.kind == DONE, final.value
    direct = explain_volume(model, original, affine, PREPROCESSING, img_size=IMG_SIZE, target=1)
    result = final.value
    np.testing.assert_allclose(result.attention.grid, direct.grid, atol=1e-6)
    np.testing.assert_allclose(result.attention.ijk_to_ras, direct.ijk_to_ras)
    np.testing.assert_allclose(result.attention.peak_ras(), direct.peak_ras())
    shape, oblique = (37, 19, 9), oblique_grid_over(affine, array.shape, (37, 19, 9))
    on_oblique = result.attention.resample_to(shape, oblique)
    assert on_oblique.shape == shape and on_oblique.max() > 0.5  # the grid lies over the map's bright part
    np.testing.assert_allclose(on_oblique, direct.resample_to(shape, oblique), atol=1e-6)
    np.testing.assert_allclose(result.attention.probabilities, direct.probabilities, atol=1e-6)
    assert result.model.classes == ["background", "bright"] and result.model.device == "cpu"
    assert (result.model.num_layers, result.model.num_heads) == (2, 2)
    assert result.attention.num_windows == 2 and result.attention.target == 1
    assert sorted(os.listdir(shared.folder)) == [".owner", "worker.log"]  # the input file was read and removed


def oblique_case():
    """An oblique (30 deg about S, 20 about R), anisotropic (1.1 x 0.9 x 1.6 mm), non-cubic 36 x 20 x 18 volume with a
    bright block, and an oblique box region (axes 25 deg about A) around the block that cuts through tokens."""
    from AttentionMapLib.core.geometry import apply_affine, rotation

    array = np.full((36, 20, 18), 0.1, np.float32)
    array[22:28, 6:10, 8:12] = 1.0
    affine = np.eye(4)
    affine[:3, :3] = rotation(2, 30.0) @ rotation(0, 20.0) @ np.diag([1.1, 0.9, 1.6])
    affine[:3, 3] = (10.0, -5.0, 3.0)
    region = {"kind": "box", "centre_ras": apply_affine(affine, [23.0, 8.5, 9.5]).tolist(),
              "size_mm": [15.0, 11.0, 13.0], "axes": rotation(1, 25.0).tolist(), "name": "ROI"}
    return array, affine, region


def test_a_region_reaches_the_gui_side_resample_and_segment_statistics_match_the_worker(oracle_card, shared,
                                                                                        slicer_scene):
    """With an oblique box region, the worker's plain-data result resamples (on the volume's own grid and on an
    oblique grid) exactly as the in-process VolumeAttention: 0 outside the region, non-zero inside; a re-fusion
    keeps the region; segment statistics on a real scene give the same table for both."""
    from AttentionMapLib import mrml
    from AttentionMapLib.core.geometry import resample_grid
    from AttentionMapLib.core.region import region_from_spec
    from test_mrml import _labelmap, add_volume

    path, model = oracle_card
    array, affine, spec = oblique_case()
    final = explain_job(str(path), array, affine, {"method": "rollout"}, device="cpu", worker=shared,
                        region=spec).wait(120)
    assert final.kind == DONE, final.value
    gui = final.value.attention
    direct = explain_volume(model, array, affine, PREPROCESSING, img_size=IMG_SIZE, target=1,
                            region=region_from_spec(spec, None))
    np.testing.assert_allclose(gui.grid, direct.grid, atol=1e-6)
    assert np.array_equal(gui.region.voxels, direct.region.voxels) and gui.region.summary() == direct.region.summary()
    refused = worker.fuse_again_job(gui, {"method": "raw", "layer": 0}, worker=shared).wait(60)
    assert refused.kind == DONE, refused.value
    assert refused.value.region is gui.region  # the region is not sent again: the GUI keeps it
    again = direct.fuse_again(method="raw", layer=0)
    oblique = (41, 23, 15)
    for shape, target in ((array.shape, affine), (oblique, oblique_grid_over(affine, array.shape, oblique))):
        inside = direct.region.on_grid(shape, target)
        assert inside.sum() > 200 and (~inside).sum() > 200
        for worker_result, in_process in ((gui, direct), (refused.value, again)):
            values = worker_result.resample_to(shape, target)
            np.testing.assert_allclose(values, in_process.resample_to(shape, target), atol=1e-6)
            assert np.all(values[~inside] == 0.0) and (values[inside] > 0).mean() > 0.5
            spill = resample_grid(worker_result.grid, worker_result.ijk_to_ras, shape, target)
            assert spill[~inside].max() > 0.05  # without the region the trilinear spill shows outside it
    # segment statistics in the scene: one segment across the region's edge, one inside it
    scene = slicer_scene.scene
    ct = add_volume(scene, array, affine)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "findings")
    for name, box in (("across the edge", (slice(14, 30), slice(2, 14), slice(4, 16))),
                      ("inside", (slice(21, 26), slice(6, 11), slice(8, 12)))):
        mask = np.zeros(array.shape, np.uint8)
        mask[box] = 1
        segmentation.AddSegmentFromBinaryLabelmapRepresentation(_labelmap(mask, affine), name, [1.0, 0.0, 0.0])
    tables = {name: mrml.read_table(mrml.segment_statistics(attention, segmentation, ct))
              for name, attention in (("gui", gui), ("direct", direct), ("unmasked", dataclasses.replace(gui,
                                                                                                      region=None)))}
    for segment in ("across the edge", "inside"):
        for key in mrml.STATISTICS_COLUMNS:
            assert tables["gui"][segment][key] == pytest.approx(tables["direct"][segment][key], rel=1e-5, abs=1e-7)
    assert tables["unmasked"]["across the edge"]["mean"] != pytest.approx(tables["gui"]["across the edge"]["mean"],
                                                                          rel=1e-3)


GUI_STATISTICS = """
import json, sys
import numpy as np
import slicer, vtk
from vtk.util import numpy_support
from AttentionMapLib import mrml, worker

array, affine, mask = (np.load(sys.argv[1])[key] for key in ("array", "affine", "mask"))
region = json.loads(sys.argv[3])
process = worker.WorkerProcess(threads=1)
try:
    final = worker.explain_job(sys.argv[2], array, affine, {"method": "rollout"}, device="cpu", worker=process,
                               region=region).wait(120)
finally:
    process.close()
attention = final.value.attention
values = attention.resample_to(array.shape, affine)
scene, app = mrml.headless_scene()
ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
slicer.util.updateVolumeFromArray(ct, np.ascontiguousarray(array.transpose(2, 1, 0)))
ct.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(affine))
image = slicer.vtkOrientedImageData()
image.SetExtent(0, mask.shape[0] - 1, 0, mask.shape[1] - 1, 0, mask.shape[2] - 1)
image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.transpose(2, 1, 0).ravel()
image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(affine))
segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "findings")
segmentation.AddSegmentFromBinaryLabelmapRepresentation(image, "across the edge", [1.0, 0.0, 0.0])
table = mrml.read_table(mrml.segment_statistics(attention, segmentation, ct))
print(json.dumps({"torch": "torch" in sys.modules, "monai": "monai" in sys.modules, "values_sum": float(values.sum()),
                  "table": table}))
"""


def test_gui_side_statistics_with_a_region_never_import_torch(oracle_card, tmp_path):
    """The Slicer process's path in a fresh Python: an explain job in a worker, then AttentionData.resample_to and
    mrml.segment_statistics on a slicer-core scene. torch and MONAI are never imported there (only in the worker),
    and the numbers equal the in-process VolumeAttention's."""
    from AttentionMapLib.core.region import region_from_spec

    path, model = oracle_card
    array, affine, spec = oblique_case()
    mask = np.zeros(array.shape, np.uint8)
    mask[14:30, 2:14, 4:16] = 1
    np.savez(tmp_path / "case.npz", array=array, affine=affine, mask=mask)
    result = subprocess.run([sys.executable, "-c", GUI_STATISTICS, str(tmp_path / "case.npz"), str(path),
                             json.dumps(spec)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": worker.PACKAGE_PARENT})
    assert result.returncode == 0, result.stderr[-3000:]
    gui = json.loads(result.stdout.strip().splitlines()[-1])
    assert gui["torch"] is False and gui["monai"] is False
    direct = explain_volume(model, array, affine, PREPROCESSING, img_size=IMG_SIZE, target=1,
                            region=region_from_spec(spec, None))
    values = direct.resample_to(array.shape, affine)
    assert gui["values_sum"] == pytest.approx(float(values.sum()), rel=1e-5)
    from AttentionMapLib.core.metrics import mask_statistics

    expected = mask_statistics(values, mask.astype(bool))
    for key, value in gui["table"]["across the edge"].items():
        assert value == pytest.approx(float(expected[key]), rel=1e-5, abs=1e-7), key


def test_the_engine_and_the_worker_results_share_one_definition_of_the_result_fields():
    """VolumeAttention and worker.AttentionData derive from core.attention_grid.AttentionGrid: its fields
    come first in both, neither repeats them, and peak_ras / resample_to (with its region mask) are the base's."""
    shared_names = [f.name for f in dataclasses.fields(AttentionGrid)]
    assert shared_names[:2] == ["grid", "ijk_to_ras"] and shared_names[-1] == "region" and len(shared_names) == 18
    for subclass, own in ((VolumeAttention, {"window_probabilities", "decisive_window", "window_centres_ras",
                                             "temperature", "domain", "window_eligible", "segmentation",
                                             "segmentation_ijk_to_ras", "_tiling"}),
                          (worker.AttentionData, {"result_id", "prediction"})):
        assert issubclass(subclass, AttentionGrid) and subclass.__dataclass_params__.frozen
        names = [f.name for f in dataclasses.fields(subclass)]
        assert names[:len(shared_names)] == shared_names and set(names[len(shared_names):]) == own, subclass
        assert not set(vars(subclass).get("__annotations__", {})) & set(shared_names), subclass
    assert worker.AttentionData.peak_ras is AttentionGrid.peak_ras is VolumeAttention.peak_ras
    assert worker.AttentionData.resample_to is AttentionGrid.resample_to is VolumeAttention.resample_to


def test_progress_log_and_the_cards_default_target(oracle_card, shared):
    path, _ = oracle_card
    job = explain_job(str(path), *volume(), {"method": "grad_rollout"}, device="auto", worker=shared)
    events = events_until_final(job)
    assert [e.kind for e in events if e.kind != LOG] == [PROGRESS, PROGRESS, DONE]
    assert events[-1].value.attention.target == 1  # the card's "target": 1
    assert job.poll() == [] and job.wait(1).kind == DONE
    # the model stays loaded in the worker: a second job logs no second "Loaded model"
    second = events_until_final(explain_job(str(path), *volume(), {}, device="cpu", worker=shared))
    assert not any(e.kind == LOG and "Loaded model" in e.value for e in second)


def test_fuse_again_job_equals_fuse_again_in_this_process(oracle_card, shared):
    path, model = oracle_card
    array, affine = volume()
    result = explain_job(str(path), array, affine, {"normalize": "minmax"}, device="cpu", worker=shared).wait(120).value
    attention = explain_volume(model, array, affine, PREPROCESSING, img_size=IMG_SIZE, target=1, normalize="minmax")
    options = {"method": "raw", "layer": 0, "discard_ratio": 0.3, "query_ras": attention.peak_ras()}
    final = worker.fuse_again_job(result.attention, options, worker=shared).wait(60)
    assert final.kind == DONE, final.value
    expected = attention.fuse_again(**options)
    np.testing.assert_allclose(final.value.grid, expected.grid, atol=1e-6)
    np.testing.assert_allclose(final.value.query_ras, attention.peak_ras())
    assert final.value.method == "raw" and final.value.timings["forward"] == 0.0
    assert final.value.result_id == result.attention.result_id
    bad = worker.fuse_again_job(result.attention, {"method": "nonsense"}, worker=shared).wait(60)
    assert bad.kind == ERROR and isinstance(bad.value, AttentionMapError) and "method" in str(bad.value)
    assert "Traceback" in bad.detail
    # another explanation replaces the cached one: re-fusing the old result is refused clearly
    explain_job(str(path), array, affine, {}, device="cpu", worker=shared).wait(120)
    stale = worker.fuse_again_job(result.attention, {"layer": 0}, worker=shared).wait(60)
    assert stale.kind == ERROR and "press Apply" in str(stale.value)


def test_flip_averaging_crosses_the_worker_and_its_re_fusion(oracle_card, shared):
    path, model = oracle_card
    array, affine = volume()
    final = explain_job(str(path), array, affine, {"flip_axes": (0, 1, 2), "method": "grad_rollout"}, device="cpu",
                        worker=shared).wait(120)
    assert final.kind == DONE, final.value
    attention = final.value.attention
    direct = explain_volume(model, array, affine, PREPROCESSING, img_size=IMG_SIZE, target=1, method="grad_rollout",
                            flip_axes=(0, 1, 2))
    assert attention.flip_axes == direct.flip_axes == (0, 1, 2)
    np.testing.assert_allclose(attention.grid, direct.grid, atol=1e-6)
    np.testing.assert_allclose(attention.probabilities, direct.probabilities, atol=1e-6)
    again = worker.fuse_again_job(attention, {"layer": 0}, worker=shared).wait(60)
    assert again.kind == DONE and again.value.flip_axes == (0, 1, 2)
    np.testing.assert_allclose(again.value.grid, direct.fuse_again(layer=0).grid, atol=1e-6)
    bad = explain_job(str(path), array, affine, {"flip_axes": [0, 3]}, device="cpu", worker=shared).wait(60)
    assert bad.kind == ERROR and isinstance(bad.value, AttentionMapError)
    assert str(bad.value).startswith("flip_axes: expected distinct model-input axes among 0, 1, 2")


def test_score_job_equals_score_volume_on_the_networks_device(tmp_path, shared):
    from AttentionMapLib.core.metrics import score_volume

    model = make_oracle_vit(IMG_SIZE, PATCH, classification=True, num_layers=2)
    with torch.no_grad():  # values, output projections and head made random, so the curves move
        torch.manual_seed(0)
        for block in model.blocks:
            block.attn.qkv.weight[32:].normal_()
            block.attn.out_proj.weight.normal_()
        model.classification_head.weight.normal_()
    path = write_card(tmp_path, model)
    array, affine = volume()
    result = explain_job(str(path), array, affine, {}, device="cpu", worker=shared).wait(120).value
    options = {"method": "rollout", "layer": 1, "target": 1}
    final = worker.score_job(result, (35.0, 2.0, 18.0), options, worker=shared).wait(120)
    assert final.kind == DONE, final.value
    direct = score_volume(model, array, affine, PREPROCESSING, img_size=IMG_SIZE, centre_ras=(35.0, 2.0, 18.0),
                          **options)
    assert final.value == {**direct, "device": "cpu"}  # the device the network is on, not a GUI choice
    assert len(set(np.round(direct["deletion_curve"], 6))) > 1


def test_one_job_at_a_time_and_errors_come_back(oracle_card, shared, tmp_path):
    path, _ = oracle_card
    array, affine = volume(4)
    running = explain_job(str(path), array, affine, {}, device="cpu", worker=shared)
    with pytest.raises(AttentionMapError, match="one job at a time"):
        explain_job(str(path), array, affine, {}, device="cpu", worker=shared)
    assert running.wait(120).kind == DONE
    final = explain_job(str(tmp_path / "missing.json"), array, affine, device="cpu", worker=shared).wait(60)
    assert final.kind == ERROR and isinstance(final.value, AttentionMapError) and "missing.json" in str(final.value)
    final = explain_job(str(path), array, affine, device="tpu", worker=shared).wait(60)
    assert final.kind == ERROR and "device" in str(final.value)
    with pytest.raises(AttentionMapError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(AttentionMapError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_cancel_between_windows_keeps_the_worker(oracle_card, shared):
    """Cancel after the first window: the worker stops before the last of 96 windows (enough that a loaded machine
    delaying this poll loop still cancels mid-run) and serves the next job."""
    path, _ = oracle_card
    job = explain_job(str(path), *volume(96), {}, device="cpu", worker=shared)
    events = []
    while not any(e.kind == PROGRESS for e in events):
        events += job.poll()
        time.sleep(0.005)
    job.cancel()
    events += events_until_final(job)
    assert events[-1].kind == CANCELLED
    assert sum(e.kind == PROGRESS for e in events) < 96
    assert shared.alive and job.wait(1).kind == CANCELLED
    assert explain_job(str(path), *volume(), {}, device="cpu", worker=shared).wait(120).kind == DONE


def test_cancel_during_a_score_stops_softly_and_the_same_worker_serves_the_next_job(oracle_card, shared):
    """A long score (2 x 129 forward batches) cancelled after its first batch: a cancelled event from the
    worker itself (no kill), then the same process scores the same result to the end."""
    path, _ = oracle_card
    result = explain_job(str(path), *volume(), {}, device="cpu", worker=shared).wait(120).value
    pid = shared.pid
    job = worker.score_job(result, None, {"method": "rollout", "steps": 1024}, worker=shared)
    events = []
    while not any(e.kind == PROGRESS for e in events) and not job.finished:
        events += job.poll()
        time.sleep(0.005)
    job.cancel()
    started = time.monotonic()
    events += events_until_final(job)
    assert events[-1].kind == CANCELLED and time.monotonic() - started < worker.CANCEL_GRACE_S
    assert 1 <= sum(e.kind == PROGRESS for e in events) < 258
    assert shared.alive and shared.pid == pid
    final = worker.score_job(result, None, {"method": "rollout", "steps": 4}, worker=shared).wait(120)
    assert final.kind == DONE and len(final.value["deletion_curve"]) == 5 and shared.pid == pid


def test_a_result_that_arrived_before_the_cancel_is_never_handed_out(oracle_card, shared):
    """Scene closed after the worker finished but before the GUI polled: the result is dropped."""
    path = str(oracle_card[0])
    assert explain_job(path, *volume(), {}, device="cpu", worker=shared).wait(120).kind == DONE  # model loaded
    job = explain_job(path, *volume(), {}, device="cpu", worker=shared)
    while not job._sent:
        job.poll()
    time.sleep(2.0)  # the worker runs both windows and sends its result; nobody reads it yet
    job.cancel()
    events = events_until_final(job, 60)
    assert [e.kind for e in events] == [PROGRESS, PROGRESS, CANCELLED]  # finished in the worker, dropped here
    assert shared.alive  # nothing to kill: the worker had finished


def test_the_input_is_copied_once_not_twice(oracle_card, shared):
    """explain_job writes the caller's array straight to the worker's input file: no copy in memory."""
    import tracemalloc

    array = np.random.default_rng(1).random((64, 64, 64), dtype=np.float32)  # 1 MiB
    tracemalloc.start()
    try:
        job = explain_job(str(oracle_card[0]), array, np.eye(4), {}, device="cpu", worker=shared)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < array.nbytes / 4, f"explain_job allocated {peak} bytes for a {array.nbytes}-byte input"
    job.cancel()
    job.wait(60)


def test_a_cancel_before_the_worker_got_the_job_sends_nothing(oracle_card):
    process = WorkerProcess(threads=1)
    try:
        job = explain_job(str(oracle_card[0]), *volume(), {}, device="cpu", worker=process)
        job.cancel()
        assert job.wait(30).kind == CANCELLED
        assert not [name for name in os.listdir(process.folder) if name.startswith("input")]  # removed too
    finally:
        process.close()
    assert wait_gone(process.pid)


def test_torch_threads_in_the_worker_are_set(oracle_card, monkeypatch, tmp_path):
    from AttentionMapLib.worker_process import THREADS_VARIABLE, default_threads

    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    assert default_threads() == max(1, (os.cpu_count() or 2) - 1)  # one core stays free for the GUI
    monkeypatch.setenv(THREADS_VARIABLE, "0")
    with pytest.raises(AttentionMapError, match=THREADS_VARIABLE):
        default_threads()
    monkeypatch.setenv(THREADS_VARIABLE, "1")  # the worker inherits the environment
    process = WorkerProcess()
    try:
        events = events_until_final(explain_job(str(oracle_card[0]), *volume(), {}, device="cpu", worker=process))
    finally:
        process.close()
    assert any(e.kind == LOG and "PyTorch" in e.value and " 1 thread(s)" in e.value for e in events), events
    with pytest.raises(AttentionMapError, match="no-python is not an executable file"):
        WorkerProcess(python=str(tmp_path / "no-python"))


# ---------------------------------------------------------------- crashes, kills, timeouts, orphans

@pytest.mark.parametrize("how", ["SIGKILL", "SIGSEGV"])
def test_a_worker_that_dies_mid_job_gives_one_error_and_the_next_job_works(oracle_card, how):
    path, _ = oracle_card
    first = worker.shared_worker()
    for _attempt in range(5):  # no race with a fast machine: the worker is frozen mid-job before the signal
        job = explain_job(str(path), *volume(12), {}, device="cpu")
        events = []
        while not any(e.kind == PROGRESS for e in events):  # the network is running
            events += job.poll()
        os.kill(first.pid, signal.SIGSTOP)
        events += job.poll()
        if not job.finished:  # frozen before its last window: the job is still running
            break
        os.kill(first.pid, signal.SIGCONT)
    assert not job.finished, "the job finished before the worker could be frozen, five times"
    os.kill(first.pid, getattr(signal, how))
    os.kill(first.pid, signal.SIGCONT)  # a stopped process takes SIGSEGV once it runs again
    events += events_until_final(job, 30)
    finals = [e for e in events if e.kind in worker.FINAL_KINDS]
    assert len(finals) == 1 and finals[0].kind == ERROR and isinstance(finals[0].value, WorkerDied)
    assert how in str(finals[0].value) and "next run starts a fresh one" in str(finals[0].value)
    if how == "SIGSEGV":  # faulthandler wrote where it crashed into the log, the error's details
        assert "Segmentation fault" in finals[0].detail
    assert wait_gone(first.pid) and not os.path.exists(first.folder)
    job = explain_job(str(path), *volume(), {}, device="cpu")
    assert job.wait(120).kind == DONE and worker.shared_worker().pid != first.pid
    worker.stop_shared_worker()


def test_timeout_kills_the_worker_and_the_processes_it_started(tmp_path, oracle_card):
    """A trusted bundle whose config starts a child process and hangs: the job's timeout kills both."""
    folder = tmp_path / "bundle"
    (folder / "configs").mkdir(parents=True)
    pid_file = tmp_path / "child.pid"
    hang = (f"$open({str(pid_file)!r}, 'w').write(str(__import__('subprocess').Popen(['sleep', '300']).pid)) "
            "and __import__('time').sleep(300)")
    config = {"hang": hang, "network_def": {"_target_": "monai.networks.nets.ViT", **ARGS, "_requires_": "@hang"}}
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    process = WorkerProcess(threads=1)
    assert explain_job(str(oracle_card[0]), *volume(), {}, device="cpu", worker=process).wait(120).kind == DONE
    job = explain_job(str(folder), *volume(), {}, trust_bundle=True, device="cpu", worker=process, timeout=4.0)
    final = job.wait(60)
    assert final.kind == ERROR and isinstance(final.value, TimeoutError) and "4 s" in str(final.value)
    child = int(pid_file.read_text())
    assert wait_gone(process.pid) and wait_gone(child), "a process survived the hard stop"


def test_a_cancel_the_worker_cannot_honour_kills_it(tmp_path, oracle_card, monkeypatch):
    """Cancel during a step without cancel checks (here: a hanging bundle load): hard stop after the grace."""
    monkeypatch.setattr(worker, "CANCEL_GRACE_S", 1.0)
    folder = tmp_path / "bundle"
    (folder / "configs").mkdir(parents=True)
    started = tmp_path / "hanging"  # written by the config just before it hangs
    config = {"hang": f"$open({str(started)!r}, 'w').close() or __import__('time').sleep(300)",
              "network_def": {"_target_": "monai.networks.nets.ViT", **ARGS, "_requires_": "@hang"}}
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    process = WorkerProcess(threads=1)
    job = explain_job(str(folder), *volume(), {}, trust_bundle=True, device="cpu", worker=process)
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:  # cancel only once the worker hangs
        job.poll()
        time.sleep(0.01)
    assert started.exists(), "the bundle load never started"
    job.cancel()
    assert job.wait(60).kind == CANCELLED
    assert wait_gone(process.pid)


def test_the_worker_exits_when_its_parent_dies():
    """A parent (standing in for Slicer) killed with SIGKILL gets no cleanup: its worker ends by itself."""
    script = textwrap.dedent("""
        import sys, time
        from AttentionMapLib.worker import WorkerProcess
        process = WorkerProcess(threads=1)
        while process.connection() is None:
            time.sleep(0.01)
        print(process.pid, process.folder, flush=True)
        time.sleep(300)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([worker.PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pid, folder = parent.stdout.readline().split()
        worker_pid = int(pid)
        assert not process_gone(worker_pid) and os.path.isdir(folder)
    finally:
        parent.kill()
        parent.wait()
    assert wait_gone(worker_pid, 15), "the worker outlived its parent"
    assert not os.path.exists(folder)  # the worker removed the scratch folder its parent could not


def test_stopping_the_shared_worker_leaves_no_process(oracle_card):
    job = explain_job(str(oracle_card[0]), *volume(), {}, device="cpu")
    pid = worker.shared_worker().pid
    assert job.wait(120).kind == DONE
    worker.stop_shared_worker()
    assert wait_gone(pid)


# ---------------------------------------------------------------- Slicer's event loop, emulated

def emulated_slicer_loop(start_job):
    """Run a job as the module does inside Slicer: the main thread idles in C *holding the GIL* for
    100 ms (PythonQt with thread support off: Qt's event loop never releases it), then the QTimer
    callback polls. Returns the final event (a hang fails after 300 s, a bound for hangs, not a timing)."""
    import ctypes

    sleep_holding_the_gil = ctypes.PyDLL(None).usleep
    start = time.monotonic()
    job = start_job()
    final = None
    while final is None:
        sleep_holding_the_gil(100_000)
        final = next((e for e in job.poll() if e.kind in worker.FINAL_KINDS), None)
        assert time.monotonic() - start < 300, "the job did not finish inside the emulated event loop"
    return final


def test_explain_fuse_again_and_score_finish_inside_slicers_event_loop(shared):
    """Explain, re-fusion and score finish, with the same results as when the caller just waits, while the main
    thread is blocked the way Slicer blocks it (holding the GIL in C between polls).

    The thread-based job this worker process replaced never finished so: its thread ran only while the main thread
    was in Python, a few microseconds per 100 ms (0.4 s of work had not finished after 38 s). How long each takes
    in the loop against waiting is measured by `benchmarks/bench_worker.py`, not asserted here (a busy machine
    makes any bound flaky)."""
    array = np.random.default_rng(0).normal(0.0, 300.0, (120, 120, 96)).astype(np.float32)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    result = explain_job("demo", array, affine, {}, device="cpu", worker=shared,  # loads the model
                         region="none").wait(300).value  # noise, not a chest CT: no lung field
    starts = {
        "explain": lambda: explain_job("demo", array, affine, {"method": "rollout"}, device="cpu", worker=shared,
                                       region="none"),
        "fuse_again": lambda: worker.fuse_again_job(result.attention, {"method": "raw", "layer": 1}, worker=shared),
        "score": lambda: worker.score_job(result, None, {"method": "rollout", "target": 1}, worker=shared),
    }
    for name in ("fuse_again", "score", "explain"):  # explain last: it replaces the worker's cached result
        start_job = starts[name]
        waited_final = start_job().wait(300)
        assert waited_final.kind == DONE, (name, waited_final.value)
        final = emulated_slicer_loop(start_job)
        assert final.kind == DONE, (name, final.value)
        if name == "score":
            assert final.value["deletion_auc"] == waited_final.value["deletion_auc"]
        else:
            np.testing.assert_allclose(final.value.grid if name == "fuse_again" else final.value.attention.grid,
                                       waited_final.value.grid if name == "fuse_again"
                                       else waited_final.value.attention.grid, atol=1e-6)


def test_region_mask_and_box_reach_the_worker_and_the_prediction_comes_back(oracle_card, shared):
    """A mask region (its array sent as a scratch file) and a box region give the worker's explain_volume
    the same result as a direct run with that region; the volume-level prediction and region come back."""
    from AttentionMapLib.core.region import BoxRegion, MaskRegion

    path, model = oracle_card
    array, affine = volume()
    mask = np.zeros(array.shape, np.uint8)
    mask[20:28, 2:10, 6:14] = 1  # only the second window (I 16..31) holds it
    for spec, region in (({"kind": "mask", "mask": mask, "ijk_to_ras": affine, "name": "nodule"},
                          MaskRegion(mask, affine, "nodule")),
                         ({"kind": "box", "centre_ras": [33.0, 2.0, 18.0], "size_mm": [6.0, 6.0, 6.0], "name": "ROI"},
                          BoxRegion((33.0, 2.0, 18.0), (6.0, 6.0, 6.0), None, "ROI"))):
        final = explain_job(str(path), array, affine, {"method": "rollout"}, device="cpu", worker=shared,
                            region=spec).wait(120)
        assert final.kind == DONE, final.value
        direct = explain_volume(model, array, affine, PREPROCESSING, img_size=IMG_SIZE, target=1, region=region)
        attention = final.value.attention
        np.testing.assert_allclose(attention.grid, direct.grid, atol=1e-6)
        assert attention.num_windows == direct.num_windows == 1
        assert attention.region.summary() == direct.region.summary() and attention.region.windows_skipped == 1
        assert np.array_equal(attention.region.voxels, direct.region.voxels)
        assert attention.prediction == direct.prediction(["background", "bright"])
        assert sorted(os.listdir(shared.folder)) == [".owner", "worker.log"]  # input and mask read and removed
    final = explain_job(str(path), array, affine, {}, device="cpu", worker=shared, region="none").wait(120)
    assert final.value.attention.region is None and final.value.attention.num_windows == 2


def test_the_demo_card_refuses_a_scan_without_lungs_in_the_worker_and_keeps_serving(shared):
    """The worker runs the demo card's domain: a scan without lungs is refused by the default region with the
    message the module shows; switched off, the result arrives with no confident answer and the input statement."""
    array = np.full((96, 80, 40), 40.0, dtype=np.float32)  # soft tissue with a gas-filled loop: no lung
    array[30:60, 30:50, 10:30] = -1000.0
    affine = np.diag([1.2, 1.4, 3.0, 1.0])
    refused = explain_job("demo", array, affine, {"shift_average": "off", "flip_axes": "none"}, device="cpu",
                          worker=shared).wait(300)
    assert refused.kind == ERROR and "no lungs found" in str(refused.value) and "chest CT" in str(refused.value)
    done = explain_job("demo", array, affine, {"shift_average": "off", "flip_axes": "none"}, device="cpu",
                       worker=shared, region="none").wait(300)
    assert done.kind == DONE, done.value
    prediction = done.value.attention.prediction
    assert prediction["probability"] is None and prediction["confident"] is False
    assert prediction["domain"]["summary"].startswith("unlike the training scans: no lungs")


def test_a_segment_target_reaches_the_worker_as_a_mask_a_box_or_the_networks_own_labels(tmp_path, shared):
    """Why this segment in the worker: the same result as explain_volume with the SegmentTarget, for a mask (sent
    as a scratch file and removed), a box, and the network's own labels of the class."""
    from monai.networks.nets import UNETR

    from AttentionMapLib.core.region import BoxRegion, MaskRegion
    from AttentionMapLib.core.segment import SegmentTarget

    args = {"in_channels": 1, "out_channels": 2, "img_size": list(IMG_SIZE), "feature_size": 8, "hidden_size": 32,
            "mlp_dim": 32, "num_heads": 2}
    torch.manual_seed(0)
    model = UNETR(**{**args, "img_size": IMG_SIZE}).eval()
    torch.save(model.state_dict(), tmp_path / "unetr.pt")
    card = {"network": {"name": "UNETR", "args": args}, "weights": "unetr.pt", "preprocessing": PREPROCESSING,
            "classes": ["background", "lesion"]}
    (tmp_path / "unetr.json").write_text(json.dumps(card))
    array, affine = volume()
    mask = np.zeros(array.shape, np.uint8)
    mask[20:28, 2:10, 6:14] = 1  # only the second window holds it
    cases = [({"class": "lesion", "region": {"kind": "mask", "mask": mask, "ijk_to_ras": affine, "name": "lesion"}},
              SegmentTarget(1, MaskRegion(mask, affine, "lesion")), 1),
             ({"class": 1, "region": {"kind": "box", "centre_ras": [33.0, 2.0, 18.0], "size_mm": [6.0, 6.0, 6.0]}},
              SegmentTarget(1, BoxRegion((33.0, 2.0, 18.0), (6.0, 6.0, 6.0))), 1),
             ({"class": 1, "region": None}, SegmentTarget(1), 2)]
    for segment, target, windows in cases:
        final = explain_job(str(tmp_path / "unetr.json"), array, affine, {"method": "grad_rollout"}, device="cpu",
                            worker=shared, region="none", segment=segment).wait(120)
        assert final.kind == DONE, final.value
        direct = explain_volume(model, array, affine, PREPROCESSING, img_size=IMG_SIZE, method="grad_rollout",
                                target=target)
        attention = final.value.attention
        np.testing.assert_allclose(attention.grid, direct.grid, atol=1e-6)
        assert attention.num_windows == direct.num_windows == windows and attention.target == 1
        assert np.array_equal(final.value.labels.labels, direct.segmentation)  # the network's own labels come back
        np.testing.assert_allclose(final.value.labels.ijk_to_ras, direct.segmentation_ijk_to_ras)
        assert sorted(os.listdir(shared.folder)) == [".owner", "worker.log"]
