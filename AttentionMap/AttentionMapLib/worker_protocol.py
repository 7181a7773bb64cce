"""Messages between the Slicer module and the worker process: JSON headers plus raw array frames.

A message is one JSON object (UTF-8, sent with ``Connection.send_bytes``) followed by one binary
frame per entry of its ``"arrays"`` list (``{"name", "dtype", "shape"}``, C order). Nothing is ever
pickled: a peer can send data only, never code, and arrays of Python objects are refused. Large
inputs (the scanned volume) travel as ``.npy`` files read with ``allow_pickle=False`` so that
sending a request never blocks the GUI for long.

Standard library, numpy and the torch-free `core.region` only: the GUI process imports this module, never torch.
"""
import hashlib
import hmac
import json
import os
import socket
import time
from multiprocessing.connection import Connection
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .core.region import AppliedRegion
from .errors import AttentionMapError

ALLOWED_DTYPE_KINDS = "biuf"  # bool, signed / unsigned integers, floats: never objects
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAY_BYTES = 1 << 32  # far above any map, region or score a job returns (the scanned volume travels as a file)
AUTHKEY_BYTES = 32

Arrays = Dict[str, np.ndarray]


class ProtocolError(AttentionMapError):
    """A peer sent something that is not a message of this protocol."""


def _plain(value: Any) -> Any:
    """numpy scalars and small arrays inside a header as JSON numbers and lists."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"worker protocol: {type(value).__name__} is not plain data")


def send(conn: Connection, header: Dict[str, Any], arrays: Optional[Arrays] = None) -> None:
    """Send ``header`` (JSON-able dict) and the arrays (numeric, any shape) as one message."""
    arrays = {name: np.ascontiguousarray(value) for name, value in (arrays or {}).items()}
    header = dict(header, arrays=[{"name": name, "dtype": value.dtype.str, "shape": list(value.shape)}
                                  for name, value in arrays.items()])
    conn.send_bytes(json.dumps(header, default=_plain).encode("utf-8"))
    for value in arrays.values():
        conn.send_bytes(memoryview(value).cast("B") if value.size else b"")


def _array_entry(entry: Any) -> Tuple[str, np.dtype, Tuple[int, ...], int]:
    """(name, dtype, shape, bytes) of a header's array entry, checked before any of its frame is read."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ProtocolError("worker protocol: an array entry has no name")
    name = entry["name"]
    try:
        dtype = np.dtype(entry.get("dtype"))
    except (TypeError, ValueError):
        raise ProtocolError(f"worker protocol: array {name!r} has no valid dtype") from None
    if dtype.kind not in ALLOWED_DTYPE_KINDS:
        raise ProtocolError(f"worker protocol: array {name!r} has dtype {dtype}; only numbers cross")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(type(n) is int and 0 <= n for n in shape):
        raise ProtocolError(f"worker protocol: array {name!r}: shape {shape!r} is not a list of sizes >= 0")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise ProtocolError(f"worker protocol: array {name!r}: {nbytes} bytes declared, more than {MAX_ARRAY_BYTES}")
    return name, dtype, tuple(shape), nbytes


def receive(conn: Connection) -> Tuple[Dict[str, Any], Arrays]:
    """One message: (header without "arrays", {name: array}). Raises EOFError when the peer is gone and
    ProtocolError for anything that is not a message of this protocol: a header that is not a JSON object (or
    nested past the recursion limit), an array entry without a name, numeric dtype or sizes, and a frame of
    another length than its entry declares. A frame is read only up to its declared length (a longer one is
    refused unread), and no entry may declare more than MAX_ARRAY_BYTES."""
    raw = conn.recv_bytes(MAX_HEADER_BYTES)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ProtocolError(f"worker protocol: a header is not JSON ({type(error).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("worker protocol: a header is not a JSON object")
    entries = header.pop("arrays", [])
    if not isinstance(entries, list):
        raise ProtocolError("worker protocol: the header's arrays are not a list")
    arrays = {}
    for name, dtype, shape, nbytes in [_array_entry(entry) for entry in entries]:
        try:
            frame = conn.recv_bytes(nbytes)
        except OSError:  # "bad message length": longer than declared, its bytes left unread
            raise ProtocolError(f"worker protocol: array {name!r}: a frame longer than {nbytes} bytes") from None
        if len(frame) != nbytes:
            raise ProtocolError(f"worker protocol: array {name!r}: {len(frame)} bytes, expected {nbytes}")
        arrays[name] = np.frombuffer(frame, dtype=dtype).reshape(shape).copy()
    return header, arrays


def save_input(array: np.ndarray, folder: str, name: str) -> str:
    """Write a numeric array to ``folder/name.npy`` straight from its buffer (no copy in memory); its path."""
    if array.dtype.kind not in ALLOWED_DTYPE_KINDS:
        raise AttentionMapError(f"volume: expected a numeric array, got dtype {array.dtype}")
    path = os.path.join(folder, f"{name}.npy")
    with open(path, "wb") as stream:
        np.save(stream, array, allow_pickle=False)
    return path


def load_input(path: str) -> np.ndarray:
    """Read and delete an input written by save_input (numbers only: ``allow_pickle=False``)."""
    try:
        array = np.load(path, allow_pickle=False)
    finally:
        os.remove(path)
    if array.dtype.kind not in ALLOWED_DTYPE_KINDS:
        raise ProtocolError(f"worker protocol: input {path} holds dtype {array.dtype}; expected numbers")
    return array


# ---------------------------------------------------------------- an applied region as plain data

def region_message(region: Optional[AppliedRegion]) -> Tuple[Optional[Dict[str, Any]], Arrays]:
    """An applied region as (JSON fields, arrays): its voxel mask on the model-input grid packed eight voxels a
    byte (``np.packbits``, C order: exact, an eighth of a bool array), that grid's ijk_to_ras and the token mask.
    (None, {}) for no region."""
    if region is None:
        return None, {}
    fields = {"description": region.description, "name": region.name, "windows_run": int(region.windows_run),
              "windows_skipped": int(region.windows_skipped), "voxels_shape": list(region.voxels.shape)}
    arrays = {"region_voxels": np.packbits(region.voxels, axis=None), "region_ijk_to_ras": region.ijk_to_ras,
              "region_tokens": np.asarray(region.tokens, dtype=bool)}
    return fields, arrays


def region_from_message(fields: Optional[Dict[str, Any]], arrays: Arrays) -> Optional[AppliedRegion]:
    """The AppliedRegion that region_message wrote (None for no region)."""
    if fields is None:
        return None
    shape = tuple(int(n) for n in fields["voxels_shape"])
    voxels = np.unpackbits(arrays["region_voxels"], count=int(np.prod(shape))).reshape(shape).view(bool)
    return AppliedRegion(description=str(fields["description"]), name=str(fields["name"]), voxels=voxels,
                         ijk_to_ras=np.asarray(arrays["region_ijk_to_ras"], dtype=np.float64),
                         tokens=arrays["region_tokens"], windows_run=int(fields["windows_run"]),
                         windows_skipped=int(fields["windows_skipped"]))


# ---------------------------------------------------------------- connecting with a shared key

HANDSHAKE_TIMEOUT_S = 5.0  # a peer that has not proved the key by then is dropped
CHALLENGE_BYTES = 32
DIGEST_BYTES = 32  # HMAC-SHA256
PID_BYTES = 8
SOCKET_NAME = "socket"
MAX_UNIX_PATH = 100  # sun_path holds 104 (macOS) to 108 (Linux) bytes


def listen(folder: str, tcp: bool = False) -> Tuple[socket.socket, str]:
    """A non-blocking server the worker connects to, and its address for the worker's command line.

    POSIX: a Unix socket ``folder/socket`` (``folder`` is the worker's 0700 scratch folder, so no other local
    user can even connect); ``"unix:PATH"``. Windows, or a path too long for a Unix socket: TCP on the loopback
    interface, port chosen by the system; ``"tcp:127.0.0.1:PORT"`` (also with ``tcp=True``). Either way the peer
    must prove the key.
    """
    path = os.path.join(folder, SOCKET_NAME)
    if not tcp and hasattr(socket, "AF_UNIX") and os.name != "nt" and len(os.fsencode(path)) <= MAX_UNIX_PATH:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(4)
        address = f"unix:{path}"
    else:
        server = socket.create_server(("127.0.0.1", 0))
        address = f"tcp:127.0.0.1:{server.getsockname()[1]}"
    server.setblocking(False)
    return server, address


def remove_socket_file(folder: str) -> None:
    """Remove the Unix socket listen() made in ``folder`` (nothing if there is none)."""
    try:
        os.unlink(os.path.join(folder, SOCKET_NAME))
    except OSError:
        pass


def _open(address: str) -> socket.socket:
    kind, _, rest = address.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(rest)
        return sock
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return _no_delay(socket.create_connection((host, int(port))))
    raise ProtocolError(f"worker protocol: address {address!r} is neither unix:PATH nor tcp:HOST:PORT")


def _no_delay(sock: socket.socket) -> socket.socket:
    """Send small messages at once: Nagle's algorithm would hold a header until the peer's delayed ACK (~40 ms)."""
    if sock.family != getattr(socket, "AF_UNIX", None):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _digest(authkey: bytes, role: bytes, *parts: bytes) -> bytes:
    return hmac.new(authkey, role + b"".join(parts), hashlib.sha256).digest()


class PendingPeer:
    """The GUI side of one handshake, advanced without ever blocking.

    The GUI sends a random challenge; the peer answers HMAC(key, "worker" + challenge + its pid), its pid and a
    challenge of its own, which the GUI answers in turn. ``step()`` reads only what has arrived.
    """

    def __init__(self, sock: socket.socket, authkey: bytes) -> None:
        self.sock = sock
        self._key = authkey
        self._challenge = os.urandom(CHALLENGE_BYTES)
        self._received = b""
        self.deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        sock.setblocking(False)
        sock.sendall(self._challenge)  # 32 bytes into an empty socket buffer: never blocks

    def step(self) -> Optional[Tuple[Connection, int]]:
        """(connection, the peer's pid) once the peer proved the key; None while it has not answered yet.
        Raises ProtocolError for a wrong answer, a closed connection or the deadline passed."""
        wanted = DIGEST_BYTES + PID_BYTES + CHALLENGE_BYTES
        while len(self._received) < wanted:
            try:
                chunk = self.sock.recv(wanted - len(self._received))
            except (BlockingIOError, InterruptedError):
                if time.monotonic() > self.deadline:
                    raise ProtocolError("worker protocol: a peer did not answer the challenge in time") from None
                return None
            except OSError as error:
                raise ProtocolError(f"worker protocol: a peer's connection failed ({error})") from None
            if not chunk:
                raise ProtocolError("worker protocol: a peer closed its connection during the handshake")
            self._received += chunk
        digest, pid, challenge = (self._received[:DIGEST_BYTES], self._received[DIGEST_BYTES:-CHALLENGE_BYTES],
                                  self._received[-CHALLENGE_BYTES:])
        if not hmac.compare_digest(digest, _digest(self._key, b"worker", self._challenge, pid)):
            raise ProtocolError("worker protocol: a peer without the key was refused")
        self.sock.sendall(_digest(self._key, b"gui", challenge))  # 32 bytes: the buffer is empty, never blocks
        self.sock.setblocking(True)
        return Connection(_no_delay(self.sock).detach()), int.from_bytes(pid, "big")

    def close(self) -> None:
        self.sock.close()


class Acceptor:
    """Accepts the worker's connection on ``server`` without ever blocking the caller (the GUI's timer).

    Peers that do not prove the key within HANDSHAKE_TIMEOUT_S, or answer wrongly, are dropped and noted in
    ``refused`` (text for the job's log); the real worker can still connect after them.
    """

    def __init__(self, server: socket.socket, authkey: bytes) -> None:
        self._server = server
        self._key = authkey
        self._pending: List[PendingPeer] = []
        self.refused: List[str] = []

    def poll(self) -> Optional[Tuple[Connection, int]]:
        """(connection, worker pid) of the first peer that proved the key, else None (returns at once)."""
        while True:
            try:
                sock, _ = self._server.accept()
            except (BlockingIOError, InterruptedError):
                break
            try:
                self._pending.append(PendingPeer(sock, self._key))
            except OSError as error:
                sock.close()
                self.refused.append(f"a connection failed at once ({error})")
        for peer in list(self._pending):
            try:
                done = peer.step()
            except ProtocolError as error:
                self._pending.remove(peer)
                peer.close()
                self.refused.append(str(error))
                continue
            if done is not None:
                self._pending.remove(peer)
                self.close_pending()
                return done
        return None

    def close_pending(self) -> None:
        for peer in self._pending:
            peer.close()
        self._pending = []


def _receive_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ProtocolError("worker protocol: the GUI closed the connection during the handshake")
        data += chunk
    return data


def connect(address: str, authkey: bytes, pid: Optional[int] = None) -> Connection:
    """The worker side of the handshake (``Acceptor``): answer the GUI's challenge with the key and this process's
    pid, then check the GUI's answer to ours. Bounded by HANDSHAKE_TIMEOUT_S."""
    sock = _open(address)
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    challenge = _receive_exactly(sock, CHALLENGE_BYTES)
    own = os.urandom(CHALLENGE_BYTES)
    pid_bytes = int(os.getpid() if pid is None else pid).to_bytes(PID_BYTES, "big")
    sock.sendall(_digest(authkey, b"worker", challenge, pid_bytes) + pid_bytes + own)
    if not hmac.compare_digest(_receive_exactly(sock, DIGEST_BYTES), _digest(authkey, b"gui", own)):
        sock.close()
        raise ProtocolError("worker protocol: the GUI side did not prove the key")
    sock.settimeout(None)
    return Connection(sock.detach())
