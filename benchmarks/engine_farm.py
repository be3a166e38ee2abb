"""Many fake vLLM engines in ONE separate process, for benchmarks at 100-1000 Services.

One asyncio server bound to ``0.0.0.0:<port>`` receives connections for every 127.x pod IP
(a wildcard bind on Linux gets them all) and answers as the pod whose IP the connection was made
to (``sockname``): ``GET /metrics`` (the page :class:`FakeEngine` renders), ``GET /v1/models``,
``POST /v1/completions``, ``GET /health``.  Per-IP state is driven by commands on stdin, one per
line:

``up IP MODEL`` (known pod), ``drain IP`` (keeps answering, but closes each connection after
its response, like uvicorn after SIGTERM), ``down IP`` (connections reset, like a stopped pod),
``blackhole IP...`` (accept and read, never answer), ``clear`` (no black holes), ``stats``
(answered with one ``STATS {json}`` line on stdout: requests served by path), ``quit``.

The process prints ``READY <port>`` once listening, exits on ``quit``, on stdin EOF (the parent
died) and after ``--max-seconds`` at the latest.  Run it as ``python benchmarks/engine_farm.py``;
:class:`EngineFarm` below starts and stops it from the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the library importable for its pages
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
_HOLD_LIMIT = 300.0  # a black-holed connection is held at most this long
_IDLE_LIMIT = 120.0  # an idle keep-alive connection is closed after this long
_COUNTED = ("/v1/models", "/metrics", "/health", "other")


class _Farm:
    def __init__(self) -> None:
        self.models: dict[str, str] = {}
        self.down: set[str] = set()
        self.draining: set[str] = set()
        self.blackhole: set[str] = set()
        self._pages: dict[str, bytes] = {}
        self._model_lists: dict[str, bytes] = {}
        self.served = 0
        #: requests answered, by path (what the library's probes and checks cost the engines)
        self.by_path: dict[str, int] = dict.fromkeys(_COUNTED, 0)

    # -- state ---------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Apply one control line; False on ``quit``."""
        parts = line.split()
        if not parts:
            return True
        verb, args = parts[0], parts[1:]
        if verb == "quit":
            return False
        if verb == "up" and args:
            self.models[args[0]] = args[1] if len(args) > 1 else DEFAULT_MODEL
            self.down.discard(args[0])
            self.draining.discard(args[0])
        elif verb == "drain" and args:
            self.draining.add(args[0])
        elif verb == "down" and args:
            self.down.add(args[0])
            self.draining.discard(args[0])
        elif verb == "blackhole":
            self.blackhole.update(args)
        elif verb == "clear":
            self.blackhole.clear()
        elif verb == "stats":
            line = json.dumps({"served": self.served, "by_path": dict(self.by_path),
                               "pods": len(self.models), "down": len(self.down),
                               "time": time.monotonic()})
            sys.stdout.write(f"STATS {line}\n")
            sys.stdout.flush()
        return True

    # -- payloads (rendered once per model: every pod of a model has the same page) -----------

    def metrics_page(self, model: str) -> bytes:
        page = self._pages.get(model)
        if page is None:
            from vllm_router_svcdisc.sim.engine import FakeEngine

            page = self._pages[model] = FakeEngine("127.0.0.1", 0, model=model).metrics_text()
        return page

    def models_list(self, model: str) -> bytes:
        body = self._model_lists.get(model)
        if body is None:
            from vllm_router_svcdisc.sim.engine import FakeEngine

            payload = FakeEngine("127.0.0.1", 0, model=model).models_payload()
            body = self._model_lists[model] = json.dumps(payload).encode()
        return body

    # -- HTTP ----------------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ip = str(writer.get_extra_info("sockname")[0])
        try:
            while True:
                if ip in self.down:
                    _reset(writer)
                    return
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _IDLE_LIMIT)
                lines = head.decode("latin-1").split("\r\n")
                method, path = [*lines[0].split(" "), "", ""][:2]
                headers = {}
                for raw in lines[1:]:
                    if ":" in raw:
                        key, value = raw.split(":", 1)
                        headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                if length:
                    await reader.readexactly(length)
                if ip in self.down:
                    _reset(writer)
                    return
                if ip in self.blackhole:
                    with contextlib.suppress(TimeoutError, ConnectionError):
                        await asyncio.wait_for(reader.read(), _HOLD_LIMIT)
                    return
                status, ctype, body = self._route(ip, method, path.split("?", 1)[0])
                close = (headers.get("connection", "").lower() == "close"
                         or ip in self.draining)
                writer.write(
                    f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n"
                    .encode() + body)
                await writer.drain()
                self.served += 1
                if close:
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                TimeoutError, OSError, ValueError, asyncio.CancelledError):
            return  # cancelled: the farm is shutting down
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def _route(self, ip: str, method: str, path: str) -> tuple[int, str, bytes]:
        counted = path if path in _COUNTED else "other"
        self.by_path[counted] += 1
        model = self.models.get(ip, DEFAULT_MODEL)
        if path == "/metrics" and method == "GET":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics_page(model)
        if path == "/v1/models" and method == "GET":
            return 200, "application/json", self.models_list(model)
        if path == "/health" and method == "GET":
            return 200, "text/plain", b""
        if path in ("/v1/completions", "/v1/chat/completions") and method == "POST":
            body = {"id": "cmpl-farm", "object": "text_completion", "created": int(time.time()),
                    "model": model, "served_by": ip,
                    "choices": [{"index": 0, "text": " ok", "finish_reason": "stop"}]}
            return 200, "application/json", json.dumps(body).encode()
        return 404, "application/json", b'{"detail": "Not Found"}'


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as a client connecting to a stopped pod would see."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _serve(port: int, max_seconds: float) -> None:
    farm = _Farm()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    try:
        server = await asyncio.start_server(farm.handle, "0.0.0.0", port, backlog=4096,
                                            reuse_address=True)
    except OSError:
        if port == 0:
            raise
        server = await asyncio.start_server(farm.handle, "0.0.0.0", 0, backlog=4096)
    bound = server.sockets[0].getsockname()[1]

    def read_commands() -> None:
        for line in sys.stdin:
            if not farm.command(line):
                break
        loop.call_soon_threadsafe(done.set)  # quit or EOF: the parent is done or gone

    # the reader thread only appends to sets/dicts (atomic under the GIL)
    threading.Thread(target=read_commands, name="farm-control", daemon=True).start()
    sys.stdout.write(f"READY {bound}\n")
    sys.stdout.flush()
    async with server:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), max_seconds)
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=18080,
                        help="port to bind on 0.0.0.0 (0 or in use: an ephemeral one)")
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="hard bound on the process lifetime")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (quit / EOF / kill)
    asyncio.run(_serve(args.port, args.max_seconds))
    return 0


class EngineFarm:
    """The parent's handle on an engine-farm process: start, send commands, stop."""

    def __init__(self, port: int = 18080, max_seconds: float = 900.0) -> None:
        self.requested_port = port
        self.max_seconds = max_seconds
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def start(self, timeout: float = 15.0) -> EngineFarm:
        script = Path(__file__).resolve()
        self._proc = subprocess.Popen(
            [sys.executable, str(script), "--port", str(self.requested_port),
             "--max-seconds", str(self.max_seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1",  # the package, also from a checkout
                 "PYTHONPATH": os.pathsep.join(filter(None, (str(script.parent.parent),
                                                             os.environ.get("PYTHONPATH"))))},
        )
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.2)
            if ready:
                line = self._proc.stdout.readline()
                if line.startswith("READY "):
                    self.port = int(line.split()[1])
                    return self
                if not line:
                    break
            if self._proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError("engine farm did not start")

    def send(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.poll() is not None:
            return
        with self._lock, contextlib.suppress(OSError, ValueError):
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

    def up(self, ip: str, model: str) -> None:
        self.send(f"up {ip} {model}")

    def drain(self, ip: str) -> None:
        self.send(f"drain {ip}")

    def down(self, ip: str) -> None:
        self.send(f"down {ip}")

    def blackhole(self, ips: list[str]) -> None:
        for i in range(0, len(ips), 200):
            self.send("blackhole " + " ".join(ips[i:i + 200]))

    def clear(self) -> None:
        self.send("clear")

    def stats(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """Requests the farm answered so far, by path (None when it does not answer in time).

        Only one caller at a time reads the farm's stdout (the ``READY`` line is long gone).
        """
        proc = self._proc
        if proc is None or proc.stdout is None:
            return None
        self.send("stats")
        deadline = time.monotonic() + timeout
        for _ in range(1000):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if not ready:
                return None
            line = proc.stdout.readline()
            if not line:
                return None
            if line.startswith("STATS "):
                stats: dict[str, Any] = json.loads(line[len("STATS "):])
                return stats
        return None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._stop_process(proc)

    def _stop_process(self, proc: subprocess.Popen[str]) -> None:
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin is not None:
                proc.stdin.write("quit\n")
                proc.stdin.close()
        try:
            proc.wait(3.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(3.0)
        if proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()

    def __enter__(self) -> EngineFarm:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def engine_factory(self) -> Any:
        """A ``SimCluster(engine_factory=...)`` whose pods are served by this farm."""
        from vllm_router_svcdisc.sim.engine import FakeEngine

        farm = self

        class FarmEngine(FakeEngine):
            """A FakeEngine whose HTTP side lives in the farm process (never binds here)."""

            def start(self) -> FarmEngine:
                farm.up(self.ip, self.model)
                return self

            def drain(self) -> None:  # SimCluster.terminate_pod: graceful termination
                self.draining = True
                farm.drain(self.ip)

            def stop(self) -> None:
                farm.down(self.ip)

            def cut_network(self) -> None:  # SimCluster.kill_node needs sockets of its own
                raise NotImplementedError("farm engines cannot be cut off the network")

        def factory(ip: str, port: int, **options: Any) -> FakeEngine:
            return FarmEngine(ip, farm.port, **options)

        return factory


if __name__ == "__main__":
    sys.exit(main())
