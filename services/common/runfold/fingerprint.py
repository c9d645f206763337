"""Error fingerprints and endpoint routes: the normalisations behind failure groups and coverage. Pure."""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlsplit

# One pass over the message, the first alternative that matches wins: whole tokens that vary per
# run (URLs, ids, quoted values, times) before bare numbers, so a URL's host keeps its digits.
_VARIABLE = re.compile(
    r"(?P<url>https?://[^\s'\"]+)"
    r"|(?P<uuid>\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b)"
    r"|(?P<email>[\w.+-]+@[\w-]+\.[\w.-]+)"
    # A short lowercase prefix, an underscore and a tail with a digit: Flowtrail's own ids (run_, run_child_,
    # run_sched_, del_, con_…) and most APIs' (cus_NffrFeUfNV2Hib).
    r"|(?P<id>\b[a-z]{2,10}_(?=[0-9A-Za-z_-]*\d)[0-9A-Za-z_-]{4,}\b)"
    r"|(?P<time>\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)"
    r"|(?P<hex>\b(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{12,}\b)"
    # Business keys keep their prefix, whatever the number's length: SO-7 and SO-1042 are both SO-<n>.
    r"|(?P<key>\b[A-Za-z]{1,10}-\d+\b)"
    # Opaque ids: letters and at least two digits mixed, six characters or more (u-bdb68b43, a1b2c3).
    r"|(?P<opaque>\b(?=[A-Za-z-]*\d[A-Za-z-]*\d)(?=[0-9-]*[A-Za-z])[0-9A-Za-z][0-9A-Za-z-]{5,}\b)"
    # A quote opens a value only where a word does not end: the apostrophe of "flow's" or "can't" is no quote.
    r"|(?P<str>(?<![A-Za-z])'[^']*'|\"[^\"]*\")"
    r"|(?P<n>\b\d+(?:\.\d+)?\b)"
)


def _replace(match: re.Match[str]) -> str:
    kind = match.lastgroup or "n"
    if kind == "url":
        return _url_pattern(match.group(0))
    if kind == "key":
        return match.group(0).rsplit("-", 1)[0] + "-<n>"
    return f"<{kind}>"


_ID_SEGMENT = re.compile(
    r"^(?:\d+"  # 42
    r"|[0-9a-fA-F-]{16,}"  # uuids, long hex
    r"|[A-Za-z]+[-_]\d[\w-]*"  # SO-1042
    r"|[a-z]{2,10}_(?=[\w-]*\d)[\w-]{4,}"  # run_child_8d7c…, cus_NffrFeUfNV2Hib
    r"|(?=[A-Za-z-]*\d[A-Za-z-]*\d)(?=[0-9-]*[A-Za-z])[0-9A-Za-z][0-9A-Za-z-]{5,})$"  # u-bdb68b43
)


def _url_pattern(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{route(parts.path)}"


def normalise(message: str) -> str:
    """`GET https://x/orders/42 answered 503` → `GET https://x/orders/{id} answered <n>`."""
    return re.sub(r"\s+", " ", _VARIABLE.sub(_replace, message.strip()))[:500]


def fingerprint(flow_id: str, step: str | None, category: str, message: str) -> tuple[str, str]:
    """(fingerprint, message pattern): equal for errors that differ only in ids, numbers and quoted values."""
    pattern = normalise(message)
    digest = hashlib.sha256(f"{flow_id}\x00{step or ''}\x00{category}\x00{pattern}".encode()).hexdigest()
    return digest[:20], pattern


def route(path: str) -> str:
    """`/orders/SO-1042/lines/7` → `/orders/{id}/lines/{id}`: ids in a path do not make new endpoints."""
    segments = [("{id}" if _ID_SEGMENT.match(s) else s) for s in (path or "/").split("/")]
    return "/".join(segments) or "/"


def endpoint(method: str, url: str) -> tuple[str, str, str] | None:
    """(METHOD, host, route) of an http_request step's URL, or None when the URL has no host."""
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return method.upper(), host, route(parts.path)
