"""Private folders a process makes for one job (the worker's scratch folder, the command line's staging folder),
marked with their owner, and the removal of those whose owner died without cleaning up.

Both folders can hold patient data (the worker's ``input-*.npy`` voxels, the staged overlays). When the process is
killed outright (SIGKILL, the out-of-memory killer, or Slicer and its worker crashing together) nothing removes them;
the next start of the same kind removes those of this user whose owner is gone. Standard library only.
"""
import os
import shutil
from pathlib import Path
from typing import List, Optional

OWNER_FILE = ".owner"


def process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (Linux: field 22 of /proc/PID/stat, in clock ticks), to tell it from a later
    process that reuses the pid; None where /proc is absent (macOS, Windows) or the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19].decode() if fields[0] != b"Z" and len(fields) > 19 else None


def process_alive(pid: int, started: Optional[str] = None) -> bool:
    """True while process ``pid`` runs; ``started`` (process_start when it was seen) tells a reused pid apart."""
    if os.name == "nt":
        import ctypes  # Windows: a handle to a dead process is signalled (WaitForSingleObject -> 0)

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) != 0
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the pid now belongs to another user
        return False
    return started is None or process_start(pid) == started


def mark_owner(folder: Path, pid: Optional[int] = None) -> None:
    """Record in ``folder`` which process owns it (default: this one), with that process's start time."""
    pid = os.getpid() if pid is None else pid
    Path(folder, OWNER_FILE).write_text(f"{pid} {process_start(pid) or '-'}\n", encoding="ascii")


def _owner_gone(folder: Path) -> bool:
    try:
        pid, started = Path(folder, OWNER_FILE).read_text(encoding="ascii").split()
        return not process_alive(int(pid), None if started == "-" else started)
    except (OSError, ValueError):
        return False  # no owner recorded (or unreadable): never removed


def remove_stale(parent: Path, prefix: str) -> List[str]:
    """Remove the folders ``parent/prefix*`` of this user (never a link) whose recorded owner is gone; their names."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
            continue
        if hasattr(os, "getuid") and entry.stat(follow_symlinks=False).st_uid != os.getuid():
            continue
        if _owner_gone(Path(entry.path)):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    return removed
