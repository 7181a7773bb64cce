"""Read and write volumes with their geometry (SimpleITK): NRRD, NIfTI, MetaImage, DICOM series.

Arrays come and go indexed (I, J, K), or (C, I, J, K) for multi-component images, with a RAS
``ijk_to_ras`` (4, 4) that includes spacing and direction cosines. SimpleITK works in LPS; the
conversion happens here and nowhere else. Pixel types are kept as stored (an int16 CT stays int16,
a float32 attention grid is written as float32); preprocessing converts to float32 for the model.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from .core.geometry import check_ijk_to_ras, kji_to_ijk, lps_to_ras, voxel_spacing
from .errors import AttentionMapError

PathLike = Union[str, os.PathLike]

_WRITE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")


def _sitk():
    import SimpleITK as sitk

    # ITK prints its warnings (e.g. GDCM's "No Series were found") straight to stderr; the reader's
    # outcome is reported by our own messages instead, one line per problem.
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    return sitk


def check_input_path(path: PathLike, what: str = "", folders: bool = True) -> Path:
    """`path` as a Path if it is a regular file (or, with `folders`, a folder), else AttentionMapError.

    Checked with os.stat before anything opens it: a named pipe (what a shell's <(...) gives), a device
    or a socket is refused without being opened, so it can never block the reader. Symbolic links to a
    file or folder are followed (inputs are only read). `what` prefixes the message (e.g. "--label").
    """
    if not isinstance(path, (str, os.PathLike)):
        raise AttentionMapError(f"{what or 'path'}: expected a file or folder path, got {path!r}")
    p = Path(path)
    name = f"{what} {p}" if what else str(p)
    expected = "a regular file" + (" or a DICOM folder" if folders else "")
    try:
        info = os.stat(p)
    except FileNotFoundError:
        raise AttentionMapError(f"{name}: no such file or folder") from None
    except OSError as exc:
        raise AttentionMapError(f"{name}: cannot be read ({exc.strerror}); expected {expected}") from None
    if stat.S_ISDIR(info.st_mode) and folders:
        if not os.access(p, os.R_OK | os.X_OK):
            raise AttentionMapError(f"{name}: the folder cannot be read (permission denied)")
        return p
    if not stat.S_ISREG(info.st_mode):
        kind = ("a named pipe" if stat.S_ISFIFO(info.st_mode) else "a folder" if stat.S_ISDIR(info.st_mode)
                else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device")
        raise AttentionMapError(f"{name}: is {kind}; expected {expected} (save a stream to a file first)")
    if info.st_size == 0:
        raise AttentionMapError(f"{name}: the file is empty; expected {expected}")
    if not os.access(p, os.R_OK):
        raise AttentionMapError(f"{name}: the file cannot be read (permission denied)")
    return p


def image_ijk_to_ras(image) -> np.ndarray:
    """RAS ijk_to_ras (4, 4) float64 of a 3D SimpleITK image (its LPS origin, spacing, direction)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    ijk_to_lps[:3, 3] = image.GetOrigin()
    return lps_to_ras(ijk_to_lps)


def _read_dicom_series(folder: Path, series_id: Optional[str]):
    sitk = _sitk()
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise AttentionMapError(f"{folder}: no DICOM series found in this folder")
    if series_id is None:
        if len(ids) > 1:
            raise AttentionMapError(f"{folder}: {len(ids)} DICOM series found; choose one with --series-uid UID "
                                    f"(library: series_id=), one of {list(ids)}")
        series_id = ids[0]
    elif series_id not in ids:
        raise AttentionMapError(f"{folder}: DICOM series {series_id!r} not found; series present: {list(ids)}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id))
    return reader.Execute()


def read_volume(path: PathLike, series_id: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Read a 3D volume: a NRRD / NIfTI / MHA file, or a folder holding one DICOM series.

    Args:
        path: the file, or the DICOM folder.
        series_id: DICOM folders holding several series: the SeriesInstanceUID to read.

    Returns:
        (array_ijk, ijk_to_ras): array indexed (I, J, K), or (C, I, J, K) for multi-component pixels, in
        the stored pixel type; ijk_to_ras (4, 4) float64 in RAS millimetres.
    """
    sitk = _sitk()
    p = check_input_path(path)
    if series_id is not None and not p.is_dir():
        raise AttentionMapError(f"{p}: a series UID was given but the input is a file, not a DICOM folder")
    try:
        if not p.is_dir():
            check_header(p)
        image = _read_dicom_series(p, series_id) if p.is_dir() else sitk.ReadImage(str(p))
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[-300:]
        raise AttentionMapError(f"{p}: SimpleITK could not read it as a volume ({reason})") from None
    if image.GetDimension() != 3:
        raise AttentionMapError(f"{p}: expected a 3D volume, got a {image.GetDimension()}D image")
    return image_arrays(image)


MAX_VOLUME_BYTES = 8 * 2 ** 30  # a whole-body CT of 512 x 512 x 2000 int16 voxels is 1 GiB
VOLUME_LIMIT_VARIABLE = "ATTENTIONMAP_MAX_VOLUME_BYTES"
_HEADER_BYTES = 1 << 16  # NRRD / MetaImage text headers are read up to this many bytes


def max_volume_bytes() -> int:
    """The most bytes a volume file may declare: $ATTENTIONMAP_MAX_VOLUME_BYTES, else MAX_VOLUME_BYTES (8 GiB)."""
    configured = os.environ.get(VOLUME_LIMIT_VARIABLE, "").strip()
    if not configured:
        return MAX_VOLUME_BYTES
    if not configured.isdigit() or int(configured) < 1:
        raise AttentionMapError(f"{VOLUME_LIMIT_VARIABLE}: expected a positive number of bytes, got {configured!r}")
    return int(configured)


def _declared_spacing(p: Path) -> Optional[Tuple[float, ...]]:
    """The voxel spacing as the file's own header states it, before any reader replaces a bad value (SimpleITK and
    nibabel read a NIfTI pixdim of 0 or NaN as 1 mm; ITK takes pixdim even where an sform is set): NIfTI-1 / -2
    pixdim[1:4], NRRD ``spacings`` or the lengths of
    ``space directions``, MetaImage ``ElementSpacing``. None for other formats or where the header states none."""
    import gzip
    import struct

    name = p.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(p, "rb") as stream:
            head = stream.read(_HEADER_BYTES)
    except (OSError, EOFError):
        return None
    if name.endswith((".nii", ".nii.gz")) and len(head) >= 348:
        for endian in "<>":
            size = struct.unpack(endian + "i", head[:4])[0]
            if size == 348:
                return struct.unpack(endian + "8f", head[76:108])[1:4]
            if size == 540 and len(head) >= 540:
                return struct.unpack(endian + "8d", head[104:168])[1:4]
        return None
    text = head.split(b"\n\n", 1)[0].decode("latin-1") if name.endswith(".nrrd") else head.decode("latin-1")
    for line in text.splitlines():
        key, _, value = line.partition(":" if name.endswith(".nrrd") else "=")
        key = key.strip().lower()
        try:
            if name.endswith(".nrrd") and key == "spacings":
                values = [float(v) for v in value.split()]  # a vector (non-spatial) axis has spacing nan
                return tuple(v for v in values if len(values) == 3 or not np.isnan(v))
            if name.endswith(".nrrd") and key == "space directions":
                vectors = [v for v in value.replace("none", "").split(")") if "(" in v]
                return tuple(float(np.linalg.norm([float(c) for c in v.split("(")[1].split(",")])) for v in vectors)
            if name.endswith((".mha", ".mhd")) and key == "elementspacing":
                return tuple(float(v) for v in value.split())
        except ValueError:
            return (float("nan"),)
    return None


def check_header(p: Path) -> None:
    """Refuse a volume file from its header, before any voxel is read: more bytes than max_volume_bytes() (a 1 KB
    header can declare terabytes), or a voxel spacing that is zero, negative or not finite (it would be read as 1 mm
    and the map placed at the wrong size)."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    reader.ReadImageInformation()  # RuntimeError: not a volume (the caller words it)
    size, components = reader.GetSize(), reader.GetNumberOfComponents()
    itemsize = sitk.GetArrayViewFromImage(sitk.Image([1] * len(size), reader.GetPixelID(), components)).itemsize
    nbytes = int(np.prod(size, dtype=object)) * components * itemsize
    limit = max_volume_bytes()
    if nbytes > limit:
        raise AttentionMapError(
            f"{p}: its header declares {' x '.join(map(str, size))} voxels of {components * itemsize} bytes "
            f"({nbytes / 2 ** 30:.1f} GiB), more than the {limit / 2 ** 30:.1f} GiB limit; set "
            f"{VOLUME_LIMIT_VARIABLE} to read larger volumes")
    declared = _declared_spacing(p)
    spacing = tuple(declared) if declared is not None else tuple(reader.GetSpacing())
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise AttentionMapError(
            f"{p}: its header gives the voxel spacing {', '.join(f'{v:g}' for v in spacing)}; expected positive "
            "finite millimetres (a reader would put 1 mm in its place and the map at the wrong size): fix the header")


def image_arrays(image) -> Tuple[np.ndarray, np.ndarray]:
    """(array_ijk, ijk_to_ras) of a 3D SimpleITK image: (I, J, K) or (C, I, J, K) array, RAS (4, 4)."""
    # GetArrayFromImage is (K, J, I) or (K, J, I, C); reversing gives (I, J, K) or (C, I, J, K)
    array = np.ascontiguousarray(kji_to_ijk(_sitk().GetArrayFromImage(image)))
    return array, image_ijk_to_ras(image)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in _WRITE_SUFFIXES if name.endswith(s)), "")


def array_image(array_ijk: np.ndarray, ijk_to_ras: np.ndarray, stored_by: str = "a SimpleITK image holds"):
    """The 3D SimpleITK image of an array indexed (I, J, K) with its RAS geometry (the inverse of `image_arrays`).

    The pixel type is kept. The affine must be spacing x direction with orthonormal directions (no shear);
    `stored_by` names what needs that in the error message.
    """
    sitk = _sitk()
    array = np.asarray(array_ijk)
    if array.ndim != 3:
        raise AttentionMapError(f"array_ijk: expected a 3D array indexed (I, J, K), got shape {array.shape}")
    m = check_ijk_to_ras(ijk_to_ras)
    spacing = voxel_spacing(m)
    direction = m[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-5):
        raise AttentionMapError(
            f"ijk_to_ras: columns are not orthogonal (sheared grid); {stored_by} spacing and "
            f"orthonormal directions only:\n{m}"
        )
    ijk_to_lps = lps_to_ras(m)
    image = sitk.GetImageFromArray(np.ascontiguousarray(kji_to_ijk(array)))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((ijk_to_lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    return image


def write_volume(path: PathLike, array_ijk: np.ndarray, ijk_to_ras: np.ndarray) -> Path:
    """Write a 3D array indexed (I, J, K) with its RAS geometry to .nrrd, .nii, .nii.gz or .mha.

    The pixel type is kept (float32 stays float32). The affine must be spacing x direction with
    orthonormal directions (no shear), as these formats store it. Written into a private temporary folder
    (``mkdtemp``, 0700) beside the target and renamed over it, so a failure leaves no partial file and a link
    planted beside the target is never written through. Returns the path.
    """
    sitk = _sitk()
    p = Path(path)
    suffix = _suffix(p)
    if not suffix:
        raise AttentionMapError(f"{p}: expected a file name ending in one of {', '.join(_WRITE_SUFFIXES)}")
    image = array_image(array_ijk, ijk_to_ras, f"{suffix} stores")
    try:
        private = tempfile.mkdtemp(prefix=f".{p.name}.", dir=p.parent)  # 0700, unpredictable: no planted link
    except OSError as exc:
        raise AttentionMapError(f"{p}: cannot write in {p.parent} ({exc.strerror})") from None
    tmp = os.path.join(private, f"volume{suffix}")
    try:
        sitk.WriteImage(image, tmp, True)
        os.replace(tmp, p)
    except RuntimeError as exc:
        raise AttentionMapError(f"{p}: SimpleITK could not write it ({str(exc).strip()[:300]})") from None
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return p
