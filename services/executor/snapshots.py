"""A partition scan's state as bytes and back (pure): what an executor stores so that a restart replays only the
ledger's tail (docs/architecture.md, Recovery; docs/decisions.md, executor snapshots).

Layout, version 1: the magic `FTSNAP`, the version (2 bytes, big-endian), the header's length (4 bytes), the
header as JSON (orjson: the covered position and count, the archived runs, the open runs' records, the records of
recently ended children, the number of finished runs), then the finished runs' sorted hashes and next seqs as raw
little-endian 8-byte integers. Anything else — another magic, another version, a short or inconsistent body — is a
`SnapshotError`: the caller ignores the snapshot and replays the whole partition.
"""

from __future__ import annotations

import struct
import sys
from array import array
from datetime import datetime
from typing import Any

import orjson

from services.executor.finished import FinishedRuns
from services.executor.replay import LogPosition, PartitionScan

MAGIC = b"FTSNAP"
VERSION = 1
_PREFIX = struct.Struct(">6sHI")


class SnapshotError(ValueError):
    """The bytes are not a snapshot this code can read."""


def encode(scan: PartitionScan) -> bytes:
    """The scan's state after its last record; the scan must have taken at least one (it has a position)."""
    if scan.position is None:
        raise ValueError(f"partition {scan.partition}: nothing taken, nothing to snapshot")
    keys, seqs = scan.finished.arrays()
    header = orjson.dumps(
        {
            "partition": scan.partition,
            "offset": scan.position.offset,
            "digest": scan.position.digest,
            "count": scan.count,
            "finished": len(keys),
            "archived": sorted(scan.archived),
            "open": scan.open_raw,
            "ended_children": scan.ended_raw,
        }
    )
    return b"".join((_PREFIX.pack(MAGIC, VERSION, len(header)), header, _little(keys), _little(seqs)))


def decode(data: bytes, *, partition: int, now: datetime) -> PartitionScan:
    """The scan `encode` stored, with the clock `now` (children ended longer ago than the renotify window are
    dropped); raises SnapshotError for bytes it cannot trust."""
    if len(data) < _PREFIX.size:
        raise SnapshotError("too short")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError("not a snapshot")
    if version != VERSION:
        raise SnapshotError(f"version {version}, this code reads {VERSION}")
    body = _PREFIX.size + header_len
    try:
        header = orjson.loads(data[_PREFIX.size : body])
        n = int(header["finished"])
        if header["partition"] != partition:
            raise SnapshotError(f"a snapshot of partition {header['partition']}")
        if len(data) != body + 16 * n:
            raise SnapshotError(f"{len(data) - body} bytes of finished runs, {16 * n} expected")
        keys, seqs = array("Q"), array("q")
        keys.frombytes(data[body : body + 8 * n])
        seqs.frombytes(data[body + 8 * n :])
        if sys.byteorder != "little":
            keys.byteswap()
            seqs.byteswap()
        open_raw = _records_by_run(header["open"])
        ended = [_records(raw) for raw in header["ended_children"]]
        position = LogPosition(int(header["offset"]), str(header["digest"]))
        return PartitionScan(
            partition,
            FinishedRuns.from_arrays(keys, seqs),
            {str(run_id) for run_id in header["archived"]},
            now,
            count=int(header["count"]),
            position=position,
            restored_from=position,
            _ended_raw=ended,
            _open_raw=open_raw,
        )
    except SnapshotError:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"undecodable: {exc!r}") from exc


def _little(values: array[int]) -> bytes:
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = values[:]
    swapped.byteswap()
    return swapped.tobytes()


def _records(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw or not all(isinstance(obj, dict) for obj in raw):
        raise SnapshotError("a run's records are not a non-empty list of objects")
    return raw


def _records_by_run(open_raw: Any) -> dict[str, list[dict[str, Any]]]:
    if not isinstance(open_raw, dict):
        raise SnapshotError("open runs are not an object")
    return {str(run_id): _records(raw) for run_id, raw in open_raw.items()}
