"""The chaos run's load: four flow shapes triggered at a steady rate through ingest, each request retried with its
own `Idempotency-Key` until it is answered 202 (so a request cut by a fault still names its runs, invariant 9), and
a loopback upstream that fails the first attempts of every HTTP step and counts calls per idempotency key."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web

from schemas.flows import FlowDefinition
from tests.harness import Handler, Upstream, flow, stub_upstream

TENANT = "tenant-a"
# The HTTP step's retry policy: up to 5 attempts; the upstream answers 503 to attempts 1 and 2, 200 to the third.
HTTP_RETRY = {"delays_s": [0.5, 1, 1, 1]}
FAILING_ATTEMPTS = 2
LIMIT = 5
# flow id → share of the runs triggered
MIX = {"steps10": 0.4, "delayed": 0.2, "http": 0.3, "limited": 0.1}
PROBE_FLOW = "steps10"
# Answers after which a trigger request is sent again with its key (0: no answer), and for how long.
RETRIED = frozenset({0, 409, 429, 500, 502, 503, 504})
GIVE_UP_S = 300  # recovery is timed by the first run of this shape accepted after a fault


def flows(upstream: str) -> list[FlowDefinition]:
    def shape(i: int) -> dict[str, Any]:
        return {"name": f"s{i}", "action": "transform", "input": {"output": {"n": "{{ trigger.n }}", "i": i}}}

    return [
        flow(TENANT, "steps10", [shape(i) for i in range(10)]),
        flow(TENANT, "delayed", [shape(0), {"name": "wait", "action": "delay", "input": {"seconds": 2}}, shape(1)]),
        flow(TENANT, "http", [shape(0), {"name": "call", "action": "http_request", "retry": HTTP_RETRY,
                                         "input": {"method": "POST", "url": upstream + "/call",
                                                   "body": {"n": "{{ trigger.n }}"}}}]),
        flow(TENANT, "limited", [{"name": "wait", "action": "delay", "input": {"seconds": 0.5}}, shape(1)],
             concurrency_limit=LIMIT),
    ]  # fmt: skip


@dataclass
class KeyCalls:
    """What the upstream saw for one idempotency key (`run_id:step:attempt`): its calls' answers in order."""

    answers: list[int] = field(default_factory=list)


class CountingUpstream:
    """An idempotent upstream: attempts 1..FAILING_ATTEMPTS of a step answer 503, later ones 200; a key that was
    answered 200 answers 200 again (a redelivered attempt is recognised by its key, as a real idempotent API does)."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyCalls] = defaultdict(KeyCalls)
        self.without_key = 0

    async def call(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key", "")
        if not key:
            self.without_key += 1
            return web.json_response({"error": "no idempotency key"}, status=400)
        calls = self.keys[key]
        attempt = int(key.rsplit(":", 1)[1])
        status = 503 if attempt <= FAILING_ATTEMPTS and 200 not in calls.answers else 200
        calls.answers.append(status)
        return web.json_response({"key": key, "ok": status == 200}, status=status)

    def routes(self) -> dict[tuple[str, str], Handler]:
        return {("POST", "/call"): self.call}


def serve(counting: CountingUpstream) -> Any:
    """The counting upstream on a free loopback port (an async context manager giving its Upstream)."""
    return stub_upstream(counting.routes())


@dataclass
class Request:
    """One trigger request: its flow, its inputs' numbers, when it was first sent, and how it ended."""

    flow_id: str
    numbers: list[int]
    sent_at: float
    key: str
    run_ids: list[str] = field(default_factory=list)
    accepted_at: float | None = None
    tries: int = 0
    answers: list[int] = field(default_factory=list)  # status of each try (0: no answer)


class Load:
    """Triggers `rate` runs per second in requests of `batch` inputs (one flow per request, drawn by MIX) until
    `runs` are accepted and `stop` is set; at most `in_flight` requests at once (the rate drops while ingest cannot
    answer, as a client's would)."""

    def __init__(self, ingest: str, key: str, rate: float, batch: int, seed: int, in_flight: int = 64) -> None:
        self.ingest = ingest
        self.key = key
        self.rate = rate
        self.batch = batch
        self.random = random.Random(seed)
        self.slots = asyncio.Semaphore(in_flight)
        self.requests: list[Request] = []
        self.stop = asyncio.Event()
        self.numbers = itertools.count()
        self.client = httpx.AsyncClient(timeout=10, trust_env=False)
        self.tasks: set[asyncio.Task[None]] = set()
        self.answered = asyncio.Event()  # set at each request accepted

    @property
    def accepted(self) -> int:
        return sum(len(r.run_ids) for r in self.requests)

    def accepted_runs(self) -> dict[str, tuple[str, int]]:
        """run id → (flow, input number) of every accepted run."""
        return {rid: (r.flow_id, n) for r in self.requests if r.run_ids
                for rid, n in zip(r.run_ids, r.numbers, strict=True)}  # fmt: skip

    async def run(self) -> None:
        every = self.batch / self.rate
        next_at = time.monotonic()
        flows_, weights = list(MIX), list(MIX.values())
        while not self.stop.is_set():
            await self.slots.acquire()
            if self.stop.is_set():
                self.slots.release()
                return
            flow_id = self.random.choices(flows_, weights)[0]
            request = Request(flow_id, [next(self.numbers) for _ in range(self.batch)], time.monotonic(),
                              f"chaos-{uuid.uuid4().hex}")  # fmt: skip
            self.requests.append(request)
            task = asyncio.create_task(self._send(request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            next_at += every
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - every)  # no burst to catch up after a stall

    async def until_accepted(self, runs: int) -> None:
        """Wait until at least `runs` runs were accepted."""
        while self.accepted < runs:
            self.answered.clear()
            await self.answered.wait()

    async def drain(self, within: float = 300) -> None:
        """Stop sending new requests; wait until every request sent was answered 202."""
        self.stop.set()
        if self.tasks:
            await asyncio.wait_for(asyncio.gather(*self.tasks), timeout=within)
        await self.client.aclose()

    async def _send(self, request: Request) -> None:
        """Send the request with its key until it is answered 202 (after no answer, a 503, a 429 or a 500, the
        same request again: ingest names the same runs, docs/intake.md); give up on any other answer, or after
        `GIVE_UP_S` (the request stays unaccepted and the run fails on it)."""
        url = f"{self.ingest}/v1/flows/{request.flow_id}/trigger"
        headers = {"Authorization": f"Bearer {self.key}", "Idempotency-Key": request.key}
        body = {"inputs": [{"n": n} for n in request.numbers]}
        try:
            while True:
                request.tries += 1
                try:
                    answer = await self.client.post(url, json=body, headers=headers)
                    status = answer.status_code
                except httpx.HTTPError:
                    status = 0
                request.answers.append(status)
                if status == 202:
                    request.run_ids = [str(r) for r in answer.json()["run_ids"]]
                    request.accepted_at = time.monotonic()
                    self.answered.set()
                    return
                if status not in RETRIED or time.monotonic() - request.sent_at > GIVE_UP_S:
                    return
                await asyncio.sleep(min(2.0, 0.25 * 2**request.tries))
        finally:
            self.slots.release()

    def first_accepted_after(self, at: float, flow_id: str | None = None) -> Request | None:
        """The first request sent after `at` (of `flow_id`) that was accepted."""
        for request in self.requests:
            if request.sent_at > at and request.run_ids and flow_id in (None, request.flow_id):
                return request
        return None


__all__ = ["CountingUpstream", "Load", "Request", "Upstream", "flows", "serve"]
