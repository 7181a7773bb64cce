"""Cut faces on training crops (`attentionmap_dev/scan_faces.py`): a plane, padding beyond it, never over the
nodule, the same for both crops of a pair. Real pyradiomics lung CT crops from the demo sampler."""
import numpy as np
import pytest

from attentionmap_dev import demo_data, scan_faces

CROP = demo_data.CROP


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """`mask` grown by `steps` face-neighbour steps (6-connected)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        for axis in range(3):
            for shift in (1, -1):
                moved = np.roll(out, shift, axis)
                edge = [slice(None)] * 3
                edge[axis] = 0 if shift == 1 else -1
                moved[tuple(edge)] = False
                grown |= moved
        out = grown
    return out


def _axes_angle_degrees(normal: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.abs(normal).max())))


def test_normals_are_unit_within_the_tilt_of_an_axis_and_mostly_axial():
    rng = np.random.default_rng(3)
    normals = np.array([scan_faces.face_normal(rng) for _ in range(400)])
    assert np.allclose(np.linalg.norm(normals, axis=1), 1.0)
    assert max(_axes_angle_degrees(n) for n in normals) <= scan_faces.FACE_TILT_DEGREES + 1e-6
    nearest = np.abs(normals).argmax(1)
    assert 0.55 < np.mean(nearest == 2) < 0.8, "half along K plus a third of the rest"
    assert np.mean(nearest == 0) > 0.1 and np.mean(nearest == 1) > 0.1
    assert 0.4 < np.mean(normals[np.arange(400), nearest] > 0) < 0.6, "both sides"


def _is_half_space(cut: np.ndarray) -> bool:
    """Along every axis-parallel line, the cut voxels are one run touching the crop's border (true of a
    half-space, false of a blob or a slab in the middle)."""
    for axis in range(3):
        lines = np.moveaxis(cut, axis, -1).reshape(-1, CROP)
        for line in lines[lines.any(1)]:
            idx = np.flatnonzero(line)
            if idx[-1] - idx[0] + 1 != len(idx) or not (idx[0] == 0 or idx[-1] == CROP - 1):
                return False
    return True


def test_a_face_cuts_a_half_space_and_keeps_enough_of_the_crop():
    rng = np.random.default_rng(5)
    soft = 0
    for _ in range(40):
        keep = scan_faces.face_keep(rng)
        assert keep.dtype == np.float32 and keep.shape == (CROP,) * 3 and keep.min() >= 0 and keep.max() <= 1
        cut = keep < 1
        assert cut.any() and (keep == 1).mean() > 0.05 and cut.mean() > 0.05
        assert _is_half_space(cut)
        partial = (keep > 0) & (keep < 1)
        soft += partial.any()
        if partial.any():  # one voxel of linear partial volume: keep = offset - distance along a unit normal
            points = np.argwhere(partial)
            design = np.c_[points, np.ones(len(points))]
            fit, *_ = np.linalg.lstsq(design, keep[partial], rcond=None)
            assert np.abs(design @ fit - keep[partial]).max() < 1e-4
            assert np.linalg.norm(fit[:3]) == pytest.approx(1.0, abs=1e-4)
    assert 10 <= soft <= 30, "half the faces hard, half with partial volume"


def test_a_face_never_reaches_the_nodule_or_its_margin():
    rng = np.random.default_rng(9)
    centres = np.argwhere(np.ones((3, 3, 3))) * 16 + 8
    for centre in centres:
        mask = np.zeros((CROP,) * 3, dtype=bool)
        mask[tuple(slice(c - 3, c + 4) for c in centre)] = True
        margin = _dilate(mask)  # every voxel within 1 voxel of the nodule
        for _ in range(5):
            keep = scan_faces.face_keep(rng, mask)
            assert np.all(keep[margin] == 1)


@pytest.fixture(scope="module")
def pairs():
    cts = demo_data.load_demo_cts()
    return demo_data.CropSampler(cts, "train").batches(np.random.default_rng(2), 6, flip=False)


def test_pairs_get_the_same_face_clear_of_the_nodule_and_the_input_stays(pairs):
    before = pairs.images.copy()
    cut = scan_faces.cut_faces(pairs, np.random.default_rng(4), 1.0, group=2)
    assert np.array_equal(pairs.images, before), "the input batch is not modified"
    assert np.array_equal(cut.labels, pairs.labels) and np.array_equal(cut.masks, pairs.masks)
    cut_pairs = 0
    for i in range(0, len(cut.labels), 2):
        pos, neg, mask = cut.images[i, 0], cut.images[i + 1, 0], cut.masks[i]
        assert np.array_equal(pos[mask], before[i, 0][mask]), "the nodule is never cut"
        assert np.array_equal(pos[~mask] == 0, neg[~mask] == 0), "one face for both crops"
        assert np.all(neg <= before[i + 1, 0]) and np.all(pos <= before[i, 0]), "only padding is added"
        cut_pairs += ((neg == 0) & (before[i + 1, 0] > 0)).mean() > 0.02
    assert cut_pairs >= 4, "a face moved beyond a nodule may leave a pair whole, but not most of them"


def test_the_fraction_decides_how_many_groups_are_cut(pairs):
    same = scan_faces.cut_faces(pairs, np.random.default_rng(1), 0.0, group=2)
    assert np.array_equal(same.images, pairs.images)
    singles = scan_faces.cut_faces(pairs, np.random.default_rng(1), 0.5)
    changed = [not np.array_equal(a, b) for a, b in zip(singles.images, pairs.images)]
    assert 0 < sum(changed) < len(changed)
    with pytest.raises(ValueError, match="groups of 5"):
        scan_faces.cut_faces(pairs, np.random.default_rng(1), 0.5, group=5)
