"""Safe output writing for the command line: a run is staged in a hidden folder and moved into place.

Guarantees (see docs/RELIABILITY.md):

- every file of a run is written into a fresh hidden folder ``.attention-map-*`` created next to the
  target (the output folder itself when it exists, else its nearest existing parent: same file system,
  so the final moves are renames); on any error, Ctrl-C or SIGTERM that folder is removed, so the
  output folder never holds a partial file or only some of a run's files (the final moves and that
  removal run with Ctrl-C and SIGTERM held, so a stop cannot cut them in half);
- at the end a new output folder is the renamed staging folder; into an existing output folder each
  file is moved with ``os.replace`` (atomic per file: a reader sees the old or the new file), and files
  not written by this run are left untouched;
- an existing entry with an output's name is refused when it is a symbolic link, not a regular file,
  or one of the run's inputs (``os.path.samefile``): the tool never writes through a link and never
  replaces what it reads; an output folder equal to or inside an input folder (DICOM) is refused;
- every ``OSError`` while staging or moving becomes one ``AttentionMapError`` naming the output path.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .errors import AttentionMapError
from .stale import mark_owner, remove_stale

STAGING_PREFIX = ".attention-map-"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM during the final renames or the removal of the staging folder (a few
    system calls), so a stop never leaves some files moved and others not, or half a staging folder.
    A stop that arrives meanwhile is dropped: the run has finished (or is failing) by then anyway.
    Handlers are swapped rather than the signal mask, because with several threads (torch's pools)
    the kernel may deliver a process signal to any thread that does not block it. Main thread only
    (Python handles signals there); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler installed outside Python, cannot be restored from here
                signal.signal(sig, handler)


def _identity(info: os.stat_result) -> tuple:
    return info.st_dev, info.st_ino


def check_output_entry(path: Path, inputs: Sequence[Path], option: str, dir_fd: Optional[int] = None) -> None:
    """Refuse to write `path` when it is a link, not a regular file, or one of `inputs` (never follows links).
    With ``dir_fd``, the entry ``path.name`` of that open folder is checked (the message still shows `path`)."""
    try:
        info = os.stat(path.name if dir_fd is not None else path, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AttentionMapError(f"{option} {path}: cannot be checked ({exc.strerror})") from None
    if stat.S_ISLNK(info.st_mode):
        raise AttentionMapError(f"{option} {path}: is a symbolic link; refusing to write through it "
                                "(remove the link or choose another output)")
    if not stat.S_ISREG(info.st_mode):
        raise AttentionMapError(f"{option} {path}: exists and is not a regular file (a folder, pipe or device); "
                                "choose another output")
    for source in inputs:
        try:
            same = _identity(os.stat(source)) == _identity(info)
        except OSError:
            continue
        if same:
            raise AttentionMapError(f"{option} {path}: is the input {source}; refusing to overwrite an input "
                                    "(choose another output)")


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.isdir(candidate):
            return candidate
    return Path(os.getcwd())


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(folder))
        return True
    except ValueError:
        return False


def _mentioning(exc: BaseException, staging: Path, target: Path) -> AttentionMapError:
    """The error with the staging folder's path replaced by the target's (the user never sees the temp name)."""
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else target
        text = f"{where}: could not write ({exc.strerror or exc})"
    else:
        text = str(exc)
    return AttentionMapError(text.replace(str(staging), str(target)))


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name `path` in an OSError raised without a file name (e.g. by an image writer's stream)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


def check_output_folder(output_dir: Path, names: Sequence[str], inputs: Sequence[Path],
                        option: str = "--output-dir") -> Path:
    """The absolute output folder, or AttentionMapError: not a folder, inside an input folder, or an entry
    named in `names` that is a link, not a regular file, or an input."""
    target = Path(os.path.abspath(output_dir))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise AttentionMapError(f"{option} {target}: exists and is not a folder; expected a folder (or a new name)")
    for source in inputs:
        if os.path.isdir(source) and _inside(target, source):
            raise AttentionMapError(f"{option} {target}: lies inside the input folder {source}; "
                                    "inputs are only read, choose an output folder elsewhere")
    if os.path.isdir(target):
        for name in names:
            check_output_entry(target / name, inputs, option)
    return target


# Moves relative to folder descriptors where the system has them (Linux, macOS): a folder on the way swapped for a
# link while the run computes is never followed (the Windows path keeps the name-based moves). os.replace takes
# src_dir_fd / dst_dir_fd wherever os.rename does.
_DIR_FDS = (hasattr(os, "O_DIRECTORY") and hasattr(os, "O_NOFOLLOW") and sys.version_info >= (3, 11)
            and {os.open, os.mkdir, os.rename, os.stat, os.unlink, os.chmod} <= os.supports_dir_fd)


def _open_folder(name: str, dir_fd: Optional[int] = None) -> int:
    """A descriptor of the folder ``name`` (relative to ``dir_fd``), never through a link as its last component."""
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


@contextlib.contextmanager
def staged_folder(output_dir: Path, names: Sequence[str], inputs: Sequence[Path],
                  option: str = "--output-dir") -> Iterator[Path]:
    """Yield a fresh staging folder; on normal exit move `names` written there into `output_dir`.

    Checks as :func:`check_output_folder` on entry and again before the move. An existing output folder of another
    user is refused (it could read what the run writes). The output folder, or its nearest existing parent, is opened
    once (its links as the user gave them resolved at the start, O_NOFOLLOW, device and inode remembered); the final
    moves are made relative to that descriptor, and a folder replaced on the way during the run is refused, never
    followed. Raises AttentionMapError naming `output_dir` (or the entry) for every refusal or OSError; the staging
    folder never outlives it.
    """
    target = check_output_folder(output_dir, names, inputs, option)
    nearest = _nearest_existing(target)
    anchor = Path(os.path.realpath(nearest))
    owner = os.stat(target).st_uid if os.path.isdir(target) and hasattr(os, "geteuid") else None
    if owner is not None and owner != os.geteuid():
        raise AttentionMapError(f"{option} {target}: belongs to another user (uid {owner}), who could read what this "
                                "run writes; choose a folder of your own")
    anchor_fd = None
    try:
        remove_stale(anchor, STAGING_PREFIX)  # of runs of this user killed outright (SIGKILL, out of memory)
        if _DIR_FDS:
            anchor_fd = _open_folder(str(anchor))
            name = f"{STAGING_PREFIX}{secrets.token_hex(6)}"
            os.mkdir(name, 0o700, dir_fd=anchor_fd)
            staging = anchor / name
        else:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=anchor))
    except OSError as exc:
        if anchor_fd is not None:
            os.close(anchor_fd)
        raise AttentionMapError(f"{option} {target}: cannot write in {anchor} ({exc.strerror})") from None
    try:
        try:
            mark_owner(staging)  # a run killed outright leaves it: the next run here removes it
            yield staging
            with stop_signals_held():
                if anchor_fd is None:
                    _move_into_place(staging, target, names, inputs, option)
                else:
                    missing = Path(target).relative_to(nearest).parts  # () for an existing output folder
                    _move_by_descriptor(anchor, anchor_fd, staging.name, target, missing, names, inputs, option)
        except (OSError, AttentionMapError) as exc:
            raise _mentioning(exc, staging, target) from None
    finally:
        with stop_signals_held():
            if anchor_fd is not None:
                shutil.rmtree(staging.name, ignore_errors=True, dir_fd=anchor_fd)
                os.close(anchor_fd)
            else:
                shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, target: Path, names: Sequence[str], inputs: Sequence[Path],
                     option: str) -> None:
    """The name-based moves (systems without folder descriptors)."""
    written = [name for name in names if (staging / name).is_file()]
    if not os.path.isdir(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp made it private; the output folder gets the usual mode
        for extra in set(os.listdir(staging)) - set(written):  # e.g. a writer's own temp file
            (staging / extra).unlink()
        os.rename(staging, target)
        return
    for name in written:  # checked again: the folder may have changed while the run computed
        check_output_entry(target / name, inputs, option)
    for name in written:
        os.replace(staging / name, target / name)


def _move_by_descriptor(anchor: Path, anchor_fd: int, staging: str, target: Path, missing: Sequence[str],
                        names: Sequence[str], inputs: Sequence[Path], option: str) -> None:
    """The final moves relative to the descriptor of ``anchor`` (the output folder, or its nearest existing parent,
    opened at the start; ``missing``: the folders below it up to the output folder, none when that existed): a
    folder replaced on the way is refused; nothing is moved through a link."""
    try:
        now = os.stat(anchor, follow_symlinks=False)
    except OSError:
        now = None
    if now is None or _identity(now) != _identity(os.fstat(anchor_fd)):
        raise AttentionMapError(f"{option} {target}: {anchor} was replaced (moved, or swapped for a link) while the "
                                "run computed; nothing was written")
    staging_fd = _open_folder(staging, anchor_fd)
    parents = []
    try:
        written = [name for name in names if _is_regular(name, staging_fd)]
        if not missing:  # an existing output folder: file by file
            for name in written:  # checked again: the folder may have changed while the run computed
                check_output_entry(target / name, inputs, option, dir_fd=anchor_fd)
            for name in written:
                os.replace(name, name, src_dir_fd=staging_fd, dst_dir_fd=anchor_fd)
            return
        folder_fd = anchor_fd
        for part in missing[:-1]:  # the new folder's missing parents, each opened without following a link
            try:
                os.mkdir(part, dir_fd=folder_fd)
            except FileExistsError:
                pass
            folder_fd = _open_folder(part, folder_fd)
            parents.append(folder_fd)
        try:
            os.stat(missing[-1], dir_fd=folder_fd, follow_symlinks=False)
            raise AttentionMapError(f"{option} {target}: appeared while the run computed; nothing was written")
        except FileNotFoundError:
            pass
        os.chmod(staging, 0o777 & ~current_umask(), dir_fd=anchor_fd)  # the output folder gets the usual mode
        for extra in set(os.listdir(staging_fd)) - set(written):  # e.g. the owner mark, a writer's own temp file
            os.unlink(extra, dir_fd=staging_fd)
        os.rename(staging, missing[-1], src_dir_fd=anchor_fd, dst_dir_fd=folder_fd)
    finally:
        for fd in [staging_fd] + parents:
            os.close(fd)


def _is_regular(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def current_umask() -> int:
    """This process's umask: read from /proc/self/status where it is there (Linux), else set and restored at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def check_output_file(path: Path, inputs: Sequence[Path], option: str) -> Path:
    """The absolute path of an output file to be written, or AttentionMapError (see :func:`check_output_entry`)."""
    target = Path(os.path.abspath(path))
    if not target.parent.is_dir():
        raise AttentionMapError(f"{option} {target}: the folder {target.parent} does not exist")
    check_output_entry(target, inputs, option)
    return target


def write_file(path: Path, data: bytes, inputs: Sequence[Path], option: str) -> Path:
    """Write one file atomically (temp file in the same folder, then rename); never through a link or over an input."""
    target = check_output_file(path, inputs, option)
    folder = target.parent
    try:
        handle, temp = tempfile.mkstemp(prefix=STAGING_PREFIX, dir=folder)
    except OSError as exc:
        raise AttentionMapError(f"{option} {target}: cannot write in {folder} ({exc.strerror})") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        mode = 0o666 & ~current_umask()  # as open() would create it; mkstemp made it 0600
        if os.path.isfile(target):  # replacing a report: never looser than the one it replaces
            mode &= stat.S_IMODE(os.stat(target).st_mode)
        os.chmod(temp, mode)
        os.replace(temp, target)
    except OSError as exc:
        raise AttentionMapError(f"{option} {target}: could not write ({exc.strerror})") from None
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)
    return target
