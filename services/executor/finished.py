"""The runs an executor knows have ended, and each one's next `seq`: a compact map that does not grow the
process by hundreds of bytes per run of history.

Every finished run must stay known: a trigger redelivered (or a scheduler's tick fired twice) long after the
run ended would otherwise start it again at seq 0 — a second, different event at a seq the ledger already has.
A dict of run-id strings costs ~150 bytes a run (150 MB at a million); here a run costs ~16 bytes: an 8-byte
hash of its id and its next seq, in two sorted arrays, with the runs ended since the last compaction in a small
dict. Two run ids with the same 64-bit hash (odds ~1 in 10^7 at a million runs per partition set) would make
the second look finished; that is the price of the bound, and it is stated here rather than hidden.
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left
from collections.abc import Iterator

_COMPACT_AT = 50_000


def run_hash(run_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(run_id.encode(), digest_size=8).digest(), "little")


class FinishedRuns:
    """Run hash → next seq. The runs ended here go to `_recent`, merged into the sorted `_keys`/`_seqs` now and then;
    a partition's replay is absorbed whole (`absorb`) and searched as it is, never merged, so a restart adds each
    partition's history without a pass over it (docs/architecture.md, Recovery)."""

    def __init__(self) -> None:
        self._keys = array("Q")  # sorted hashes
        self._seqs = array("q")  # next seq, by the same index
        self._recent: dict[int, int] = {}
        self._absorbed: dict[int, tuple[array[int], array[int]]] = {}  # by partition: its replay's sorted arrays

    def __len__(self) -> int:
        """The runs known; a run ended here after its partition's replay was absorbed counts twice."""
        stored = len(self._keys) + sum(len(keys) for keys, _ in self._absorbed.values())
        return stored + sum(1 for h in self._recent if self._stored(h) is None)

    def __contains__(self, run_id: object) -> bool:
        return isinstance(run_id, str) and self.get(run_id) is not None

    def _index(self, h: int) -> int | None:
        return _find(self._keys, h)

    def _stored(self, h: int) -> int | None:
        """The highest next seq of `h` in the sorted arrays (its own and the absorbed ones)."""
        found = None
        for keys, seqs in (self._keys, self._seqs), *self._absorbed.values():
            if (i := _find(keys, h)) is not None and (found is None or seqs[i] > found):
                found = seqs[i]
        return found

    def get(self, run_id: str) -> int | None:
        h = run_hash(run_id)
        if (seq := self._recent.get(h)) is not None:
            return seq  # the newest: a run's next seq only grows
        return self._stored(h)

    def __setitem__(self, run_id: str, next_seq: int) -> None:
        self._recent[run_hash(run_id)] = next_seq
        # Amortised: the recent dict may grow to a quarter of the arrays before a merge, so merges stay rare.
        if len(self._recent) >= max(_COMPACT_AT, len(self._keys) // 4):
            self.compact()

    def compact(self) -> None:
        """Merge the recent runs into the sorted arrays: one linear merge, no dict of everything."""
        if not self._recent:
            return
        new = sorted(self._recent.items())
        self._keys, self._seqs = _merge(self._keys, self._seqs, array("Q", (k for k, _ in new)),
                                        array("q", (s for _, s in new)), newer_wins=True)  # fmt: skip
        self._recent = {}

    def hashes(self) -> Iterator[int]:
        yield from self._keys
        for keys, _ in self._absorbed.values():
            yield from keys
        yield from self._recent

    def items(self) -> dict[int, int]:
        """Every run's hash and next seq (tests: two sets compare equal by these)."""
        keys, seqs = self.arrays()
        return dict(zip(keys, seqs, strict=True))

    def arrays(self) -> tuple[array[int], array[int]]:
        """The sorted hashes and their next seqs, everything merged in (what a snapshot stores, services/executor/
        snapshots.py). They are this set's own: read them, do not change them."""
        self.compact()
        for keys, seqs in self._absorbed.values():
            small, large = sorted([(self._keys, self._seqs), (keys, seqs)], key=lambda pair: len(pair[0]))
            self._keys, self._seqs = _merge(*large, *small, newer_wins=False)
        self._absorbed = {}
        return self._keys, self._seqs

    @classmethod
    def from_arrays(cls, keys: array[int], seqs: array[int]) -> FinishedRuns:
        """The set whose `arrays()` these were (sorted hashes, unique, with their next seqs)."""
        if keys.typecode != "Q" or seqs.typecode != "q" or len(keys) != len(seqs):
            raise ValueError("finished runs: hashes and seqs do not match")
        finished = cls()
        finished._keys, finished._seqs = keys, seqs
        return finished

    def absorb(self, partition: int, other: FinishedRuns) -> None:
        """Add the runs of `partition`'s replay, replacing what an earlier replay of it gave (a replay of a log
        that only grows knows everything the earlier one did); a run also known otherwise keeps its higher seq.
        `other`'s arrays are shared, not copied: neither set changes its arrays in place."""
        self._absorbed[partition] = other.arrays()


def _find(keys: array[int], h: int) -> int | None:
    i = bisect_left(keys, h)
    return i if i < len(keys) and keys[i] == h else None


def _merge(
    keys: array[int], seqs: array[int], new_keys: array[int], new_seqs: array[int], *, newer_wins: bool
) -> tuple[array[int], array[int]]:
    """Two sorted (hash, next seq) arrays as one; a hash in both keeps the second's seq (`newer_wins`) or the
    higher one. Linear in copying but a Python step only per entry of the second (pass the smaller one there when
    `newer_wins` is False): the runs between two of its entries are copied as one slice, so adding the few runs
    ended since the last compaction to a million costs milliseconds, not a second."""
    out_keys, out_seqs = array("Q"), array("q")
    at = 0
    for h, seq in zip(new_keys, new_seqs, strict=True):
        i = bisect_left(keys, h, at)
        out_keys.extend(keys[at:i])
        out_seqs.extend(seqs[at:i])
        if i < len(keys) and keys[i] == h:
            if not newer_wins:
                seq = max(seq, seqs[i])
            i += 1
        out_keys.append(h)
        out_seqs.append(seq)
        at = i
    out_keys.extend(keys[at:])
    out_seqs.extend(seqs[at:])
    return out_keys, out_seqs
