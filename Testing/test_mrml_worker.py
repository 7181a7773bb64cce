"""AttentionMapLib.worker: the background job runner the Slicer logic uses (no Qt, no MRML in the
thread). Real threads, a real MONAI ViT loaded from a real model card, real explain_volume."""
import json
import threading

import numpy as np
import pytest
import torch

from AttentionMapLib import AttentionMapError, Cancelled
from AttentionMapLib.volume import explain_volume
from AttentionMapLib.worker import (CANCELLED, DONE, ERROR, PROGRESS, BackgroundJob, ModelCache, explain_job,
                                    refuse_job, resolve_device)
from oracle import make_oracle_vit

IMG_SIZE = (16, 16, 16)
PATCH = (4, 4, 4)
PREPROCESSING = {"orientation": "RAS", "spacing": None,
                 "intensity": {"a_min": 0.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
                 "spatial": {"mode": "sliding_window", "overlap": 0.0, "sw_batch_size": 1}}


@pytest.fixture(scope="module")
def oracle_card(tmp_path_factory):
    """A model card + weights on disk for the oracle ViT (sliding window of 16^3, 4 windows)."""
    folder = tmp_path_factory.mktemp("card")
    model = make_oracle_vit(IMG_SIZE, PATCH, classification=True, num_layers=2)
    torch.save(model.state_dict(), folder / "oracle.pt")
    args = {"in_channels": 1, "img_size": list(IMG_SIZE), "patch_size": list(PATCH), "hidden_size": 16,
            "mlp_dim": 16, "num_layers": 2, "num_heads": 2, "classification": True, "num_classes": 2,
            "post_activation": None}
    card = {"network": {"name": "ViT", "args": args}, "weights": "oracle.pt", "preprocessing": PREPROCESSING,
            "classes": ["background", "bright"], "target": 1}
    path = folder / "oracle.json"
    path.write_text(json.dumps(card))
    return path, model


def volume():
    """32 x 16 x 16 voxels, anisotropic: two sliding windows of 16^3 (overlap 0) along I."""
    array = np.full((32, 16, 16), 0.1, np.float32)
    array[22:26, 4:8, 8:12] = 1.0
    affine = np.diag([1.0, 1.2, 1.5, 1.0])
    affine[:3, 3] = (10.0, -5.0, 3.0)
    return array, affine


def test_job_reports_progress_then_result():
    def work(progress, is_cancelled):
        for step in range(3):
            progress((step + 1) / 3)
        return threading.current_thread().name

    job = BackgroundJob(work, name="worker-test").start()
    final = job.wait(30)
    assert final.kind == DONE and final.value == "worker-test"  # ran off the caller's thread
    assert job.finished and job.poll() == []


def test_poll_returns_events_in_order_without_blocking():
    release = threading.Event()

    def work(progress, is_cancelled):
        progress(0.5)
        release.wait(30)
        return 42

    job = BackgroundJob(work).start()
    events = []
    while not events:
        events = job.poll()
    assert [e.kind for e in events] == [PROGRESS] and not job.finished
    release.set()
    job.wait(30)
    assert job.finished


def test_error_is_handed_back_with_its_traceback():
    def work(progress, is_cancelled):
        raise AttentionMapError("volume: expected 3D")

    final = BackgroundJob(work).start().wait(30)
    assert final.kind == ERROR and isinstance(final.value, AttentionMapError)
    assert "volume: expected 3D" in final.detail and "Traceback" in final.detail


def test_cancel_is_reported_even_if_the_function_finishes():
    started, release = threading.Event(), threading.Event()

    def work(progress, is_cancelled):
        started.set()
        release.wait(30)
        if is_cancelled():
            raise Cancelled("stopped")
        return "finished"

    job = BackgroundJob(work).start()
    started.wait(30)
    job.cancel()
    release.set()
    assert job.wait(30).kind == CANCELLED

    def ignores_cancel(progress, is_cancelled):
        started.wait(30)
        return "result nobody should apply"

    job = BackgroundJob(ignores_cancel)
    job.cancel()
    assert job.start().wait(30).kind == CANCELLED


def test_explain_job_equals_a_direct_run_and_copies_its_input(oracle_card):
    path, model = oracle_card
    array, affine = volume()
    original = array.copy()
    job = explain_job(str(path), array, affine, {"method": "rollout", "target": "bright"}, device="cpu")
    array[:] = 0.0  # the caller changes its array while the job runs: the job has its own copy
    final = job.wait(120)
    assert final.kind == DONE, final.detail
    direct = explain_volume(model, original, affine, PREPROCESSING, img_size=IMG_SIZE, target=1)
    np.testing.assert_allclose(final.value.attention.grid, direct.grid, atol=1e-6)
    np.testing.assert_allclose(final.value.attention.ijk_to_ras, direct.ijk_to_ras)
    assert final.value.model.classes == ["background", "bright"]
    assert final.value.attention.num_windows == 2


def test_explain_job_reports_progress_and_uses_the_cards_default_target(oracle_card):
    path, _ = oracle_card
    cache = ModelCache()
    job = explain_job(str(path), *volume(), {"method": "grad_rollout"}, device="auto", cache=cache)
    final = job.wait(120)
    assert final.kind == DONE, final.detail
    assert final.value.attention.target == 1  # the card's "target": 1
    # progress events were posted before the result (drained by wait: count them via a fresh job)
    job = explain_job(str(path), *volume(), {}, device="cpu", cache=cache)
    kinds = []
    while not job.finished:
        kinds += [e.kind for e in job.poll()]
    assert kinds.count(PROGRESS) == 2 and kinds[-1] == DONE
    assert cache.get(str(path), False, "cpu") is job.wait(1).value.model  # loaded once, reused


def test_cancel_stops_within_one_window(oracle_card):
    """Cancel pressed while the first window runs: the second window never starts."""
    path, model = oracle_card
    array, affine = volume()
    windows_done = []

    def work(progress, is_cancelled):
        def report(fraction):
            windows_done.append(fraction)
            job.cancel()  # the user presses Cancel as soon as the first window is done
            progress(fraction)
        return explain_volume(model, array, affine, PREPROCESSING, img_size=IMG_SIZE,
                              progress=report, cancel=is_cancelled)

    job = BackgroundJob(work)
    assert job.start().wait(120).kind == CANCELLED
    assert windows_done == [0.5]


def test_bad_model_source_and_device_come_back_as_errors(tmp_path):
    array, affine = volume()
    final = explain_job(str(tmp_path / "missing.json"), array, affine, device="cpu").wait(60)
    assert final.kind == ERROR and isinstance(final.value, AttentionMapError)
    assert "missing.json" in str(final.value)
    with pytest.raises(AttentionMapError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(AttentionMapError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_refuse_job_equals_refuse_on_the_callers_thread(oracle_card):
    _, model = oracle_card
    array, affine = volume()
    attention = explain_volume(model, array, affine, PREPROCESSING, img_size=IMG_SIZE)
    options = {"method": "raw", "layer": 0, "discard_ratio": 0.3, "query_ras": attention.peak_ras()}
    final = refuse_job(attention, options).wait(60)
    assert final.kind == DONE, final.detail
    expected = attention.refuse(**options)
    np.testing.assert_array_equal(final.value.grid, expected.grid)
    assert final.value.method == "raw" and final.value.timings["forward"] == 0.0
    bad = refuse_job(attention, {"method": "nonsense"}).wait(60)
    assert bad.kind == ERROR and "method" in str(bad.value)


def test_score_job_equals_score_volume_and_copies_its_input(oracle_card):
    from AttentionMapLib.metrics import score_volume
    from AttentionMapLib.models import load_model
    from AttentionMapLib.worker import score_job

    loaded = load_model(str(oracle_card[0]))
    with torch.no_grad():  # values, output projections and head made random, so the curves move
        torch.manual_seed(0)
        for block in loaded.network.blocks:
            block.attn.qkv.weight[32:].normal_()
            block.attn.out_proj.weight.normal_()
        loaded.network.classification_head.weight.normal_()
    array, affine = volume()
    original = array.copy()
    options = {"method": "rollout", "layer": 1, "target": 1}
    job = score_job(loaded, array, affine, (35.0, 2.0, 18.0), options, device="cpu")
    array[:] = 0.0
    final = job.wait(120)
    assert final.kind == DONE, final.detail
    direct = score_volume(loaded.network, original, affine, loaded.preprocessing, img_size=loaded.img_size,
                          centre_ras=(35.0, 2.0, 18.0), device="cpu", **options)
    assert final.value == direct
    assert final.value["target"] == 1 and len(set(np.round(direct["deletion_curve"], 6))) > 1
