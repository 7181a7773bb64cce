"""The GUI side of the worker on the Pythons Slicer ships, with the network in another interpreter.

This file imports neither torch nor MONAI: CI also runs it (with ``--noconftest``) under Python 3.9 and 3.12
holding only numpy and pytest, with ``ATTENTIONMAP_WORKER_PYTHON`` naming the project's Python that has torch:
exactly the external-worker case. In the main suite both sides are this interpreter.

- the worker started through a launcher of PythonSlicer's shape (``slicer_launcher.py``: the real Python is its
  child) runs explain, re-fusion and score to done; killing it leaves no process; the crash report of the
  launcher's child reaches the error shown; killing the GUI process ends launcher and worker;
- the handshake never blocks the caller: a peer that connects and says nothing, or answers wrongly, is dropped
  and the real worker still gets in; the Unix socket lies in a folder only this user can enter;
- every malformed message from the worker is a job event, never an exception out of poll();
- an interpreter is checked by running it (versions, devices), never by importing torch here.
"""
import ast
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from AttentionMapLib import AttentionMapError, worker
from AttentionMapLib import worker_protocol as protocol
from AttentionMapLib.worker import DONE, ERROR, FINAL_KINDS, LOG, WorkerDied, WorkerProcess
from AttentionMapLib.worker_environment import check_worker_python
from processes import process_gone, wait_gone

HERE = Path(__file__).resolve().parent
MODULE_FILE = HERE.parent / "AttentionMap" / "AttentionMap.py"
WORKER_PYTHON = os.environ.get(worker.PYTHON_VARIABLE) or sys.executable
QUICK = {"flip_axes": "none", "shift_average": "off"}  # one forward pass per window


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])


def chest_block():
    """48^3 voxels of 2 mm (one window of the demo model), lung-like noise with a brighter blob, oblique."""
    array = np.random.default_rng(0).normal(-800.0, 50.0, (48, 48, 48)).astype(np.float32)
    array[20:28, 14:22, 24:32] = 20.0
    angle = np.radians(20)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                               [0, 0, 1]]) @ np.diag([2.0, 2.0, 2.0])
    return array, affine


@pytest.fixture
def launcher(tmp_path):
    """An executable of PythonSlicer's shape: the launcher (on this interpreter) starts the worker's Python."""
    path = tmp_path / "PythonSlicer"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "slicer_launcher.py"}" "{WORKER_PYTHON}" "$@"\n')
    path.chmod(0o755)
    return str(path)


def connected(process: WorkerProcess) -> None:
    deadline = time.monotonic() + 120
    while process.connection() is None:
        assert time.monotonic() < deadline, "the worker never connected"
        time.sleep(0.02)


# ---------------------------------------------------------------- through a launcher

def test_through_a_launcher_explain_fuse_again_and_score_finish_and_a_kill_leaves_no_process(launcher):
    process = WorkerProcess(python=launcher, threads=1)
    try:
        array, affine = chest_block()
        final = worker.explain_job("demo", array, affine, dict(QUICK, method="rollout"), device="cpu",
                                   worker=process, region="none").wait(300)
        assert final.kind == DONE, (final.value, final.detail)
        result = final.value
        launcher_pid, python_pid = process.pid, process.worker_pid
        assert python_pid != launcher_pid and parent_of(python_pid) == launcher_pid  # the launcher's child
        assert result.model.device == "cpu" and result.attention.grid.shape == (6, 6, 6)
        again = worker.fuse_again_job(result.attention, {"method": "raw", "layer": 0}, worker=process).wait(120)
        assert again.kind == DONE and again.value.method == "raw" and again.value.timings["forward"] == 0.0
        scores = worker.score_job(result, None, {"method": "rollout", "target": 1}, worker=process).wait(300)
        assert scores.kind == DONE and 0.0 <= scores.value["deletion_auc"] <= 1.0
        assert not process_gone(launcher_pid) and not process_gone(python_pid)
    finally:
        process.kill()
    assert wait_gone(launcher_pid, 20) and wait_gone(python_pid, 20), "the launcher or its Python survived the kill"
    assert not os.path.exists(process.folder)


@pytest.mark.parametrize("how", ["SIGSEGV", "SIGKILL"])
def test_a_crash_of_the_launchers_python_reaches_the_error_shown(launcher, how):
    """The launcher exits 1 when its child crashes, so its exit code says nothing: the child's crash report
    (faulthandler in the worker's log) is what the error carries; a child killed without one (the OOM killer's
    SIGKILL) is named as such."""
    process = WorkerProcess(python=launcher, threads=1)
    try:
        connected(process)
        python_pid = process.worker_pid
        os.kill(python_pid, getattr(signal, how))
        assert wait_gone(python_pid, 20) and wait_gone(process.pid, 20)
        job = worker.explain_job("demo", *chest_block(), QUICK, device="cpu", worker=process, region="none")
        final = job.wait(60)
    finally:
        process.kill()
    assert final.kind == ERROR and isinstance(final.value, WorkerDied), final
    assert "exit code 1" in str(final.value), final.value
    if how == "SIGSEGV":
        assert "Segmentation fault" in str(final.value) and "Fatal Python error: Segmentation fault" in final.detail
    else:
        assert f"its Python (pid {python_pid}) left no crash report" in str(final.value), final.value


def test_killing_the_gui_process_ends_the_launcher_and_the_worker(launcher):
    script = textwrap.dedent(f"""
        import time
        from AttentionMapLib.worker import WorkerProcess
        process = WorkerProcess(python={launcher!r}, threads=1)
        while process.connection() is None:
            time.sleep(0.01)
        print(process.pid, process.worker_pid, process.folder, flush=True)
        time.sleep(600)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([worker.PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")]))
    gui = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        launcher_pid, python_pid, folder = gui.stdout.readline().split()
        assert not process_gone(int(launcher_pid)) and not process_gone(int(python_pid))
    finally:
        gui.kill()  # SIGKILL: the GUI gets no chance to clean up
        gui.wait()
    assert wait_gone(int(python_pid), 20) and wait_gone(int(launcher_pid), 20), "launcher or worker outlived the GUI"
    assert not os.path.exists(folder)  # the worker removed the scratch folder its GUI could not


# ---------------------------------------------------------------- the handshake

@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_the_handshake_never_blocks_and_strangers_are_dropped(tmp_path, monkeypatch, tcp):
    monkeypatch.setattr(protocol, "HANDSHAKE_TIMEOUT_S", 0.5)
    folder = tmp_path / "scratch"
    folder.mkdir(mode=0o700)
    server, address = protocol.listen(str(folder), tcp=tcp)
    assert address.startswith("tcp:127.0.0.1:" if tcp else f"unix:{folder}")
    key = os.urandom(protocol.AUTHKEY_BYTES)
    acceptor = protocol.Acceptor(server, key)
    assert acceptor.poll() is None  # nobody there: returns at once

    silent = protocol._open(address)  # connects and never answers the challenge
    assert acceptor.poll() is None  # returns although that peer holds a connection: nothing blocks
    while not any("in time" in text for text in acceptor.refused):  # dropped at its deadline
        assert acceptor.poll() is None
        time.sleep(0.05)
    wrong = protocol._open(address)
    wrong.sendall(b"x" * (protocol.DIGEST_BYTES + protocol.PID_BYTES + protocol.CHALLENGE_BYTES))
    found = {}
    real = threading.Thread(target=lambda: found.update(conn=protocol.connect(address, key, pid=4242)))
    real.start()
    accepted = None
    while accepted is None:
        accepted = acceptor.poll()
        time.sleep(0.01)
    real.join(30)
    conn, pid = accepted
    assert pid == 4242
    protocol.send(conn, {"op": "hello"})
    assert protocol.receive(found["conn"]) == ({"op": "hello"}, {})
    assert any("without the key" in text for text in acceptor.refused), acceptor.refused
    silent.close()
    wrong.close()
    server.close()


def test_the_workers_socket_lies_in_a_folder_only_this_user_can_enter():
    process = WorkerProcess(threads=1)
    try:
        assert stat.S_IMODE(os.stat(process.folder).st_mode) == 0o700
        assert (Path(process.folder) / protocol.SOCKET_NAME).is_socket()
        connected(process)
        assert not (Path(process.folder) / protocol.SOCKET_NAME).exists()  # nobody else may connect now
    finally:
        process.close()


def test_a_stranger_holding_a_connection_never_blocks_poll_and_is_logged():
    """A local process that connects first and holds the socket: poll() keeps returning, the real worker gets in
    after it, and the job's log says a connection was refused."""
    process = WorkerProcess(threads=1)
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stranger.connect(os.path.join(process.folder, protocol.SOCKET_NAME))
        stranger.sendall(b"\0" * (protocol.DIGEST_BYTES + protocol.PID_BYTES + protocol.CHALLENGE_BYTES))
        job = worker.explain_job("demo", *chest_block(), QUICK, device="cpu", worker=process, region="none")
        events = []
        while not job.finished:
            events += job.poll()
            time.sleep(0.01)
    finally:
        stranger.close()
        process.close()
    assert events[-1].kind == DONE, events[-1]
    assert any(e.kind == LOG and "without the key" in e.value for e in events), events


# ---------------------------------------------------------------- malformed messages

@pytest.mark.parametrize("mode", ["not-json", "nested", "negative-shape", "no-name", "long-frame", "short-frame",
                                  "done-without-value"])
def test_a_malformed_message_is_one_error_event_never_an_exception(tmp_path, mode):
    rogue = tmp_path / "rogue-python"
    rogue.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "rogue_worker.py"}" {mode} "$@"\n')
    rogue.chmod(0o755)
    process = WorkerProcess(python=str(rogue), threads=1)
    try:
        job = worker.explain_job("demo", *chest_block(), QUICK, device="cpu", worker=process, region="none")
        events = []
        while not job.finished:
            events += job.poll()  # raises nothing, whatever arrives
            time.sleep(0.01)
    finally:
        process.kill()
    finals = [e for e in events if e.kind in FINAL_KINDS]
    assert len(finals) == 1 and finals[0].kind == ERROR, events
    assert isinstance(finals[0].value, protocol.ProtocolError) and "malformed" in str(finals[0].value), finals[0]
    assert wait_gone(process.pid, 20)


# ---------------------------------------------------------------- the worker's interpreter

def test_an_interpreter_is_checked_by_running_it_never_by_importing_torch_here(tmp_path):
    info = check_worker_python(WORKER_PYTHON)
    assert not info.problems, info.problems
    assert info.packages["torch"] and info.packages["monai"] and info.auto_device in ("cpu", "cuda", "mps")
    assert "torch" not in sys.modules or os.environ.get(worker.PYTHON_VARIABLE) is None
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    missing = check_worker_python(str(bare / "bin" / "python"))
    assert missing.problems and "lacks torch, monai" in missing.problems[0] and "-m pip install" in missing.problems[0]
    with pytest.raises(AttentionMapError, match="not a usable Python"):
        check_worker_python("/bin/true")
    with pytest.raises(AttentionMapError, match="not an executable file"):
        check_worker_python(str(tmp_path / "absent"))


def test_the_worker_python_setting_and_variable_choose_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv(worker.PYTHON_VARIABLE, WORKER_PYTHON)
    assert worker.worker_python() == WORKER_PYTHON
    assert worker.worker_python("/bin/sh") == "/bin/sh"  # the module's setting wins over the variable
    monkeypatch.setenv(worker.PYTHON_VARIABLE, str(tmp_path / "absent"))
    with pytest.raises(AttentionMapError, match=f"{worker.PYTHON_VARIABLE}: .*absent is not an executable"):
        worker.worker_python()
    monkeypatch.delenv(worker.PYTHON_VARIABLE)
    assert worker.worker_python() == sys.executable  # outside Slicer: this interpreter


def test_the_modules_library_imports_run_here_without_torch():
    """AttentionMap.py compiles on this Python, and every library module it imports (the GUI process's) imports
    with torch and MONAI unimportable (Slicer imports the module at start-up, before any dependency is installed).
    Only the MRML glue needs Slicer's own ``slicer`` / ``vtk``; where they are absent (the bare Pythons of this
    file's CI run) it is the one module left out, and the main suite imports it on slicer-core."""
    tree = ast.parse(MODULE_FILE.read_text())
    compile(tree, str(MODULE_FILE), "exec")
    modules = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "AttentionMapLib":
            modules |= {f"AttentionMapLib.{alias.name}" for alias in node.names if alias.name != "AttentionMapError"}
        elif isinstance(node, ast.ImportFrom) and node.module.startswith("AttentionMapLib."):
            modules.add(node.module)
    assert {"AttentionMapLib.worker", "AttentionMapLib.dependencies", "AttentionMapLib.worker_environment"} <= modules
    script = textwrap.dedent(f"""
        import importlib, sys
        for name in ("torch", "monai", "einops"):
            sys.modules[name] = None
        for module in {sorted(modules)!r}:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as error:
                if error.name not in ("slicer", "vtk"):
                    raise
                print("NEEDS SLICER", module)
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(MODULE_FILE.parent)})
    lines = result.stdout.strip().splitlines()
    assert lines and lines[-1] == "OK", result.stdout + result.stderr
    assert set(lines[:-1]) <= {"NEEDS SLICER AttentionMapLib.mrml"}, lines


def test_frames_are_checked_against_their_declared_shape_before_they_are_read():
    """A frame longer than its entry declares is refused unread, a declared size beyond MAX_ARRAY_BYTES before any
    frame, bad entries as ProtocolError (never KeyError, ValueError or MemoryError)."""
    import json
    from multiprocessing.connection import Connection

    left, right = socket.socketpair()
    sender, receiver = Connection(left.detach()), Connection(right.detach())

    def message(arrays, *frames):
        sender.send_bytes(json.dumps({"event": "log", "arrays": arrays}).encode())
        for frame in frames:
            sender.send_bytes(frame)

    cases = [
        ([{"name": "a", "dtype": "<f4", "shape": [0]}], [b"\0" * 4096], "longer than 0 bytes"),
        ([{"name": "a", "dtype": "<f4", "shape": [1 << 40]}], [], "more than"),
        ([{"name": "a", "dtype": "<f4", "shape": [-1]}], [], "sizes >= 0"),
        ([{"name": "a", "dtype": "<f4", "shape": "x"}], [], "sizes >= 0"),
        ([{"name": "a", "dtype": "|O", "shape": [1]}], [], "only numbers"),
        ([{"name": "a", "dtype": "nonsense", "shape": [1]}], [], "no valid dtype"),
        ([{"dtype": "<f4", "shape": [1]}], [], "no name"),
        ([{"name": "a", "dtype": "<f4", "shape": [4]}], [b"\0" * 8], "8 bytes, expected 16"),
    ]
    for arrays, frames, expected in cases:
        message(arrays, *frames)
        with pytest.raises(protocol.ProtocolError, match=expected):
            protocol.receive(receiver)
        left, right = socket.socketpair()  # a refused message may leave the stream unusable: a fresh pair
        sender, receiver = Connection(left.detach()), Connection(right.detach())
    sender.send_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(protocol.ProtocolError, match="not JSON"):
        protocol.receive(receiver)
    message([{"name": "a", "dtype": "<i2", "shape": [2, 3]}], np.arange(6, dtype="<i2").tobytes())
    header, arrays = protocol.receive(receiver)
    assert header == {"event": "log"} and arrays["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    arrays["a"][0, 0] = 7  # writable, its own memory


def test_the_worker_answers_a_malformed_request_with_an_error_and_keeps_serving():
    process = WorkerProcess(threads=1)
    try:
        connected(process)
        conn = process.connection()
        conn.send_bytes(b"{not a request")
        header, _ = protocol.receive(conn)
        assert header["event"] == "error" and "malformed request" in header["message"], header
        pid = process.worker_pid
        final = worker.explain_job("demo", *chest_block(), QUICK, device="cpu", worker=process,
                                   region="none").wait(300)
        assert final.kind == DONE and process.worker_pid == pid and process.alive
    finally:
        process.close()


def test_scratch_folders_of_dead_guis_are_removed_at_the_next_start(tmp_path, monkeypatch):
    """A GUI and its worker killed together leave the scratch folder (the patient's voxels in input-*.npy); the
    next worker start removes this user's folders whose owner is gone, and keeps the rest."""
    import tempfile

    from AttentionMapLib import stale
    from AttentionMapLib.worker_process import SCRATCH_PREFIX

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = {}
    for name, owner in (("dead", dead.pid), ("alive", os.getpid()), ("unmarked", None)):
        folder = tmp_path / f"{SCRATCH_PREFIX}{name}"
        folder.mkdir(mode=0o700)
        (folder / "input-1.npy").write_bytes(b"voxels")
        if owner is not None:
            stale.mark_owner(folder, owner)
        folders[name] = folder
    (tmp_path / f"{SCRATCH_PREFIX}link").symlink_to(folders["dead"])  # a link is never followed nor removed
    process = WorkerProcess(threads=1)
    try:
        assert Path(process.folder).parent == tmp_path and (Path(process.folder) / stale.OWNER_FILE).is_file()
    finally:
        process.close()
    assert not folders["dead"].exists()
    assert folders["alive"].exists() and folders["unmarked"].exists()
    assert (tmp_path / f"{SCRATCH_PREFIX}link").is_symlink()
