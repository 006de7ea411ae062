"""``livegift watch`` prints user text without letting it drive the terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from livegift.terminal import safe
from tests.conftest import ROOT, LiveServer, uid, unit
from tests.wsclient import Client


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Thanks Ana! é ß 漢字 😀 \u200f", "Thanks Ana! é ß 漢字 😀 \\u200f"),
        ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),  # clear the screen, cursor home
        ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),  # retitle the window (OSC ... BEL)
        ("\x1b]52;c;ZXZpbA==\x1b\\", "\\x1b]52;c;ZXZpbA==\\x1b\\"),  # write the clipboard
        ("\x9b31mred", "\\x9b31mred"),  # C1 CSI
        ("a\x7fb\x00c", "a\\x7fb\\x00c"),  # DEL, NUL
        ("line\r\nfake #9 line", "line\\r\\nfake #9 line"),  # a forged line
        ("\u202eevil\u2066", "\\u202eevil\\u2066"),  # bidi override, isolate
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),
        ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
        ("tab\there", "tab\\there"),
        ("", ""),
    ],
)
def test_safe_escapes_controls_and_keeps_printable_text(text: str, shown: str) -> None:
    assert safe(text) == shown
    assert safe(text).isprintable()


async def test_watch_escapes_what_the_server_sends(live_server: LiveServer) -> None:
    creator, viewer = uid("c"), uid("v")
    evil_name = "\x1b[2JEve\x1b]0;pwned\x07"
    ctoken = live_server.token(creator, name="Nova \x9b31m")
    room = live_server.create_stream(ctoken)
    token = live_server.token(viewer, name=evil_name)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    args = [sys.executable, "-m", "livegift", "watch", room, "--token", token]
    watcher = subprocess.Popen(
        [*args, "--url", live_server.base_url],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert watcher.stdout is not None
        joined = watcher.stdout.readline()  # the welcome: its viewer and creator names
        creator_ws = await Client.open(live_server.ws(room, ctoken))
        text = "\x1b[31mred\x1b[0m é 😀\u202egnp.exe\nfake #9 line"
        await creator_ws.send({"op": "shoutout", "req": "s1", "to": viewer, "text": text})
        assert (await creator_ws.ack("s1"))["ok"]
        live_server.delete(f"/api/streams/{room}", ctoken)
        rest, _ = watcher.communicate(timeout=unit(10))
        await creator_ws.close()
    finally:
        watcher.kill()
    out = (joined + rest).decode("utf-8")
    assert watcher.returncode == 0, out
    for raw in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert raw not in out
    assert "joined" in out and "\\x1b[2JEve\\x1b]0;pwned\\x07" in out and "Nova \\x9b31m" in out
    assert "\\x1b[31mred\\x1b[0m é 😀\\u202egnp.exe\\nfake #9 line" in out
    assert len(out.splitlines()) == 3  # joined, the shout-out, the end: no forged line
