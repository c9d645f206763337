"""Live progress over Server-Sent Events: a client sees every step of a run in order as it is projected,
resumes from the last event id it saw, and a tenant-wide feed shows status changes of its own runs only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Infra
from tests.factories import run_events
from tests.harness import append_ledger, auth, running, wait_until


@dataclass
class Message:
    id: str | None
    event: str | None
    data: Any


async def messages(response: httpx.Response) -> AsyncIterator[Message]:
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                yield Message(fields.get("id"), fields.get("event"), orjson.loads(fields["data"]))
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def collect(client: httpx.AsyncClient, url: str, until: int, **kwargs: Any) -> list[Message]:
    got: list[Message] = []
    async with asyncio.timeout(30), client.stream("GET", url, **kwargs) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for m in messages(response):
            got.append(m)
            if len(got) >= until:
                break
    return got


async def test_a_stream_shows_every_step_of_a_live_run_in_order(
    infra: Infra, tmp_path_factory: pytest.TempPathFactory
) -> None:
    events = run_events("run-live", steps=3, start=datetime.now(UTC))
    keys = {"key": "t1", "other": "t2"}
    async with running(infra, tmp_path_factory, keys=keys, services=("projector", "api")) as env:
        await append_ledger(env.sandbox, events[:2])  # the run exists, nothing has run yet
        async with env.client(timeout=30) as api:

            async def visible() -> bool:
                return (await api.get("/v1/runs/run-live")).status_code == 200

            await wait_until(visible, what="run-live visible")
            feed = asyncio.create_task(collect(api, "/v1/stream", until=2))
            watcher = asyncio.create_task(collect(api, "/v1/runs/run-live/stream", until=len(events)))
            await asyncio.sleep(0.3)
            # The rest happens now, a few events at a time while the clients watch (timestamps as it happens).
            events = events[:2] + run_events("run-live", steps=3, start=datetime.now(UTC))[2:]
            for i in range(2, len(events), 3):
                await asyncio.sleep(0.2)
                await append_ledger(env.sandbox, events[i : i + 3])
            seen = await watcher
            assert [m.data["seq"] for m in seen] == list(range(len(events)))
            assert [m.event for m in seen] == [e.type for e in events]
            assert [m.id for m in seen] == [str(e.seq) for e in events]
            assert seen[-1].event == "RunSucceeded"

            # Resuming after seq 4 replays from seq 5, and the stream ends with the final status.
            resumed = await collect(api, "/v1/runs/run-live/stream", until=100, headers={"Last-Event-ID": "4"})
            assert [m.data["seq"] for m in resumed] == list(range(5, len(events)))

            # The tenant feed saw the run move to RUNNING and then SUCCEEDED (it started after QUEUED).
            statuses = [m.data["status"] for m in await feed]
            assert statuses == ["RUNNING", "SUCCEEDED"]
            assert all(m.event == "run" for m in await feed)

            # Another tenant can neither stream the run nor see it in its feed.
            r = await api.get("/v1/runs/run-live/stream", headers=auth(env.keys["other"]))
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            bad = await api.get("/v1/runs/run-live/stream", headers={"Last-Event-ID": "x"})
            assert bad.status_code == 400
