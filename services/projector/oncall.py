"""On-call pages for Flowtrail's own bugs, as a pure decision: runs that failed INTERNAL in, pages out (docs/alerts.md).

A run failing with the INTERNAL error category (or ending INTERNAL_ERROR) is a Flowtrail defect, not the flow's:
the deployment's on-call hears of it without any rule, once per error fingerprint per window, so a bug that
breaks a thousand runs pages once an hour rather than a thousand times.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

_NS = uuid.UUID("0b6f6c39-1c9e-4c55-8a77-2f7d0f1e6a41")


@dataclass(frozen=True, slots=True)
class Failure:
    """A run that failed with an INTERNAL error, as the page shows it."""

    run_id: str
    tenant_id: str
    environment: str
    flow_id: str
    fingerprint: str
    message: str
    at: datetime


def due(failures: Iterable[Failure], last_paged: Mapping[str, datetime], window: timedelta) -> list[Failure]:
    """The failures that page, in event-time order: the first of each fingerprint, then the next one at least
    `window` after the last page of that fingerprint (`last_paged`: fingerprint → when it last paged)."""
    last = dict(last_paged)
    pages: list[Failure] = []
    for f in sorted(failures, key=lambda f: (f.at, f.run_id)):
        previous = last.get(f.fingerprint)
        if previous is not None and f.at - previous < window:
            continue
        last[f.fingerprint] = f.at
        pages.append(f)
    return pages


def page_id(f: Failure) -> str:
    return "page_" + uuid.uuid5(_NS, f"{f.fingerprint}:{f.run_id}").hex[:20]


def body(f: Failure, window: timedelta) -> dict[str, Any]:
    """What the on-call webhook receives."""
    return {
        "id": page_id(f),
        "event": "flowtrail.internal_error",
        "created_at": f.at.isoformat(),
        "summary": f"Flowtrail internal error in run {f.run_id} (tenant {f.tenant_id}, flow {f.flow_id}): {f.message}",
        "data": {
            "run_id": f.run_id,
            "tenant_id": f.tenant_id,
            "environment": f.environment,
            "flow_id": f.flow_id,
            "fingerprint": f.fingerprint,
            "message": f.message,
            "failed_at": f.at.isoformat(),
            "window_s": window.total_seconds(),
        },
    }
