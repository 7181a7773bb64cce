"""ExplainOptions: one object of explanation options, the card's defaults filled in by resolve()."""
import pytest

from AttentionMapLib import load_model
from AttentionMapLib.core.region import BoxRegion, LungFieldRegion
from AttentionMapLib.core.segment import SegmentTarget
from AttentionMapLib.errors import AttentionMapError
from AttentionMapLib.explain_options import ExplainOptions


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


def test_the_cards_defaults_are_filled_in(demo):
    options = ExplainOptions().resolve(demo)
    assert options["target"] == 1 and isinstance(options["region"], LungFieldRegion)
    assert options["flip_axes"] == (0, 1, 2) and options["shift_average"] is True
    assert options["temperature"] == pytest.approx(0.5056) and options["domain"] is not None
    assert options["method"] == "rollout" and options["query_ras"] is None


def test_given_options_replace_the_cards(demo):
    box = BoxRegion((0.0, 0.0, 0.0), (50.0, 50.0, 50.0))
    options = ExplainOptions(target="no lesion", region=box, flip_axes="none", shift_average="off",
                             method="grad_rollout").resolve(demo)
    assert options["target"] == 0 and options["region"] is box and options["flip_axes"] == ()
    assert options["shift_average"] is False and options["method"] == "grad_rollout"
    assert ExplainOptions(region="none").resolve(demo)["region"] is None
    segment = ExplainOptions(target=SegmentTarget("lesion")).resolve(demo)["target"]
    assert segment == SegmentTarget(1)  # a class name becomes the card's index


@pytest.mark.parametrize("make,message", [
    (lambda: ExplainOptions.from_message({"methd": "raw"}), r"options: unknown option\(s\) \['methd'\]"),
    (lambda: ExplainOptions(region="lungs").resolve(load_model("demo")), "region: expected a region, 'default'"),
    (lambda: ExplainOptions(target="tumour").resolve(load_model("demo")), "target 'tumour' is not a class"),
    (lambda: ExplainOptions(flip_axes=[0, 0]).resolve(load_model("demo")), "flip"),
])
def test_bad_options_are_refused_naming_them(make, message):
    with pytest.raises(AttentionMapError, match=message):
        make()
