"""Geometry oracle: a bright cube at a known RAS point must come out under the peak of the map.

The oracle ViT's layer-0 attention of every query peaks on the brightest patch (Testing/oracle.py), so
the peak token of `explain_volume(..., method="raw", layer=0)` is the patch holding the cube, whatever
the orientation, obliquity, spacing, shape, model input shape and spatial mode. A flipped or transposed
axis, a missing half-patch offset or a wrong resize scale moves the peak by a patch or more.
"""
import numpy as np
import pytest
import torch

from AttentionMapLib.core.volume import explain_volume
from geometry_cases import CASES, INTENSITY, MODELS, POSITIONS, cube_volume, peak_error
from oracle import make_oracle_vit

PREPROCESSING = {
    "ras_2mm": {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0]},
    "native": {"orientation": None, "spacing": None},
    "lpi_anisotropic": {"orientation": "LPI", "spacing": [1.5, 2.5, 2.0]},
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def oracle(request):
    torch.manual_seed(0)
    img_size, patch_size = MODELS[request.param]
    return make_oracle_vit(img_size, patch_size, classification=True), img_size


# both cube positions with the main preprocessing, one each with the others (keeps the suite fast)
PREP_POSITIONS = [("ras_2mm", p) for p in POSITIONS] + [("native", POSITIONS[0]), ("lpi_anisotropic", POSITIONS[1])]


@pytest.mark.parametrize("mode", ["resize", "sliding_window"])
@pytest.mark.parametrize("prep, position", PREP_POSITIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_peak_lies_on_the_cube(oracle, case, position, prep, mode):
    model, img_size = oracle
    volume = cube_volume(case, position)
    preprocessing = {**PREPROCESSING[prep], "intensity": INTENSITY, "spatial": {"mode": mode}}
    result = explain_volume(model, volume.array, volume.ijk_to_ras, preprocessing, img_size=img_size,
                            method="raw", layer=0)
    error = peak_error(result, volume.centre_ras)
    assert error["mm"] <= error["half_diagonal_mm"], error
    # the cube centre lies in the peak token's patch (0.5), with a margin for a centre on a patch border
    assert error["patch_fraction"] <= 0.6, error
    assert (result.num_windows == 1) == (mode == "resize")


def test_a_mirrored_affine_moves_the_peak_off_the_cube():
    """The oracle check can fail: the same array with its I axis mirrored in ijk_to_ras misses the cube."""
    img_size, patch_size = MODELS["cubic32_p8"]
    model = make_oracle_vit(img_size, patch_size, classification=True)
    volume = cube_volume("oblique_30_20", POSITIONS[0])
    shape = volume.array.shape
    mirrored = volume.ijk_to_ras @ np.array([[-1, 0, 0, shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    preprocessing = {**PREPROCESSING["ras_2mm"], "intensity": INTENSITY, "spatial": {"mode": "resize"}}
    result = explain_volume(model, volume.array, mirrored, preprocessing, img_size=img_size, method="raw", layer=0)
    error = peak_error(result, volume.centre_ras)
    assert error["mm"] > error["half_diagonal_mm"]
