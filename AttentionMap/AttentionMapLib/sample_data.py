"""Sample scans, downloaded once and cached; nothing is built or installed.

- `fetch_sample_data`: the CT / MR volumes (with tumour labels) shipped in the pyradiomics 3.0.1 source
  archive. The sdist is downloaded from PyPI (files.pythonhosted.org), its sha256 is checked, and only
  ``data/*.nrrd`` is extracted. BSD-3 (pyradiomics).
- `fetch_head_ct`: a whole head CT without a lung lesion (no chest at all), InVesalius' example project
  ``Cranium.inv3`` from the Debian package ``invesalius-examples`` (GPL-2), converted to NRRD in Hounsfield
  units with its patient geometry (`read_inv3`).

Cache: ``cache_dir`` argument, else ``$ATTENTIONMAP_CACHE/sample-data``, else
``~/.cache/attentionmap/sample-data``. A complete cache is reused without touching the network.
"""
from __future__ import annotations

import hashlib
import io
import os
import plistlib
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .core.geometry import lps_to_ras
from .errors import AttentionMapError

SDIST_URL = (
    "https://files.pythonhosted.org/packages/1b/35/c7f7fb7affd302fd8107dcee6b6e7aaf3708b75ad69d5f9a3dfcadb73eaa/"
    "pyradiomics-3.0.1.tar.gz"
)  # from https://pypi.org/simple/pyradiomics/
SDIST_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"
SAMPLE_NAMES = tuple(
    f"{case}_{kind}" for case in ("lung1", "lung2", "brain1", "brain2", "breast1") for kind in ("image", "label")
)


def default_cache_dir() -> Path:
    """``$ATTENTIONMAP_CACHE/sample-data`` if that variable is set, else ``~/.cache/attentionmap/sample-data``."""
    root = os.environ.get("ATTENTIONMAP_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "attentionmap"
    return base / "sample-data"


MANIFEST = ".sample-data.sha256"  # in the cache: the archive's sha256 and each extracted file's, checked on every use


def _manifest(folder: Path) -> Dict[str, str]:
    """name -> sha256 recorded in the cache's manifest ({} when there is none or it is unreadable)."""
    try:
        lines = (folder / MANIFEST).read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    return dict(reversed(line.split(maxsplit=1)) for line in lines if len(line.split(maxsplit=1)) == 2)


def _cached(folder: Path, archive_sha256: str) -> Optional[Dict[str, Path]]:
    """The cached volumes when every one is there and still has the sha256 recorded when it was extracted from the
    archive with ``archive_sha256``; else None (the cache is filled again)."""
    paths = {name: folder / f"{name}.nrrd" for name in SAMPLE_NAMES}
    recorded = _manifest(folder)
    if recorded.get("archive") != archive_sha256.lower() or not all(p.is_file() for p in paths.values()):
        return None
    return paths if all(_sha256(path) == recorded.get(path.name) for path in paths.values()) else None


def _download_failure(url: str, target: Path, timeout: float) -> Optional[str]:
    """Download `url` into `target`; None when it worked, else the reason."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as exc:
        return f"could not download {url} ({getattr(exc, 'reason', exc)})"
    return None


def _download(url: str, target: Path, timeout: float) -> None:
    failure = _download_failure(url, target, timeout)
    if failure is not None:
        raise AttentionMapError(
            f"sample data: {failure}; are you offline? Connect to the internet once (the files are cached), or put "
            "the pyradiomics 3.0.1 data/*.nrrd files into the cache folder yourself"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_nrrd(archive: Path, folder: Path) -> None:
    """Extract every ``<top>/data/<name>.nrrd`` member (flat, no links, no other paths) into `folder`."""
    wanted = {f"{name}.nrrd" for name in SAMPLE_NAMES}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[1] == "data" and parts[2] in wanted:
                source = tar.extractfile(member)
                with open(folder / parts[2], "wb") as out:
                    shutil.copyfileobj(source, out)


def fetch_sample_data(
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    url: str = SDIST_URL,
    sha256: str = SDIST_SHA256,
    timeout: float = 60.0,
) -> Dict[str, Path]:
    """Paths of the pyradiomics sample volumes, downloading and caching them on first use.

    Returns {"lung1_image": Path, "lung1_label": Path, ..., "breast1_label": Path} (NRRD files).
    `url` / `sha256` may point at another copy of the same archive (tests use a local file:// URL). The cache is
    re-verified on every call: each file must still have the sha256 recorded when it was extracted from the archive
    with `sha256` (`MANIFEST`), else the archive is fetched and checked again.
    Raises AttentionMapError when the download fails (offline), the checksum differs, or the archive
    lacks one of the volumes. Nothing partial is left in the cache: files are extracted into a temporary
    folder and moved in when complete.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = _cached(folder, sha256)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        archive = Path(tmp) / "sdist.tar.gz"
        _download(url, archive, timeout)
        actual = _sha256(archive)
        if actual != sha256.lower():
            raise AttentionMapError(f"sample data: {url} has sha256 {actual}, expected {sha256}; refusing to use it")
        staging = Path(tmp) / "data"
        staging.mkdir()
        try:
            _extract_nrrd(archive, staging)
        except tarfile.TarError as exc:
            raise AttentionMapError(f"sample data: {url} is not a readable .tar.gz archive ({exc})") from None
        missing = [name for name in SAMPLE_NAMES if not (staging / f"{name}.nrrd").is_file()]
        if missing:
            raise AttentionMapError(f"sample data: {url} lacks data/{missing[0]}.nrrd (missing: {', '.join(missing)})")
        manifest = [f"{sha256.lower()} archive"] + [f"{_sha256(staging / f'{n}.nrrd')} {n}.nrrd" for n in SAMPLE_NAMES]
        (staging / MANIFEST).write_text("\n".join(manifest) + "\n", encoding="ascii")
        for name in SAMPLE_NAMES:
            os.replace(staging / f"{name}.nrrd", folder / f"{name}.nrrd")
        os.replace(staging / MANIFEST, folder / MANIFEST)  # last: the files it names are in place
    return _cached(folder, sha256)


# ---------------------------------------------------------------------------------------------- head CT
HEAD_CT_PACKAGE = "invesalius-examples"
HEAD_CT_DEB_URL = (
    "https://deb.debian.org/debian/pool/main/i/invesalius/invesalius-examples_3.1.99998-4_all.deb"
)  # Debian 12 (bookworm); https://packages.debian.org/bookworm/invesalius-examples
HEAD_CT_INV3_SHA256 = "3b34f11f7c4f557f4c65cd6543c412a2f6ceb0cfecfd9c41184420e02d9b7e2a"  # its Cranium.inv3
HEAD_CT_FILE = "head_ct.nrrd"
HEAD_CT_SHA256_FILE = ".head_ct.nrrd.sha256"  # the converted scan's sha256, checked whenever the cache is reused
MAX_PROJECT_BYTES = 256 * 2 ** 20  # Cranium.inv3 has about 10 MB
_INV3_NAME = "Cranium.inv3"
_INV3_AXIAL = 1  # InVesalius constants.AXIAL: the project's "orientation" when it was read from axial slices
_DEB_TAR_MODES = {"data.tar.xz": "r:xz", "data.tar.gz": "r:gz", "data.tar.bz2": "r:bz2", "data.tar": "r:"}


def _extract_from_deb(deb: Path, name: str, out: Path) -> str:
    """Stream the regular file called `name` (any folder) of the data.tar of Debian package `deb` into `out`, hashed
    as it is written (never whole in memory, at most MAX_PROJECT_BYTES); its sha256.

    The package (an ``ar`` archive) is read with the standard library; compressions it lacks (zstd, as
    Ubuntu builds packages) go through ``dpkg-deb --fsys-tarfile`` when dpkg-deb is installed.
    """
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise AttentionMapError(f"{deb}: not a Debian package (no ar archive header)")
    data: Optional[Tuple[bytes, str]] = None
    pos = 8
    while data is None and pos + 60 <= len(blob):
        header = blob[pos:pos + 60]  # name[16] mtime[12] uid[6] gid[6] mode[8] size[10] "`\n"
        member, size = header[:16].decode("ascii", "replace").strip().rstrip("/"), int(header[48:58])
        pos += 60
        if member in _DEB_TAR_MODES:
            data = blob[pos:pos + size], _DEB_TAR_MODES[member]
        elif member.startswith("data.tar"):
            dpkg_deb = shutil.which("dpkg-deb")
            if dpkg_deb is None:
                raise AttentionMapError(f"{deb}: its {member} needs dpkg-deb to unpack; install dpkg, or use the "
                                        f"Debian package {HEAD_CT_DEB_URL}")
            data = subprocess.run([dpkg_deb, "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout, "r:"
        pos += size + (size & 1)
    if data is None:
        raise AttentionMapError(f"{deb}: a Debian package without data.tar.*")
    with tarfile.open(fileobj=io.BytesIO(data[0]), mode=data[1]) as tar:
        for info in tar:
            if info.isfile() and info.name.rsplit("/", 1)[-1] == name:
                if info.size > MAX_PROJECT_BYTES:
                    raise AttentionMapError(f"{deb}: its {name} has {info.size} bytes, more than the "
                                            f"{MAX_PROJECT_BYTES} a scan project of this package has")
                digest, source = hashlib.sha256(), tar.extractfile(info)
                with open(out, "wb") as stream:
                    block = source.read(1 << 20)
                    while block:
                        digest.update(block)
                        stream.write(block)
                        block = source.read(1 << 20)
                return digest.hexdigest()
    raise AttentionMapError(f"{deb}: the package holds no {name}")


def read_inv3(project: bytes, source: str = "project") -> Tuple[np.ndarray, np.ndarray]:
    """(array_ijk, ijk_to_ras) of an axial InVesalius 3 project (the bytes of a .inv3 file).

    A .inv3 is a gzip tar of one folder: ``main.plist`` names the image file (``matrix`` filename, dtype,
    shape (slices, rows, columns)) and its ``spacing`` (column, row, slice mm); the image file is the raw
    C-order array. InVesalius wrote it (project.py SavePlistProject; read back by numpy.memmap in
    load_from_folder) from DICOM slices sorted by gdcm.IPPSorter (ascending position along the slice
    normal), each slice upside down (rows reversed: VTK's lower-left origin; imagedata_utils.dcm2memmap),
    columns as in DICOM, values as the reader rescaled them (Hounsfield units for CT). Format 1 stores no
    origin, direction, byte order or patient orientation: the bytes are read little-endian (the x86 machines
    InVesalius ran on) and the axial DICOM convention is assumed: columns run to the patient's left, rows
    to posterior, slices to superior. The volume's centre is placed at RAS (0, 0, 0).

    Returns array_ijk (columns, rows, slices) in DICOM row order, the stored pixel type; ijk_to_ras (4, 4).
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(project), mode="r:gz") as tar:
            files = {info.name.rsplit("/", 1)[-1]: info for info in tar if info.isfile()}
            meta = plistlib.loads(tar.extractfile(files["main.plist"]).read())
            matrix = meta["matrix"]
            raw = tar.extractfile(files[matrix["filename"]]).read()
            dtype = np.dtype(matrix["dtype"]).newbyteorder("<")
            shape = tuple(int(n) for n in matrix["shape"])
            spacing = np.asarray(meta["spacing"], dtype=np.float64)
            orientation = meta["orientation"]
    except (tarfile.TarError, OSError, EOFError, plistlib.InvalidFileException, KeyError, TypeError, ValueError) as exc:
        raise AttentionMapError(f"{source}: not a readable InVesalius 3 project ({type(exc).__name__}: {exc}); "
                                "expected a gzip tar with main.plist and its matrix file") from None
    if orientation != _INV3_AXIAL:
        raise AttentionMapError(f"{source}: main.plist orientation {orientation!r}; only axial projects "
                                f"({_INV3_AXIAL}) are read")
    if len(shape) != 3 or spacing.shape != (3,) or not np.all(spacing > 0) or dtype.kind not in "iuf":
        raise AttentionMapError(f"{source}: main.plist describes shape {shape}, spacing {spacing.tolist()}, dtype "
                                f"{dtype}; expected 3 axes, 3 positive spacings and a numeric dtype")
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise AttentionMapError(f"{source}: {matrix['filename']} holds {len(raw)} bytes, main.plist's shape {shape} "
                                f"of {dtype} needs {int(np.prod(shape)) * dtype.itemsize}")
    stored = np.frombuffer(raw, dtype=dtype).reshape(shape)  # (slice, row from the bottom, column)
    array_ijk = np.ascontiguousarray(stored[:, ::-1, :].transpose(2, 1, 0), dtype=dtype.newbyteorder("="))
    ijk_to_ras = lps_to_ras(np.diag([*spacing, 1.0]))  # identity LPS directions: i to the left, j posterior, k up
    ijk_to_ras[:3, 3] = -ijk_to_ras[:3, :3] @ ((np.asarray(array_ijk.shape) - 1) / 2.0)
    return array_ijk, ijk_to_ras


def _apt_get_download(apt_get: str, folder: Path, timeout: float, failures: List[str]) -> Optional[Path]:
    """``apt-get download invesalius-examples`` into `folder` (no root needed); the .deb, or None and a reason."""
    exe = shutil.which(apt_get)
    if exe is None:
        failures.append(f"{apt_get} is not installed (it comes with Debian and Ubuntu)")
        return None
    try:
        run = subprocess.run([exe, "download", HEAD_CT_PACKAGE], cwd=folder, capture_output=True, text=True,
                             timeout=max(timeout, 120.0))
    except (OSError, subprocess.TimeoutExpired) as exc:
        failures.append(f"{apt_get} download {HEAD_CT_PACKAGE}: {exc}")
        return None
    debs = sorted(folder.glob(f"{HEAD_CT_PACKAGE}_*.deb"))
    if run.returncode != 0 or not debs:
        lines = (run.stderr or run.stdout).strip().splitlines() or [f"exit status {run.returncode}"]
        failures.append(f"{apt_get} download {HEAD_CT_PACKAGE}: {lines[-1]}")
        return None
    return debs[0]


def _head_ct_project(folder: Path, tmp: Path, url: str, sha256: str, timeout: float,
                     apt_get: Optional[str]) -> bytes:
    """Cranium.inv3 with `sha256`, from the first source that has it: a .deb in `folder`, `url`, `apt_get`."""
    failures: List[str] = []

    def candidates():
        yield from sorted(folder.glob(f"{HEAD_CT_PACKAGE}_*.deb"))
        failure = _download_failure(url, tmp / "download.deb", timeout)
        if failure is None:
            yield tmp / "download.deb"
        else:
            failures.append(failure)
        if apt_get:
            (tmp / "apt").mkdir()
            deb = _apt_get_download(apt_get, tmp / "apt", timeout, failures)
            if deb is not None:
                yield deb

    for deb in candidates():
        project = tmp / _INV3_NAME
        try:
            actual = _extract_from_deb(deb, _INV3_NAME, project)
        except (AttentionMapError, tarfile.TarError, OSError, EOFError, ValueError,
                subprocess.CalledProcessError) as exc:
            failures.append(f"{deb.name}: {exc}")
            continue
        if actual == sha256.lower():
            return project.read_bytes()  # read only once its hash is known
        failures.append(f"{deb.name}: its {_INV3_NAME} has sha256 {actual}, expected {sha256}")
    raise AttentionMapError(
        f"head CT: could not get {_INV3_NAME} of the Debian package {HEAD_CT_PACKAGE} ({'; '.join(failures)}). "
        f"Connect to the internet once (the converted scan is cached), or download {url} yourself (or run "
        f"`apt-get download {HEAD_CT_PACKAGE}` on a Debian machine) and put the .deb into {folder}"
    )


def fetch_head_ct(
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    url: str = HEAD_CT_DEB_URL,
    sha256: str = HEAD_CT_INV3_SHA256,
    timeout: float = 60.0,
    apt_get: Optional[str] = "apt-get",
) -> Path:
    """Path of a whole head CT without a lung lesion (NRRD, int16 Hounsfield units), converting it on first use.

    The scan is InVesalius' example project Cranium.inv3 ("ProMED CT 0051", 256 x 256 x 108 voxels of
    0.957 x 0.957 x 1.5 mm, vertex to jaw) from the Debian package invesalius-examples
    (GPL-2). The package is taken from the first source whose Cranium.inv3 has `sha256`: an
    ``invesalius-examples_*.deb`` put into the cache folder by hand, `url` (Debian's archive), then
    ``apt-get download invesalius-examples`` (`apt_get`: the command; None skips it). Geometry and
    intensities: `read_inv3`. Only the NRRD is kept (``head_ct.nrrd`` in the cache, written atomically), with its
    sha256 beside it: a cached scan that no longer has it is converted again.
    Raises AttentionMapError naming every source tried and what to do when none works.
    """
    from .io import write_volume

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target, recorded = folder / HEAD_CT_FILE, folder / HEAD_CT_SHA256_FILE
    if target.is_file() and recorded.is_file() and recorded.read_text(encoding="ascii").strip() == _sha256(target):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        project = _head_ct_project(folder, Path(tmp), url, sha256, timeout, apt_get)
        array_ijk, ijk_to_ras = read_inv3(project, _INV3_NAME)
        write_volume(target, array_ijk, ijk_to_ras)
        (Path(tmp) / HEAD_CT_SHA256_FILE).write_text(_sha256(target) + "\n", encoding="ascii")
        os.replace(Path(tmp) / HEAD_CT_SHA256_FILE, recorded)
    return target
