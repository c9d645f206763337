"""The run/step transition table, checked over every (from, to) pair against docs/architecture.md written out here."""

from __future__ import annotations

import itertools

import pytest

from schemas.status import (
    TERMINAL_RUN_STATUSES,
    TERMINAL_STEP_STATUSES,
    RunStatus,
    StepStatus,
    can_step_transition,
    can_transition,
    is_terminal,
    parse_run_statuses,
)

R = RunStatus
S = StepStatus

# docs/architecture.md#vocabulary, copied by hand; the module's table must agree with it, not the other way round.
EXPECTED_RUN: dict[str, set[str]] = {
    "CREATED": {"QUEUED", "SCHEDULED", "INVALID"},
    "QUEUED": {"RUNNING", "BLOCKED", "QUOTA_EXCEEDED", "CANCELED"},
    "BLOCKED": {"QUEUED"},
    "RUNNING": {"PAUSED", "SUCCEEDED", "PARTIAL", "FAILED", "TIMED_OUT", "CANCELED", "INTERNAL_ERROR"},
    "PAUSED": {"RUNNING", "CANCELED", "TIMED_OUT"},
}
# Deliberate additions of schemas/status.py beyond architecture.md: vocabulary:
# a scheduled run becomes due and joins the queue, or is canceled before it is due;
EXPECTED_RUN["SCHEDULED"] = {"QUEUED", "CANCELED"}
# a run blocked by the concurrency limit can be canceled while it waits;
EXPECTED_RUN["BLOCKED"] |= {"CANCELED"}
# an executor bug ends a run INTERNAL_ERROR in whatever status it waits in (invariant 5: every run ends), as
# tests/unit/test_decide_transitions.py found decide doing.
for waiting in ("SCHEDULED", "QUEUED", "BLOCKED", "PAUSED"):
    EXPECTED_RUN[waiting] |= {"INTERNAL_ERROR"}

EXPECTED_TERMINAL_RUN = {"SUCCEEDED", "PARTIAL", "FAILED", "TIMED_OUT", "CANCELED", "INVALID", "QUOTA_EXCEEDED",
                         "INTERNAL_ERROR"}  # fmt: skip

EXPECTED_STEP: dict[str, set[str]] = {
    "PENDING": {"RUNNING", "SKIPPED", "CANCELED"},
    "RUNNING": {"SUCCEEDED", "FAILED", "RETRYING", "CANCELED"},
    "RETRYING": {"RUNNING", "FAILED", "CANCELED"},
}
EXPECTED_TERMINAL_STEP = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"}


def test_status_names_are_those_of_design() -> None:
    assert {s.value for s in RunStatus} == set(EXPECTED_RUN) | EXPECTED_TERMINAL_RUN | {"RUNNING"}
    assert {s.value for s in StepStatus} == {"PENDING", "RUNNING", "RETRYING", *EXPECTED_TERMINAL_STEP}


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(RunStatus, RunStatus)), ids=lambda s: s.value)
def test_run_transition(src: RunStatus, dst: RunStatus) -> None:
    expected = dst.value in EXPECTED_RUN.get(src.value, set())
    assert can_transition(src, dst) is expected, f"{src} -> {dst} should be {'allowed' if expected else 'refused'}"


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(StepStatus, StepStatus)), ids=lambda s: s.value)
def test_step_transition(src: StepStatus, dst: StepStatus) -> None:
    expected = dst.value in EXPECTED_STEP.get(src.value, set())
    assert can_step_transition(src, dst) is expected, f"{src} -> {dst} should be {'allowed' if expected else 'refused'}"


def test_terminal_run_statuses_have_no_way_out() -> None:
    assert {s.value for s in TERMINAL_RUN_STATUSES} == EXPECTED_TERMINAL_RUN
    for src in RunStatus:
        assert is_terminal(src) is (src.value in EXPECTED_TERMINAL_RUN)
        if is_terminal(src):
            assert not any(can_transition(src, dst) for dst in RunStatus), src


def test_non_terminal_run_statuses_all_have_a_way_out_and_reach_a_terminal_one() -> None:
    for src in RunStatus:
        if is_terminal(src):
            continue
        seen, frontier = {src}, [src]
        while frontier:
            current = frontier.pop()
            for dst in RunStatus:
                if can_transition(current, dst) and dst not in seen:
                    seen.add(dst)
                    frontier.append(dst)
        assert seen & TERMINAL_RUN_STATUSES, f"{src} can never end (invariant 5)"


def test_terminal_step_statuses_have_no_way_out() -> None:
    assert {s.value for s in TERMINAL_STEP_STATUSES} == EXPECTED_TERMINAL_STEP
    for src in TERMINAL_STEP_STATUSES:
        assert not any(can_step_transition(src, dst) for dst in StepStatus), src


# What each product word users bring means (docs/architecture.md#vocabulary, docs/origins.md): a word names every
# status a user of that product would expect behind it ("Error" is any run that ended in error, "Pending" anything
# not yet started).
ERROR = {R.FAILED, R.TIMED_OUT, R.INTERNAL_ERROR, R.QUOTA_EXCEEDED, R.INVALID}
SEED_ALIASES: dict[str, set[RunStatus]] = {
    "Pending": {R.CREATED, R.QUEUED, R.SCHEDULED, R.BLOCKED},
    "InProgress": {R.RUNNING, R.PAUSED},
    "Successful": {R.SUCCEEDED},
    "passed": {R.SUCCEEDED},
    "success": {R.SUCCEEDED},
    "Partial": {R.PARTIAL},
    "PARTIAL_SUCCEEDED": {R.PARTIAL},
    "Error": ERROR,
    "error": ERROR,
    "failure": ERROR,
    "failed": {R.FAILED},
    "Canceled": {R.CANCELED},
    "STOPPED": {R.CANCELED},
    "cancelled": {R.CANCELED},
    "timed_out": {R.TIMED_OUT},
    "TIMEOUT": {R.TIMED_OUT},
}


@pytest.mark.parametrize(("alias", "statuses"), SEED_ALIASES.items())
def test_seed_words_mean_their_status_sets_in_any_case(alias: str, statuses: set[RunStatus]) -> None:
    for spelling in (alias, alias.upper(), alias.lower(), alias.swapcase(), f"  {alias} "):
        assert parse_run_statuses(spelling) == statuses, spelling


@pytest.mark.parametrize("status", list(RunStatus), ids=lambda s: s.value)
def test_our_names_mean_themselves(status: RunStatus) -> None:
    assert parse_run_statuses(status.value) == {status}
    assert parse_run_statuses(status.value.lower()) == {status}


def test_every_status_is_reachable_through_a_seed_word_or_its_name() -> None:
    reached = set().union(*SEED_ALIASES.values())
    assert reached >= set(TERMINAL_RUN_STATUSES) - {R.INVALID} | {R.QUEUED, R.RUNNING}


@pytest.mark.parametrize("name", ["", "DONE", "runing", "SUCCEEDED!", "QUEUED,RUNNING"])
def test_parse_run_status_rejects_unknown_names_listing_accepted_values(name: str) -> None:
    with pytest.raises(ValueError, match="unknown run status") as err:
        parse_run_statuses(name)
    message = str(err.value)
    assert repr(name) in message
    for accepted in [*(s.value for s in RunStatus), "PENDING", "SUCCESSFUL", "CANCELLED", "TIMEOUT"]:
        assert accepted in message
