"""The executor's memory of finished runs: exact answers for every run it was told about, in ~16 bytes a run."""

from __future__ import annotations

import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from services.executor.finished import FinishedRuns


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([f"run_{i}" for i in range(300)]), st.integers(0, 10_000)), max_size=400),
       st.integers(1, 7))  # fmt: skip
def test_it_answers_like_a_dict_whatever_the_compactions(ops: list[tuple[str, int]], compact_every: int) -> None:
    finished, expected = FinishedRuns(), {}
    for n, (run_id, seq) in enumerate(ops):
        finished[run_id] = seq
        expected[run_id] = seq
        if n % compact_every == 0:
            finished.compact()
    assert len(finished) == len(expected)
    for i in range(300):
        run_id = f"run_{i}"
        assert finished.get(run_id) == expected.get(run_id)
        assert (run_id in finished) == (run_id in expected)


def test_a_hundred_thousand_runs_cost_about_sixteen_bytes_each() -> None:
    tracemalloc.start()
    finished = FinishedRuns()
    for i in range(100_000):
        finished[f"run_0190f3a2{i:012x}c0ffee00"] = 10
    finished.compact()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "run_0190f3a2000000000007c0ffee00" in finished and finished.get("run_0190f3a2000000000007c0ffee00") == 10
    assert "run_elsewhere" not in finished
    assert current / 100_000 < 40  # a dict of the ids would hold ~150 bytes a run
