"""`sync_records`, the pure mapping: records keyed, selected, deduplicated, filtered and mapped (`prepare`), the
upsert a PostgreSQL destination runs, and the step's output as it goes (`Progress`). No I/O: reading and writing
are `adapters/sync_http.py` and `adapters/sync_postgres.py`."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError

from schemas.flows import mask_secrets, mask_text
from services.executor.adapters.actions_base import cap_output
from services.executor.sync import SyncRecordsInput, key_text, parse_stamp

SAMPLE_SIZE = 3


@dataclass(frozen=True, slots=True)
class Prepared:
    """A source record ready to write: its key, the mapped record and the source's update time."""

    key: str
    data: dict[str, Any]
    updated_at: str | None


@dataclass
class Tally:
    """Counters and per-record failures, shared by the pure phase and the writes."""

    counters: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("read", "transformed", "written", "deduped", "skipped", "failed"), 0)
    )
    failures: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, key: str, field_path: str | None, error: str, raw_error: Any = None) -> None:
        self.counters["failed"] += 1
        self.failures.append({"record_key": key, "field_path": field_path, "error": mask_text(error),
                              "raw_error": raw_error})  # fmt: skip


class _RecordError(Exception):
    """A JMESPath that failed on one record (a function given the wrong type…): that record fails, not the step."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(message)
        self.field_path = field_path


def _search(expression: str, record: Any, field_path: str) -> Any:
    """The expression's value over the record, or the _RecordError saying why it has none (returned, not raised)."""
    try:
        return jmespath.search(expression, record)
    except JMESPathError as exc:
        return _RecordError(field_path, f"{field_path}: `{expression}` failed: {exc}")


def prepare(records: Sequence[Any], spec: SyncRecordsInput, tally: Tally) -> list[Prepared]:
    """Key, select (only_keys), dedupe, filter and map the records read; no I/O.

    Of several records with one key the newest by `updated_at` is kept (the first when times tie or are absent):
    a record updated while the window was being paged can appear twice, and its later state is the one to write.
    Only the records this run takes on are counted `read`: with `only_keys`, the ones named.
    """
    wanted = set(spec.only_keys) if spec.only_keys is not None else None
    kept: dict[str, tuple[Any, dt.datetime | None]] = {}
    for index, record in enumerate(records):
        found = _search(spec.key, record, "key")
        if found is None or isinstance(found, _RecordError):
            if wanted is None:
                tally.counters["read"] += 1
                tally.fail(f"#{index}", "key", str(found) if found else f"key `{spec.key}` gave null")
            continue
        key = key_text(found)
        if wanted is not None and key not in wanted:
            continue
        tally.counters["read"] += 1
        stamp = parse_stamp(_search(spec.updated_at, record, "updated_at")) if spec.updated_at else None
        if key not in kept:
            kept[key] = (record, stamp)
            continue
        tally.counters["deduped"] += 1
        previous = kept[key][1]
        if stamp is not None and (previous is None or stamp > previous):
            kept[key] = (record, stamp)
    prepared: list[Prepared] = []
    for key, (record, stamp) in kept.items():
        if spec.filter is not None:
            passes = _search(spec.filter, record, "filter")
            if isinstance(passes, _RecordError):
                tally.fail(key, passes.field_path, str(passes))
                continue
            if not _truthy(passes):
                tally.counters["skipped"] += 1
                continue
        data = {name: _search(expression, record, name) for name, expression in spec.mapping.items()}
        problem = next((v for v in data.values() if isinstance(v, _RecordError)), None)
        missing = next((n for n in spec.required if data[n] is None or data[n] == ""), None)
        if problem is None and missing is not None:
            problem = _RecordError(missing, f"{missing} is required; `{spec.mapping[missing]}` gave nothing")
        if problem is not None:
            tally.fail(key, problem.field_path, str(problem))
            continue
        tally.counters["transformed"] += 1
        prepared.append(Prepared(key, data, stamp.isoformat() if stamp else None))
    return prepared


def _truthy(value: Any) -> bool:
    # JMESPath's truth: false, null, "", [] and {} are false; 0 is true.
    return value is not None and value is not False and value not in ("", [], {})


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def upsert_sql(table: str, columns: Sequence[str], key_columns: Sequence[str], id_column: str | None) -> str:
    """INSERT … ON CONFLICT (keys) DO UPDATE of the other columns: writing a record twice leaves one row."""
    target = ".".join(quote_ident(part) for part in table.split("."))
    names = ", ".join(quote_ident(c) for c in columns)
    values = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    others = [c for c in columns if c not in key_columns]
    action = ("DO UPDATE SET " + ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in others)
              if others else "DO NOTHING")  # fmt: skip
    returning = f" RETURNING {quote_ident(id_column)}" if id_column else ""
    keys = ", ".join(quote_ident(c) for c in key_columns)
    return f"INSERT INTO {target} ({names}) VALUES ({values}) ON CONFLICT ({keys}) {action}{returning}"


@dataclass
class Progress:
    """One call's progress; `output` is the step's output contract, also attached to a StepError."""

    spec: SyncRecordsInput
    tally: Tally = field(default_factory=Tally)
    upserts: list[dict[str, Any]] = field(default_factory=list)
    sample: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("read", "transform", "write"), 0.0))

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.timing[phase] += (time.perf_counter() - began) * 1000

    def written(self, record: Prepared, dest_id: str | None) -> None:
        self.tally.counters["written"] += 1
        if self.spec.entity is None:
            return
        assert self.spec.system is not None
        external_ids = {self.spec.system: record.key}
        if self.spec.dest_system is not None and dest_id is not None:
            external_ids[self.spec.dest_system] = dest_id
        self.upserts.append({"external_ids": external_ids, "data": record.data,
                             "source_updated_at": record.updated_at})  # fmt: skip

    def output(self, max_bytes: int) -> dict[str, Any]:
        return {
            "counters": dict(self.tally.counters),
            "failures": list(self.tally.failures),
            "upserts": list(self.upserts),
            "entity": self.spec.entity,
            "window": self.spec.window.model_dump(),
            "timing_ms": {phase: round(ms, 3) for phase, ms in self.timing.items()},
            "sample": cap_output(mask_secrets(self.sample), max_bytes),
        }
