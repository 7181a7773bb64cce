"""render: views through the peak in radiological convention, whatever the volume's index order."""
import numpy as np
import pytest
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from AttentionMapLib.core.geometry import apply_affine
from AttentionMapLib.render import (
    LUNG_WINDOW,
    MAX_ALPHA,
    OverlayCase,
    draw_case,
    intensity_window,
    overlay_slices,
    write_montage,
    write_overlay,
)

SPACING = np.array([0.8, 1.2, 2.5])
SHAPE = (30, 24, 12)


def ras_case(label=True) -> OverlayCase:
    """A volume stored in RAS index order; the hot spot sits right, anterior, superior of the centre."""
    rng = np.random.default_rng(1)
    volume = rng.normal(0.0, 50.0, SHAPE).astype(np.float32) - 800.0
    attention = np.zeros(SHAPE, dtype=np.float32)
    attention[22:26, 16:20, 8:10] = 1.0
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 40.0]
    peak = apply_affine(affine, [23, 17, 8])
    mask = (attention > 0).astype(np.uint8) if label else None
    return OverlayCase("ras", volume, attention, affine, peak, "title", mask)


def lps_permuted(case: OverlayCase) -> OverlayCase:
    """The same patient data stored with axes (K, J, I) flipped to (S, P, L): another index order, same RAS."""
    def reorder(a):
        return None if a is None else np.ascontiguousarray(a[::-1, ::-1, :].transpose(2, 1, 0))

    # new index (k, j', i') with j' = J-1-j, i' = I-1-i
    to_old = np.zeros((4, 4))
    to_old[0, 2], to_old[0, 3] = -1.0, SHAPE[0] - 1
    to_old[1, 1], to_old[1, 3] = -1.0, SHAPE[1] - 1
    to_old[2, 0] = 1.0
    to_old[3, 3] = 1.0
    return OverlayCase("lps", reorder(case.volume), reorder(case.attention), case.ijk_to_ras @ to_old,
                       case.peak_ras, "title", reorder(case.label))


def drawn(case: OverlayCase):
    figure = Figure()
    axes = figure.subplots(1, 3)
    draw_case(axes, overlay_slices(case), Normalize(0.0, 1.0))
    return axes


def test_views_do_not_depend_on_the_index_order_and_follow_radiological_convention():
    reference, other = drawn(ras_case()), drawn(lps_permuted(ras_case()))
    for a, b in zip(reference, other):
        np.testing.assert_array_equal(a.images[0].get_array(), b.images[0].get_array())
        np.testing.assert_array_equal(a.images[1].get_array(), b.images[1].get_array())
        np.testing.assert_allclose(a.lines[0].get_xydata(), b.lines[0].get_xydata())
        assert a.get_xlim()[0] > a.get_xlim()[1]  # horizontal axis inverted: patient right / anterior on the left
        assert len(a.collections) == 1  # the label contour
    axial, coronal, sagittal = reference
    # the peak marker: axial (R, A), coronal (R, S), sagittal (A, S) in mm from the first voxel centre
    np.testing.assert_allclose(axial.lines[0].get_xydata()[0], [23 * 0.8, 17 * 1.2])
    np.testing.assert_allclose(coronal.lines[0].get_xydata()[0], [23 * 0.8, 8 * 2.5])
    np.testing.assert_allclose(sagittal.lines[0].get_xydata()[0], [17 * 1.2, 8 * 2.5])
    # the axial image is the plane k = 8 shown with rows = A (upwards, origin lower) and columns = R
    np.testing.assert_array_equal(axial.images[0].get_array(), ras_case().volume[:, :, 8].T)


def test_low_attention_is_transparent():
    heat = drawn(ras_case(label=False))[0].images[1].get_array()
    assert heat.shape[-1] == 4
    assert np.all(heat[..., 3][heat[..., 3] > 0] > 0.5 * MAX_ALPHA)  # only the hot spot is drawn
    assert heat[..., 3].max() == pytest.approx(MAX_ALPHA) and (heat[..., 3] == 0).mean() > 0.9


def test_intensity_window():
    assert intensity_window(np.array([-1000.0, -900.0, 50.0] * 100)) == LUNG_WINDOW
    low, high = intensity_window(np.arange(1000, dtype=float))
    assert low == pytest.approx(9.99) and high == pytest.approx(989.01)


def test_overlay_and_montage_files(tmp_path):
    from matplotlib.image import imread

    single = imread(write_overlay(tmp_path / "one.png", ras_case()))
    montage = imread(write_montage(tmp_path / "two.png", [ras_case(), lps_permuted(ras_case())], (0.0, 2.0)))
    assert single.shape[1] == montage.shape[1] and montage.shape[0] == 2 * single.shape[0]
