"""Messages between the Slicer module and the worker process: JSON headers plus raw array frames.

A message is one JSON object (UTF-8, sent with ``Connection.send_bytes``) followed by one binary
frame per entry of its ``"arrays"`` list (``{"name", "dtype", "shape"}``, C order). Nothing is ever
pickled: a peer can send data only, never code, and arrays of Python objects are refused. Large
inputs (the scanned volume) travel as ``.npy`` files read with ``allow_pickle=False`` so that
sending a request never blocks the GUI for long.

Standard library, numpy and the torch-free `core.region` only: the GUI process imports this module, never torch.
"""
import json
import os
import socket
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .core.region import AppliedRegion
from .errors import AttentionMapError

ALLOWED_DTYPE_KINDS = "biuf"  # bool, signed / unsigned integers, floats: never objects
MAX_HEADER_BYTES = 1 << 20
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


def receive(conn: Connection) -> Tuple[Dict[str, Any], Arrays]:
    """One message: (header without "arrays", {name: array}). Raises EOFError when the peer is gone."""
    raw = conn.recv_bytes(MAX_HEADER_BYTES)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ProtocolError(f"worker protocol: a header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ProtocolError("worker protocol: a header is not a JSON object")
    arrays = {}
    for entry in header.pop("arrays", []):
        dtype = np.dtype(entry["dtype"])
        if dtype.kind not in ALLOWED_DTYPE_KINDS:
            raise ProtocolError(f"worker protocol: array {entry['name']!r} has dtype {dtype}; only numbers cross")
        array = np.empty([int(s) for s in entry["shape"]], dtype=dtype)
        if array.nbytes:
            received = conn.recv_bytes_into(memoryview(array).cast("B"))
        else:
            received = len(conn.recv_bytes())
        if received != array.nbytes:
            raise ProtocolError(f"worker protocol: array {entry['name']!r}: {received} bytes, expected {array.nbytes}")
        arrays[entry["name"]] = array
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

def listen() -> socket.socket:
    """A non-blocking TCP server on the loopback interface (port chosen by the system)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    return server


def _no_delay(sock: socket.socket) -> socket.socket:
    """Send small messages at once: Nagle's algorithm would hold a header until the peer's delayed ACK (~40 ms)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def accept(server: socket.socket, authkey: bytes) -> Optional[Connection]:
    """The worker's connection once it has connected and proved it holds ``authkey``; None while
    nobody is waiting (never blocks). Raises AuthenticationError for a peer without the key."""
    try:
        sock, _ = server.accept()
    except BlockingIOError:
        return None
    sock.setblocking(True)
    conn = Connection(_no_delay(sock).detach())
    # the same two handshakes, in the same order, as multiprocessing.connection.Listener.accept
    deliver_challenge(conn, authkey)
    answer_challenge(conn, authkey)
    return conn


def connect(address: Tuple[str, int], authkey: bytes) -> Connection:
    """The worker side of accept (as multiprocessing.connection.Client does)."""
    conn = Connection(_no_delay(socket.create_connection(address)).detach())
    answer_challenge(conn, authkey)
    deliver_challenge(conn, authkey)
    return conn
