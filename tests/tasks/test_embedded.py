"""`tenfold serve` in embedded mode runs the application's tasks in-process."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.conftest import make_settings, serve_app


async def test_serve_runs_tasks_of_the_configured_app(
    tmp_path: Any, sqlite_template: Any, admin_key_of: Any
) -> None:
    settings = make_settings(
        data_dir=str(tmp_path),
        database_url=sqlite_template.clone(tmp_path / "db.sqlite"),
        services=["tasks"],  # no other service's built-in workers in the list below
        tasks_app="tests.tasks.apps.naps:registry",
        tasks_concurrency=2,
    )
    async with serve_app(settings) as (_, client):
        headers = {"Authorization": f"Bearer {admin_key_of(settings)}"}
        r = await client.post(
            "/api/v1/tasks",
            json={"task_type": "shout", "payload": {"word": "embedded"}},
            headers=headers,
        )
        assert r.status_code == 201, r.text
        task_id = r.json()["task_id"]
        deadline = time.monotonic() + 10
        while True:
            task = (await client.get(f"/api/v1/tasks/{task_id}", headers=headers)).json()
            if task["status"] == "succeeded":
                break
            assert time.monotonic() < deadline, task
            await asyncio.sleep(0.02)
        assert task["result"] == "EMBEDDED"
        workers = (await client.get("/api/v1/workers", headers=headers)).json()["workers"]
        assert [w["pool_id"] for w in workers] == ["embedded"]
