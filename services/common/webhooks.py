"""Webhook signing (seed 003) and the event names deliveries carry: one definition for sender and receiver.

X-Flowtrail-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{raw body}")>. A receiver
recomputes the HMAC over the raw body, compares in constant time, and rejects a timestamp older than
five minutes (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import time

TOLERANCE_S = 300

# Ledger event type → webhook event name.
RUN_EVENTS = {
    "RunStarted": "run.started",
    "RunSucceeded": "run.succeeded",
    "RunPartiallySucceeded": "run.partial",
    "RunFailed": "run.failed",
}
EVENT_NAMES = (*RUN_EVENTS.values(), "connector.degraded", "flow.paused")


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, now: float | None = None, tolerance_s: int = TOLERANCE_S) -> bool:
    """What a receiver does: the signature matches this body and secret, and it is not stale."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        t = int(parts["t"])
        given = parts["v1"]
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given)
