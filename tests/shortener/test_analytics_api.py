"""Click analytics through the HTTP API, and the shortener's background work on the queue."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tenfold.kernel.clock import ManualClock
from tests.conftest import make_settings, serve_app

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1"
)
BOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


@pytest.fixture
async def served(stack: dict[str, Any], clock: ManualClock, admin_key_of: Any) -> Any:
    settings = make_settings(**stack, services=["shortener"], shortener_analytics_process=True)
    async with serve_app(settings, clock) as (app, client):
        yield app, client, {"Authorization": f"Bearer {admin_key_of(settings)}"}


@pytest.mark.parametrize("in_server", [False, True])
async def test_clicks_reach_the_analytics_report(
    stack: dict[str, Any], clock: ManualClock, admin_key_of: Any, in_server: bool
) -> None:
    """Through the analytics process (the default), and with the work in the server."""
    settings = make_settings(
        **stack, services=["shortener"], shortener_analytics_process=not in_server
    )
    async with serve_app(settings, clock) as (app, client):
        headers = {"Authorization": f"Bearer {admin_key_of(settings)}"}
        await _clicks_reach_the_report(app, client, headers)


async def _clicks_reach_the_report(app: Any, client: Any, headers: dict[str, str]) -> None:
    service = app.state.runtime.services["shortener"]
    r = await client.post("/api/v1/urls", json={"url": "https://example.com"}, headers=headers)
    code = r.json()["short_code"]
    for ua, ref in (
        (CHROME, "https://news.example/item?id=1"),
        (CHROME, "https://news.example/other"),  # the same visitor again: one unique
        (IPHONE, ""),
        (BOT, ""),
    ):
        assert (
            await client.get(f"/r/{code}", headers={"user-agent": ua, "referer": ref})
        ).status_code == 302
    await service.flush()
    report = (await client.get(f"/api/v1/analytics/{code}", headers=headers)).json()
    assert report["total_clicks"] == 3 and report["unique_clicks"] == 2
    assert report["bot_clicks"] == 1
    assert report["referrer_stats"]["news.example"] == 2
    assert report["device_breakdown"]["browsers"]["Chrome"] == 2
    assert sum(p["clicks"] for p in report["click_timeline"]) == 3
    hourly = await client.get(
        f"/api/v1/analytics/{code}", params={"granularity": "hour"}, headers=headers
    )
    assert hourly.status_code == 200 and hourly.json()["click_timeline"][0]["period"].endswith("Z")
    bad = await client.get(
        f"/api/v1/analytics/{code}",
        params={"start_date": "2024-02-02", "end_date": "2024-02-01"},
        headers=headers,
    )
    assert bad.status_code == 422
    # Links count their clicks too, bots included (they were redirected).
    got = (await client.get(f"/api/v1/urls/{code}", headers=headers)).json()
    assert got["click_count"] == 4


async def test_the_server_sends_each_distinct_click_once_with_its_count(
    served: Any, clock: ManualClock
) -> None:
    app, client, headers = served
    service = app.state.runtime.services["shortener"]
    r = await client.post("/api/v1/urls", json={"url": "https://example.com"}, headers=headers)
    code = r.json()["short_code"]
    for ua, times in ((CHROME, 30), (IPHONE, 4), (BOT, 2)):
        for _ in range(times):
            assert (await client.get(f"/r/{code}", headers={"user-agent": ua})).status_code == 302
    clock.advance(1.0)  # a second later: the same visitor's click is another entry
    assert (await client.get(f"/r/{code}", headers={"user-agent": CHROME})).status_code == 302
    recorder = service.recorder
    assert recorder.buffered == 37 and len(recorder._pending) == 4
    await service.flush()
    assert recorder.buffered == 0
    report = (await client.get(f"/api/v1/analytics/{code}", headers=headers)).json()
    assert report["total_clicks"] == 35 and report["unique_clicks"] == 2
    assert report["bot_clicks"] == 2
    assert report["device_breakdown"]["browsers"]["Chrome"] == 31


async def test_redirects_survive_an_unreachable_analytics_store(
    stack: dict[str, Any], clock: ManualClock, admin_key_of: Any
) -> None:
    settings = make_settings(
        **stack,
        services=["shortener"],
        analytics_url="postgresql://nobody@127.0.0.1:1/nowhere",
        shortener_click_buffer=100,
        shortener_analytics_process=True,
    )
    async with serve_app(settings, clock) as (app, client):
        headers = {"Authorization": f"Bearer {admin_key_of(settings)}"}
        service = app.state.runtime.services["shortener"]
        code = (
            await client.post("/api/v1/urls", json={"url": "https://example.com"}, headers=headers)
        ).json()["short_code"]
        statuses = [(await client.get(f"/r/{code}")).status_code for _ in range(150)]
        assert statuses == [302] * 150
        recorder = service.recorder
        assert recorder.buffered == 100 and recorder.dropped == 50
        with pytest.raises(Exception):  # noqa: B017 - the store is down; nothing is lost
            await service.flush()
        assert recorder.buffered == 100
        # The link's own click count does not depend on analytics.
        got = (await client.get(f"/api/v1/urls/{code}", headers=headers)).json()
        assert got["click_count"] == 150


async def test_the_blocklist_recheck_runs_on_the_task_queue(
    stack: dict[str, Any], clock: ManualClock, admin_key_of: Any
) -> None:
    from tenfold.shortener.models import Blocklist
    from tenfold.tasks import service_tasks
    from tenfold.tasks.schedules import list_schedules

    settings = make_settings(**stack, services=["tasks", "shortener"], shortener_analytics=False)
    async with serve_app(settings, clock) as (app, client):
        runtime = app.state.runtime
        headers = {"Authorization": f"Bearer {admin_key_of(settings)}"}
        service = runtime.services["shortener"]
        names = {s.name for s in await list_schedules(runtime.engine)}
        assert {"shortener.recheck_blocklist", "shortener.purge"} <= names
        code = (
            await client.post(
                "/api/v1/urls", json={"url": "https://later-bad.example/"}, headers=headers
            )
        ).json()["short_code"]
        service.config.blocklist = Blocklist.of(["later-bad.example"])
        tasks = service_tasks(runtime)
        task_id = await tasks["shortener.recheck_blocklist"].submit()
        assert tasks.client is not None
        result = await asyncio.wait_for(tasks.client.result(task_id, wait=20), 25)
        assert result["blocked"] == 1
        assert (await client.get(f"/r/{code}")).status_code == 404


async def test_the_analytics_process_is_started_again_if_it_dies(served: Any) -> None:
    app, client, headers = served
    service = app.state.runtime.services["shortener"]
    recorder = service.recorder
    r = await client.post("/api/v1/urls", json={"url": "https://example.com"}, headers=headers)
    code = r.json()["short_code"]
    await client.get(f"/r/{code}", headers={"user-agent": CHROME})
    await service.flush()
    first = recorder._proc.pid
    recorder._proc.kill()
    await recorder._proc.wait()
    # Redirects do not notice; their clicks wait in the server's buffer.
    for _ in range(3):
        assert (await client.get(f"/r/{code}", headers={"user-agent": IPHONE})).status_code == 302
    assert recorder.buffered == 3
    await service.flush()  # a new analytics process takes them
    assert recorder._proc.pid != first
    report = (await client.get(f"/api/v1/analytics/{code}", headers=headers)).json()
    assert report["total_clicks"] == 4
