"""One ledger partition read into the state of its open runs (pure: the records come in as parsed JSON).

The events of runs that end in the log are never validated into models or folded: a run's raw events wait in
`open_raw` only until its terminal event, then only its next seq is kept (in `FinishedRuns`). Most of a long ledger
is ended runs, so a replay costs a JSON parse per event, not a fold. The reading is `adapters/ledger.py`
(`iter_partition_tail`); the partition's owner is `partitions.py`.

A scan is a deterministic function of the records it took, [0, `position.offset`]: its state can be stored
(`snapshots.py`) and restored, and a restored scan that takes the rest of the log equals one that read it all
(docs/architecture.md, Recovery).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from schemas import codec
from schemas.status import TERMINAL_RUN_EVENTS
from services.executor.finished import FinishedRuns
from services.executor.fold import RunState, fold

log = logging.getLogger(__name__)

# A child run that ended within this long before a replay tells its parent again (it may have crashed first).
CHILD_RENOTIFY_WINDOW = timedelta(hours=24)


def fold_raw(raw: list[dict[str, Any]]) -> RunState | None:
    """A run's state from its raw ledger records; an undecodable record is skipped (the projector dead-letters it)."""
    state: RunState | None = None
    for obj in raw:
        try:
            state = fold(state, codec.ledger_event_from_dict(obj))
        except (codec.DecodeError, ValueError) as exc:
            log.error("run %s seq %s not replayed: %s", obj.get("run_id"), obj.get("seq"), exc)
    return state


@dataclass(frozen=True, slots=True)
class LogPosition:
    """The last ledger record a scan took: its offset, and its identity (a hash of its bytes), so that a snapshot
    of a ledger since truncated or recreated is recognised by the record now at that offset."""

    offset: int
    digest: str


@dataclass
class PartitionScan:
    """Takes a partition's records batch by batch. Ended runs go to `finished` (their next seq) and `archived`;
    `open_runs()` folds the rest; `ended_children` are the child runs that ended recently (their parent may not
    have heard). `count` is every record taken since offset 0 (a restored scan's included), `replayed` those
    taken by this one; `restored_from` is the snapshot's position it began from, if any."""

    partition: int
    finished: FinishedRuns
    archived: set[str]
    now: datetime
    count: int = 0
    position: LogPosition | None = None
    replayed: int = 0
    restored_from: LogPosition | None = None
    _ended_raw: list[list[dict[str, Any]]] = field(default_factory=list)
    _open_raw: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._recent = (self.now - CHILD_RENOTIFY_WINDOW).strftime("%Y-%m-%dT%H:%M:%S")  # compared as ISO text
        # A restored scan keeps only the children still recent by its own clock.
        self._ended_raw = [raw for raw in self._ended_raw if str(raw[-1].get("occurred_at", "")) >= self._recent]

    @property
    def ended_children(self) -> list[RunState]:
        """The child runs that ended within CHILD_RENOTIFY_WINDOW of `now`, folded."""
        return [child for raw in self._ended_raw if (child := fold_raw(raw)) is not None]

    @property
    def ended_raw(self) -> list[list[dict[str, Any]]]:
        return self._ended_raw

    @property
    def open_raw(self) -> dict[str, list[dict[str, Any]]]:
        """The records of each run still open, in the order the runs first appeared."""
        return self._open_raw

    def take(self, batch: list[dict[str, Any]], position: LogPosition | None = None) -> None:
        """Take the next records; `position` is the last record of the log they come from (it may be one the
        reader could not parse, and so not in `batch`)."""
        self.count += len(batch)
        self.replayed += len(batch)
        if position is not None:
            self.position = position
        for obj in batch:
            run_id, seq, kind = obj.get("run_id"), obj.get("seq"), obj.get("type")
            if not isinstance(run_id, str) or not isinstance(seq, int):
                log.error("ledger record without run_id/seq in partition %s skipped", self.partition)
                continue
            if (done := self.finished.get(run_id)) is not None:
                # Ended: only its next seq matters (an archive appends there).
                self.finished[run_id] = max(done, seq + 1)
                if kind == "RunArchived":
                    self.archived.add(run_id)
                continue
            raw = self._open_raw.setdefault(run_id, [])
            raw.append(obj)
            if kind in TERMINAL_RUN_EVENTS:
                self._open_raw.pop(run_id)
                self.finished[run_id] = seq + 1
                first = raw[0].get("payload") or {}
                if first.get("parent_run_id") and str(obj.get("occurred_at", "")) >= self._recent:
                    self._ended_raw.append(raw)  # folded when asked for: most are dropped by a later restore

    def open_runs(self) -> list[RunState]:
        """The runs still open at the end of the log, oldest first (so BLOCKED runs queue in arrival order)."""
        states = [state for raw in self._open_raw.values() if (state := fold_raw(raw)) is not None]
        return sorted(states, key=lambda state: state.created_at)
