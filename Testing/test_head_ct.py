"""sample_data.fetch_head_ct / read_inv3: a whole head CT without a lung lesion (InVesalius' Cranium.inv3).

Two parts:
- the real scan (downloaded from Debian once and cached, like the pyradiomics data of test_demo_model):
  Hounsfield units and anatomy in RAS after io.read_volume (vertex superior, face anterior);
- the reader's conventions and failures on small .inv3 projects and .deb packages built here (real tar, gzip,
  xz and ar files), with a geometry that is neither isotropic nor cubic.

Left/right cannot be checked on the anatomy (a head is nearly symmetric, and the project stores no patient
orientation): it rests on the axial DICOM convention that InVesalius keeps (columns run to the patient's left).
"""
import hashlib
import io
import lzma
import plistlib
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest

from AttentionMapLib.core.geometry import apply_affine, ras_to_ijk
from AttentionMapLib.core.region import enclosed_air
from AttentionMapLib.errors import AttentionMapError
from AttentionMapLib.io import read_volume, write_volume
from AttentionMapLib.sample_data import HEAD_CT_FILE, HEAD_CT_SHA256_FILE, fetch_head_ct, read_inv3


# ---- the real scan -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head():
    """(array_ijk int16, ijk_to_ras, intracranial bool mask) of the cached head CT, read as a user reads it."""
    array, ijk_to_ras = read_volume(fetch_head_ct())
    # inside the skull: per axial slice, what a closed ring of bone (>= 300 HU) encloses
    intracranial = enclosed_air(array < 300, 2000)
    return array, ijk_to_ras, intracranial


def test_head_ct_geometry_is_the_projects(head):
    array, ijk_to_ras, _ = head
    assert array.shape == (256, 256, 108) and array.dtype == np.int16
    np.testing.assert_allclose(np.linalg.norm(ijk_to_ras[:3, :3], axis=0), [0.9570312, 0.9570312, 1.5])
    # axial DICOM order: i to the patient's left (-R), j posterior (-A), k superior (+S); centred on RAS 0
    np.testing.assert_allclose(ijk_to_ras[:3, :3], np.diag([-0.9570312, -0.9570312, 1.5]), atol=1e-6)
    np.testing.assert_allclose(apply_affine(ijk_to_ras, (np.array(array.shape) - 1) / 2.0), 0.0, atol=1e-6)


def test_head_ct_is_in_hounsfield_units(head):
    array, _, intracranial = head
    corners = np.concatenate([array[:8, :8].ravel(), array[:8, -8:].ravel(), array[-8:, :8].ravel(),
                              array[-8:, -8:].ravel()])
    assert -1030 <= np.median(corners) <= -990  # air outside the head
    assert intracranial.sum() * 0.9570312 ** 2 * 1.5 > 100e3  # > 100 ml enclosed by bone
    assert 20 <= np.median(array[intracranial]) <= 60  # brain tissue
    assert array.max() > 1500 and (array > 300).sum() * 0.9570312 ** 2 * 1.5 > 200e3  # cortical bone, a skull


def _profile(array, ijk_to_ras, start_ras, direction_ras, step_mm=0.5):
    """Nearest-voxel values from start_ras along direction_ras until the ray leaves the volume."""
    points = np.asarray(start_ras) + np.arange(0, 400, step_mm)[:, None] * np.asarray(direction_ras, dtype=float)
    ijk = np.floor(ras_to_ijk(ijk_to_ras, points) + 0.5).astype(int)
    inside = np.all((ijk >= 0) & (ijk < array.shape), axis=1)
    return array[tuple(ijk[: np.argmin(inside) if not inside.all() else len(ijk)].T)]


def test_head_ct_vertex_is_superior(head):
    array, ijk_to_ras, intracranial = head
    centre = apply_affine(ijk_to_ras, np.argwhere(intracranial).mean(axis=0))
    up = _profile(array, ijk_to_ras, centre, (0, 0, 1))
    bone = np.argmax(up > 1000)
    assert bone > 0 and 20 <= np.median(up[:bone]) <= 60  # brain, then the skull's vertex ...
    assert (up[bone:] < -500).any()  # ... then the scalp and air (the scan ends just above the head)
    # the body's cross-section tapers to the vertex at the superior face and is cut wide at the inferior face
    body = array > -300
    s_of_k = apply_affine(ijk_to_ras, np.stack([np.zeros(array.shape[2]), np.zeros(array.shape[2]),
                                                np.arange(array.shape[2])], axis=1))[:, 2]
    area = body.sum(axis=(0, 1))[np.argsort(s_of_k)]  # from inferior to superior
    assert area[-1] < 0.1 * area.max() and area[0] > 0.75 * area.max()


def test_head_ct_face_is_anterior(head):
    array, ijk_to_ras, intracranial = head
    brain = apply_affine(ijk_to_ras, np.argwhere(intracranial).mean(axis=0))
    # air enclosed by the head (paranasal sinuses, nasal cavity): in front of and below the brain
    sinuses = apply_affine(ijk_to_ras, np.argwhere(enclosed_air(array < -400, 100)).mean(axis=0))
    assert sinuses[1] > brain[1] + 40 and sinuses[2] < brain[2]
    # in front of the nose: from the sinuses forward the face ends in air before the scan's anterior face
    forward = _profile(array, ijk_to_ras, sinuses, (0, 1, 0))
    tissue = np.flatnonzero(forward > -300)
    assert len(tissue) and (forward[tissue[-1]:] < -900).sum() >= 4


# ---- small projects and packages built here --------------------------------------------------------
def make_inv3(matrix: np.ndarray, spacing=(0.8, 0.6, 2.5), orientation=1, extra=b"", folder="tmpabc") -> bytes:
    """The bytes of a .inv3 holding `matrix` (slices, rows from the bottom, columns) as InVesalius writes it."""
    meta = {"format_version": 1, "modality": "CT", "orientation": orientation, "spacing": list(spacing),
            "matrix": {"filename": "matrix.dat", "dtype": str(matrix.dtype), "shape": list(matrix.shape)}}
    raw = matrix.astype(matrix.dtype.newbyteorder("<")).tobytes() + extra
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in (("main.plist", plistlib.dumps(meta)), ("matrix.dat", raw)):
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def make_deb(path: Path, inv3: bytes, compression: str = "xz") -> Path:
    """A Debian package (ar archive) whose data.tar.<compression> holds .../examples/Cranium.inv3."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        info = tarfile.TarInfo("./usr/share/doc/invesalius-examples/examples/Cranium.inv3")
        info.size = len(inv3)
        tar.addfile(info, io.BytesIO(inv3))
    members = [("debian-binary", b"2.0\n"), (f"data.tar.{compression}", lzma.compress(data.getvalue()))]
    blob = b"!<arch>\n"
    for name, body in members:
        blob += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body + b"\n" * (len(body) & 1)
    path.write_bytes(blob)
    return path


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/invesalius-examples.deb"


def test_read_inv3_places_a_marked_voxel_in_patient_space():
    """A bright voxel at stored (slice 4, row-from-bottom 1, column 2) of a 7 x 3 x 5 project lands at DICOM
    row 1 (= 3 - 1 - 1), column 2, slice 4; RAS from LPS identity directions and the centred origin."""
    matrix = np.zeros((7, 3, 5), dtype=np.int16)  # (slices, rows, columns)
    matrix[4, 1 - 1, 2] = 1000  # bottom-up row 0 = DICOM row 2
    matrix[0, 2, 0] = -7  # bottom-up row 2 = DICOM row 0
    array, ijk_to_ras = read_inv3(make_inv3(matrix, spacing=(0.8, 0.6, 2.5)))
    assert array.shape == (5, 3, 7) and array.dtype == np.int16
    assert array[2, 2, 4] == 1000 and array[0, 0, 0] == -7 and np.count_nonzero(array) == 2
    np.testing.assert_allclose(ijk_to_ras[:3, :3], np.diag([-0.8, -0.6, 2.5]))
    np.testing.assert_allclose(apply_affine(ijk_to_ras, [[2, 1, 3]]), [[0.0, 0.0, 0.0]])  # the centre voxel
    # columns to the patient's left, rows to posterior, slices up (LPS +x, +y, +z)
    np.testing.assert_allclose(apply_affine(ijk_to_ras, [[3, 1, 3], [2, 2, 3], [2, 1, 4]]),
                               [[-0.8, 0, 0], [0, -0.6, 0], [0, 0, 2.5]], atol=1e-12)


@pytest.mark.parametrize("change, message", [
    (dict(orientation=2), "orientation 2; only axial"),
    (dict(extra=b"\0\0"), "holds 212 bytes"),
    (dict(spacing=(1.0, 0.0, 1.0)), "3 positive spacings"),
])
def test_read_inv3_refuses_projects_it_cannot_place(change, message):
    with pytest.raises(AttentionMapError, match=message):
        read_inv3(make_inv3(np.zeros((7, 3, 5), dtype=np.int16), **change), "x.inv3")


def test_read_inv3_refuses_what_is_not_a_project():
    with pytest.raises(AttentionMapError, match="x.inv3: not a readable InVesalius 3 project"):
        read_inv3(b"not a tar", "x.inv3")


def test_a_package_in_the_cache_is_converted_without_the_network(tmp_path):
    matrix = (np.arange(7 * 3 * 5, dtype=np.int16) - 50).reshape(7, 3, 5)
    inv3 = make_inv3(matrix)
    cache = tmp_path / "cache"
    cache.mkdir()
    make_deb(cache / "invesalius-examples_0.1-1_all.deb", inv3)
    path = fetch_head_ct(cache, url=closed_port_url(), sha256=hashlib.sha256(inv3).hexdigest(), timeout=5,
                         apt_get=None)
    assert path == cache / HEAD_CT_FILE
    array, ijk_to_ras = read_volume(path)
    expected, expected_affine = read_inv3(inv3)
    assert np.array_equal(array, expected) and array.dtype == np.int16
    np.testing.assert_allclose(ijk_to_ras, expected_affine, atol=1e-6)
    assert sorted(p.name for p in cache.iterdir()) == [HEAD_CT_SHA256_FILE, HEAD_CT_FILE,
                                                       "invesalius-examples_0.1-1_all.deb"]
    (cache / "invesalius-examples_0.1-1_all.deb").unlink()  # the converted scan is reused from now on
    assert fetch_head_ct(cache, url=closed_port_url(), sha256="0" * 64, apt_get=None) == path


def test_a_package_with_another_scan_is_refused_by_its_checksum(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    make_deb(cache / "invesalius-examples_0.1-1_all.deb", make_inv3(np.zeros((7, 3, 5), dtype=np.int16)))
    with pytest.raises(AttentionMapError, match="its Cranium.inv3 has sha256 .*, expected 0000"):
        fetch_head_ct(cache, url=closed_port_url(), sha256="0" * 64, timeout=5, apt_get=None)
    assert sorted(p.name for p in cache.iterdir()) == ["invesalius-examples_0.1-1_all.deb"]


def test_offline_without_apt_get_says_what_to_install_and_where_to_put_the_package(tmp_path):
    cache = tmp_path / "cache"
    url = closed_port_url()
    with pytest.raises(AttentionMapError) as info:
        fetch_head_ct(cache, url=url, timeout=5, apt_get="no-such-apt-get")
    message = str(info.value)
    assert f"could not download {url}" in message
    assert "no-such-apt-get is not installed (it comes with Debian and Ubuntu)" in message
    assert f"put the .deb into {cache}" in message and "apt-get download invesalius-examples" in message
    assert list(cache.iterdir()) == []


def test_a_file_that_is_not_a_package_is_named(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "invesalius-examples_0.1-1_all.deb").write_bytes(b"<html>not found</html>")
    with pytest.raises(AttentionMapError, match="invesalius-examples_0.1-1_all.deb: .*not a Debian package"):
        fetch_head_ct(cache, url=closed_port_url(), timeout=5, apt_get=None)


def fake_apt_get(folder: Path, script: str) -> str:
    """An executable standing in for apt-get (the real one needs a Debian archive): runs `script` in its cwd."""
    path = folder / "fake-apt-get"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


def test_apt_get_download_is_used_when_the_url_fails(tmp_path):
    inv3 = make_inv3(np.full((7, 3, 5), 40, dtype=np.int16))
    deb = make_deb(tmp_path / "built.deb", inv3)
    apt_get = fake_apt_get(tmp_path, f'[ "$1 $2" = "download invesalius-examples" ] && cp {deb} '
                                     "invesalius-examples_9.9-1_all.deb")
    cache = tmp_path / "cache"
    path = fetch_head_ct(cache, url=closed_port_url(), sha256=hashlib.sha256(inv3).hexdigest(), timeout=5,
                         apt_get=apt_get)
    assert (read_volume(path)[0] == 40).all()
    assert sorted(p.name for p in cache.iterdir()) == [HEAD_CT_SHA256_FILE, HEAD_CT_FILE]  # the package is not kept


def test_a_failing_apt_get_is_reported_with_its_last_line(tmp_path):
    apt_get = fake_apt_get(tmp_path, 'echo "Reading package lists..." >&2; '
                                     'echo "E: Unable to locate package invesalius-examples" >&2; exit 100')
    with pytest.raises(AttentionMapError, match="download invesalius-examples: E: Unable to locate package"):
        fetch_head_ct(tmp_path / "cache", url=closed_port_url(), timeout=5, apt_get=apt_get)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_changed_cached_scan_is_converted_again_from_a_verified_package(tmp_path):
    """The cache is re-verified: a head_ct.nrrd that no longer has the sha256 recorded at conversion is not used."""
    inv3 = make_inv3(np.full((7, 3, 5), 40, dtype=np.int16))
    cache = tmp_path / "cache"
    cache.mkdir()
    make_deb(cache / "invesalius-examples_0.1-1_all.deb", inv3)
    digest = hashlib.sha256(inv3).hexdigest()
    path = fetch_head_ct(cache, url=closed_port_url(), sha256=digest, timeout=5, apt_get=None)
    write_volume(path, np.zeros((7, 3, 5), np.int16), np.eye(4))  # changed behind the cache's back
    again = fetch_head_ct(cache, url=closed_port_url(), sha256=digest, timeout=5, apt_get=None)
    assert (read_volume(again)[0] == 40).all()
