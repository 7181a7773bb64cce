"""The Slicer module's Qt-free decisions: model-card summary (layer / head ranges before a run), re-fusion
after a job when the options on screen changed, and the self-test's phantom explained by the shipped demo model
through the worker process."""
import json

import numpy as np
import pytest

from AttentionMapLib import AttentionMapError, worker
from AttentionMapLib.core.metrics import mask_statistics
from AttentionMapLib.models import DEMO_CARD
from AttentionMapLib.module_logic import card_summary, fusion_differs, patch_size_mm, self_test_phantom


def test_card_summary_gives_the_ranges_before_any_run(tmp_path):
    demo = card_summary(DEMO_CARD)
    assert demo.classes == ["no lesion", "lesion"] and (demo.num_layers, demo.num_heads) == (4, 4)
    card = {"network": {"name": "ViT", "args": {"in_channels": 1, "img_size": [32, 32, 32], "patch_size": 16}}}
    (tmp_path / "defaults.json").write_text(json.dumps(card))
    assert card_summary(tmp_path / "defaults.json") == ([], 12, 12)  # MONAI's ViT defaults
    card["network"]["args"].update(num_layers=3, num_heads=6)
    card["classes"] = ["a", "b", "c"]
    (tmp_path / "set.json").write_text(json.dumps(card))
    assert card_summary(tmp_path / "set.json") == (["a", "b", "c"], 3, 6)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(AttentionMapError, match="broken.json"):
        card_summary(tmp_path / "broken.json")


def attention(**fields):
    base = dict(method="rollout", layer=3, normalize="percentile", discard_ratio=0.0, query_ras=None)
    base.update(fields)
    return type("Made", (), base)()


def test_fusion_differs_spots_changes_made_while_a_job_ran():
    shown = {"method": "rollout", "layer": -1, "normalize": "percentile", "discard_ratio": 0.0, "query_ras": None}
    assert not fusion_differs(attention(), shown, num_layers=4)  # -1 = last = index 3
    assert fusion_differs(attention(), {**shown, "layer": 1}, 4)
    assert fusion_differs(attention(), {**shown, "method": "raw"}, 4)
    assert fusion_differs(attention(), {**shown, "discard_ratio": 0.5}, 4)
    assert fusion_differs(attention(), {**shown, "normalize": "minmax"}, 4)
    assert fusion_differs(attention(), {**shown, "query_ras": np.array([1.0, 2.0, 3.0])}, 4)
    made = attention(query_ras=np.array([1.0, 2.0, 3.0]))
    assert not fusion_differs(made, {**shown, "query_ras": np.array([1.0, 2.0, 3.0])}, 4)
    assert fusion_differs(made, {**shown, "query_ras": np.array([1.0, 2.0, 9.0])}, 4)
    assert fusion_differs(made, shown, 4)


def test_the_self_tests_phantom_puts_the_demo_models_peak_within_one_patch_of_the_nodule():
    """What AttentionMapTest asserts inside Slicer, run here through the same worker process."""
    array, ijk_to_ras, nodule = self_test_phantom()
    assert array.shape == (100, 84, 44) and abs(ijk_to_ras[0, 1]) > 0.1  # oblique, anisotropic, not cubic
    process = worker.WorkerProcess(threads=1)
    try:
        final = worker.explain_job("demo", array, ijk_to_ras, {"method": "rollout", "normalize": "percentile"},
                                   device="cpu", worker=process).wait(300)  # the card's lung field
    finally:
        process.close()
    assert final.kind == worker.DONE, final.value
    result = final.value.attention
    assert np.linalg.norm(result.peak_ras() - nodule) <= patch_size_mm(result.ijk_to_ras)
    # the volume-level prediction is the card's target class, from the window that holds the nodule (the
    # whole-scan model gives this texture-free phantom P(lesion) 0.45, below 0.5: the call itself is not asserted)
    assert result.prediction["class"] == "lesion" and result.prediction["windows"] == result.num_windows
    # a chest: the lung field finds its lungs, and every window holds lung (a confident answer); the input is
    # smaller than the training scans, which the statement says
    assert result.region.name == "lung field" and result.prediction["confident"]
    assert result.prediction["domain"]["windows_with_lung"] == result.num_windows
    assert "field of view" in result.prediction["domain"]["summary"]
    assert np.linalg.norm(np.asarray(result.prediction["window_centre_ras_mm"]) - nodule) <= 48.0  # half a window
    # the self-test's segment statistics: a sphere of the nodule's radius gets more than its share
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in array.shape], indexing="ij"), axis=-1)
    ras = ijk @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]
    sphere = np.linalg.norm(ras - nodule, axis=-1) < 8.0
    assert mask_statistics(result.resample_to(array.shape, ijk_to_ras), sphere)["mass_ratio"] > 1.0
