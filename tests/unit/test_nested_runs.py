"""Runs linked to a parent by a trigger's `ap-parent-run-id` header (docs/intake.md#nested-runs): the link is folded
into the child's state, the child tells its parent only of a failure it was asked to pass on, and that failure
fails a RUNNING parent — while a subflow step's child still completes its step as before."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from schemas import codec
from schemas.events import ChildRunFinished, ErrorCategory, ErrorInfo
from schemas.status import RunStatus
from schemas.topics import Topics
from services.executor.decide import CommandInput, StartRun
from services.executor.subflows import Subflows
from tests.unit.drive import Run, make_flow, make_trigger


def _child(fail_parent: bool) -> Run:
    run = Run(make_flow({"name": "only"}), trigger=make_trigger("run-child", parent_run_id="run-parent",
                                                                 fail_parent_on_failure=fail_parent))  # fmt: skip
    run.feed(StartRun(run.trigger, 3))
    return run


def _finished(child_status: str, step: str = "", error: ErrorInfo | None = None) -> CommandInput:
    return CommandInput(ChildRunFinished(tenant_id="t1", run_id="run-1", child_run_id="run-child", step=step,
                                         attempt=1, status=child_status, error=error))  # fmt: skip


def test_the_link_and_the_request_are_recorded_and_folded() -> None:
    child = _child(fail_parent=True)
    requested = child.of_type("RunRequested")[0]
    assert requested.payload.parent_run_id == "run-parent" and requested.payload.fail_parent_on_failure
    assert requested.correlation_id == "run-parent"
    assert child.state is not None and child.state.parent_run_id == "run-parent"
    assert child.state.parent_step is None and child.state.fail_parent_on_failure
    assert not _child(fail_parent=False).of_type("RunRequested")[0].payload.fail_parent_on_failure


def test_a_linked_childs_failure_fails_a_running_parent_with_the_childs_error() -> None:
    parent = Run(make_flow({"name": "a"}, {"name": "b"}))
    parent.start()
    assert parent.state is not None and parent.state.status == RunStatus.RUNNING
    cause = ErrorInfo(category=ErrorCategory.TRANSIENT, message="upstream 503")
    parent.feed(_finished("FAILED", error=cause))
    assert parent.state.status == RunStatus.FAILED
    ended = parent.events[-1]
    assert ended.type == "RunFailed" and ended.payload.error.code == "child_run_failed"
    assert ended.payload.error.message == "child run run-child ended FAILED: upstream 503"
    assert "StepCanceled" in parent.types  # the step that was running is abandoned


@pytest.mark.parametrize("child_status", ["SUCCEEDED", "PARTIAL"])
def test_a_linked_child_that_succeeds_changes_nothing(child_status: str) -> None:
    parent = Run(make_flow({"name": "a"}))
    parent.start()
    before = list(parent.events)
    assert parent.feed(_finished(child_status)) == []
    assert parent.events == before


def test_a_parent_that_already_ended_is_not_failed_again() -> None:
    parent = Run(make_flow({"name": "a"}))
    parent.start()
    parent.complete()
    assert parent.state is not None and parent.state.status == RunStatus.SUCCEEDED
    assert parent.feed(_finished("FAILED")) == []


class _Producer:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send_and_wait(self, topic: str, value: bytes, **_: Any) -> None:
        self.sent.append(codec.loads(value))


class _Ledger:
    def __init__(self) -> None:
        self.producer = _Producer()


@pytest.mark.parametrize(
    ("fail_parent", "child_status", "told"),
    [(True, "FAILED", True), (True, "SUCCEEDED", False), (False, "FAILED", False), (False, "SUCCEEDED", False)],
)
async def test_a_linked_child_tells_its_parent_only_a_failure_it_was_asked_to(
    fail_parent: bool, child_status: str, told: bool
) -> None:
    child = _child(fail_parent)
    assert child.state is not None
    ledger = _Ledger()
    subflows = Subflows(Topics("t"), 2, ledger)  # type: ignore[arg-type]
    await subflows.notify_parent(replace(child.state, status=RunStatus(child_status)))
    assert len(ledger.producer.sent) == told
    if told:
        (command,) = ledger.producer.sent
        assert (command["run_id"], command["step"], command["status"]) == ("run-parent", "", "FAILED")
