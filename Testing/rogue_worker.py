"""A worker that proves the key and then answers its first request with one malformed message (for tests).

``python rogue_worker.py MODE -m AttentionMapLib.worker_process --address ADDRESS ...`` (the arguments a worker
gets; the key on stdin). MODE names the defect: a header that is not JSON, JSON nested past Python's recursion
limit, an array of negative shape, an array entry without a name, a frame longer or shorter than its declared
shape, a "done" event without its value.
"""
import json
import sys

from AttentionMapLib import worker_protocol as protocol


def header(job: int, arrays: list, **fields) -> bytes:
    return json.dumps({"event": "done", "id": job, "value": {}, "arrays": arrays, **fields}).encode()


def main() -> None:
    mode = sys.argv[1]
    address = sys.argv[sys.argv.index("--address") + 1]
    conn = protocol.connect(address, bytes.fromhex(sys.stdin.readline().strip()))
    request, _ = protocol.receive(conn)
    job = request["id"]
    floats = [{"name": "grid", "dtype": "<f4", "shape": [2]}]
    messages = {
        "not-json": [b"\xff{not json"],
        "nested": [b"[" * 200_000 + b"]" * 200_000],
        "negative-shape": [header(job, [{"name": "grid", "dtype": "<f4", "shape": [-3]}])],
        "no-name": [header(job, [{"dtype": "<f4", "shape": [2]}]), b"\0" * 8],
        "long-frame": [header(job, floats), b"\0" * 16],
        "short-frame": [header(job, floats), b"\0" * 4],
        "done-without-value": [json.dumps({"event": "done", "id": job}).encode()],
    }[mode]
    for message in messages:
        conn.send_bytes(message)
    try:
        conn.recv_bytes()  # until the GUI side closes the connection
    except EOFError:
        pass


if __name__ == "__main__":
    main()
