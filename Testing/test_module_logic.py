"""The Slicer module's Qt-free decisions: dependency plan from installed versions, model-card summary
(layer / head ranges before a run), re-fusion after a job when the options on screen changed, and
the self-test's phantom explained by the shipped demo model through the worker process."""
import json

import numpy as np
import pytest

from AttentionMapLib import AttentionMapError, worker
from AttentionMapLib.core.metrics import mask_statistics
from AttentionMapLib.dependencies import (
    EINOPS_VERSION,
    MONAI_VERSION,
    installed_versions,
    parse_version,
    plan_dependencies,
)
from AttentionMapLib.models import DEMO_CARD
from AttentionMapLib.module_logic import card_summary, fusion_differs, patch_size_mm, self_test_phantom

GOOD = {"torch": "2.9.1+cpu", "monai": MONAI_VERSION, "einops": EINOPS_VERSION, "numpy": "1.26.4"}


def test_versions_are_parsed_from_real_version_strings():
    assert parse_version("2.8.0+cpu") == (2, 8, 0)
    assert parse_version("2.1.0a0+git") == (2, 1, 0)
    assert parse_version("1.26") == (1, 26)
    assert parse_version(None) is None and parse_version("dev") is None
    installed = installed_versions()  # this environment: what the test suite runs with
    assert plan_dependencies(installed).needed is False and not plan_dependencies(installed).problems


def test_nothing_to_install_when_versions_fit():
    plan = plan_dependencies(GOOD)
    assert not plan.needed and plan.torch_requirement is None and plan.pip_arguments is None and not plan.problems


def test_torch_missing_or_too_old_is_asked_from_pytorch_utils_within_monais_range():
    for torch_version in (None, "2.1.2+cu118", "2.7.1"):
        plan = plan_dependencies({**GOOD, "torch": torch_version})
        assert plan.torch_requirement == ">=2.8" and plan.pip_arguments is None
    assert "older than MONAI" in plan_dependencies({**GOOD, "torch": "2.1.2"}).consent_text()


def test_monai_is_pinned_and_pip_may_not_touch_torch():
    plan = plan_dependencies({**GOOD, "monai": None, "einops": None})
    assert plan.pip_arguments == [f"monai=={MONAI_VERSION}", f"einops=={EINOPS_VERSION}", "--no-deps"]
    assert plan.torch_requirement is None  # the installed torch fits: PyTorchUtils is not called
    other = plan_dependencies({**GOOD, "monai": "1.4.0"})  # present but not the tested version: replaced
    assert other.pip_arguments == [f"monai=={MONAI_VERSION}", "--no-deps"]
    text = other.consent_text()  # one question lists every step
    assert "1.4.0" in text and "--no-deps" in text and "torch is left as it is" in text
    both = plan_dependencies({**GOOD, "torch": None, "monai": None})
    assert both.torch_requirement and both.pip_arguments and "PyTorch extension" in both.consent_text()


def test_numpy_outside_monais_range_is_a_problem_not_an_install():
    plan = plan_dependencies({**GOOD, "numpy": "1.21.0"})
    assert plan.problems and "numpy 1.21.0" in plan.problems[0] and not plan.needed


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
                                   device="cpu", worker=process, region="none").wait(300)  # lung field only
    finally:
        process.close()
    assert final.kind == worker.DONE, final.value
    result = final.value.attention
    assert np.linalg.norm(result.peak_ras() - nodule) <= patch_size_mm(result.ijk_to_ras)
    # the volume-level prediction is the card's target class, from the window that holds the nodule (the
    # whole-scan model gives this texture-free phantom P(lesion) 0.45, below 0.5: the call itself is not asserted)
    assert result.prediction["class"] == "lesion" and result.prediction["windows"] == result.num_windows
    assert np.linalg.norm(np.asarray(result.prediction["window_centre_ras_mm"]) - nodule) <= 48.0  # half a window
    # the self-test's segment statistics: a sphere of the nodule's radius gets more than its share
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in array.shape], indexing="ij"), axis=-1)
    ras = ijk @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]
    sphere = np.linalg.norm(ras - nodule, axis=-1) < 8.0
    assert mask_statistics(result.resample_to(array.shape, ijk_to_ras), sphere)["mass_ratio"] > 1.0
