"""``python -m loadtest attacks``: the issue-9 attacks against a spawned ``livegift serve``,
each measured, written to ``<stamp>-attacks-<label>.json`` and ``.md``.

The server is started here on a free loopback port, with a fresh data folder and its own
embedded Redis, production defaults and secrets that only this run knows. ``--server-env
PYTHONPATH=/path/to/checkout`` runs the code of another commit (the "before" figures);
the run records which livegift the server imported. Each attack is bounded in time and
bytes; for each the run records the server's CPU seconds, its peak RSS growth (VmRSS every
20 ms), the time a concurrent ``GET /healthz`` took, and what the attacker observed.
Configuration findings are reported as checks (pass/fail with what was seen).

``--compare BEFORE.json AFTER.json`` prints the two runs side by side as Markdown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import attack_checks as chk
from . import attack_dos as dos
from . import attack_proto as proto
from . import probes
from .attack_kit import Meter, healthz_ms
from .attack_server import Ctx, spawn

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Attack:
    name: str
    item: str  # the finding number
    title: str
    kind: str  # "check" (pass/fail) or "cost" (what it cost the server)
    run: Callable[[Ctx], dict[str, Any]]
    setup: Callable[[Ctx], None] | None = None  # not measured
    verdict: Callable[[Ctx, dict[str, Any]], None] | None = None  # after the measurement


ATTACKS = (
    Attack("dev-receipt", "1", "free coins from the dev receipt endpoint", "check", chk.dev_receipt),
    Attack("public-secrets", "2", "serve on 0.0.0.0 with the public dev secrets", "check", chk.public_secrets),
    Attack("redis-open", "3", "the embedded Redis open to local users", "check", chk.redis_open),
    Attack("big-handshake", "4", "8 MB handshake without a token", "cost", dos.big_handshake),
    Attack("long-request-line", "4", "a 200 MB request line", "cost", dos.long_request_line),
    Attack("slowloris", "5", "40 half-sent + 40 silent handshakes", "cost", dos.slowloris),
    Attack("one-token-sockets", "5", "60 sockets with one token", "cost", dos.one_token_sockets),
    Attack("big-post", "6", "300 MB POST (Content-Length)", "cost", dos.big_post),
    Attack("big-post-chunked", "6", "300 MB POST (chunked)", "cost", dos.big_post_chunked),
    Attack("resume-flood", "7", "`?since=0` on a full room", "cost", dos.resume_flood, dos.full_room),
    Attack("stalled-resumers", "8", "8 stalled msgpack resumers", "cost", dos.stalled_resumers, dos.full_room,
           dos.stalled_verdict),
    Attack("redis-growth", "8b", "Redis grows without bound", "check", chk.redis_growth),
    Attack("failed-gifts", "9", "300 gift ops with no coins", "cost", dos.failed_gifts),
    Attack("rfc-fail-fast", "10", "input after a failing frame", "cost", proto.rfc_fail_fast),
    Attack("rfc-close-codes", "10", "invalid close codes and reasons", "cost", proto.rfc_close_codes),
    Attack("rfc-bad-key", "10", "Sec-WebSocket-Key not base64 of 16 bytes", "cost", proto.rfc_bad_key),
    Attack("bad-room-id", "11", "GET /api/streams/<room>:hist", "cost", proto.bad_room_id),
    Attack("huge-since", "11", "since ≥ 2^64", "cost", proto.huge_since),
    Attack("watch-escapes", "12", "escape codes reach a `livegift watch` terminal", "check", chk.watch_escapes),
    Attack("csp", "13", "CSP connect-src allows any host", "check", chk.csp),
    Attack("expired-token", "14", "an expired token keeps gifting", "cost", proto.expired_token),
    Attack("overlay-token", "15", "the creator's token in the OBS overlay URL", "check", chk.overlay_token),
)  # fmt: skip
BY_NAME = {a.name: a for a in ATTACKS}


def select(only: str | None) -> list[Attack]:
    """``--only``: attack names or finding numbers, comma-separated."""
    if not only:
        return list(ATTACKS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in BY_NAME and not any(a.item == w for a in ATTACKS)]
    if unknown:
        raise SystemExit(f"unknown attacks {unknown}; known: {', '.join(BY_NAME)}")
    return [a for a in ATTACKS if a.name in wanted or a.item in wanted]


# -- one run --------------------------------------------------------------------------------------


def attack_once(ctx: Ctx, attack: Attack, wait_idle: float = 0.0) -> dict[str, Any]:
    res: dict[str, Any] = {"name": attack.name, "item": attack.item, "title": attack.title,
                           "kind": attack.kind}  # fmt: skip
    if wait_idle > 0:
        res["waited_for_idle"] = probes.wait_machine_idle(wait_idle)
    try:
        if attack.setup is not None:
            t0 = time.monotonic()
            attack.setup(ctx)
            res["setup_s"] = round(time.monotonic() - t0, 1)
        meter = Meter(ctx.pid, ctx.target.host, ctx.target.port, ctx.redis_pid)
        with meter:
            res.update(attack.run(ctx))
        res.update(meter.result())
        if attack.verdict is not None:
            attack.verdict(ctx, res)
    except Exception as e:  # a harness failure is a result too, and the run goes on
        res.update(outcome=f"harness error: {type(e).__name__}: {e}", passed=None, error=True)
    res["healthz_after_ms"] = healthz_ms(ctx.target.host, ctx.target.port, 10)
    res["load1"] = float(Path("/proc/loadavg").read_text().split()[0])
    return res


def run(
    extra: dict[str, str],
    only: str | None,
    label: str,
    out: Path,
    progress: bool = True,
    wait_idle: float = 0.0,
) -> dict[str, Any]:
    chosen = select(only)
    work = Path(tempfile.mkdtemp(prefix=f"attacks-{label}-"))
    started = time.time()
    result: dict[str, Any] = {"label": label, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "load_before": load(), "server_env": extra, "work_dir": str(work),
                              "command": "python -m loadtest attacks " + " ".join(sys.argv[2:])}  # fmt: skip
    servers = 0
    sp, ctx, result["server"] = spawn(extra, work, servers)
    results: list[dict[str, Any]] = []
    try:
        for attack in chosen:
            if sp.proc.poll() is not None:  # the last attack killed it: note it, start another
                results[-1]["server_died"] = True
                servers += 1
                sp.stop()
                sp, ctx, _ = spawn(extra, work, servers)
            res = attack_once(ctx, attack, wait_idle)
            if progress:
                print(f"{attack.name}: {res.get('outcome', '')[:200]}", file=sys.stderr, flush=True)
            results.append(res)
    finally:
        sp.stop()
        for data in work.glob("server*/data"):  # the stores' files; the logs stay
            shutil.rmtree(data, ignore_errors=True)
    result.update(attacks=results, load_after=load(), wall_s=round(time.time() - started, 1),
                  servers_started=servers + 1, conformance=conformance())  # fmt: skip
    return write(result, out, label)


def load() -> dict[str, Any]:
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"uptime": up, "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


# -- conformance cases, by Autobahn category -------------------------------------------------------

CATEGORIES = (
    ("framing", "framing (1.x)"), ("pings", "pings/pongs (2.x)"),
    ("reserved_bits", "reserved bits (3.x)"), ("opcodes", "opcodes (4.x)"),
    ("fragmentation", "fragmentation (5.x)"), ("utf8", "UTF-8 (6.x)"),
    ("masking", "masking (§5.3)"), ("close", "close handshake (7.x)"),
    ("limits", "limits (9.x)"), ("server_frames", "server frames"),
    ("handshake", "opening handshake"), ("parser_state", "parser state"),
)  # fmt: skip
CHUNKINGS = ("whole", "bytewise", "chunks7")


def conformance(tests: str = "tests/test_rfc6455.py") -> dict[str, Any]:
    """Cases of the RFC 6455 parser tests per category, from ``pytest --collect-only``:
    distinct cases, and pytest items (a case run once per chunking counts once)."""
    p = subprocess.run([sys.executable, "-m", "pytest", tests, "--collect-only", "-q", "-p", "no:cacheprovider"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    items, cases = Counter[str](), {name: set[str]() for name, _ in CATEGORIES}
    for line in p.stdout.splitlines():
        if "::test_" not in line:
            continue
        test = line.split("::", 1)[1].removeprefix("test_")
        name = next((n for n, _ in CATEGORIES if test.startswith(n + "_")), "other")
        func, _, param = test.partition("[")
        for c in CHUNKINGS:
            param = param.removeprefix(c + "-").removeprefix(c + "]")
        items[name] += 1
        cases.setdefault(name, set()).add(f"{func}[{param}")
    rows = [{"category": title, "cases": len(cases.get(n, ())), "items": items[n]}
            for n, title in (*CATEGORIES, ("other", "other")) if items[n]]  # fmt: skip
    return {"source": tests, "rows": rows, "cases": sum(r["cases"] for r in rows),
            "items": sum(r["items"] for r in rows)}  # fmt: skip


# -- reports --------------------------------------------------------------------------------------


def _cell(v: Any, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def verdict(r: dict[str, Any]) -> str:
    return {True: "pass", False: "FAIL", None: "—"}[r.get("passed")]


def markdown(res: dict[str, Any]) -> str:
    s = res["server"]
    lines = [f"# Attacks: {res['label']}", "",
             f"Server: `{s['livegift_file']}` (commit {s.get('commit') or '?'}), "
             f"PYTHONPATH `{s['pythonpath'] or '-'}`; {res['started']}; {res['wall_s']} s; "
             f"load before: {' '.join(res['load_before']['loadavg'])}.", "",
             "| # | attack | result | outcome | server CPU s | peak RSS growth MB | /healthz ms (max) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in res["attacks"]:
        outcome = r.get("outcome", "").replace("|", "\\|")
        lines.append(f"| {r['item']} | {r['name']}: {r['title']} | {verdict(r)} | {outcome} | "
                     f"{_cell(r.get('server_cpu_s'))} | {_cell(r.get('peak_rss_growth_mb'), 1)} | "
                     f"{_cell(r.get('healthz_ms_max'), 0)} |")  # fmt: skip
    c = res["conformance"]
    lines += ["", f"RFC 6455 conformance cases ({c['source']}):", "",
              "| category | cases | pytest items |", "| --- | --- | --- |"]  # fmt: skip
    lines += [f"| {r['category']} | {r['cases']} | {r['items']} |" for r in c["rows"]]
    lines.append(f"| total | {c['cases']} | {c['items']} |")
    return "\n".join(lines) + "\n"


def _pair(before: dict[str, Any], after: dict[str, Any], key: str, digits: int = 2) -> str:
    return f"{_cell(before.get(key), digits)} → {_cell(after.get(key), digits)}"


def compare(before: Path, after: Path) -> str:
    """Two runs side by side, one row per attack."""
    b, a = (json.loads(p.read_text()) for p in (before, after))
    rows = {r["name"]: r for r in b["attacks"]}
    a["attacks"].sort(key=lambda r: [x.name for x in ATTACKS].index(r["name"]))
    lines = ["| # | attack | before | after | CPU s before → after | peak RSS MB before → after "
             "| /healthz ms before → after |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in a["attacks"]:
        o = rows.get(r["name"], {})
        o, r = ({**x, "outcome": str(x.get("outcome", "—")).replace("|", "\\|")} for x in (o, r))
        lines.append(f"| {r['item']} | {r['title']} | {o.get('outcome', '—')} ({verdict(o)}) | "
                     f"{r.get('outcome')} ({verdict(r)}) | {_pair(o, r, 'server_cpu_s')} | "
                     f"{_pair(o, r, 'peak_rss_growth_mb', 1)} | {_pair(o, r, 'healthz_ms_max', 0)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- attacks:begin -->", "<!-- attacks:end -->"


def into(doc: Path, table: str, runs: list[Path]) -> None:
    """Put ``table`` between the BEGIN and END markers of ``doc`` (docs/security.md)."""
    text = doc.read_text()
    head, _, rest = text.partition(BEGIN)
    _, found, tail = rest.partition(END)
    if not found:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} block")
    meta = [json.loads(p.read_text()) for p in runs]
    note = "\n".join(f"{m['label']}: `{p.name}`, livegift from `{m['server']['livegift_file']}` "
                     f"(commit {(m['server'].get('commit') or '?')[:9]}), {m['started']}, load "
                     f"{' '.join(m['load_before']['loadavg'])}, {m['wall_s']} s  "
                     for m, p in zip(meta, runs, strict=True))  # fmt: skip
    doc.write_text(f"{head}{BEGIN}\n{note}\n\n{table}{END}{tail}")


def write(res: dict[str, Any], out: Path, label: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{time.strftime('%Y%m%d-%H%M%S')}-attacks-{label}"
    res["json"], res["markdown"] = f"{stem}.json", f"{stem}.md"
    Path(res["json"]).write_text(json.dumps(res, indent=1, default=str))
    Path(res["markdown"]).write_text(markdown(res))
    return res


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest attacks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the spawned server (repeatable)")  # fmt: skip
    ap.add_argument("--label", default="current")
    ap.add_argument(
        "--only",
        default=None,
        help=f"comma-separated names or finding numbers: {', '.join(BY_NAME)}",
    )
    ap.add_argument("--out", type=Path, default=Path("loadtest/results"))
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each attack, wait up to this long for the machine to be idle")  # fmt: skip
    ap.add_argument("--no-progress", action="store_true", help="no line per attack on stderr")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--into", type=Path, help="with --compare: replace the table in this file")
    a = ap.parse_args(argv)
    if a.compare:
        table = compare(*a.compare)
        if a.into:
            into(a.into, table, a.compare)
        print(table)
        return 0
    extra = dict(kv.partition("=")[::2] for kv in a.server_env)
    res = run(extra, a.only, a.label, a.out, not a.no_progress, a.wait_idle)
    print(markdown(res))
    print(f"written: {res['json']} and {res['markdown']}")
    return 1 if any(r.get("error") for r in res["attacks"]) else 0
