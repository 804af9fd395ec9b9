"""The dashboard in headless Chromium: submit a task, watch it, replay a dead letter.

Screenshots of each page go to a temporary folder, or to docs/screenshots/
for docs/dashboard.md when HIVEBUS_SAVE_SCREENSHOTS=1 is set.
The test needs Debian's Chromium at /usr/bin/chromium, which scripts/test
installs when it can. Playwright's Python package drives it, and no browser
of Playwright's own is downloaded.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from hivebus import BreakerConfig, Bus, RetryPolicy
from hivebus.web import create_app
from tests.conftest import REDIS_URL, eventually
from tests.test_web_api import running_team, serve, web_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
SCREENSHOTS = (
    DOCS_SCREENSHOTS
    if os.environ.get("HIVEBUS_SAVE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / f"hivebus-screenshots-{os.getpid()}"
)
WAIT_MS = 30_000  # maximum wait for a page to show a state, in milliseconds

pytestmark = [
    pytest.mark.redis_only,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=(
            "Chromium is not installed at /usr/bin/chromium; install Debian's "
            "package (apt-get install chromium) or run scripts/test as root"
        ),
    ),
    pytest.mark.timeout(120),
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    opened = await context.new_page()
    try:
        yield opened
    finally:
        await context.close()


@pytest.fixture
async def web_prefix(prefix: str, raw_redis: Any) -> AsyncIterator[str]:
    yield prefix
    keys = [k async for k in raw_redis.scan_iter(f"{prefix}:*", count=1000)]
    if keys:
        await raw_redis.delete(*keys)


async def shot(page: Page, name: str, selector: str | None = None) -> None:
    """Save a screenshot of the window, or of the top of one element, for the docs."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    if selector is None:
        image = await page.screenshot(path=path)
    else:
        await page.locator(selector).scroll_into_view_if_needed()
        box = await page.locator(selector).bounding_box()
        assert box is not None
        clip = {**box, "height": min(box["height"], 860.0)}
        image = await page.screenshot(path=path, clip=clip)
    assert len(image) > 1000


async def test_submit_task_reaches_done(page: Page, web_prefix: str) -> None:
    app = create_app(web_settings(REDIS_URL, web_prefix))
    async with running_team(REDIS_URL, web_prefix), serve(app) as base:
        await page.goto(f"{base}/tasks")
        await page.fill("#task-text", "Add CSV export to the monthly report page")
        await page.click("#submit-task button[type=submit]")
        await page.wait_for_url(f"{base}/tasks/*", timeout=WAIT_MS)
        bar = page.locator("#task-progress [data-role=bar]")
        await expect(bar).to_have_attribute("aria-valuenow", "100", timeout=WAIT_MS)
        await expect(page.locator("#task-status")).to_have_text("completed")
        task_url = page.url

        await page.reload()
        tree = page.locator("#event-tree")
        await expect(tree.locator("li.event").first).to_be_visible()
        root_type = await tree.locator("li.event a.type").first.inner_text()
        nested = await tree.locator("ol.timeline li.event").count()
        await shot(page, "task")
        await shot(page, "event-tree", "#event-tree")

        await tree.locator("li.event a.type").first.click()
        await expect(page.locator("h1")).to_contain_text("Event")
        await page.goto(f"{base}/tasks")
        row_bar = page.locator("#task-list [data-role=bar]").first
        await expect(row_bar).to_have_attribute("aria-valuenow", "100")
        await shot(page, "tasks")

        await page.goto(f"{base}/contexts/project.default")
        await expect(page.locator("#diff")).to_be_visible()
        await shot(page, "context-diff")
        await page.goto(f"{base}/prompts/developer")
        await shot(page, "prompts")
    assert task_url.rsplit("/", 1)[1]
    assert root_type == "team.task.submitted"
    assert nested >= 5


async def test_feed_shows_live_events(page: Page, web_prefix: str) -> None:
    app = create_app(web_settings(REDIS_URL, web_prefix))
    async with (
        running_team(REDIS_URL, web_prefix),
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        await page.goto(f"{base}/feed?channel=team.*")
        await expect(page.locator("#feed-state")).to_have_text("live", timeout=WAIT_MS)
        await client.post("/api/tasks", json={"text": "Add a dark mode toggle"})
        rows = page.locator("#feed tbody tr")
        await expect(rows.nth(9)).to_be_visible(timeout=WAIT_MS)
        channels = await page.locator(
            "#feed tbody tr td:nth-child(2)"
        ).all_inner_texts()
        await shot(page, "feed")
    assert all(channel.startswith("team.") for channel in channels)


async def test_dead_letter_replay_purge(
    page: Page, make_bus: Callable[..., Bus], url: str, prefix: str
) -> None:
    handled: list[str] = []
    healthy = asyncio.Event()
    worker = make_bus(service="billing")

    @worker.subscribe(
        "invoices", durable=True, raw=True, retry=RetryPolicy(max_attempts=1)
    )
    async def send_invoice(event: Any) -> None:
        if not healthy.is_set():
            raise ConnectionError("mail server refused the connection")
        handled.append(event.id)

    app = create_app(web_settings(url, prefix))
    async with worker, serve(app) as base:
        await _open_breaker(worker)
        sent = [
            (
                await worker.publish(
                    "invoices",
                    {"invoice": n},
                    type="invoice.due",
                    raw=True,
                    durable=True,
                )
            ).event_id
            for n in (1, 2)
        ]

        async def both_dead() -> bool:
            return bool(await worker.dlq.count() == 2)

        await eventually(both_dead, what="two dead letters")
        await page.goto(f"{base}/dlq")
        await expect(page.locator("#dlq-list tbody tr")).to_have_count(2)
        await page.locator("#dlq-list details").first.click()
        await shot(page, "dlq")

        healthy.set()
        await page.locator("#dlq-list button.replay").first.click()
        await expect(page.locator("#dlq-message")).to_contain_text("Replayed")
        await expect(page.locator("#dlq-list tbody tr")).to_have_count(1)
        await eventually(lambda: len(handled) == 1, what="replayed event handled")

        await page.click("#purge-open")
        await expect(page.locator("#purge-dialog")).to_be_visible()
        await page.click("#purge-confirm")
        await expect(page.locator("#dlq-list tbody tr.empty")).to_be_visible()
        left = await worker.dlq.count()

        await page.goto(f"{base}/breakers")
        await expect(page.locator("#breakers")).to_contain_text("open")
        await shot(page, "breakers")
        await page.goto(f"{base}/stats")
        await shot(page, "stats")
    assert handled[0] in sent
    assert left == 0


async def _open_breaker(bus: Bus) -> None:
    """Open a breaker, so the breakers page has a state to show."""
    breaker = bus.breaker("mail-server", BreakerConfig(failure_threshold=1))
    permit = await breaker.acquire()
    await breaker.record(permit, success=False)
