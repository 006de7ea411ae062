"""Browser tests of the studio, overlay and watch pages (livegift/web/).

They drive Debian's chromium (apt-get install chromium) through Playwright against the real
server started by the `live_server` fixture in tests/conftest.py. Screenshots go to
tests/artifacts/screenshots/.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

playwright_api = pytest.importorskip("playwright.async_api")
from playwright.async_api import (  # noqa: E402
    Browser,
    BrowserContext,
    Page,
    ViewportSize,
    async_playwright,
    expect,
)

from livegift.api.app import PAGE_HEADERS  # noqa: E402
from tests.conftest import LiveServer  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.timeout(60)]

CHROMIUM = os.environ.get("LIVEGIFT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = pathlib.Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
DESKTOP: ViewportSize = {"width": 1280, "height": 820}
PHONE: ViewportSize = {"width": 375, "height": 812}


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium)")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


@dataclass
class Room:
    server: Any
    room: str
    creator: str
    creator_token: str
    viewer: str
    viewer_name: str
    viewer_token: str


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def live_server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The pages' server, in development mode: the viewer page recharges with sandbox
    receipts from POST /api/dev/receipt, which a production server does not serve."""
    server = LiveServer(
        redis_url, {"LIVEGIFT_DEV": "1"}, log=tmp_path_factory.mktemp("logs") / "pages.log"
    )
    server.start()
    yield server
    server.close()


@pytest.fixture
def room(live_server: Any) -> Room:
    """A live stream with a creator and an adult viewer holding 1,321 coins."""
    creator = uid("creator")
    viewer = uid("viewer")
    creator_token = live_server.token(creator, name="Nova Streams")
    viewer_token = live_server.token(viewer, name="Alice")
    room_id = live_server.create_stream(creator_token, title="Friday night live")
    live_server.recharge(viewer_token, viewer, package="p1321")
    return Room(live_server, room_id, creator, creator_token, viewer, "Alice", viewer_token)


class Pages:
    """Opens pages in fresh browser contexts and records JavaScript errors on them."""

    def __init__(self, browser: Browser, base_url: str) -> None:
        self.browser = browser
        self.base_url = base_url
        self.contexts: list[BrowserContext] = []
        self.errors: list[str] = []

    async def open(
        self,
        kind: str,
        room: str,
        token: str,
        query: str = "",
        viewport: ViewportSize | None = None,
        wait_live: bool = True,
    ) -> Page:
        context = await self.browser.new_context(
            viewport=viewport or DESKTOP, device_scale_factor=1
        )
        self.contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(f"{kind}: {exc}"))
        url = f"{self.base_url}/{kind}/{room}?token={token}{'&' + query if query else ''}"
        await page.goto(url)
        if wait_live:
            await expect(page.get_by_test_id("status")).to_have_attribute(
                "data-state", "live", timeout=5000
            )
        return page

    async def close(self) -> None:
        for context in self.contexts:
            await context.close()


@pytest.fixture
async def pages(browser: Browser, live_server: Any) -> AsyncIterator[Pages]:
    p = Pages(browser, live_server.base_url)
    try:
        yield p
    finally:
        await p.close()
    assert not p.errors, f"JavaScript errors on the pages: {p.errors}"


async def gift_rows(page: Page) -> Any:
    return page.locator('[data-testid="feed-item"][data-type="gift"]')


async def record_alerts(overlay: Page) -> None:
    """Record, in the overlay page, every alert shown and every value its counter takes."""
    await overlay.evaluate(
        """() => {
            window.__alerts = [];
            window.__alertTimes = [];
            window.__counts = [];
            const seen = new WeakSet();
            const scan = () => {
              document.querySelectorAll('[data-testid="alert"]').forEach(a => {
                if (!seen.has(a)) {
                  seen.add(a);
                  window.__alerts.push(a.dataset.gift);
                  window.__alertTimes.push(performance.now());
                }
              });
              document.querySelectorAll('[data-testid="alert-count"]').forEach(c => {
                const last = window.__counts[window.__counts.length - 1];
                if (c.textContent !== last) window.__counts.push(c.textContent);
              });
            };
            new MutationObserver(scan).observe(document.body,
              {subtree: true, childList: true, characterData: true});
          }"""
    )


async def no_horizontal_scroll(page: Page) -> None:
    width = await page.evaluate("() => document.documentElement.scrollWidth")
    viewport = page.viewport_size["width"] if page.viewport_size else 0
    assert width <= viewport, f"page is {width}px wide in a {viewport}px viewport"


async def send_gifts(
    server: Any, room: str, token: str, gifts: list[str], pause: float = 0.0
) -> list[dict[str, Any]]:
    """Send gifts over a plain WebSocket client (no browser) and return their acks."""
    import websockets
    from websockets.typing import Subprotocol

    url = server.base_url.replace("http", "ws", 1) + f"/ws/{room}?token={token}"
    acks = []
    async with websockets.connect(url, subprotocols=[Subprotocol("livegift.json")]) as ws:

        async def next_event(match: Any) -> dict[str, Any]:
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
                for event in frame if isinstance(frame, list) else [frame]:
                    if match(event):
                        return dict(event)

        await next_event(lambda e: e.get("type") == "welcome")
        for gift in gifts:
            req = uuid.uuid4().hex
            await ws.send(json.dumps({"op": "gift", "req": req, "gift": gift, "count": 1}))
            ack = await next_event(
                lambda e, req=req: e.get("type") == "ack" and e.get("req") == req
            )
            assert ack["ok"], ack
            acks.append(ack)
            await asyncio.sleep(pause)
    return acks


def shot(name: str) -> str:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return str(SCREENSHOTS / name)


# ---------------------------------------------------------------- 1. gift reaches studio and overlay


async def test_gift_from_watch_appears_on_studio_and_overlay_within_1s(
    pages: Pages, room: Room
) -> None:
    studio = await pages.open("studio", room.room, room.creator_token)
    overlay = await pages.open("overlay", room.room, room.creator_token)
    watch = await pages.open("watch", room.room, room.viewer_token)
    await expect(watch.get_by_test_id("balance")).to_have_text("1,321")

    start = time.monotonic()
    await watch.get_by_test_id("gift-btn-corgi").click()
    studio_row = studio.locator('[data-testid="feed-item"][data-type="gift"]').first
    alert = overlay.get_by_test_id("alert").first
    await asyncio.gather(
        expect(studio_row).to_contain_text("Alice", timeout=1000),
        expect(alert).to_contain_text("Alice", timeout=1000),
    )
    elapsed = time.monotonic() - start
    assert elapsed < 1.0, f"took {elapsed:.2f}s"

    await expect(studio_row).to_contain_text("Corgi")
    await expect(alert).to_contain_text("Corgi")
    await expect(alert).to_have_attribute("data-tier", "2")  # 299 coins: 100..999
    await expect(studio.get_by_test_id("total-coins")).to_have_text("299")
    await expect(studio.get_by_test_id("total-diamonds")).to_have_text("299")
    await expect(studio.get_by_test_id("total-gifts")).to_have_text("1")
    await expect(studio.get_by_test_id("top-gifters")).to_contain_text("Alice")
    await expect(watch.get_by_test_id("balance")).to_have_text("1,022")
    await expect(
        watch.locator('[data-testid="feed-item"][data-type="gift"]').first
    ).to_contain_text("Corgi")


# ---------------------------------------------------------------- 2. combo: one alert, one row, counting up


async def test_combo_is_one_alert_and_one_studio_row_counting_up(pages: Pages, room: Room) -> None:
    studio = await pages.open("studio", room.room, room.creator_token)
    overlay = await pages.open("overlay", room.room, room.creator_token)
    watch = await pages.open("watch", room.room, room.viewer_token)
    await record_alerts(overlay)

    rose = watch.get_by_test_id("gift-btn-rose")
    for _ in range(5):
        await rose.click()
        await asyncio.sleep(0.15)

    await expect(overlay.get_by_test_id("alert-count")).to_have_text("x5", timeout=3000)
    await expect(overlay.locator('[data-testid="alert"][data-state="showing"]')).to_have_count(1)
    await expect(watch.get_by_test_id("combo-box").get_by_test_id("combo")).to_have_text("x5")

    rows = await gift_rows(studio)
    await expect(rows).to_have_count(1)
    await expect(rows.first.get_by_test_id("combo")).to_have_text("x5")
    await expect(studio.get_by_test_id("total-coins")).to_have_text("5")
    await expect(studio.get_by_test_id("total-gifts")).to_have_text("5")
    await expect(await gift_rows(watch)).to_have_count(1)

    alerts = await overlay.evaluate("() => window.__alerts")
    counts = await overlay.evaluate("() => window.__counts")
    assert alerts == ["rose"], alerts
    numbers = [int(c.lstrip("x")) for c in counts]
    assert numbers == sorted(numbers) and numbers[-1] == 5 and len(set(numbers)) > 1, counts

    # A new streak of another gift is a new row and a new (queued) alert.
    await watch.get_by_test_id("gift-btn-finger_heart").click()
    await expect(rows).to_have_count(2)
    await expect(rows.first).to_contain_text("Finger Heart")
    await expect(rows.first.get_by_test_id("combo")).to_have_text("x1")


# ---------------------------------------------------------------- 3. shout-out reaches the watch page


async def test_shoutout_from_studio_appears_on_watch_page(pages: Pages, room: Room) -> None:
    server = room.server
    other = uid("teen")
    other_token = server.token(other, name="Sam", birthdate=None)  # not an adult
    studio = await pages.open("studio", room.room, room.creator_token)
    watch = await pages.open("watch", room.room, room.viewer_token)
    bystander = await pages.open("watch", room.room, other_token)

    await watch.get_by_test_id("gift-btn-rose").click()
    row = (await gift_rows(studio)).first
    await expect(row).to_contain_text("Alice")
    button = row.get_by_test_id("shoutout-btn")
    await expect(button).to_have_accessible_name("Shout out to Alice")
    await button.click()

    shout = watch.locator('[data-testid="feed-item"][data-type="shoutout"]').first
    await expect(shout).to_contain_text("Thank you Alice!", timeout=2000)
    await expect(shout).to_have_attribute("data-mine", "true")
    await expect(shout).to_have_class(re.compile(r"\bshoutout-me\b"))
    await expect(watch.get_by_test_id("message")).to_contain_text("shout-out")

    other_shout = bystander.locator('[data-testid="feed-item"][data-type="shoutout"]').first
    await expect(other_shout).to_contain_text("Thank you Alice!")
    await expect(other_shout).to_have_attribute("data-mine", "false")
    await expect(studio.locator('[data-testid="feed-item"][data-type="shoutout"]')).to_have_count(1)

    # The non-adult bystander gets a clear message when trying to gift.
    await bystander.get_by_test_id("gift-btn-rose").click()
    await expect(bystander.get_by_test_id("message")).to_have_text(
        "You must be 18 or older to send gifts."
    )


# ---------------------------------------------------------------- 4. overlay ?min= filter


async def test_overlay_min_filter_hides_small_gifts(pages: Pages, room: Room) -> None:
    overlay = await pages.open(
        "overlay",
        room.room,
        room.creator_token,
        "min=100&duration=1500&gap=400&tiers=50,200,5000",
    )
    studio = await pages.open("studio", room.room, room.creator_token)
    watch = await pages.open("watch", room.room, room.viewer_token)
    await record_alerts(overlay)

    await watch.get_by_test_id("gift-btn-rose").click()  # 1 coin: filtered
    await expect((await gift_rows(studio)).first).to_contain_text("Rose")
    await watch.get_by_test_id("gift-btn-hand_hearts").click()  # 100 coins: shown
    first = overlay.locator('[data-testid="alert"][data-state="showing"]')
    await expect(first).to_contain_text("Hand Hearts")
    await expect(first).to_have_attribute("data-tier", "2")  # ?tiers=50,200,5000
    await expect(await gift_rows(studio)).to_have_count(2)  # the studio shows both

    # A second alert waits in the queue while the first one shows.
    await watch.get_by_test_id("gift-btn-corgi").click()
    await overlay.wait_for_function("() => window.overlay.queueLength() === 1")
    await expect(first).to_contain_text("Hand Hearts")
    await expect(first).to_have_count(1)

    # ... and shows ?duration= + ?gap= later, with its own tier.
    await expect(first).to_contain_text("Corgi", timeout=4000)
    await expect(first).to_have_attribute("data-tier", "3")
    assert await overlay.evaluate("() => window.__alerts") == ["hand_hearts", "corgi"]
    times = await overlay.evaluate("() => window.__alertTimes")
    assert times[1] - times[0] >= 1500 + 400 - 50, times

    # The last alert goes away after ?duration=.
    await expect(overlay.get_by_test_id("alert")).to_have_count(0, timeout=4000)


# ---------------------------------------------------------------- 5. screenshots (desktop and phone)


async def test_screenshots_of_each_page(pages: Pages, room: Room) -> None:
    server = room.server
    fans = [("Bo", ["p6607"] * 5), ("Chen", ["p6607"]), ("Dana", ["p330"])]
    fan_tokens = []
    for name, packages in fans:
        user = uid(name.lower())
        token = server.token(user, name=name)
        for package in packages:
            server.recharge(token, user, package=package)
        fan_tokens.append(token)

    studio = await pages.open("studio", room.room, room.creator_token)
    overlay = await pages.open(
        "overlay",
        room.room,
        room.creator_token,
        "goal=50000&goal_title=Road%20to%20the%20Universe&duration=60000",
    )
    watch = await pages.open("watch", room.room, room.viewer_token)

    bo, chen, dana = fan_tokens
    await send_gifts(server, room.room, bo, ["lion"])  # tier 4
    await send_gifts(server, room.room, chen, ["galaxy"])  # tier 3
    await send_gifts(server, room.room, dana, ["corgi"])  # tier 2
    for _ in range(3):
        await watch.get_by_test_id("gift-btn-donut").click()  # a x3 streak from the page
        await asyncio.sleep(0.1)
    await send_gifts(server, room.room, dana, ["rose"] * 7, pause=0.05)  # a x7 streak
    await expect(await gift_rows(studio)).to_have_count(5)
    await expect(studio.get_by_test_id("total-coins")).to_have_text("31,395")
    await (await gift_rows(studio)).filter(has_text="Alice").get_by_test_id("shoutout-btn").click()
    # (the server may add automatic shout-outs for big gifts)
    await expect(
        watch.locator('[data-type="shoutout"]', has_text="Thank you Alice!")
    ).to_have_count(1)
    await expect(studio.get_by_test_id("top-gifters").get_by_test_id("gifter")).to_have_count(4)
    await expect(overlay.get_by_test_id("goal-bar")).to_have_attribute("data-value", "31395")
    await expect(watch.get_by_test_id("combo-box").get_by_test_id("combo")).to_have_text("x3")
    await asyncio.sleep(0.8)  # let entrance animations settle

    await studio.screenshot(path=shot("studio.png"))
    await overlay.screenshot(path=shot("overlay.png"), omit_background=True)
    await watch.screenshot(path=shot("watch.png"))
    # The overlay as OBS composites it over a game scene.
    await overlay.evaluate(
        """() => {
            const scene = document.createElement('div');
            scene.style.cssText = 'position:fixed;inset:0;z-index:-1;background:'
              + 'radial-gradient(circle at 70% 80%, #3a7bd5 0, transparent 45%),'
              + 'linear-gradient(135deg, #1d4350, #2b5876 40%, #4e4376)';
            document.body.prepend(scene);
        }"""
    )
    await overlay.screenshot(path=shot("overlay-preview.png"))

    # Phone width: readable, no sideways scrolling.
    studio_phone = await pages.open("studio", room.room, room.creator_token, viewport=PHONE)
    watch_phone = await pages.open("watch", room.room, room.viewer_token, viewport=PHONE)
    await expect(watch_phone.get_by_test_id("gift-btn-rose")).to_be_visible()
    await asyncio.sleep(0.5)
    await no_horizontal_scroll(studio_phone)
    await no_horizontal_scroll(watch_phone)
    await studio_phone.screenshot(path=shot("studio-phone.png"), full_page=False)
    await watch_phone.screenshot(path=shot("watch-phone.png"), full_page=True)
    for name in ("studio.png", "overlay.png", "watch.png", "studio-phone.png", "watch-phone.png"):
        assert (SCREENSHOTS / name).stat().st_size > 5000


# ---------------------------------------------------------------- extra: resume without loss


async def test_studio_reconnects_and_resumes_without_losing_or_duplicating(
    pages: Pages, room: Room
) -> None:
    studio = await pages.open("studio", room.room, room.creator_token)
    watch = await pages.open("watch", room.room, room.viewer_token)
    await watch.get_by_test_id("gift-btn-perfume").click()
    await expect(studio.get_by_test_id("total-gifts")).to_have_text("1")

    await studio.evaluate("() => window.studio.client.drop(3000)")
    await expect(studio.get_by_test_id("status")).to_have_attribute("data-state", "reconnecting")
    for gift in ("hand_hearts", "corgi", "finger_heart"):
        await watch.get_by_test_id(f"gift-btn-{gift}").click()
        await expect(watch.get_by_test_id("combo-box")).to_have_attribute("data-gift", gift)
    # All three were sent while the studio was away.
    await expect(studio.get_by_test_id("status")).to_have_attribute("data-state", "reconnecting")
    await expect(studio.get_by_test_id("status")).to_have_attribute(
        "data-state", "live", timeout=8000
    )

    rows = await gift_rows(studio)
    await expect(rows).to_have_count(4)
    seqs = await rows.evaluate_all("rows => rows.map(r => Number(r.dataset.seq))")
    assert len(set(seqs)) == 4 and seqs == sorted(seqs, reverse=True), seqs
    await expect(studio.get_by_test_id("total-gifts")).to_have_text("4")
    await expect(studio.get_by_test_id("total-coins")).to_have_text("424")  # 20 + 100 + 299 + 5
    stats = await studio.evaluate("() => window.studio.client.stats")
    assert stats["connects"] == 2, stats


# ---------------------------------------------------------------- extra: escaping, keyboard, errors, end


async def test_watch_recharge_button_and_taps_while_reconnecting(
    pages: Pages, live_server: Any
) -> None:
    viewer = uid("fan")
    creator = uid("creator")
    creator_token = live_server.token(creator, name="Nova")
    token = live_server.token(viewer, name="Fan")
    room_id = live_server.create_stream(creator_token)
    studio = await pages.open("studio", room_id, creator_token)
    watch = await pages.open("watch", room_id, token)
    await expect(watch.get_by_test_id("balance")).to_have_text("0")

    # No coins yet: a clear message, nothing charged.
    await watch.get_by_test_id("gift-btn-rose").click()
    await expect(watch.get_by_test_id("message")).to_contain_text("Not enough coins")

    # Recharge through the page (development receipts).
    await watch.get_by_label("Coin package").select_option("p330")
    await watch.get_by_test_id("recharge").click()
    await expect(watch.get_by_test_id("balance")).to_have_text("330")
    await expect(watch.get_by_test_id("message")).to_have_text("Added 330 coins to your balance.")
    assert live_server.get("/api/wallet", token).json()["coins"] == 330

    # Taps made while the socket is down are sent after the reconnect, each charged once.
    await watch.evaluate("() => window.watch.client.drop(1500)")
    await expect(watch.get_by_test_id("status")).to_have_attribute("data-state", "reconnecting")
    await watch.get_by_test_id("gift-btn-perfume").click()
    await watch.get_by_test_id("gift-btn-perfume").click()
    await expect(watch.get_by_test_id("status")).to_have_attribute(
        "data-state", "live", timeout=8000
    )
    await expect(watch.get_by_test_id("balance")).to_have_text("290")
    await expect(watch.get_by_test_id("combo-box").get_by_test_id("combo")).to_have_text("x2")
    rows = await gift_rows(studio)
    await expect(rows).to_have_count(1)
    await expect(rows.first.get_by_test_id("combo")).to_have_text("x2")
    assert live_server.get("/api/wallet", token).json()["coins"] == 290


async def test_watch_recharge_explains_a_server_not_in_development_mode(
    browser: Browser, server_factory: Any
) -> None:
    server: LiveServer = server_factory()  # production: the default
    viewer, creator = uid("fan"), uid("creator")
    token = server.token(viewer, name="Fan")
    room_id = server.create_stream(server.token(creator, name="Nova"))
    pages = Pages(browser, server.base_url)
    try:
        watch = await pages.open("watch", room_id, token)
        await watch.get_by_label("Coin package").select_option("p330")
        await watch.get_by_test_id("recharge").click()
        await expect(watch.get_by_test_id("message")).to_contain_text(
            "Recharging from this page only works on a development server."
        )
        await expect(watch.get_by_test_id("balance")).to_have_text("0")
    finally:
        await pages.close()
    assert server.get("/api/wallet", token).json()["coins"] == 0
    assert not pages.errors, pages.errors


async def test_user_text_is_escaped_and_pages_are_keyboard_operable(
    pages: Pages, room: Room
) -> None:
    server = room.server
    evil = uid("evil")
    evil_name = '<img src=x onerror="window.__pwned=1">Eve'
    evil_token = server.token(evil, name=evil_name)
    server.recharge(evil_token, evil, package="p65")
    studio = await pages.open("studio", room.room, room.creator_token)
    evil_page = await pages.open("watch", room.room, evil_token)

    # Keyboard only: Tab to the rose and press Enter.
    rose = evil_page.get_by_test_id("gift-btn-rose")
    await expect(rose).to_have_accessible_name(re.compile(r"^Send Rose, 1 coin"))
    for _ in range(40):
        await evil_page.keyboard.press("Tab")
        if await rose.evaluate("b => b === document.activeElement"):
            break
    else:
        pytest.fail("the rose button cannot be reached with Tab")
    await evil_page.keyboard.press("Enter")

    row = (await gift_rows(studio)).first
    await expect(row).to_contain_text(evil_name)
    assert await studio.evaluate("() => window.__pwned") is None
    assert await studio.locator('[data-testid="feed"] img').count() == 0

    # Not enough coins: a clear message.
    await evil_page.get_by_test_id("gift-btn-universe").click()
    await expect(evil_page.get_by_test_id("message")).to_contain_text("Not enough coins")

    # Every button and form control has an accessible name.
    for page in (studio, evil_page):
        unnamed = await page.evaluate(
            """() => [...document.querySelectorAll('button, input, select')].filter(e => {
                   const id = e.id && document.querySelector(`label[for="${e.id}"]`);
                   return !(e.getAttribute('aria-label') || id || e.textContent.trim());
               }).map(e => e.outerHTML)"""
        )
        assert unnamed == []


async def test_end_stream_button_ends_the_stream_everywhere(pages: Pages, room: Room) -> None:
    studio = await pages.open("studio", room.room, room.creator_token)
    watch = await pages.open("watch", room.room, room.viewer_token)
    end = studio.get_by_test_id("end-stream")
    await end.click()
    await expect(end).to_have_text("Confirm: end stream")
    await end.click()
    await expect(studio.get_by_test_id("status")).to_have_attribute(
        "data-state", "ended", timeout=3000
    )
    await expect(watch.get_by_test_id("status")).to_have_attribute(
        "data-state", "ended", timeout=3000
    )
    await expect(watch.get_by_test_id("gift-btn-rose")).to_be_disabled()
    body = room.server.get(f"/api/streams/{room.room}").json()
    assert body["live"] is False


async def test_pages_explain_a_bad_token_or_an_unknown_room(pages: Pages, room: Room) -> None:
    expired = room.server.token(uid("late"), ttl=-60)
    studio = await pages.open("studio", room.room, expired, wait_live=False)
    await expect(studio.get_by_test_id("status")).to_have_attribute(
        "data-state", "unauthorized", timeout=8000
    )
    await expect(studio.get_by_test_id("message")).to_contain_text("expired")

    watch = await pages.open("watch", "no-such-room", room.viewer_token, wait_live=False)
    await expect(watch.get_by_test_id("status")).to_have_attribute(
        "data-state", "not_found", timeout=8000
    )
    await expect(watch.get_by_test_id("message")).to_contain_text("doesn't exist or has ended")


async def test_pages_work_under_a_strict_content_security_policy(room: Room) -> None:
    """No inline scripts or styles: the pages run under default-src 'self', and their
    WebSockets under the shipped connect-src 'self' (no ws:/wss: to other hosts)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"chromium not found at {CHROMIUM}")
    csp = PAGE_HEADERS["content-security-policy"]
    assert "connect-src 'self';" in csp and "ws:" not in csp
    violations: list[str] = []

    async def add_csp(route: Any) -> None:
        response = await route.fetch()
        headers = {**response.headers, "content-security-policy": csp}
        await route.fulfill(response=response, headers=headers)

    # Chromium treats a document fulfilled by Playwright as public, and its local network
    # access checks would then block the page's WebSocket to 127.0.0.1.
    args = [*CHROMIUM_ARGS, "--disable-features=LocalNetworkAccessChecks"]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            context = await browser.new_context(viewport=DESKTOP)
            await context.route(re.compile(r"/(studio|overlay|watch)/"), add_csp)
            opened = []
            for kind, token in (
                ("studio", room.creator_token),
                ("overlay", room.creator_token),
                ("watch", room.viewer_token),
            ):
                page = await context.new_page()
                page.on(
                    "console",
                    lambda msg: (
                        violations.append(msg.text)
                        if "Content Security Policy" in msg.text
                        else None
                    ),
                )
                url = f"{room.server.base_url}/{kind}/{room.room}?token={token}&goal=100"
                await page.goto(url)
                await expect(page.get_by_test_id("status")).to_have_attribute("data-state", "live")
                opened.append(page)
            studio, overlay, watch = opened
            await watch.get_by_test_id("gift-btn-donut").click()
            await expect((await gift_rows(studio)).first).to_contain_text("Doughnut")
            await expect(overlay.get_by_test_id("alert")).to_contain_text("Doughnut")
            await expect(overlay.get_by_test_id("goal-bar")).to_have_attribute("data-value", "30")
            assert violations == [], violations
        finally:
            await browser.close()


# ---------------------------------------------------------------- tokens and the overlay key (PROTOCOL §8)


async def test_studio_gives_an_overlay_url_without_a_token_that_follows_the_creator(
    pages: Pages, room: Room
) -> None:
    server = room.server
    studio = await pages.open("studio", room.room, room.creator_token)
    await studio.get_by_test_id("overlay-key").click()
    url_box = studio.get_by_test_id("overlay-url")
    await expect(url_box).to_have_value(
        re.compile(rf"/overlay/u/{room.creator}\?key=[A-Za-z0-9_-]{{22,}}")
    )
    await studio.get_by_label("Minimum coins").fill("5")
    url = await url_box.input_value()
    assert "token" not in url and room.creator_token not in url and "min=5" in url, url

    context = await pages.browser.new_context(viewport=DESKTOP)
    pages.contexts.append(context)
    overlay = await context.new_page()
    overlay.on("pageerror", lambda exc: pages.errors.append(f"overlay/u: {exc}"))
    await overlay.goto(url + "&debug=1")
    status = overlay.get_by_test_id("status")
    await expect(status).to_have_attribute("data-state", "live")
    assert "key=" not in overlay.url and "min=5" in overlay.url, overlay.url

    await send_gifts(server, room.room, room.viewer_token, ["rose", "corgi"])  # rose < min
    alert = overlay.get_by_test_id("alert").first
    await expect(alert).to_contain_text("Alice")
    await expect(alert).to_contain_text("Corgi")
    assert await overlay.get_by_test_id("alert").filter(has_text="Rose").count() == 0

    # The stream ends, the next one starts: the same URL follows it.
    assert server.delete(f"/api/streams/{room.room}", room.creator_token).status_code == 200
    await expect(status).to_have_attribute("data-state", "offline")
    second = server.create_stream(room.creator_token, title="Saturday")
    await expect(status).to_have_attribute("data-state", "live")
    await send_gifts(server, second, room.viewer_token, ["hand_hearts"])
    await expect(overlay.get_by_test_id("alert").filter(has_text="Hand Hearts")).to_have_count(
        1, timeout=8000
    )


async def test_pages_take_the_token_out_of_the_address_bar(pages: Pages, room: Room) -> None:
    for kind, token in (
        ("studio", room.creator_token),
        ("overlay", room.creator_token),
        ("watch", room.viewer_token),
    ):
        page = await pages.open(kind, room.room, token, "tiers=10,20,30")
        assert "token" not in page.url and "tiers=" in page.url, page.url
        assert token not in await page.evaluate("() => location.href + history.state")
        # A reload in the same tab still works: the tab kept the token, not the URL.
        await page.reload()
        await expect(page.get_by_test_id("status")).to_have_attribute("data-state", "live")
        assert "token" not in page.url


async def test_a_page_whose_token_expired_says_the_session_ended(pages: Pages, room: Room) -> None:
    token = room.server.token(room.viewer, name="Alice", ttl=5)
    watch = await pages.open("watch", room.room, token)
    status = watch.get_by_test_id("status")
    await expect(status).to_have_attribute("data-state", "token_expired", timeout=9000)
    await expect(status).to_have_text("Session ended")
    await expect(watch.get_by_test_id("message")).to_have_text(
        "Your session ended \u2014 reload with a new link."
    )
    await asyncio.sleep(2)  # it does not reconnect
    assert (await watch.evaluate("() => window.watch.client.stats"))["connects"] == 1
    await expect(status).to_have_attribute("data-state", "token_expired")


async def test_a_page_takes_a_new_token_from_the_app_that_opened_it(
    pages: Pages, room: Room
) -> None:
    server = room.server
    short = server.token(room.viewer, name="Alice", ttl=8)
    exp = time.time() + 8  # the token's exp, or up to a second later
    app = await pages.open("watch", room.room, room.viewer_token)  # stands in for the app
    await app.evaluate(
        "() => { window.__got = []; addEventListener('message', e => window.__got.push(e.data)); }"
    )
    async with app.context.expect_page() as opened:
        await app.evaluate(
            "url => { window.__popup = window.open(url); }",
            f"{server.base_url}/watch/{room.room}?token={short}",
        )
    popup = await opened.value
    popup.on("pageerror", lambda exc: pages.errors.append(f"popup: {exc}"))
    status = popup.get_by_test_id("status")
    await expect(status).to_have_attribute("data-state", "live")
    # Its token expires within the minute, so it asks the app for a new one...
    await app.wait_for_function(
        "() => window.__got.some(m => m && m.type === 'livegift.token_expiring')"
    )
    # ... which refuses another user's token and takes the same user's.
    post = "t => window.__popup.postMessage({type: 'livegift.token', token: t}, '*')"
    await app.evaluate(post, server.token(uid("mallory"), ttl=3600))
    await app.wait_for_function(
        "() => window.__got.some(m => m && m.type === 'livegift.token_refreshed' && !m.ok"
        " && m.code === 'unauthorized')"
    )
    fresh = server.token(room.viewer, name="Alice", ttl=3600)
    await app.evaluate(post, fresh)
    await app.wait_for_function(
        "() => window.__got.some(m => m && m.type === 'livegift.token_refreshed' && m.ok)"
    )
    assert await popup.evaluate("() => window.LiveGift.context().token") == fresh

    await asyncio.sleep(max(0.0, exp + 2 - time.time()))  # past the old token's exp
    await expect(status).to_have_attribute("data-state", "live")
    await popup.get_by_test_id("gift-btn-rose").click()
    await expect(popup.get_by_test_id("balance")).to_have_text("1,320")
