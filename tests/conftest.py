"""Fixtures: a real Redis-compatible server, and real livegift servers on free ports.

Nothing is mocked: the Redis is a real valkey/redis process started here, and
``live_server`` runs ``python -m livegift serve`` (uvicorn) in a subprocess. Test
timeouts scale with LIVEGIFT_TEST_TIMEOUT_FACTOR on slow machines.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from livegift import auth
from livegift.catalog import default_catalog
from livegift.embedded import STATE_FILE, EmbeddedRedis, free_port
from tests.cluster import valkey_cluster_fixture  # noqa: F401  (the fixture `valkey_cluster`)

SECRET = "test-secret-0123456789abcdef0123456789"
PAYMENT_SECRET = "test-payment-secret-0123456789abcdef01"
ADULT = "1990-01-01"
FACTOR = float(os.environ.get("LIVEGIFT_TEST_TIMEOUT_FACTOR", "1"))
ROOT = Path(__file__).resolve().parent.parent


def unit(seconds: float) -> float:
    """A timeout, scaled for slow machines."""
    return seconds * FACTOR


def uid(prefix: str = "u") -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


# LIVEGIFT_TEST_CLUSTER=1: the data store of the run is a 3-master, 3-replica Valkey
# Cluster (tests/cluster.py) instead of one embedded server, and only the modules below
# run (scripts/test runs them both ways). The others stay on one server: they need the
# embedded server itself (its password, maxmemory, a kill -9, the CLI's discovery), use
# db numbers or plain clients, or kill cluster nodes themselves (test_cluster_*.py).
CLUSTER = os.environ.get("LIVEGIFT_TEST_CLUSTER") == "1"
CLUSTER_MODULES = frozenset(
    {
        "test_ws.py",
        "test_http.py",
        "test_transactions_http.py",
        "test_payouts_http.py",
        "test_liveliness.py",
        "test_tokens_overlay.py",
        "test_ws_asgi.py",
        "test_workers.py",
        "test_ledger.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not CLUSTER:
        return
    kept = [item for item in items if item.path.name in CLUSTER_MODULES]
    if len(kept) < len(items):
        config.hook.pytest_deselected(
            items=[i for i in items if i.path.name not in CLUSTER_MODULES]
        )
        items[:] = kept


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    if CLUSTER:
        return str(request.getfixturevalue("valkey_cluster").url)
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    return server.url


class LiveServer:
    """A real ``livegift serve`` process, with helpers to mint tokens and make requests."""

    def __init__(self, redis_url: str, env: dict[str, str] | None = None, log: Path | None = None):
        self.redis_url = redis_url
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.secret = SECRET
        self.payment_secret = PAYMENT_SECRET
        self.extra_env = env or {}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.base_url, timeout=unit(10))

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            REDIS_URL=self.redis_url,
            LIVEGIFT_SECRET=SECRET,
            LIVEGIFT_PAYMENT_SECRET=PAYMENT_SECRET,
            LIVEGIFT_GIFT_RATE="1000",
            LIVEGIFT_GIFT_BURST="1000",
            # Tests share a few users across many sockets; test_security_transport.py
            # checks the production cap (16) on servers of its own.
            LIVEGIFT_MAX_CONNECTIONS_PER_USER="1000",
        )
        env.update(self.extra_env)
        return env

    def start(self) -> LiveServer:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "livegift", "serve", "--port", str(self.port)],
            env=self.env(),
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )
        deadline = time.monotonic() + unit(20)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"livegift serve exited with {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/healthz").status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError("livegift serve did not become healthy")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(unit(10))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        self.http.close()

    # -- helpers -----------------------------------------------------------------------

    def token(
        self,
        user: str,
        *,
        name: str | None = None,
        birthdate: str | None = ADULT,
        ttl: int = 3600,
    ) -> str:
        return auth.mint_token(SECRET, user, name=name, birthdate=birthdate, ttl=ttl)

    def receipt(
        self, user: str, package: str = "p1321", region: str = "US", txn: str | None = None
    ) -> str:
        # Signed as a store signs it: the test servers run in production mode.
        return auth.mint_receipt(
            PAYMENT_SECRET, default_catalog(), user, package, region=region, txn=txn, sandbox=False
        )

    def headers(self, token: str | None) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        return self.http.get(path, headers=self.headers(token), **kw)

    def post(
        self,
        path: str,
        json: Any = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return self.http.post(path, json=json, headers={**self.headers(token), **(headers or {})})

    def delete(self, path: str, token: str | None = None) -> httpx.Response:
        return self.http.delete(path, headers=self.headers(token))

    def create_stream(self, creator_token: str, title: str = "t") -> str:
        r = self.post("/api/streams", {"title": title}, token=creator_token)
        assert r.status_code in (200, 201), r.text
        return str(r.json()["room"])

    def recharge(
        self,
        user_token: str,
        user: str,
        package: str = "p1321",
        region: str = "US",
        txn: str | None = None,
    ) -> dict[str, Any]:
        r = self.post(
            "/api/wallet/recharge",
            {"receipt": self.receipt(user, package, region, txn)},
            token=user_token,
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    def ws(self, room: str, token: str, **params: Any) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"token": token, **params}.items())
        return f"{self.ws_url}/ws/{room}?{query}"


@pytest.fixture(scope="session")
def live_server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(redis_url, log=tmp_path_factory.mktemp("logs") / "server.log").start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def server_env() -> dict[str, str]:
    """Environment every server of a test module gets (a module may override this)."""
    return {}


@pytest.fixture
def server_factory(redis_url: str, tmp_path: Path, server_env: dict[str, str]) -> Iterator[Any]:
    """Start extra servers with their own environment (stopped after the test)."""
    started: list[LiveServer] = []

    def make(env: dict[str, str] | None = None, url: str | None = None) -> LiveServer:
        merged = {**server_env, **(env or {})}
        server = LiveServer(url or redis_url, merged, log=tmp_path / f"server{len(started)}.log")
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.close()


def crash_and_restart(redis: EmbeddedRedis, port: int) -> None:
    """kill -9 a Redis (no shutdown, no final fsync) and start it again on its data."""
    assert redis.process is not None
    os.kill(redis.process.pid, signal.SIGKILL)
    redis.process.wait()
    redis.process = None
    (redis.data_dir / STATE_FILE).unlink()
    redis.start(port=port)
