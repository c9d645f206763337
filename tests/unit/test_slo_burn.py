"""slo_burn's decision: a window pair pages only when both its windows burn the error budget faster than its
factor, exactly at the boundary it does not, and the step resolves once no pair burns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import product

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common import slo_burn
from services.common.slo_burn import Counts, decide
from services.projector import alerts
from services.projector.alerts import Finished, Fire, Resolve, Revision, Rule, State

OBJECTIVE = 0.99  # budget: 1 % of runs may fail
T0 = datetime(2026, 1, 1, tzinfo=UTC)
QUIET = Counts(0, 100)


def counts(**by_window: Counts) -> dict[float, Counts]:
    """Every default window quiet except the ones given (`m60=Counts(...)`)."""
    out = {m: QUIET for m in slo_burn.windows({})}
    out |= {float(k[1:]): v for k, v in by_window.items()}
    return out


def test_default_windows_and_factors_are_the_sre_workbooks() -> None:
    assert slo_burn.windows({}) == [5, 30, 60, 360]
    assert slo_burn.pairs({}) == (slo_burn.Pair(60, 5, 14.4), slo_burn.Pair(360, 30, 6.0))
    custom = {"fast_long_minutes": 120, "fast_short_minutes": 10, "fast_factor": 10}
    assert slo_burn.pairs(custom)[0] == slo_burn.Pair(120, 10, 10)
    assert slo_burn.windows(custom) == [10, 30, 120, 360]


def test_burn_rate_is_error_ratio_over_budget() -> None:
    assert slo_burn.burn_rate(Counts(1, 100), OBJECTIVE) == pytest.approx(1.0)
    assert slo_burn.burn_rate(Counts(144, 1000), OBJECTIVE) == pytest.approx(14.4)
    assert slo_burn.burn_rate(Counts(50, 100), 0.9) == pytest.approx(5.0)
    assert slo_burn.burn_rate(Counts(0, 0), OBJECTIVE) == 0.0


@pytest.mark.parametrize(
    ("failed", "total", "pages"),
    [
        (144, 1000, False),  # exactly 14.4x: "exceeds" is strict
        (145, 1000, True),
        (1440, 10000, False),
        (1441, 10000, True),
        (143, 1000, False),
        (1000, 1000, True),
    ],
)
def test_fast_pair_boundary(failed: int, total: int, pages: bool) -> None:
    both = counts(m60=Counts(failed, total), m5=Counts(failed, total))
    decision = decide(OBJECTIVE, {}, both)
    assert decision.burning is pages
    assert decision.pair == (slo_burn.FAST if pages else None)


@pytest.mark.parametrize(
    ("failed", "total", "pages"),
    [(6, 100, False), (7, 100, True), (60, 1000, False), (61, 1000, True), (3, 50, False), (4, 50, True)],
)
def test_slow_pair_boundary(failed: int, total: int, pages: bool) -> None:
    both = counts(m360=Counts(failed, total), m30=Counts(failed, total))
    decision = decide(OBJECTIVE, {}, both)
    assert decision.burning is pages
    assert decision.pair == (slo_burn.SLOW if pages else None)


def test_boundary_holds_for_objectives_that_are_not_binary_fractions() -> None:
    # 0.999: budget 0.1 %; 14.4x is an error ratio of exactly 1.44 %.
    at = counts(m60=Counts(144, 10000), m5=Counts(144, 10000))
    assert not decide(0.999, {}, at).burning
    over = counts(m60=Counts(145, 10000), m5=Counts(145, 10000))
    assert decide(0.999, {}, over).burning
    # 0.9: budget 10 %; 6x is 60 %.
    assert not decide(0.9, {}, counts(m360=Counts(6, 10), m30=Counts(6, 10))).burning
    assert decide(0.9, {}, counts(m360=Counts(61, 100), m30=Counts(61, 100))).burning


HOT = Counts(50, 100)  # 50x the 1 % budget: over every factor


@pytest.mark.parametrize("windows", list(product([False, True], repeat=4)))
def test_every_combination_of_hot_windows(windows: tuple[bool, bool, bool, bool]) -> None:
    """Over all 16 combinations: pages exactly when both windows of some pair are hot."""
    m5, m30, m60, m360 = windows
    given_counts = {5.0: HOT if m5 else QUIET, 30.0: HOT if m30 else QUIET, 60.0: HOT if m60 else QUIET,
                    360.0: HOT if m360 else QUIET}  # fmt: skip
    decision = decide(OBJECTIVE, {}, given_counts)
    assert decision.burning is ((m60 and m5) or (m360 and m30))
    if m60 and m5:
        assert decision.pair == slo_burn.FAST  # the fast pair is named first when both burn
    elif m360 and m30:
        assert decision.pair == slo_burn.SLOW


def test_one_window_alone_never_pages() -> None:
    for window in slo_burn.windows({}):
        alone = counts(**{f"m{window:g}": Counts(100, 100)})
        assert not decide(OBJECTIVE, {}, alone).burning, window


def test_empty_windows_do_not_burn() -> None:
    empty = {m: Counts(0, 0) for m in slo_burn.windows({})}
    assert not decide(OBJECTIVE, {}, empty).burning
    assert not decide(OBJECTIVE, {}, counts(m60=HOT, m5=Counts(0, 0))).burning


def test_objective_out_of_range_is_refused() -> None:
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="objective"):
            decide(bad, {}, counts())


@given(
    failed=st.integers(0, 500), extra=st.integers(0, 500), objective=st.sampled_from([0.9, 0.95, 0.99, 0.999]),
    factor=st.sampled_from([1.0, 2.0, 6.0, 14.4]),
)  # fmt: skip
def test_burning_matches_the_exact_rate(failed: int, extra: int, objective: float, factor: float) -> None:
    """Against the definition worked in integers: failed/total > factor * (1 - objective)."""
    total = failed + extra
    c = Counts(failed, total)
    params = {"fast_factor": factor, "slow_factor": factor}
    decision = decide(objective, params, {m: c for m in slo_burn.windows(params)})
    tenths, budget = round(factor * 10), round((1 - objective) * 10_000)  # factor/10, budget/10 000: exact ints
    expected = total > 0 and failed * 100_000 > tenths * budget * total
    assert decision.burning is expected


# ---- the rule's fold: fire once while burning, resolve when no pair burns ------------------------------------


RULE = Rule("r1", "t1", "production", "f", "slo_burn", "orders SLO",
            (Revision(T0, True, {"objective": OBJECTIVE, **slo_burn.DEFAULTS}),))  # fmt: skip


def run(i: int, status: str) -> Finished:
    return Finished(f"run{i}", status, T0 + timedelta(minutes=i), "orders")


def test_step_fires_once_while_burning_and_resolves_when_it_stops() -> None:
    hot = counts(m60=HOT, m5=HOT)
    state, actions = alerts.step(RULE, State(), run(1, "FAILED"), hot)
    assert state.open and len(actions) == 1 and isinstance(actions[0], Fire)
    fire = actions[0]
    assert fire.key == "slo:run1" and "1h/5m > 14.4x" in fire.reason
    assert fire.details["pair"] == {"long_minutes": 60, "short_minutes": 5, "factor": 14.4}
    assert fire.details["windows"]["60"] == {"failed": 50, "runs": 100, "burn_rate": 50.0}

    state, actions = alerts.step(RULE, state, run(2, "FAILED"), hot)
    assert state.open and actions == []  # still burning: no second page

    # A success alone does not resolve it while the windows still burn.
    state, actions = alerts.step(RULE, state, run(3, "SUCCEEDED"), hot)
    assert state.open and actions == []

    state, actions = alerts.step(RULE, state, run(4, "SUCCEEDED"), counts(m60=HOT))
    assert not state.open and actions == [Resolve(run(4, "SUCCEEDED").at, "run4")]


def test_step_ignores_runs_before_the_rule_and_outcomes_that_say_nothing() -> None:
    hot = counts(m60=HOT, m5=HOT)
    early = Finished("early", "FAILED", T0 - timedelta(minutes=1))
    assert alerts.step(RULE, State(), early, hot)[1] == []
    assert alerts.step(RULE, State(), run(1, "CANCELED"), hot)[1] == []
