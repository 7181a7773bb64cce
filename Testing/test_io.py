"""File round trips with geometry: SimpleITK-written NRRD / NIfTI / MHA / DICOM read back in RAS."""
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from AttentionMapLib.core.geometry import apply_affine, lps_to_ras
from AttentionMapLib.errors import AttentionMapError
from AttentionMapLib.io import read_volume, write_volume
from geometry_cases import CASES, OBLIQUE

SHAPE_IJK = (13, 9, 7)
SPACING = (0.8, 1.1, 2.5)
ORIGIN_LPS = (-31.0, 12.5, 40.25)


def _sitk_image(pixel_type=np.int16) -> sitk.Image:
    rng = np.random.default_rng(0)
    kji = rng.integers(-1000, 1000, size=SHAPE_IJK[::-1]).astype(pixel_type)
    image = sitk.GetImageFromArray(kji)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN_LPS)
    image.SetDirection(OBLIQUE.ravel().tolist())
    return image


VOXELS = [(0, 0, 0), (12, 8, 6), (3, 7, 2), (11, 1, 5)]


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_sitk_written_file_reads_back_with_the_same_ras_for_each_voxel(tmp_path, suffix):
    image = _sitk_image()
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(image, str(path))
    array, ijk_to_ras = read_volume(path)
    assert array.shape == SHAPE_IJK and array.dtype == np.int16
    for voxel in VOXELS:
        lps = np.array(image.TransformIndexToPhysicalPoint(voxel))
        assert np.allclose(apply_affine(ijk_to_ras, voxel), lps * [-1, -1, 1], atol=1e-4)
        assert array[voxel] == image.GetPixel(voxel)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_geometry_agrees_with_nibabel(tmp_path, suffix):
    """nibabel reads the NIfTI sform/qform directly in RAS: an independent reader."""
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(_sitk_image(), str(path))
    array, ijk_to_ras = read_volume(path)
    reference = nib.load(str(path))
    assert np.allclose(ijk_to_ras, reference.affine, atol=1e-4)
    assert np.array_equal(array, np.asarray(reference.dataobj))


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_written_grid_keeps_values_dtype_and_geometry(tmp_path, suffix):
    shape, ijk_to_ras = CASES["oblique_30_20"]
    grid = np.random.default_rng(2).random((4, 6, 3)).astype(np.float32)
    tokens = ijk_to_ras @ np.diag([8.0, 8.0, 8.0, 1.0])
    path = write_volume(tmp_path / f"grid{suffix}", grid, tokens)
    back, back_affine = read_volume(path)
    assert back.dtype == np.float32
    assert np.array_equal(back, grid)
    assert np.allclose(back_affine, tokens, atol=1e-4)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left


def _write_dicom_series(folder, image: sitk.Image, series: str = "1.2.826.0.1.3680043.2.1125.1.99.1") -> None:
    """One CT slice per file with patient position/orientation tags, as a scanner would."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.10f}" for v in np.concatenate([direction[:, 0], direction[:, 1]]))
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1.99", "0020|000e": series,
            "0008|0018": f"{series}.{k + 1}", "0020|0013": str(k + 1), "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.10f}" for v in position),
            "0028|0030": f"{image.GetSpacing()[1]:.10f}\\{image.GetSpacing()[0]:.10f}",
            "0018|0050": f"{image.GetSpacing()[2]:.10f}",
        }
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series[-1]}_slice{k:03d}.dcm"))
        writer.Execute(piece)


def test_dicom_series_folder_reads_with_oblique_geometry(tmp_path):
    image = _sitk_image()
    _write_dicom_series(tmp_path, image)
    array, ijk_to_ras = read_volume(tmp_path)
    assert array.shape == SHAPE_IJK
    for voxel in VOXELS:
        lps = np.array(image.TransformIndexToPhysicalPoint(voxel))
        assert np.allclose(apply_affine(ijk_to_ras, voxel), lps * [-1, -1, 1], atol=1e-3)
        assert array[voxel] == image.GetPixel(voxel)


def test_folder_with_two_series_needs_a_series_id(tmp_path):
    image = _sitk_image()
    _write_dicom_series(tmp_path, image, series="1.2.826.0.1.3680043.2.1125.1.99.1")
    shifted = sitk.Image(image)
    shifted.SetOrigin((0.0, 0.0, 500.0))
    _write_dicom_series(tmp_path, shifted, series="1.2.826.0.1.3680043.2.1125.1.99.2")
    with pytest.raises(AttentionMapError, match="2 DICOM series found; choose one with --series-uid UID"):
        read_volume(tmp_path)
    with pytest.raises(AttentionMapError, match="not found"):
        read_volume(tmp_path, series_id="1.2.3")
    _, ijk_to_ras = read_volume(tmp_path, series_id="1.2.826.0.1.3680043.2.1125.1.99.2")
    assert np.allclose(ijk_to_ras[:3, 3], [0.0, 0.0, 500.0], atol=1e-3)


def test_vector_image_reads_channels_first(tmp_path):
    kji = np.random.default_rng(3).random((5, 4, 3, 2)).astype(np.float32)  # (K, J, I, C)
    image = sitk.GetImageFromArray(kji, isVector=True)
    path = tmp_path / "vector.nrrd"
    sitk.WriteImage(image, str(path))
    array, _ = read_volume(path)
    assert array.shape == (2, 3, 4, 5)
    assert array[1, 2, 3, 4] == kji[4, 3, 2, 1]


def test_read_errors(tmp_path):
    with pytest.raises(AttentionMapError, match="no such file"):
        read_volume(tmp_path / "missing.nrrd")
    with pytest.raises(AttentionMapError, match="no DICOM series"):
        read_volume(tmp_path)
    flat = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(flat))
    with pytest.raises(AttentionMapError, match="expected a 3D volume"):
        read_volume(flat)
    junk = tmp_path / "junk.nrrd"
    junk.write_text("not an image")
    with pytest.raises(AttentionMapError, match="could not read"):
        read_volume(junk)


def test_write_errors_leave_nothing_behind(tmp_path):
    grid = np.zeros((3, 3, 3), dtype=np.float32)
    with pytest.raises(AttentionMapError, match="ending in"):
        write_volume(tmp_path / "grid.png", grid, np.eye(4))
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(AttentionMapError, match="not orthogonal"):
        write_volume(tmp_path / "grid.nrrd", grid, sheared)
    with pytest.raises(AttentionMapError, match="3D array"):
        write_volume(tmp_path / "grid.nrrd", grid[0], np.eye(4))
    with pytest.raises(AttentionMapError, match="degenerate"):
        write_volume(tmp_path / "grid.nrrd", grid, np.diag([1.0, 1.0, 0.0, 1.0]))
    assert os.listdir(tmp_path) == []


def test_lps_written_by_write_volume_is_what_itk_sees(tmp_path):
    """write_volume stores LPS in the file: SimpleITK's own reader gives the LPS position of each voxel."""
    _, ijk_to_ras = CASES["shape_200x160x40_oblique"]
    path = write_volume(tmp_path / "g.nrrd", np.zeros((5, 4, 3), np.float32), ijk_to_ras)
    image = sitk.ReadImage(str(path))
    for voxel in [(0, 0, 0), (4, 3, 2), (1, 2, 0)]:
        assert np.allclose(
            image.TransformIndexToPhysicalPoint(voxel), apply_affine(lps_to_ras(ijk_to_ras), voxel), atol=1e-4
        )


def test_array_image_is_the_inverse_of_image_arrays_on_an_oblique_anisotropic_grid():
    from AttentionMapLib.core.geometry import rotation
    from AttentionMapLib.io import array_image, image_arrays

    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.asarray(rotation(2, 12.0)) @ np.asarray(rotation(0, 8.0)) @ np.diag([0.7, 0.9, 2.5])
    ijk_to_ras[:3, 3] = [-40.0, 25.0, -300.0]
    back, affine = image_arrays(array_image(array, ijk_to_ras))
    assert back.dtype == np.int16 and np.array_equal(back, array)
    assert np.allclose(affine, ijk_to_ras, atol=1e-9)
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(AttentionMapError, match="not orthogonal"):
        array_image(array, sheared)
