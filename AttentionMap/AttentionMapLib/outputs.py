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
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Sequence

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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_entry(path: Path, inputs: Sequence[Path], option: str) -> None:
    """Refuse to write `path` when it is a link, not a regular file, or one of `inputs` (never follows links)."""
    try:
        info = os.lstat(path)
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
        if _same_file(path, source):
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


@contextlib.contextmanager
def staged_folder(output_dir: Path, names: Sequence[str], inputs: Sequence[Path],
                  option: str = "--output-dir") -> Iterator[Path]:
    """Yield a fresh staging folder; on normal exit move `names` written there into `output_dir`.

    Checks as :func:`check_output_folder` on entry and again before the move. Raises AttentionMapError
    naming `output_dir` (or the entry) for every refusal or OSError; the staging folder never outlives it.
    """
    target = check_output_folder(output_dir, names, inputs, option)
    anchor = _nearest_existing(target)
    try:
        remove_stale(anchor, STAGING_PREFIX)  # of runs of this user killed outright (SIGKILL, out of memory)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=anchor))
    except OSError as exc:
        raise AttentionMapError(f"{option} {target}: cannot write in {anchor} ({exc.strerror})") from None
    try:
        try:
            mark_owner(staging)  # a run killed outright leaves it: the next run here removes it
            yield staging
            with stop_signals_held():
                _move_into_place(staging, target, names, inputs, option)
        except (OSError, AttentionMapError) as exc:
            raise _mentioning(exc, staging, target) from None
    finally:
        with stop_signals_held():
            shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, target: Path, names: Sequence[str], inputs: Sequence[Path],
                     option: str) -> None:
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
