"""Whether a process is gone (Linux /proc), for the worker tests; torch-free, so the GUI-side tests use it too."""
import time
from pathlib import Path


def process_gone(pid: int) -> bool:
    """True when no process ``pid`` runs (a zombie waiting to be reaped counts as gone). A process that ends
    between the open and the read of its status file makes the read fail with ESRCH: gone too."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "\nState:\tZ" in state


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    """True once ``pid`` is gone; False if it still runs after ``seconds`` (a bound for hangs, not a timing)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.05)
    return process_gone(pid)
