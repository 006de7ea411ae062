"""livegift.rfc6455.FrameParser against websockets' sans-I/O ServerProtocol.

Two questions decide which one the lean WebSocket server parses client frames with:

- memory: bytes per idle parser object, by tracemalloc over 10,000 live instances
  (the list that holds them is allocated before the baseline, so it is not counted);
  websockets both fresh and after an opening handshake (request fed, accepted, 101
  sent and drained), since that is the state an idle connection sits in;
- speed: 100,000 masked text frames of about 100 bytes (a gift op) fed in 64 KiB
  chunks. websockets' ServerProtocol yields frames and leaves UTF-8 decoding to its
  I/O layers, so it is timed both as is and with the text decoded (the same work as
  FrameParser, whose text messages come out as str). Best of 7 runs, taken in turns.

Writes ``loadtest/results/rfc6455-bench.json`` and prints a table. Usage::

    .venv/bin/python -m loadtest.bench_rfc6455
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import websockets
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.utils import apply_mask

from livegift.protocol import MAX_FRAME
from livegift.rfc6455 import FrameParser, Message

OUT = Path(__file__).resolve().parent / "results" / "rfc6455-bench.json"
SUBPROTOCOLS: Any = ["livegift.json", "livegift.msgpack"]
REQUEST = (
    b"GET /ws/room1?token=t HTTP/1.1\r\nHost: localhost:8000\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: livegift.json\r\n\r\n"
)


def load() -> dict[str, Any]:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
    return {"uptime": uptime.strip(), "loadavg": list(os.getloadavg())}


# -- memory ------------------------------------------------------------------------------


def per_object(make: Callable[[], object], count: int) -> float:
    """Bytes tracemalloc sees per live object made by make (count of them)."""
    gc.collect()
    keep: list[object] = [None] * count
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(count):
        keep[i] = make()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del keep
    return (after - before) / count


def frame_parser_after_traffic() -> FrameParser:
    parser = FrameParser()
    parser.feed(client_frame(b'{"op":"gift","req":"r1","gift":"rose"}'))
    return parser


def websockets_fresh() -> ServerProtocol:
    return ServerProtocol(subprotocols=SUBPROTOCOLS, max_size=MAX_FRAME)


def websockets_after_handshake() -> ServerProtocol:
    protocol = ServerProtocol(subprotocols=SUBPROTOCOLS, max_size=MAX_FRAME)
    protocol.receive_data(REQUEST)
    [request] = protocol.events_received()
    response = protocol.accept(request)
    assert response.status_code == 101, response.status_code
    protocol.send_response(response)
    protocol.data_to_send()
    assert protocol.state is State.OPEN
    return protocol


def memory(count: int) -> dict[str, float]:
    cases: dict[str, Callable[[], object]] = {
        "FrameParser idle": FrameParser,
        "FrameParser after a message": frame_parser_after_traffic,
        "websockets ServerProtocol fresh": websockets_fresh,
        "websockets ServerProtocol after handshake": websockets_after_handshake,
    }
    return {name: round(per_object(make, count), 1) for name, make in cases.items()}


# -- speed -------------------------------------------------------------------------------


def client_frame(payload: bytes, mask: bytes = b"\x1f\x2e\x3d\x4c") -> bytes:
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + apply_mask(payload, mask)


def stream(frames: int) -> tuple[bytes, int]:
    """frames masked text frames of ~100 bytes, and the size of each payload."""
    payload = (
        b'{"op":"gift","req":"req-000000","gift":"rose","count":1,"note":"' + b"x" * 34 + b'"}'
    )
    return client_frame(payload) * frames, len(payload)


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def run_frame_parser(pieces: list[bytes]) -> int:
    parser, count = FrameParser(), 0
    for piece in pieces:
        for event in parser.feed(piece):
            assert type(event) is Message
            count += 1
    return count


def run_websockets(pieces: list[bytes], decode: bool) -> int:
    protocol, count = ServerProtocol(state=State.OPEN, max_size=MAX_FRAME), 0
    for piece in pieces:
        protocol.receive_data(piece)
        for frame in protocol.events_received():
            assert frame.opcode is Opcode.TEXT
            if decode:
                bytes(frame.data).decode()
            count += 1
        protocol.data_to_send()
    return count


def timed(fn: Callable[[], int], expected: int) -> float:
    gc.collect()
    start = time.perf_counter()
    assert fn() == expected
    return time.perf_counter() - start


def speed(frames: int, chunk: int, repeats: int) -> dict[str, Any]:
    """Best of repeats for each parser, the parsers taking turns so load hits all alike."""
    data, payload = stream(frames)
    pieces = chunks(data, chunk)
    runs: dict[str, Callable[[], int]] = {
        "FrameParser (text decoded)": lambda: run_frame_parser(pieces),
        "websockets ServerProtocol (frames only)": lambda: run_websockets(pieces, False),
        "websockets ServerProtocol (text decoded)": lambda: run_websockets(pieces, True),
    }
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn, frames))
    results: dict[str, Any] = {"frames": frames, "payload_bytes": payload, "chunk": chunk}
    results["stream_bytes"] = len(data)
    for name, seconds in best.items():
        results[name] = {
            "seconds": round(seconds, 4),
            "frames_per_s": round(frames / seconds),
            "us_per_frame": round(seconds / frames * 1e6, 3),
            "MB_per_s": round(len(data) / seconds / 1e6, 1),
        }
    return results


# -- report ------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    lines = [f"load before: {result['load_before']['uptime']}", "", "memory per idle object"]
    lines += [f"  {name:<44} {size:>8.0f} B" for name, size in result["memory_bytes"].items()]
    run = result["speed"]
    lines += [
        "",
        f"{run['frames']:,} text frames of {run['payload_bytes']} B, {run['chunk']} B chunks",
    ]
    for name, row in run.items():
        if isinstance(row, dict):
            lines.append(
                f"  {name:<44} {row['frames_per_s']:>10,} frames/s "
                f"{row['us_per_frame']:>7.3f} us/frame {row['MB_per_s']:>7.1f} MB/s"
            )
    lines.append(f"load after: {result['load_after']['uptime']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=65_536)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "python": sys.version.split()[0],
        "websockets": websockets.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_before": load(),
        "objects": args.objects,
    }
    result["memory_bytes"] = memory(args.objects)
    result["speed"] = speed(args.frames, args.chunk, args.repeats)
    result["load_after"] = load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
