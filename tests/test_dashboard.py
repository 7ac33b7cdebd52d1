"""The dashboard at ``/``, driven in real headless Chromium (Debian's /usr/bin/chromium) by Playwright.

Playwright only drives the system browser here: nothing is downloaded (no ``playwright install``),
and everything talks to 127.0.0.1, so this runs in the loopback-only test namespace.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, Page, async_playwright, expect

from p2pdiff.config import Config
from tests.conftest import ClientFactory, post_task
from tests.fake_signaling import fake_p2p_helper

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
TOKEN = "dashboard-test-token-0123456789"
# Generous for a loaded 2-core CI machine; a pass normally takes well under a second per step.
STEP_MS = 10_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def new_page(browser: Browser) -> tuple[Page, list[str]]:
    """A page, and the script errors and console errors it will have (tests expect none)."""
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(STEP_MS)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
    return page, problems


async def open_dashboard(
    browser: Browser, client: TestClient, mode: str = "api-only"
) -> tuple[Page, list[str]]:
    page, problems = await new_page(browser)
    await page.goto(str(client.make_url("/")))
    await expect(page.locator("#conn")).to_have_text("live")
    await expect(page.locator("#mode")).to_have_text(mode)
    return page, problems


async def join_from_the_page(page: Page, room_id: str) -> Any:
    """Join ``room_id`` with the page's own form; returns the room's card once it shows joined."""
    await page.fill("#join-room-input", room_id)
    await page.click("#join-room-btn")
    card = page.locator(f'section.room[data-room="{room_id}"]')
    await expect(card.locator(".badge.joined")).to_be_visible()
    return card


def row(page: Page, task_id: str) -> Any:
    return page.locator(f'tr[data-task-id="{task_id}"]')


async def patch(client: TestClient, room: str, task_id: str, body: dict[str, Any]) -> None:
    resp = await client.patch(f"/api/queue/{room}/{task_id}", json=body)
    assert resp.status == 200, await resp.text()


async def test_static_routes(client: TestClient) -> None:
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert "/static/app.js" in await resp.text()
    assert resp.headers["Cache-Control"] == "no-cache"
    resp = await client.get("/static/app.js")
    assert resp.status == 200 and "javascript" in resp.content_type
    assert (await client.get("/static/style.css")).content_type == "text/css"
    for bad in ("/static/nope.js", "/static/..%2F__init__.py", "/static/../app.py"):
        resp = await client.get(bad)
        assert resp.status == 404, bad
        assert (await resp.json())["error"]["code"] == "not_found"


async def test_dashboard_is_live(browser: Browser, client: TestClient) -> None:
    await post_task(client, "gallery", {"id": "old-1", "prompt": "a watercolor harbour at dawn"})
    page, problems = await open_dashboard(browser, client)
    gallery = page.locator('section.room[data-room="gallery"]')
    await expect(gallery.locator("h2")).to_have_text("gallery")
    await expect(row(page, "old-1").locator(".status")).to_have_text("pending")

    # A task posted over REST appears without a reload.
    await post_task(client, "gallery", {"id": "live-1", "prompt": "a lighthouse in a storm, oil painting"})
    await expect(row(page, "live-1").locator(".status")).to_have_text("pending")
    await expect(row(page, "live-1").locator(".pos")).to_have_text("2")

    # Progress moves its bar.
    await patch(client, "gallery", "live-1", {"action": "claim", "worker": "gpu-peer-7"})
    await expect(row(page, "live-1").locator(".status")).to_have_text("processing")
    await patch(client, "gallery", "live-1", {"action": "progress", "worker": "gpu-peer-7", "progress": 0.4})
    bar = row(page, "live-1").locator('[role="progressbar"]')
    await expect(bar).to_have_attribute("aria-valuenow", "40")
    await expect(row(page, "live-1").locator(".pct")).to_have_text("40%")
    width = await bar.locator(".fill").evaluate("el => el.getBoundingClientRect().width")
    total = await bar.evaluate("el => el.getBoundingClientRect().width")
    assert 0.3 < width / total < 0.5

    # Cancel from the page.
    await row(page, "old-1").locator(".cancel-btn").click()
    await expect(row(page, "old-1").locator(".status")).to_have_text("cancelled")
    task = await (await client.get("/api/queue/gallery/old-1")).json()
    assert task["task"]["status"] == "cancelled"
    await expect(row(page, "old-1").locator(".cancel-btn")).to_have_count(0)

    # Join a room from the page, then leave it from its card.
    studio = await join_from_the_page(page, "studio")
    await expect(studio.locator(".badge.joined")).to_have_text("helper in room")
    health = await (await client.get("/api/health")).json()
    assert [r["roomId"] for r in health["p2p"]["rooms"]] == ["studio"]
    await studio.locator(".leave-btn").click()
    await expect(studio.locator(".badge.not-joined")).to_be_visible()
    health = await (await client.get("/api/health")).json()
    assert health["p2p"]["rooms"] == []

    # Add a task from the page's form.
    await gallery.locator('input[name="prompt"]').fill("koi pond, ukiyo-e")
    await gallery.locator(".add-btn").click()
    await expect(gallery.locator("td.prompt", has_text="koi pond, ukiyo-e")).to_have_count(1)

    # More states for the screenshot, and the totals follow.
    await post_task(client, "gallery", {"id": "done-1", "prompt": "isometric city at night, neon"})
    await patch(client, "gallery", "done-1", {"action": "claim", "worker": "gpu-peer-2"})
    await patch(client, "gallery", "done-1", {"action": "complete", "worker": "gpu-peer-2"})
    await post_task(client, "gallery", {"id": "fail-1", "prompt": "portrait of a robot, 85mm"})
    await patch(client, "gallery", "fail-1", {"action": "claim", "worker": "gpu-peer-3"})
    await patch(
        client, "gallery", "fail-1", {"action": "fail", "worker": "gpu-peer-3", "error": "out of memory"}
    )
    await post_task(client, "lobby", {"prompt": "a red fox in snow"})
    await expect(row(page, "done-1").locator(".status")).to_have_text("complete")
    await expect(row(page, "fail-1").locator(".status")).to_have_text("failed")
    await expect(page.locator('[data-total="complete"]')).to_have_text("1")
    await expect(page.locator('[data-total="failed"]')).to_have_text("1")
    await expect(page.locator('[data-total="cancelled"]')).to_have_text("1")
    await expect(page.locator('section.room[data-room="lobby"]')).to_be_visible()

    await page.evaluate("document.getElementById('toasts').replaceChildren()")  # a clean picture
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert problems == []


@pytest.mark.parametrize("backlog", [1000, 2])
async def test_dashboard_reconnects_and_catches_up(
    browser: Browser, make_client: ClientFactory, config: Config, backlog: int
) -> None:
    """Changes made while the page's stream was down reach it after it reconnects: replayed from the
    backlog, or (backlog too short) through a ``reset`` that makes the page refetch."""
    config.server.sse_backlog = backlog
    client = await make_client(config)
    page, problems = await open_dashboard(browser, client)
    await page.evaluate("source.close()")  # as a proxy or a network blip would
    for i in range(4):
        await post_task(client, "r1", {"id": f"away-{i}", "prompt": "missed while offline"})
    await page.evaluate("connect()")  # the page's own reconnect path, resuming from its last id
    for i in range(4):
        await expect(row(page, f"away-{i}").locator(".status")).to_have_text("pending")
    await expect(row(page, "away-3").locator(".pos")).to_have_text("4")
    assert problems == []


@pytest.mark.parametrize("first_try", ["none", "wrong"])
async def test_dashboard_asks_for_the_admin_token(
    browser: Browser, make_client: ClientFactory, config: Config, first_try: str
) -> None:
    config.server.admin_token = TOKEN
    client = await make_client(config)
    await post_task(client, "locked", {"id": "t1", "prompt": "needs a token to cancel"})
    page, problems = await open_dashboard(browser, client)
    if first_try == "wrong":
        await page.evaluate("sessionStorage.setItem('p2pdiff.adminToken', 'not-the-token-000000')")
    await row(page, "t1").locator(".cancel-btn").click()
    dialog = page.locator("#token-dialog")
    await expect(dialog).to_be_visible()
    reason = "refused" if first_try == "wrong" else "needs an admin token"
    await expect(page.locator("#token-reason")).to_contain_text(reason)
    await page.fill("#token-input", TOKEN)
    await page.click("#token-ok")
    await expect(row(page, "t1").locator(".status")).to_have_text("cancelled")
    assert await page.evaluate("sessionStorage.getItem('p2pdiff.adminToken')") == TOKEN
    # The stored token is sent from now on: joining does not ask again.
    await join_from_the_page(page, "vault")
    await expect(dialog).to_be_hidden()
    # Cancelling the dialog leaves things as they were and says why.
    await page.click("#token-btn")  # forget the token
    await page.locator('section.room[data-room="vault"] .leave-btn').click()
    await expect(dialog).to_be_visible()
    await page.locator('#token-dialog button[value="cancel"]').click()
    await expect(page.locator(".toast-error")).to_contain_text("no admin token")
    await expect(page.locator('section.room[data-room="vault"] .badge.joined')).to_be_visible()
    await asyncio.sleep(0)  # let console messages arrive
    # 401/403 answers are logged by Chromium as failed loads; anything else is a bug.
    assert [p for p in problems if "401" not in p and "403" not in p] == []


async def test_dashboard_shows_peers_rtt_and_relays(
    browser: Browser, make_client: ClientFactory, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The P2P helper over a stand-in signaling room: what it publishes shows up live."""
    helper, rooms = fake_p2p_helper(monkeypatch)
    client = await make_client(config, helper=helper)
    page, problems = await open_dashboard(browser, client, mode="p2p")
    card = await join_from_the_page(page, "mesh")
    await expect(card.locator(".relay")).to_have_text("127.0.0.1:1883: connecting")

    room = rooms["mesh"]
    room.add_peer("peer-7f3a9c2e41d84b0f9a1c")
    peer = card.locator(".peer")
    await expect(peer).to_have_count(1)
    await expect(peer.locator(".rtt")).to_have_text("rtt \u2013")
    room.add_peer("peer-b81e55d0c3aa4f7e8d02", rtt=48.04)
    room.set_rtt("peer-7f3a9c2e41d84b0f9a1c", 23.46)
    room.relay_states["mqtt://127.0.0.1:1883"] = "connected"
    helper.watch_once(helper.room("mesh"))
    await expect(peer.first.locator(".rtt")).to_have_text("23.5 ms")
    # What a browser of the app announces (`capabilities` action) shows up on its row, live.
    room.deliver(
        "capabilities",
        {"hasGPU": True, "gpuName": "Apple M2", "memory": 8, "cores": 8},
        "peer-b81e55d0c3aa4f7e8d02",
    )
    caps = card.locator('.peer:has(code[title="peer-b81e55d0c3aa4f7e8d02"]) .cap')
    await expect(caps).to_have_text(["hasGPU", "gpuName: Apple M2", "memory: 8", "cores: 8"])
    await expect(card.locator(".relay")).to_have_text("127.0.0.1:1883: connected")
    await expect(page.locator('[data-total="peers"]')).to_have_text("2")

    await post_task(client, "mesh", {"id": "mesh-1", "prompt": "a paper boat on a canal"})
    await post_task(client, "mesh", {"id": "mesh-2", "prompt": "aurora over a fjord"})
    await patch(client, "mesh", "mesh-1", {"action": "claim", "worker": "peer-7f3a9c2e41d84b0f9a1c"})
    await patch(
        client,
        "mesh",
        "mesh-1",
        {"action": "progress", "worker": "peer-7f3a9c2e41d84b0f9a1c", "progress": 0.7},
    )
    await expect(row(page, "mesh-1").locator('[role="progressbar"]')).to_have_attribute("aria-valuenow", "70")
    await page.evaluate("document.getElementById('toasts').replaceChildren()")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-p2p.png"), full_page=True)

    room.drop_peer("peer-b81e55d0c3aa4f7e8d02")
    await expect(peer).to_have_count(1)
    await expect(page.locator('[data-total="peers"]')).to_have_text("1")
    assert problems == []


async def test_a_stale_health_answer_does_not_undo_newer_peer_events(
    browser: Browser, make_client: ClientFactory, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A /api/health snapshot taken before a peer joined, answered after the page applied the
    peer's event, must not wipe the peer (it would stay hidden until the next health poll)."""
    helper, rooms = fake_p2p_helper(monkeypatch)
    client = await make_client(config, helper=helper)
    page, problems = await open_dashboard(browser, client, mode="p2p")
    card = await join_from_the_page(page, "race")

    snapshot_taken, release, answered = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def hold(route: Any) -> None:
        response = await route.fetch()  # the snapshot, before the peer joins
        snapshot_taken.set()
        await release.wait()
        await route.fulfill(response=response)
        answered.set()

    await page.route("**/api/health", hold)
    await page.evaluate("() => { refreshHealth(); }")
    await asyncio.wait_for(snapshot_taken.wait(), 5)
    rooms["race"].add_peer("peer-0c1d2e3f4a5b6c7d8e9f")
    peer = card.locator(".peer")
    await expect(peer).to_have_count(1)
    release.set()
    await asyncio.wait_for(answered.wait(), 5)
    await asyncio.sleep(0.3)  # the page has applied the stale answer by now
    await expect(peer).to_have_count(1)
    await page.unroute("**/api/health")
    assert problems == []


# A stand-in for the app's web/p2p/index.html: like the app, an inline module script (which the
# dashboard's Content-Security-Policy would block) that probes /api/health relative to its page and
# then posts a task to the same origin.
APP_PAGE = """<!doctype html>
<meta charset="utf-8"><title>P2P WebGPU Diffusion</title><link rel="icon" href="data:,">
<p id="result">probing</p>
<script type="module">
  const health = await (await fetch("/api/health")).json();
  const resp = await fetch("/api/queue", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({id: "app-task-1", prompt: "a lighthouse", roomId: "lobby"}),
  });
  const added = await resp.json();
  document.getElementById("result").textContent =
    `${health.status} ${resp.status} ${added.roomId}/${added.taskId} from ${location.pathname}`;
</script>
"""


async def test_the_app_served_from_p2p_uses_the_api_on_its_own_origin(
    browser: Browser, make_client: ClientFactory, config: Config, tmp_path: Path
) -> None:
    (tmp_path / "p2p").mkdir()
    (tmp_path / "p2p" / "index.html").write_text(APP_PAGE)
    config.server.static_dir = str(tmp_path / "p2p")
    client = await make_client(config)
    page, problems = await new_page(browser)
    await page.goto(str(client.make_url("/p2p")))  # redirected to /p2p/
    await expect(page.locator("#result")).to_have_text("ok 201 lobby/app-task-1 from /p2p/")
    task = await (await client.get("/api/queue/lobby/app-task-1")).json()
    assert task["task"]["prompt"] == "a lighthouse"
    assert problems == []
