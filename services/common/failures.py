"""Failures classified into the error categories every run and check uses (TRANSIENT, AUTH, VALIDATION, CONFLICT,
INTERNAL): an HTTP status, a PostgreSQL SQLSTATE, a Kafka client error. Shared by the executor's step runners and the
API's connector verify, so a check and a run classify the same failure the same way."""

from __future__ import annotations

from typing import Any

from aiokafka import errors as kerr

from schemas.events import ErrorCategory, ErrorInfo
from schemas.flows import mask_text


class StepError(Exception):
    """A step (or a check) failed in a known way: its ErrorInfo (category, message, code…) and what it produced."""

    def __init__(self, category: ErrorCategory, message: str, *, output: Any = None, **info: Any) -> None:
        super().__init__(message)
        self.error = ErrorInfo(category=category, message=message, **info)
        self.output = output


def masked_message(exc: BaseException) -> str:
    """`Type: message` with any password a client library echoed (a DSN, a URL) hidden."""
    text = str(exc) or type(exc).__name__
    return mask_text(f"{type(exc).__name__}: {text}")


def classify_status(status: int) -> ErrorCategory:
    """HTTP status → error category (docs/architecture.md#vocabulary)."""
    if status in (401, 403):
        return ErrorCategory.AUTH
    if status == 409:
        return ErrorCategory.CONFLICT
    if status in (408, 425, 429) or status >= 500:
        return ErrorCategory.TRANSIENT
    return ErrorCategory.VALIDATION


def classify_sqlstate(sqlstate: str | None) -> ErrorCategory:
    """SQLSTATE → error category (docs/architecture.md#vocabulary): retry what may pass later, surface what will not."""
    state = sqlstate or ""
    if state == "42501" or state.startswith("28"):  # insufficient privilege, invalid authorization
        return ErrorCategory.AUTH
    if state in ("23505", "40001", "40P01", "55P03"):  # duplicate key, serialization, deadlock, lock not available
        return ErrorCategory.CONFLICT
    if state.startswith(("08", "53", "57", "58", "XX")):  # connection, resources, canceled/shutdown, system
        return ErrorCategory.TRANSIENT
    return ErrorCategory.VALIDATION  # data, integrity, syntax, undefined objects, read-only transaction…


_AUTH_ERRORS = (
    kerr.TopicAuthorizationFailedError, kerr.GroupAuthorizationFailedError, kerr.ClusterAuthorizationFailedError,
    kerr.TransactionalIdAuthorizationFailed, kerr.SaslAuthenticationFailed, kerr.AuthenticationFailedError,
    kerr.UnsupportedSaslMechanismError,
)  # fmt: skip
_CONFLICT_ERRORS = (kerr.CommitFailedError, kerr.IllegalGenerationError, kerr.UnknownMemberIdError,
                    kerr.RebalanceInProgressError)  # fmt: skip


def classify_kafka(exc: BaseException) -> ErrorCategory:
    """Kafka client error → error category (docs/architecture.md#vocabulary)."""
    if isinstance(exc, _AUTH_ERRORS):
        return ErrorCategory.AUTH
    if isinstance(exc, _CONFLICT_ERRORS):  # the group is in use by live members: its position moved
        return ErrorCategory.CONFLICT
    if isinstance(exc, kerr.KafkaTimeoutError | kerr.KafkaConnectionError | OSError | TimeoutError):
        return ErrorCategory.TRANSIENT
    if getattr(exc, "retriable", False):
        return ErrorCategory.TRANSIENT
    return ErrorCategory.VALIDATION  # too large, invalid topic, bad configuration…
