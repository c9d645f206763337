"""Python's cyclic garbage collector, tuned for a service whose work allocates many short-lived containers.

With the default thresholds a young collection runs every 700 container allocations and scans every young object
again, and every tenth of those scans the middle generation too: for the executor (a pydantic event, a folded state
and their dicts per event) and the projector (thousands of events decoded per batch) that was a tenth to a fifth of
the CPU per event. Reference counting still frees almost everything at once; the collector only finds cycles, so
collecting every `young` allocations instead costs memory only for the cyclic garbage of one interval.
"""

from __future__ import annotations

import gc


def tune_collector(young: int) -> None:
    """Once the process has built what lives as long as it does (modules, settings, clients): that is moved out of
    the collector's sight, so a full collection scans only what the work allocates, and young collections run every
    `young` allocations."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(young, middle, oldest)
