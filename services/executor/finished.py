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
    def __init__(self) -> None:
        self._keys = array("Q")  # sorted hashes
        self._seqs = array("l")  # next seq, by the same index
        self._recent: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._keys) + sum(1 for h in self._recent if self._index(h) is None)

    def __contains__(self, run_id: object) -> bool:
        return isinstance(run_id, str) and self.get(run_id) is not None

    def _index(self, h: int) -> int | None:
        i = bisect_left(self._keys, h)
        return i if i < len(self._keys) and self._keys[i] == h else None

    def get(self, run_id: str) -> int | None:
        h = run_hash(run_id)
        if (seq := self._recent.get(h)) is not None:
            return seq
        i = self._index(h)
        return None if i is None else self._seqs[i]

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
        old_keys, old_seqs = self._keys, self._seqs
        keys, seqs = array("Q"), array("l")
        i = j = 0
        while i < len(old_keys) and j < len(new):
            if old_keys[i] < new[j][0]:
                keys.append(old_keys[i])
                seqs.append(old_seqs[i])
                i += 1
            else:
                if old_keys[i] == new[j][0]:
                    i += 1  # the recent value wins
                keys.append(new[j][0])
                seqs.append(new[j][1])
                j += 1
        keys.extend(old_keys[i:])
        seqs.extend(old_seqs[i:])
        keys.extend(k for k, _ in new[j:])
        seqs.extend(s for _, s in new[j:])
        self._keys, self._seqs, self._recent = keys, seqs, {}

    def hashes(self) -> Iterator[int]:
        yield from self._keys
        yield from self._recent
