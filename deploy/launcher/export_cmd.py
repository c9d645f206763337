"""`flowtrail export OUT [--since T] [--until T] [--tenant T] [--flow F] [--format parquet|jsonl]`: the ledger as
files an analyst opens with DuckDB, pandas or pyarrow — runs, steps, attempts and events (docs/ledger.md#export).
The files are written by deploy/launcher/export_files.py, imported only when an export runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deploy.launcher.errors import LauncherError
from schemas.topics import Topics
from services.common.kafka import topic_partitions
from services.common.settings import CommonSettings


def _time(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def add_parser(sub: Any) -> None:
    export_cmd = sub.add_parser(
        "export", help="write the ledger's runs, steps, attempts and events as Parquet or JSON Lines files "
        "(docs/ledger.md#export)",
    )  # fmt: skip
    export_cmd.add_argument("out", type=Path, help="the folder to write runs, steps, attempts and events to")
    export_cmd.add_argument("--since", type=_time, help="runs requested and events at or after this ISO 8601 time")
    export_cmd.add_argument("--until", type=_time, help="runs requested and events before this ISO 8601 time")
    export_cmd.add_argument("--tenant", help="only this tenant's runs")
    export_cmd.add_argument("--flow", help="only this flow's runs")
    export_cmd.add_argument("--format", choices=("parquet", "jsonl"), default="parquet", help="default parquet")


class _Progress:
    """A progress line on stderr, rewritten in place on a terminal, a line every 10% otherwise."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def __call__(self, done: int, total: int) -> None:
        share = done / total if total else 1.0
        rate = done / max(time.monotonic() - self.started, 1e-6)
        line = f"export: {done:,}/{total:,} records ({share:.0%}), {rate:,.0f}/s"
        if self.tty:
            bar = "#" * int(share * 30)
            print(f"\r[{bar:<30}] {line}", end="", file=sys.stderr, flush=True)
        elif int(share * 10) > self.shown:
            self.shown = int(share * 10)
            print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    settings = CommonSettings()
    topics = Topics(settings.topic_prefix)
    progress = _Progress()

    from deploy.launcher.export_files import export

    async def go() -> dict[str, int]:
        if not (await topic_partitions(settings.kafka_bootstrap, [topics.ledger])).get(topics.ledger):
            raise LauncherError(f"no topic {topics.ledger} on {settings.kafka_bootstrap}")
        return await export(settings.kafka_bootstrap, topics, args.out, fmt=args.format, since=args.since,
                            until=args.until, tenant=args.tenant, flow=args.flow, progress=progress)  # fmt: skip

    counts = asyncio.run(go())
    if progress.tty:
        print(file=sys.stderr)
    print(" ".join(f"{name}={count}" for name, count in counts.items()), f"→ {args.out}")
    return 0
