"""Python's cyclic garbage collector, tuned for projecting: a batch decodes thousands of events at once.

With the default thresholds a collection runs every 700 container allocations, and each one scans every young event
of the batch in hand again: about a fifth of the projector's CPU per event went there (13-16 of ~75 us per event
folding and applying 5,000-event batches, measured in one process, docs/projector.md#throughput). Collecting every
50,000 allocations instead leaves ~1 us; reference counting still frees almost everything at once, so memory grows
only by the cyclic garbage of one interval.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from services.common.collector import tune_collector

ALLOCATIONS_PER_COLLECTION = 50_000


def tune_for_projecting() -> None:
    """For the projector process, once it has started: what exists by then lives as long as the process, so it is
    moved out of the collector's sight (a full collection then scans only what batches allocate), and young
    collections run less often."""
    tune_collector(ALLOCATIONS_PER_COLLECTION)


@contextmanager
def fewer_collections() -> Iterator[None]:
    """The same young-collection interval for a stretch of work in a process that is not the projector (a verify or
    rebuild replay, run by the CLI or a test), restored afterwards."""
    before = gc.get_threshold()
    gc.set_threshold(ALLOCATIONS_PER_COLLECTION, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
