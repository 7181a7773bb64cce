"""Reliability sweep, library: input dtypes, and a bad argument to every public entry point.

Integer and float64 tensors (what torch.from_numpy gives for default numpy arrays) are cast to the
model's float32 and give the float32 map; everything else wrong raises AttentionMapError naming the
argument, and the caller's objects are unchanged.
"""
import os
import signal

import numpy as np
import pytest
import torch
from monai.networks.nets import ViT

import AttentionMapLib as lib
from AttentionMapLib.errors import AttentionMapError
from reliability import ARGS, PREPROCESSING, oblique_affine, scan_array


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ViT(**ARGS).eval()


def _input(dtype) -> torch.Tensor:
    values = np.random.default_rng(1).integers(0, 200, (1, 1, 16, 16, 16))
    return torch.from_numpy(values.astype(dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.int16, np.uint8, np.int64, np.float16],
                         ids=["float64", "int16", "uint8", "int64", "float16"])
@pytest.mark.parametrize("method", ["rollout", "grad_rollout"])
def test_explain_casts_other_dtypes_to_the_models(model, dtype, method):
    x = _input(dtype)
    kept = x.clone()
    result = lib.explain(model, x, method=method, target=1)
    reference = lib.explain(model, x.to(torch.float32), method=method, target=1)
    np.testing.assert_allclose(result.grid, reference.grid, rtol=1e-5, atol=1e-6)
    assert x.dtype == kept.dtype and torch.equal(x, kept)  # the caller's tensor is not converted in place


def _fifo(tmp_path):
    path = tmp_path / "stream.nrrd"
    os.mkfifo(path)
    return path


# name -> (call(model, tmp_path), words)
CASES = {
    "explain bool tensor": (lambda m, t: lib.explain(m, _input(np.uint8) > 100), "x: expected real intensities"),
    "explain complex tensor": (
        lambda m, t: lib.explain(m, _input(np.float32).to(torch.complex64)),
        "x: expected real intensities (a float or integer tensor), got dtype torch.complex64",
    ),
    "explain numpy array": (
        lambda m, t: lib.explain(m, np.zeros((1, 1, 16, 16, 16))),
        "x: expected a torch tensor (B, C, *img_size), got ndarray (convert it with torch.from_numpy)",
    ),
    "explain wrong rank": (
        lambda m, t: lib.explain(m, torch.zeros(1, 16, 16, 16)),
        "x: expected a torch tensor (B, C) + 3",
    ),
    "explain wrong size": (lambda m, t: lib.explain(m, torch.zeros(1, 1, 16, 16, 8)), "x: spatial size (16, 16, 8)"),
    "explain NaN": (lambda m, t: lib.explain(m, torch.full((1, 1, 16, 16, 16), float("nan"))), "x: contains NaN"),
    "explain not a model": (
        lambda m, t: lib.explain("vit", torch.zeros(1, 1, 16, 16, 16)),
        "model: expected a torch.nn.Module",
    ),
    "explain not a ViT": (
        lambda m, t: lib.explain(torch.nn.Conv3d(1, 1, 3), torch.zeros(1, 1, 16, 16, 16)),
        "model: Conv3d contains no attention block this tool can read",
    ),
    "explain method": (
        lambda m, t: lib.explain(m, torch.zeros(1, 1, 16, 16, 16), method="cam"),
        "method: expected one of",
    ),
    "explain layer": (lambda m, t: lib.explain(m, torch.zeros(1, 1, 16, 16, 16), layer=3), "layer: expected -1..0"),
    "capture_attention head": (
        lambda m, t: lib.capture_attention(m, torch.zeros(1, 1, 16, 16, 16), head=2),
        "head: expected 0..1",
    ),
    "explain_volume list": (
        lambda m, t: lib.explain_volume(m, [[1, 2], [3, 4]], oblique_affine(), PREPROCESSING, img_size=(16, 16, 16)),
        "array_ijk: got shape (2, 2)",
    ),
    "explain_volume affine": (
        lambda m, t: lib.explain_volume(m, scan_array(), np.eye(3), PREPROCESSING, img_size=(16, 16, 16)),
        "ijk_to_ras",
    ),
    "explain_volume preprocessing": (
        lambda m, t: lib.explain_volume(m, scan_array(), oblique_affine(), [1], img_size=(16, 16, 16)),
        "preprocessing",
    ),
    "read_volume named pipe": (lambda m, t: lib.read_volume(_fifo(t)), "stream.nrrd: is a named pipe"),
    "read_volume empty folder": (lambda m, t: lib.read_volume(t), "no DICOM series found in this folder"),
    "read_volume not a path": (lambda m, t: lib.read_volume(3.5), "path: expected a file or folder path, got 3.5"),
    "write_volume suffix": (
        lambda m, t: lib.write_volume(t / "map.png", np.zeros((2, 2, 2)), np.eye(4)),
        "map.png: expected a file name ending in one of",
    ),
    "write_volume missing folder": (
        lambda m, t: lib.write_volume(t / "no" / "map.nrrd", np.zeros((2, 2, 2)), np.eye(4)),
        "map.nrrd: cannot write in",
    ),
    "write_volume 4D": (
        lambda m, t: lib.write_volume(t / "map.nrrd", np.zeros((2, 2, 2, 2)), np.eye(4)),
        "array_ijk: expected a 3D array",
    ),
    "parse_preprocessing list": (lambda m, t: lib.parse_preprocessing([1]), "preprocessing"),
    "lps_to_ras shape": (lambda m, t: lib.lps_to_ras(np.eye(3)), "matrix: expected a 4x4 matrix, got shape (3, 3)"),
    "mask_statistics shapes": (lambda m, t: lib.mask_statistics(np.zeros((2, 2, 2)), np.zeros((3, 3, 3))), "shape"),
    "pointing_game shapes": (lambda m, t: lib.pointing_game(np.zeros((2, 2, 2)), np.ones((3, 3, 3))), "shape"),
    "deletion_insertion baseline": (
        lambda m, t: lib.deletion_insertion(m, torch.zeros(1, 1, 16, 16, 16), np.ones((2, 2, 2)), baseline="noise"),
        "baseline: expected one of",
    ),
    "deletion_insertion steps": (
        lambda m, t: lib.deletion_insertion(m, torch.zeros(1, 1, 16, 16, 16), np.ones((2, 2, 2)), steps=0),
        "steps: expected at least 1, got 0",
    ),
    "deletion_insertion numpy x": (
        lambda m, t: lib.deletion_insertion(m, np.zeros((1, 1, 16, 16, 16)), np.ones((2, 2, 2))),
        "x: expected a torch tensor (1, C, *spatial)",
    ),
    "score_volume NaN volume": (
        lambda m, t: lib.score_volume(m, np.full((20, 16, 12), np.nan), oblique_affine(), PREPROCESSING, (16, 16, 16)),
        "array_ijk: 3840 NaN",
    ),
    "load_model number": (lambda m, t: lib.load_model(7), "model: expected 'demo'"),
    "load_model named pipe": (lambda m, t: lib.load_model(str(_fifo(t))), "stream.nrrd: is a named pipe"),
}


def _alarm(signum, frame):
    raise TimeoutError("blocked: the call opened a named pipe")


@pytest.mark.parametrize("name", list(CASES))
def test_public_entry_point_refuses_with_attention_map_error(name, model, tmp_path):
    call, words = CASES[name]
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)  # a regression that opens a pipe would block forever
    try:
        with pytest.raises(AttentionMapError) as refused:
            call(model, tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert words in str(refused.value), str(refused.value)
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name]


def test_write_volume_replaces_a_link_without_writing_through_it(tmp_path):
    """write_volume renames a finished temporary file over the name: a link there is replaced, its target kept."""
    target = tmp_path / "ct.nrrd"
    target.write_bytes(b"the user's CT")
    (tmp_path / "map.nrrd").symlink_to(target)
    lib.write_volume(tmp_path / "map.nrrd", np.ones((2, 3, 4), np.float32), oblique_affine())
    assert target.read_bytes() == b"the user's CT"
    assert not (tmp_path / "map.nrrd").is_symlink()
    assert lib.read_volume(tmp_path / "map.nrrd")[0].shape == (2, 3, 4)


def test_write_volume_never_writes_through_a_link_planted_beside_the_target(tmp_path):
    """The temporary file used to be `.NAME.partialPID.nrrd` beside the target: a link planted at that name made
    the volume overwrite the link's target. Now it is written in a private mkdtemp folder."""
    import os

    from AttentionMapLib.io import read_volume, write_volume

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "map.nrrd"
    for pid in {os.getpid(), os.getpid() + 1}:
        (tmp_path / f".map.partial{pid}.nrrd").symlink_to(victim)
    write_volume(target, np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.eye(4))
    assert victim.read_text() == "precious"
    assert read_volume(target)[0].shape == (2, 3, 4)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_symlink()) == ["map.nrrd", "victim.txt"]


def test_reports_follow_the_umask_and_never_loosen_an_existing_mode(tmp_path):
    import os
    import stat

    from AttentionMapLib.outputs import current_umask, write_file

    before = os.umask(0o077)
    try:
        assert current_umask() == 0o077
        report = write_file(tmp_path / "scores.json", b"{}", [], "--output")
        assert stat.S_IMODE(os.stat(report).st_mode) == 0o600  # was 0644 whatever the umask
        os.umask(0o022)
        os.chmod(report, 0o600)
        write_file(report, b"{}", [], "--output")
        assert stat.S_IMODE(os.stat(report).st_mode) == 0o600  # an existing 0600 report stays 0600
        fresh = write_file(tmp_path / "other.json", b"{}", [], "--output")
        assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o644
    finally:
        os.umask(before)


def _nifti_with_pixdim(path, value, offset=80):
    """A real NIfTI-1 file (nibabel) whose header's pixdim[1] is then set to ``value`` byte for byte (nibabel itself
    would repair 0 or negative values when saving)."""
    import gzip
    import struct

    import nibabel

    plain = path.with_suffix("") if path.suffix == ".gz" else path
    nibabel.save(nibabel.Nifti1Image(np.zeros((6, 5, 4), np.int16), np.diag([0.8, 0.8, 2.5, 1.0])), str(plain))
    data = bytearray(plain.read_bytes())
    data[offset:offset + 4] = struct.pack("<f", value)
    if path.suffix == ".gz":
        plain.unlink()
        path.write_bytes(gzip.compress(bytes(data)))
    else:
        path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("value", [0.0, float("nan"), -0.8, float("inf")], ids=["zero", "nan", "negative", "inf"])
@pytest.mark.parametrize("name", ["scan.nii", "scan.nii.gz"])
def test_a_bad_voxel_spacing_in_the_header_is_refused_not_read_as_1_mm(tmp_path, value, name):
    import SimpleITK as sitk

    from AttentionMapLib.io import read_volume

    path = _nifti_with_pixdim(tmp_path / name, value)
    assert np.isclose(sitk.ReadImage(str(path)).GetSpacing()[0], [0.8, 1.0]).any()  # a reader reads it as one
    with pytest.raises(AttentionMapError, match=r"scan\.nii.*voxel spacing .*expected positive finite millimetres"):
        read_volume(path)
    good = _nifti_with_pixdim(tmp_path / f"good-{name}", 0.8)
    assert np.allclose(np.linalg.norm(read_volume(good)[1][:3, :3], axis=0), [0.8, 0.8, 2.5])


@pytest.mark.parametrize("header, words", [
    ("spacings: 1 0 1", "spacing"),  # ITK refuses this one itself
    ("space: left-posterior-superior\nspace directions: (1,0,0) (0,0,0) (0,0,1)", "voxel spacing 1, 0, 1"),
    ("spacings: 1 nan 1", "voxel spacing 1, nan, 1"),
])
def test_nrrd_headers_with_a_bad_spacing_are_refused(tmp_path, header, words):
    from AttentionMapLib.io import read_volume

    path = tmp_path / "scan.nrrd"
    text = f"NRRD0004\ntype: int16\ndimension: 3\nsizes: 2 2 2\n{header}\nencoding: raw\nendian: little\n\n"
    path.write_bytes(text.encode() + b"\0" * 16)
    with pytest.raises(AttentionMapError, match=words):
        read_volume(path)


def test_a_header_declaring_more_than_the_limit_is_refused_before_any_voxel_is_read(tmp_path, monkeypatch):
    """A 100-byte NRRD header declaring 4096^3 float voxels (256 GiB) made ITK try to allocate them; now the header
    is checked against the limit (8 GiB, $ATTENTIONMAP_MAX_VOLUME_BYTES) first."""
    import resource

    from AttentionMapLib.io import VOLUME_LIMIT_VARIABLE, read_volume

    path = tmp_path / "huge.nrrd"
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4096 4096 4096\nencoding: raw\nendian: little\n\n"
                     + b"\0" * 64)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with pytest.raises(AttentionMapError, match=r"huge\.nrrd: its header declares 4096 x 4096 x 4096 voxels .*"
                                                 r"256\.0 GiB\), more than the 8\.0 GiB limit"):
        read_volume(path)
    small = tmp_path / "small.nrrd"
    small.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 8 8 8\nencoding: raw\nendian: little\n\n"
                      + b"\0" * 2048)
    monkeypatch.setenv(VOLUME_LIMIT_VARIABLE, "1024")  # 2 KiB of voxels against a 1 KiB limit
    with pytest.raises(AttentionMapError, match=VOLUME_LIMIT_VARIABLE):
        read_volume(small)
    monkeypatch.setenv(VOLUME_LIMIT_VARIABLE, "4096")
    assert read_volume(small)[0].shape == (8, 8, 8)
    assert resource.getrlimit(resource.RLIMIT_AS) == (soft, hard)
