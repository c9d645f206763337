"""Step inputs that hold secrets: `{{ secrets.NAME }}` references to the tenant's store and inline credentials the
API encrypted (`enc:v1:…`). The ledger records them masked (decide renders references as `***`); the step runner
renders them for real right before the call, and scrubs the values from what the step returns (docs/secrets.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import asyncpg

from schemas.events import ErrorCategory
from services.common.crypto import PREFIX, SecretsKeyError, decrypt_text, inline_context, plaintexts, redact
from services.common.secretstore import SecretReader
from services.common.templating import TemplateError, render, with_secrets
from services.executor.adapters.actions_base import StepError, StepOutcome


@dataclass(frozen=True, slots=True)
class PendingInput:
    """A step input still to be rendered with its secrets (by StepRunners.run, inside the step's failure handling)."""

    tenant_id: str
    environment: str
    template: dict[str, Any]  # the step's input as the definition wrote it
    context: dict[str, Any]  # the context decide rendered it from
    names: frozenset[str]  # the secrets it references
    extra: dict[str, Any]  # what decide added after rendering (a sync_records step's window)


async def resolve(pending: PendingInput, reader: SecretReader | None) -> tuple[Any, set[str]]:
    """The input with secrets and inline credentials in place, and the texts to scrub from the step's outcome.
    A missing secret is a VALIDATION failure (`secret_not_found`); an unreachable store is TRANSIENT."""
    if reader is None:
        raise StepError(ErrorCategory.VALIDATION, "this executor has no secrets store", code="secrets_unavailable")
    try:
        values = await reader.read(pending.tenant_id, pending.environment, pending.names) if pending.names else {}
    except SecretsKeyError as exc:
        raise StepError(ErrorCategory.VALIDATION, f"a secret cannot be decrypted: {exc}",
                        code="secret_undecryptable") from None  # fmt: skip
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StepError(ErrorCategory.TRANSIENT, f"the secrets store is unreachable ({type(exc).__name__})",
                        code="secrets_unavailable") from None  # fmt: skip
    missing = sorted(pending.names - values.keys())
    if missing:
        listed = ", ".join(repr(n) for n in missing)
        raise StepError(
            ErrorCategory.VALIDATION,
            f"no secret named {listed} among the tenant's {pending.environment} secrets (PUT /v1/secrets/{{name}})",
            code="secret_not_found",
            details={"secrets": missing},
        )
    opened: list[Any] = []
    ring, context = reader.keyring, inline_context(pending.tenant_id)

    def literal(text: str) -> Any:
        return decrypt_text(text, ring, context, opened) if PREFIX in text else text

    try:
        rendered = render(pending.template, with_secrets(pending.context, values), literal)
    except TemplateError as exc:
        raise StepError(ErrorCategory.VALIDATION, str(exc), code="template_error") from None
    except SecretsKeyError as exc:
        raise StepError(ErrorCategory.VALIDATION, f"an encrypted credential in the step input cannot be decrypted: "
                        f"{exc}", code="secret_undecryptable") from None  # fmt: skip
    if isinstance(rendered, dict) and pending.extra:
        rendered = {**rendered, **pending.extra}
    return rendered, plaintexts([*values.values(), *opened])


def scrub(outcome: StepOutcome, texts: set[str]) -> StepOutcome:
    """The outcome with every resolved secret replaced by `***`, wherever the step echoed it (a request it shows,
    an error message, a transform's output)."""
    if not texts:
        return outcome
    error = outcome.error
    if error is not None:
        error = error.model_copy(
            update={"message": redact(error.message, texts), "details": redact(error.details, texts)}
        )
    return dataclasses.replace(outcome, output=redact(outcome.output, texts), error=error)
