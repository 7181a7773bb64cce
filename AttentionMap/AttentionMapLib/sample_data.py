"""Sample scans: the CT / MR volumes (with tumour labels) shipped in the pyradiomics 3.0.1 source archive.

Nothing is built or installed: the sdist is downloaded from PyPI (files.pythonhosted.org), its sha256 is
checked, and only ``data/*.nrrd`` is extracted into a cache folder. The data are BSD-3-licensed (pyradiomics).
Cache: ``cache_dir`` argument, else ``$ATTENTIONMAP_CACHE/sample-data``, else
``~/.cache/attentionmap/sample-data``. A complete cache is reused without touching the network.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Optional, Union

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


def _cached(folder: Path) -> Optional[Dict[str, Path]]:
    paths = {name: folder / f"{name}.nrrd" for name in SAMPLE_NAMES}
    return paths if all(p.is_file() for p in paths.values()) else None


def _download(url: str, target: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AttentionMapError(
            f"sample data: could not download {url} ({reason}); are you offline? "
            "Connect to the internet once (the files are cached), or put the pyradiomics 3.0.1 data/*.nrrd "
            f"files into the cache folder yourself"
        ) from None


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
    `url` / `sha256` may point at another copy of the same archive (tests use a local file:// URL).
    Raises AttentionMapError when the download fails (offline), the checksum differs, or the archive
    lacks one of the volumes. Nothing partial is left in the cache: files are extracted into a temporary
    folder and moved in when complete.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = _cached(folder)
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
        for name in SAMPLE_NAMES:
            os.replace(staging / f"{name}.nrrd", folder / f"{name}.nrrd")
    return _cached(folder)
