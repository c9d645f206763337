"""Values a caller picks from a closed list, in a query string or a body: read and checked one way, with one
message that names what is accepted."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from services.common.http import ApiError


def many(values: Iterable[str] | None) -> list[str]:
    """A repeated or comma-separated parameter: `?status=FAILED&status=PARTIAL` or `?status=FAILED,PARTIAL`."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def one_of(name: str, values: list[str], accepted: Collection[str]) -> list[str]:
    """The values lower-cased (the accepted ones are lower case), or a 422 naming the first unknown one."""
    unknown = [v for v in values if v.lower() not in accepted]
    if unknown:
        raise ApiError(422, "validation_error", f"{name}: unknown {unknown[0]!r}; accepted: {', '.join(accepted)}")
    return sorted({v.lower() for v in values})


def known(values: list[str], accepted: Collection[str], noun: str) -> list[str]:
    """For a body field's validator: the values sorted and once each, or a ValueError naming the unknown ones."""
    unknown = sorted(set(values) - set(accepted))
    if unknown:
        raise ValueError(f"unknown {noun}(s) {', '.join(unknown)}; {noun}s: {', '.join(accepted)}")
    return sorted(set(values))
