"""sample_data.fetch_sample_data: download, checksum, extract only data/*.nrrd, reuse the cache, offline message.

A real (small) .tar.gz with the pyradiomics sdist layout is built in a temporary folder and served by a
file:// URL; the unreachable-server case uses a closed local port.
"""
import hashlib
import io
import socket
import tarfile
from pathlib import Path

import pytest

from AttentionMapLib.errors import AttentionMapError
from AttentionMapLib.sample_data import MANIFEST, SAMPLE_NAMES, default_cache_dir, fetch_sample_data


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_sdist(path: Path, names=SAMPLE_NAMES) -> str:
    """A tar.gz laid out like pyradiomics-3.0.1.tar.gz (plus files that must not be extracted); its sha256."""
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "pyradiomics-3.0.1/setup.py", b"print('never run')\n")
        _add(tar, "pyradiomics-3.0.1/data/README.txt", b"not a volume\n")
        _add(tar, "pyradiomics-3.0.1/data/extra_image.nrrd", b"not one of the sample volumes\n")
        for name in names:
            _add(tar, f"pyradiomics-3.0.1/data/{name}.nrrd", f"NRRD0004 {name}\n".encode())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/pyradiomics-3.0.1.tar.gz"


def test_download_extracts_only_the_volumes_and_reuses_the_cache(tmp_path):
    archive = tmp_path / "sdist.tar.gz"
    digest = make_sdist(archive)
    cache = tmp_path / "cache"
    paths = fetch_sample_data(cache, url=archive.as_uri(), sha256=digest)
    assert sorted(paths) == sorted(SAMPLE_NAMES)
    for name, path in paths.items():
        assert path.parent == cache and path.read_bytes() == f"NRRD0004 {name}\n".encode()
    assert sorted(p.name for p in cache.iterdir()) == sorted([MANIFEST] + [f"{n}.nrrd" for n in SAMPLE_NAMES])
    archive.unlink()  # a second call must not need the archive (nor the network)
    assert fetch_sample_data(cache, url=archive.as_uri(), sha256=digest) == paths


def test_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path):
    archive = tmp_path / "sdist.tar.gz"
    make_sdist(archive)
    cache = tmp_path / "cache"
    with pytest.raises(AttentionMapError, match="sha256"):
        fetch_sample_data(cache, url=archive.as_uri(), sha256="0" * 64)
    assert list(cache.iterdir()) == []


def test_offline_gives_one_clear_error_and_leaves_nothing(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(AttentionMapError, match="offline") as info:
        fetch_sample_data(cache, url=closed_port_url(), timeout=5)
    assert "could not download" in str(info.value)
    assert list(cache.iterdir()) == []


def test_archive_without_a_volume_names_it(tmp_path):
    archive = tmp_path / "sdist.tar.gz"
    digest = make_sdist(archive, names=[n for n in SAMPLE_NAMES if n != "lung2_label"])
    cache = tmp_path / "cache"
    with pytest.raises(AttentionMapError, match="lung2_label"):
        fetch_sample_data(cache, url=archive.as_uri(), sha256=digest)
    assert list(cache.iterdir()) == []


def test_incomplete_cache_is_refilled(tmp_path):
    archive = tmp_path / "sdist.tar.gz"
    digest = make_sdist(archive)
    cache = tmp_path / "cache"
    paths = fetch_sample_data(cache, url=archive.as_uri(), sha256=digest)
    paths["lung1_label"].unlink()
    again = fetch_sample_data(cache, url=archive.as_uri(), sha256=digest)
    assert again["lung1_label"].read_bytes() == b"NRRD0004 lung1_label\n"


def test_environment_variable_sets_the_default_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTIONMAP_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache" / "sample-data"
    archive = tmp_path / "sdist.tar.gz"
    digest = make_sdist(archive)
    paths = fetch_sample_data(url=archive.as_uri(), sha256=digest)
    assert paths["lung2_image"] == tmp_path / "env-cache" / "sample-data" / "lung2_image.nrrd"
    monkeypatch.delenv("ATTENTIONMAP_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "attentionmap" / "sample-data"


def test_a_changed_cached_volume_is_noticed_and_the_archive_checked_again(tmp_path):
    """The cache is re-verified on every use: a volume changed after extraction makes the next call fetch and check
    the archive again (and refuse when it no longer matches), never hand out the changed file."""
    archive = tmp_path / "sdist.tar.gz"
    digest = make_sdist(archive)
    cache = tmp_path / "cache"
    paths = fetch_sample_data(cache, url=archive.as_uri(), sha256=digest)
    paths["lung2_image"].write_bytes(b"NRRD0004 something else\n")
    again = fetch_sample_data(cache, url=archive.as_uri(), sha256=digest)
    assert again["lung2_image"].read_bytes() == b"NRRD0004 lung2_image\n"  # extracted again from the archive
    paths["lung1_image"].write_bytes(b"changed")
    archive.unlink()
    with pytest.raises(AttentionMapError, match="could not download"):
        fetch_sample_data(cache, url=archive.as_uri(), sha256=digest)
