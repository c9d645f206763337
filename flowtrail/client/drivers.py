"""The two drivers of the plans in flowtrail/client/plan.py: one blocking over `httpx.Client`, one over
`httpx.AsyncClient`. They only do what a plan asks (send, sleep, read lines, hand items over); everything else is
the plan's, written once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar, cast

import httpx

from flowtrail.client.plan import Close, Emit, Items, NextLine, Plan, Read, Send, Sleep

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741


class SyncDriver:
    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def run(self, plan: Plan[T]) -> T:
        steps = self._steps(plan)
        try:
            next(steps)
        except StopIteration as done:
            return cast(T, done.value)
        steps.close()
        raise TypeError("a call's plan emitted items; iterate it instead")

    def iterate(self, items: Items[I]) -> Iterator[I]:
        for value in self._steps(items.plan):
            yield cast(I, value)

    def _steps(self, plan: Plan[T]) -> Any:
        """A generator of the plan's emitted values, returning its result; every streamed response it opened is
        closed when it ends (also when the caller stops iterating)."""
        lines: dict[httpx.Response, Iterator[str]] = {}
        answer: Any = None
        failure: BaseException | None = None
        try:
            while True:
                try:
                    op = plan.throw(failure) if failure is not None else plan.send(answer)
                except StopIteration as done:
                    return done.value
                answer, failure = None, None
                if isinstance(op, Emit):
                    yield op.value
                    continue
                try:
                    answer = self._do(op, lines)
                except httpx.TransportError as exc:
                    failure = exc
        finally:
            plan.close()
            for response in lines:
                response.close()

    def _do(self, op: Any, lines: dict[httpx.Response, Iterator[str]]) -> Any:
        if isinstance(op, Send):
            response = self.http.send(op.request, stream=op.stream)
            if op.stream:
                lines[response] = response.iter_lines()
            return response
        if isinstance(op, Sleep):
            time.sleep(op.seconds)
        elif isinstance(op, NextLine):
            return next(lines[op.response], None)
        elif isinstance(op, Read):
            op.response.read()
        elif isinstance(op, Close):
            lines.pop(op.response, None)
            op.response.close()
        return None


class AsyncDriver:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def run(self, plan: Plan[T]) -> T:
        box: list[Any] = []
        async for _ in self._steps(plan, box):
            raise TypeError("a call's plan emitted items; iterate it instead")
        return cast(T, box[0])

    async def iterate(self, items: Items[I]) -> AsyncIterator[I]:
        async for value in self._steps(items.plan, []):
            yield cast(I, value)

    async def _steps(self, plan: Plan[Any], box: list[Any]) -> AsyncIterator[Any]:
        """The plan's emitted values; its result appended to `box` (an async generator returns nothing)."""
        lines: dict[httpx.Response, AsyncIterator[str]] = {}
        answer: Any = None
        failure: BaseException | None = None
        try:
            while True:
                try:
                    op = plan.throw(failure) if failure is not None else plan.send(answer)
                except StopIteration as done:
                    box.append(done.value)
                    return
                answer, failure = None, None
                if isinstance(op, Emit):
                    yield op.value
                    continue
                try:
                    answer = await self._do(op, lines)
                except httpx.TransportError as exc:
                    failure = exc
        finally:
            plan.close()
            for response in lines:
                await response.aclose()

    async def _do(self, op: Any, lines: dict[httpx.Response, AsyncIterator[str]]) -> Any:
        if isinstance(op, Send):
            response = await self.http.send(op.request, stream=op.stream)
            if op.stream:
                lines[response] = response.aiter_lines()
            return response
        if isinstance(op, Sleep):
            await asyncio.sleep(op.seconds)
        elif isinstance(op, NextLine):
            return await anext(lines[op.response], None)
        elif isinstance(op, Read):
            await op.response.aread()
        elif isinstance(op, Close):
            lines.pop(op.response, None)
            await op.response.aclose()
        return None
