"""Routing by room: the nginx example of deploy/nginx/ in front of two real instances.

Two ``livegift serve --workers 2`` processes share the suite's Redis, and Debian's nginx
runs deploy/nginx/livegift.conf itself (only its ports and log path swapped). Which
instance holds a socket is read from the instances' own TCP connections (psutil) while
the sockets are open, and from nginx's access log (``$upstream_addr``) once they end;
nothing is added to the server to tell.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from livegift.embedded import free_port
from tests.conftest import ROOT, LiveServer, uid, unit
from tests.wsclient import Client

EXAMPLE = ROOT / "deploy" / "nginx" / "livegift.conf"
# What the test swaps in the example: its instances, its port and its access log.
EXAMPLE_UPSTREAMS = ("server 127.0.0.1:8001 ", "server 127.0.0.1:8002 ")
EXAMPLE_LISTEN = "listen 80;"
EXAMPLE_LOG = "/var/log/nginx/livegift.access.log"
MEMBERS_PER_ROOM = 6
GIFTS_PER_ROOM = 10


def nginx_binary() -> str | None:
    """Debian puts nginx in /usr/sbin, which a non-root PATH often lacks."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def wait_healthy(base_url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + unit(40)
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/healthz", timeout=unit(2)).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not become healthy")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(unit(20))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Instance:
    """One ``livegift serve --workers 2`` on a free loopback port."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.base_url = f"http://{self.addr}"
        self.ws_url = f"ws://{self.addr}"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "livegift", "serve", "--port", str(self.port),
                 "--workers", "2"],
                env=env, cwd=ROOT, stdout=out, stderr=out,
            )  # fmt: skip

    def sockets(self) -> Counter[int]:
        """Open TCP connections to this instance's port, by worker process id."""
        counts: Counter[int] = Counter()
        for proc in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                for conn in proc.net_connections(kind="tcp"):
                    mine = conn.laddr and conn.laddr.port == self.port and conn.raddr
                    if mine and conn.status == psutil.CONN_ESTABLISHED:
                        counts[proc.pid] += 1
        return counts

    def viewers(self, room: str) -> int:
        """GET /api/streams/{room} straight from this instance (no kept-alive socket)."""
        r = httpx.get(f"{self.base_url}/api/streams/{room}", timeout=unit(5))
        assert r.status_code == 200, r.text
        return int(r.json()["viewers"])


class Nginx:
    """Debian's nginx running the example config against the given instances."""

    def __init__(self, binary: str, instances: list[Instance]) -> None:
        # Not pytest's tmp_path: that sits in a 0700 folder, and as root nginx's workers
        # run as nobody and must reach their temp folders.
        self.dir = Path(tempfile.mkdtemp(prefix="livegift-nginx-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.access_log = self.dir / "access.log"
        self.error_log = self.dir / "error.log"
        (self.dir / "livegift.conf").write_text(self.site(instances))
        (self.dir / "nginx.conf").write_text(self.main())
        with open(self.error_log, "ab") as err:
            self.proc = subprocess.Popen(
                [binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                 "-e", str(self.error_log)],
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip

    def site(self, instances: list[Instance]) -> str:
        """The example, with each swapped line checked to be there exactly once."""
        text = EXAMPLE.read_text()
        swaps = [
            *(
                (f"{old}", f"server {inst.addr} ")
                for old, inst in zip(EXAMPLE_UPSTREAMS, instances, strict=True)
            ),
            (EXAMPLE_LISTEN, f"listen 127.0.0.1:{self.port};"),
            (EXAMPLE_LOG, str(self.access_log)),
        ]
        for old, new in swaps:
            assert text.count(old) == 1, f"{EXAMPLE} no longer has {old!r} once"
            text = text.replace(old, new)
        return text

    def main(self) -> str:
        """The main context the example's http{} file is included in (as conf.d is)."""
        temp = "\n".join(
            f"    {kind}_temp_path {self.dir / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return (
            f"daemon off;\nworker_processes 1;\npid {self.dir / 'nginx.pid'};\n"
            f"error_log {self.error_log} warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n{temp}\n    include {self.dir / 'livegift.conf'};\n}}\n"
        )

    def routes(self) -> list[tuple[str, str]]:
        """(path, instance address) of every request and ended socket, from the log."""
        out = []
        for line in self.access_log.read_text().splitlines():
            request = line.split('"')[1]  # "GET /ws/room"
            fields = line.split('"')[2].split()  # status, upstream(s), time
            out.append((request.split()[1], " ".join(fields[1:-1])))
        return out

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Deployment:
    nginx: Nginx
    instances: list[Instance]
    api: LiveServer  # tokens, receipts and HTTP calls, through nginx
    clients: list[Client] = field(default_factory=list)

    def sockets(self) -> list[Counter[int]]:
        return [i.sockets() for i in self.instances]

    async def steady_sockets(self) -> list[Counter[int]]:
        """The instances' sockets once no HTTP request (nginx closes each) is ending."""
        last = self.sockets()
        deadline = time.monotonic() + unit(5)
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            now = self.sockets()
            if now == last:
                break
            last = now
        return last

    async def join(self, ws_url: str, room: str, user: str | None = None) -> Client:
        """A member of ``room`` through ``ws_url``: nginx's, or an instance's own."""
        user = user or uid("v")
        client = await Client.open(f"{ws_url}/ws/{room}?token={self.api.token(user)}")
        self.clients.append(client)
        welcome = await client.next()
        assert welcome["type"] == "welcome", welcome
        client.buffer.insert(0, welcome)
        return client

    def gifter(self) -> str:
        """A new user with coins (the recharge goes through nginx)."""
        user = uid("g")
        self.api.recharge(self.api.token(user), user)
        return user


def nginx_or_skip() -> str:
    binary = nginx_binary()
    if binary is None:
        if os.geteuid() == 0:
            pytest.fail("nginx is not installed: scripts/test installs it (apt-get install nginx)")
        pytest.skip("no nginx binary; install Debian's (apt-get install nginx) or run as root")
    return binary


@pytest.fixture(scope="module")
def deployment(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    binary = nginx_or_skip()
    logs = tmp_path_factory.mktemp("nginx-routing")
    api = LiveServer(redis_url)  # never started: its tokens, receipts and HTTP helpers
    instances = [Instance(api.env(), logs / f"instance{n}.log") for n in range(2)]
    nginx: Nginx | None = None
    try:
        for n, inst in enumerate(instances):
            wait_healthy(inst.base_url, inst.proc, f"instance {n} ({logs})")
        nginx = Nginx(binary, instances)
        wait_healthy(nginx.base_url, nginx.proc, f"nginx ({nginx.error_log})")
        api.http.close()
        api.base_url, api.ws_url = nginx.base_url, nginx.ws_url
        api.http = httpx.Client(base_url=nginx.base_url, timeout=unit(10))
        yield Deployment(nginx, instances, api)
    finally:
        api.http.close()
        if nginx is not None:
            nginx.close()
        for inst in instances:
            stop(inst.proc)


async def settle(
    deployment: Deployment, before: list[Counter[int]], added: int
) -> list[Counter[int]]:
    """The sockets each instance's workers gained, once ``added`` of them are open."""
    deadline = time.monotonic() + unit(10)
    while True:
        now = deployment.sockets()
        gained = [now[i] - before[i] for i in range(len(now))]
        if sum(sum(g.values()) for g in gained) >= added or time.monotonic() > deadline:
            return gained
        await asyncio.sleep(0.05)


@dataclass
class Placement:
    clients: list[Client]
    home: int  # the instance that took every one of them
    processes: set[int]  # its workers that hold them


async def place(deployment: Deployment, room: str, members: int) -> Placement:
    """Join ``members`` to ``room`` through nginx, and find where they landed."""
    before = await deployment.steady_sockets()
    clients = [await deployment.join(deployment.nginx.ws_url, room) for _ in range(members)]
    gained = await settle(deployment, before, members)
    totals = [sum(g.values()) for g in gained]
    assert sorted(totals) == [0, members], f"room {room} split over instances: {gained}"
    home = totals.index(members)
    assert len(gained[home]) <= 2, "more processes than the instance's two workers"
    return Placement(clients, home, set(gained[home]))


async def gift_seqs(client: Client, count: int) -> list[int]:
    seqs: list[int] = []
    while len(seqs) < count:
        event = await client.next(timeout=15)
        if event["type"] == "gift":
            seqs.append(event["seq"])
    return seqs


async def test_each_room_sticks_to_one_instance_and_every_member_gets_every_gift(
    deployment: Deployment,
) -> None:
    api = deployment.api
    rooms: dict[str, Placement] = {}
    # Rooms until both instances host some (6 rooms land all on one with p ~ 3 %).
    while len(rooms) < 6 or len({p.home for p in rooms.values()}) < 2:
        assert len(rooms) < 24, "consistent hashing sent every room to one instance"
        room = api.create_stream(api.token(uid("c")))
        rooms[room] = await place(deployment, room, MEMBERS_PER_ROOM)
    # What routing buys: a room's events reach these processes, not all four.
    print(
        f"\nrooms per instance {dict(Counter(p.home for p in rooms.values()))}, "
        f"processes per room {sorted(len(p.processes) for p in rooms.values())}"
    )
    # Gifts through nginx, and through the *other* instance directly: that sender is a
    # member of the room on an instance that nginx does not route the room to, as is one
    # more listener there. (A sender's own acks are read past its gift events.)
    senders, listeners = {}, {}
    for room, placed in rooms.items():
        other = deployment.instances[1 - placed.home]
        senders[room] = (
            await deployment.join(deployment.nginx.ws_url, room, deployment.gifter()),
            await deployment.join(other.ws_url, room, deployment.gifter()),
        )
        listeners[room] = [*placed.clients, await deployment.join(other.ws_url, room)]

    async def send(room: str) -> None:
        for i in range(GIFTS_PER_ROOM):
            ack = await senders[room][i % 2].gift(f"{room}-{i}")
            assert ack["ok"] and ack["seq"] == i + 1, ack

    await asyncio.gather(*(send(room) for room in rooms))
    everyone = [(room, c) for room, clients in listeners.items() for c in clients]
    got = await asyncio.gather(*(gift_seqs(c, GIFTS_PER_ROOM) for _, c in everyone))
    for (room, _), seqs in zip(everyone, got, strict=True):
        assert seqs == list(range(1, GIFTS_PER_ROOM + 1)), room
    # The pages of a room go where its sockets go.
    for room in rooms:
        for page in ("watch", "studio", "overlay"):
            assert api.get(f"/{page}/{room}").status_code == 200
    await close_all(deployment)
    check_log(deployment, {room: placed.home for room, placed in rooms.items()})


async def close_all(deployment: Deployment) -> None:
    await asyncio.gather(*(c.close() for c in deployment.clients))
    deployment.clients.clear()


def check_log(deployment: Deployment, homes: dict[str, int]) -> None:
    """nginx's own account: every socket and page of a room went to the room's instance."""
    expected = {room: deployment.instances[home].addr for room, home in homes.items()}
    deadline = time.monotonic() + unit(10)
    while True:
        seen: dict[str, list[str]] = {room: [] for room in homes}
        for path, upstream in deployment.nginx.routes():
            parts = path.strip("/").split("/")
            if len(parts) == 2 and parts[1] in seen and parts[0] in ("ws", "watch", "studio",
                                                                      "overlay"):  # fmt: skip
                seen[parts[1]].append(upstream)
        # Each room: its members and its nginx sender, plus its three pages.
        done = all(len(v) == MEMBERS_PER_ROOM + 1 + 3 for v in seen.values())
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for room, upstreams in seen.items():
        assert len(upstreams) == MEMBERS_PER_ROOM + 4, (room, upstreams)
        assert set(upstreams) == {expected[room]}, (room, upstreams)


async def latest_viewers(client: Client, quiet: float) -> int:
    """The count this member was told last (welcome, then viewers events)."""
    count = -1
    with contextlib.suppress(TimeoutError):
        while True:
            event = await client.next(timeout=quiet)
            if event["type"] in ("welcome", "viewers"):
                count = event["viewers"] if event["type"] == "welcome" else event["count"]
    return count


async def test_presence_is_exact_with_members_on_both_instances(deployment: Deployment) -> None:
    api = deployment.api
    room = api.create_stream(api.token(uid("c")))
    routed = await place(deployment, room, 5)
    other = deployment.instances[1 - routed.home]
    direct = [await deployment.join(other.ws_url, room) for _ in range(3)]
    members = [*routed.clients, *direct]
    for i, client in enumerate(members):
        # Presence is summed every 2 s: a welcome may not count the latest joiners yet,
        # but it never counts anyone who is not there.
        assert 1 <= client.buffer[0]["viewers"] <= i + 1
    total = len(members)

    def everywhere() -> list[int]:
        via_nginx = api.get(f"/api/streams/{room}").json()["viewers"]
        return [via_nginx, *(inst.viewers(room) for inst in deployment.instances)]

    deadline = time.monotonic() + unit(15)
    while everywhere() != [total] * 3:
        assert time.monotonic() < deadline, f"viewers {everywhere()} != {total}"
        await asyncio.sleep(0.2)
    # Two more presence beats: every member, on either instance, was told the total.
    told = await asyncio.gather(*(latest_viewers(c, quiet=4.5) for c in members))
    assert told == [total] * total
    # A member who joins now, on a worker that holds some of the room, is welcomed with
    # the others counted. A worker new to the room knows only its own members until its
    # next presence beat (up to 2 s), then tells the total like every other.
    late = await place(deployment, room, 1)
    assert late.home == routed.home
    welcomed = late.clients[0].buffer[0]["viewers"]
    if late.processes <= routed.processes:
        assert total <= welcomed <= total + 1
    else:
        assert 1 <= welcomed <= total + 1
    deadline = time.monotonic() + unit(15)
    while everywhere() != [total + 1] * 3:
        assert time.monotonic() < deadline, f"viewers {everywhere()} != {total + 1}"
        await asyncio.sleep(0.2)
    await close_all(deployment)


async def test_http_spreads_and_overlays_route_by_creator(deployment: Deployment) -> None:
    api = deployment.api
    before = len(deployment.nginx.routes())
    for _ in range(20):
        assert api.get("/healthz").status_code == 200
    creator = uid("c")
    token = api.token(creator)
    # A scheme the client claims is replaced by nginx's own.
    r = api.post("/api/overlay-key", token=token, headers={"x-forwarded-proto": "https"})
    assert r.status_code == 201, r.text
    # Built from the Host nginx passes on: the address viewers use, not an instance's.
    assert r.json()["url"].startswith(f"{deployment.nginx.base_url}/overlay/u/{creator}?key=")
    key = r.json()["key"]
    for _ in range(3):
        overlay = await Client.open(f"{deployment.nginx.ws_url}/ws/creator/{creator}?key={key}")
        assert (await overlay.next())["type"] in ("offline", "welcome")
        await overlay.close()
    deadline = time.monotonic() + unit(10)
    while True:
        routes = deployment.nginx.routes()[before:]
        overlays = {up for path, up in routes if path == f"/ws/creator/{creator}"}
        if sum(path.startswith("/ws/creator/") for path, _ in routes) == 3:
            break
        assert time.monotonic() < deadline, routes
        time.sleep(0.1)
    assert len(overlays) == 1, "a creator's overlay sockets went to different instances"
    spread = {up for path, up in routes if path == "/healthz"}
    assert spread == {i.addr for i in deployment.instances}, "HTTP did not spread"
