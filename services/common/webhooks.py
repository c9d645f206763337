"""Webhook signing (docs/api-contract.md) and the event names deliveries carry: one definition for sender and receiver.

X-Flowtrail-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{raw body}")>. A receiver
recomputes the HMAC over the raw body, compares in constant time, and rejects a timestamp older than
five minutes (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

from schemas.events import TERMINAL_EVENT_STATUS

TOLERANCE_S = 300

# Ledger event type → webhook event name: `run.started`, and one `run.<status>` per terminal status, derived from
# the one event → status table so that a new ending cannot go without its webhook.
RUN_EVENTS = {
    "RunStarted": "run.started",
    **{event_type: f"run.{status.lower()}" for event_type, status in TERMINAL_EVENT_STATUS.items()},
}
EVENT_NAMES = (*RUN_EVENTS.values(), "connector.degraded", "flow.paused")


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str | bytes, body: bytes, header: str, *, now: float | None = None,
           tolerance_s: float = TOLERANCE_S) -> bool:  # fmt: skip
    """What a receiver does: the signature matches this body and secret, and it is not stale.

    Total: any header string (or anything else) answers True or False, never raises. The header is
    comma-separated `key=value` items; `t` (ASCII digits, once) and at least one `v1` (64 hex digits; several
    are allowed, as during a secret rotation, and any one matching is enough); other keys are ignored.
    """
    if not isinstance(header, str) or len(header) > _MAX_HEADER:
        return False
    stamp: str | None = None
    given: list[str] = []
    for item in header.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            return False
        if key == "t":
            if stamp is not None:
                return False  # two timestamps: which one was signed is ambiguous
            stamp = value
        elif key == "v1":
            given.append(value)
    if stamp is None or not given or not _STAMP.fullmatch(stamp):
        return False
    t = int(stamp)
    try:
        current = time.time() if now is None else float(now)
        if not abs(current - t) <= tolerance_s:  # `not <=` so a NaN clock or tolerance is stale too
            return False
        key_bytes = secret.encode("utf-8", "surrogatepass") if isinstance(secret, str) else bytes(secret)
        expected = hmac.new(key_bytes, f"{t}.".encode() + bytes(body), hashlib.sha256).hexdigest()
    except (TypeError, ValueError, OverflowError):
        return False
    # Only well-formed candidates reach compare_digest (it refuses non-ASCII str); compared in constant time.
    return any(hmac.compare_digest(expected, v.lower()) for v in given if _MAC.fullmatch(v))


_MAX_HEADER = 8192
_STAMP = re.compile(r"[0-9]{1,12}", re.ASCII)
_MAC = re.compile(r"[0-9a-fA-F]{64}", re.ASCII)
