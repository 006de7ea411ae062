"""Money and secrets hardening (issue 9): development mode is asked for, sandbox coins are
marked and reported, ``serve`` refuses a public host with public secrets, and the embedded
Redis is private to its user. Real servers, real Redis, the real ``livegift`` command."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis

from livegift import auth
from livegift.catalog import default_catalog
from livegift.config import DEV_SECRET
from livegift.embedded import PASSWORD_FILE, STATE_FILE, EmbeddedRedis, free_port
from tests.conftest import PAYMENT_SECRET, ROOT, SECRET, LiveServer, uid, unit

DB = 12  # this module's own database on the session's Redis: reconcile sees only its data
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEGIFT_", "REDIS_"))}
SECRETS = {"LIVEGIFT_SECRET": SECRET, "LIVEGIFT_PAYMENT_SECRET": PAYMENT_SECRET}


def livegift(
    *args: str, env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "livegift", *args],
        env={**BASE_ENV, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=unit(timeout),
    )


def db_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{DB}"


# -- 1. free coins ---------------------------------------------------------------------


def test_dev_receipt_endpoint_is_off_by_default(live_server: LiveServer) -> None:
    for birthdate in ("1990-01-01", "2015-01-01", None):
        token = live_server.token(uid(), birthdate=birthdate)
        r = live_server.post("/api/dev/receipt", {"package": "p6607"}, token=token)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"


def test_sandbox_receipt_mints_nothing_outside_development_mode(live_server: LiveServer) -> None:
    user = uid()
    token = live_server.token(user)
    # What `livegift receipt` signs: a sandbox receipt, with a valid signature.
    sandbox = auth.mint_receipt(PAYMENT_SECRET, default_catalog(), user, "p6607")
    r = live_server.post("/api/wallet/recharge", {"receipt": sandbox}, token=token)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_receipt", r.text
    assert "development mode" in r.json()["error"]["message"]
    assert live_server.get("/api/wallet", token).json()["coins"] == 0
    assert live_server.get("/api/wallet/transactions", token).json()["transactions"] == []


def test_sandbox_purchases_are_marked_and_reconcile_reports_them(
    redis_url: str, server_factory: Any
) -> None:
    url = db_url(redis_url)
    sync_redis.Redis.from_url(url).flushdb()
    dev: LiveServer = server_factory({"LIVEGIFT_DEV": "1"}, url=url)
    user, minor = uid(), uid("kid")
    token = dev.token(user)
    # The development endpoint signs a receipt for any user, but a minor still can't buy.
    kid = dev.token(minor, birthdate="2015-01-01")
    kid_receipt = dev.post("/api/dev/receipt", {"package": "p330"}, token=kid).json()["receipt"]
    refused = dev.post("/api/wallet/recharge", {"receipt": kid_receipt}, token=kid)
    assert refused.json()["error"]["code"] == "not_adult"

    receipt = dev.post("/api/dev/receipt", {"package": "p330"}, token=token).json()["receipt"]
    assert jwt_claims(receipt)["env"] == "sandbox"
    bought = dev.post("/api/wallet/recharge", {"receipt": receipt}, token=token).json()
    assert bought["transaction"]["sandbox"] is True and bought["balance"]["coins"] == 330
    store = dev.recharge(token, user, "p1321")  # a store's receipt: no sandbox mark
    assert "sandbox" not in store["transaction"]
    entries = dev.get("/api/wallet/transactions", token).json()["transactions"]
    assert [(e["counterparty"], e.get("sandbox")) for e in entries] == [
        ("store", None),
        ("sandbox", True),
    ]

    env = {**SECRETS, "REDIS_URL": url}
    out = livegift("reconcile", "--json", "--quiet", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["minted"] == 330 + 1321
    assert (report["sandbox_minted"], report["sandbox_purchases"]) == (330, 1)
    text = livegift("reconcile", "--quiet", env=env)
    assert text.returncode == 0
    assert "sandbox: 330 minted coins come from 1 sandbox receipt(s)" in text.stdout

    # The same data store served in production: the sandbox receipt credits nothing more.
    prod: LiveServer = server_factory(url=url)
    again = prod.post("/api/wallet/recharge", {"receipt": receipt}, token=prod.token(user))
    assert again.json()["error"]["code"] == "invalid_receipt"


def jwt_claims(token: str) -> dict[str, Any]:
    import jwt

    return dict(jwt.decode(token, PAYMENT_SECRET, algorithms=["HS256"]))


# -- 2. public secrets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--host", "0.0.0.0"], {}, ["LIVEGIFT_SECRET", "LIVEGIFT_PAYMENT_SECRET"]),
        (["--host", "::"], {"LIVEGIFT_SECRET": SECRET}, ["LIVEGIFT_PAYMENT_SECRET"]),
        (["--host", "0.0.0.0"], {**SECRETS, "LIVEGIFT_SECRET": DEV_SECRET}, ["LIVEGIFT_SECRET"]),
        (["--host", "0.0.0.0"], {**SECRETS, "LIVEGIFT_DEV": "1"}, ["LIVEGIFT_DEV"]),
        (["--host", "192.0.2.7", "--demo"], SECRETS, ["LIVEGIFT_DEV", "--demo"]),
    ],
)
def test_serve_refuses_a_public_host_with_public_secrets_or_dev_mode(
    tmp_path: Path, args: list[str], env: dict[str, str], names: list[str]
) -> None:
    data = tmp_path / "data"
    out = livegift(
        "serve", *args, "--port", str(free_port()), env={**env, "LIVEGIFT_DATA_DIR": str(data)}
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "refusing to serve" in out.stderr
    problems = [line for line in out.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == len(names) - ("--demo" in names), out.stderr
    for name in names:
        assert name in out.stderr
    assert not data.exists(), "refused before starting anything"


def test_serve_on_a_public_host_with_both_secrets(redis_url: str) -> None:
    port = free_port()
    env = {**BASE_ENV, **SECRETS, "REDIS_URL": redis_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "livegift", "serve", "--host", "0.0.0.0", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(port, proc)
        token = auth.mint_token(SECRET, uid())
        dev = httpx.post(
            f"http://127.0.0.1:{port}/api/dev/receipt",
            headers={"authorization": f"Bearer {token}"},
        )
        assert dev.status_code == 404
    finally:
        proc.terminate()
        proc.wait(unit(20))


# -- 3. the embedded Redis is private ----------------------------------------------------


def private_modes(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (itself included) whose mode is not private."""
    wrong = {}
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        if not path.is_symlink() and mode != want:
            wrong[str(path.relative_to(folder))] = oct(mode)
    return wrong


def test_embedded_redis_has_a_password_and_a_private_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "old").mkdir(parents=True)
    (data / "old" / "notes.txt").write_text("from an older livegift")
    os.chmod(data, 0o755)
    os.chmod(data / "old", 0o755)
    os.chmod(data / "old" / "notes.txt", 0o644)
    env = {**SECRETS, "LIVEGIFT_DATA_DIR": str(data)}
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "livegift", "serve", "--port", str(port)],
            env={**BASE_ENV, **env},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(port, proc)
        state = json.loads((data / STATE_FILE).read_text())
        password = (data / PASSWORD_FILE).read_text().strip()
        assert len(password) >= 32
        plain = sync_redis.Redis(port=state["port"])
        with pytest.raises(sync_redis.AuthenticationError):  # NOAUTH
            plain.get("lg:{lg}:minted")
        with pytest.raises(sync_redis.AuthenticationError):
            sync_redis.Redis(port=state["port"], password="guess").ping()
        assert sync_redis.Redis(port=state["port"], password=password).ping()
        assert private_modes(data) == {}
        # Commands find the running server and its password through the data folder.
        assert livegift("reconcile", "--quiet", env=env).returncode == 0
    finally:
        proc.terminate()
        proc.wait(unit(20))
    assert password not in log.read_text(), "serve printed the password"
    argv = EmbeddedRedis(data).argv("valkey-server", free_port())
    assert not any(password in arg for arg in argv), "ps would show the password"
    # With serve stopped, reconcile starts the server itself, with the same password.
    out = livegift("reconcile", "--quiet", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (data / PASSWORD_FILE).read_text().strip() == password
    assert private_modes(data) == {}


def wait_healthy(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + unit(30)
    while True:
        assert proc.poll() is None, f"serve exited with {proc.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "serve did not come up"
        time.sleep(0.1)
