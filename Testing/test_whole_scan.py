"""The evaluation's whole-scan re-griddings (`attentionmap_dev/whole_scan.py`): the same anatomy on other voxel
grids, on a real sample CT (pyradiomics lung1) and its tumour label."""
import numpy as np
import pytest

from attentionmap_dev import whole_scan
from AttentionMapLib.core.geometry import apply_affine, ras_to_ijk


@pytest.fixture(scope="module")
def lung1():
    from AttentionMapLib.sample_data import fetch_sample_data

    paths = fetch_sample_data()
    return {kind: whole_scan.regridded(paths["lung1_image"], paths["lung1_label"], kind)
            for kind in whole_scan.REGRIDDINGS}


def test_every_regridding_keeps_the_tumour_in_place(lung1):
    shipped = lung1["as shipped"]
    centroid = whole_scan.label_centroid_ras(shipped["label"], shipped["label_affine"])
    volume = shipped["label"].sum() * abs(np.linalg.det(shipped["label_affine"][:3, :3]))
    for kind, scan in lung1.items():
        assert scan["image"].dtype == np.float32 and scan["label"].dtype == bool
        moved = np.linalg.norm(whole_scan.label_centroid_ras(scan["label"], scan["label_affine"]) - centroid)
        assert moved < whole_scan.CENTROID_TOLERANCE_MM, kind
        # nearest-neighbour labels of a ~1.4 ml tumour on 2.5-3.5 mm slices: its volume within 20 %
        assert scan["label"].sum() * abs(np.linalg.det(scan["label_affine"][:3, :3])) == pytest.approx(volume, rel=0.2)
    direction = lung1["oblique"]["affine"][:3, :3]
    assert np.abs(direction - np.diag(np.diag(direction))).max() > 0.1  # really oblique


def test_flipped_scan_holds_the_same_value_at_every_ras_point(lung1):
    shipped, flipped = lung1["as shipped"], lung1["flipped"]
    assert np.array_equal(flipped["image"], shipped["image"][::-1, :, ::-1])
    rng = np.random.default_rng(0)
    ijk = rng.integers(0, shipped["image"].shape, size=(50, 3))
    back = np.rint(ras_to_ijk(flipped["affine"], apply_affine(shipped["affine"], ijk))).astype(int)
    assert np.array_equal(flipped["image"][tuple(back.T)], shipped["image"][tuple(ijk.T)])
    assert np.array_equal(flipped["label_affine"], flipped["affine"])
