"""Secrets at rest, without a broker or a database: the keyring and its key file, inline encryption of the
credentials masking hides, templates that reference the secrets store, and how the step runner opens them."""

from __future__ import annotations

import asyncio
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from schemas.events import ErrorCategory, ErrorInfo
from schemas.flows import MASK, mask_secrets
from services.common.crypto import (
    Keyring,
    SecretsKeyError,
    add_key_to_file,
    contains_ciphertext,
    decrypt_all,
    encode_key,
    encrypt_inline,
    ensure_key_file,
    inline_context,
    is_ciphertext,
    new_key,
    read_key_file,
    reencrypt_all,
)
from services.common.settings import CommonSettings
from services.common.templating import masked_secrets, render, secret_names, with_secrets
from services.executor.adapters.actions_base import StepOutcome
from services.executor.adapters.secret_inputs import PendingInput, resolve, scrub

CTX = inline_context("tenant-a")


@pytest.fixture
def ring() -> Keyring:
    return Keyring([new_key()])


# ---------------------------------------------------------------- the keyring


def test_round_trip_keeps_the_value_and_its_type(ring: Keyring) -> None:
    for value in ("hunter2", "", "ünïcode ✓", 12345, 1.5, True, {"user": "a", "pass": "b"}, ["x", 1]):
        token = ring.encrypt(value, CTX)
        assert is_ciphertext(token) and token.startswith(f"enc:v1:{ring.primary}:")
        assert ring.decrypt(token, CTX) == value
    assert ring.encrypt("same", CTX) != ring.encrypt("same", CTX)  # a fresh nonce each time


def test_a_wrong_key_another_context_or_a_changed_byte_is_refused(ring: Keyring) -> None:
    token = ring.encrypt("hunter2", CTX)
    with pytest.raises(SecretsKeyError, match="does not have"):
        Keyring([new_key()]).decrypt(token, CTX)
    with pytest.raises(SecretsKeyError, match="does not open"):
        ring.decrypt(token, inline_context("tenant-b"))
    body = token.rsplit(":", 1)[1]
    tampered = token[: -len(body)] + ("A" if body[0] != "A" else "B") + body[1:]
    with pytest.raises(SecretsKeyError):
        ring.decrypt(tampered, CTX)
    with pytest.raises(SecretsKeyError, match="not a Flowtrail ciphertext"):
        ring.decrypt("hunter2", CTX)


def test_rotation_keeps_old_ciphertexts_readable_and_moves_them_to_the_new_key(tmp_path: Path) -> None:
    path = tmp_path / "secrets.key"
    old_ring = Keyring(ensure_key_file(path), path)
    old_token = old_ring.encrypt("hunter2", CTX)
    new, old = add_key_to_file(path)
    assert read_key_file(path) == [new, *old]
    rotated = Keyring(read_key_file(path), path)
    assert rotated.primary != old_ring.primary and set(old_ring.key_ids) < set(rotated.key_ids)
    assert rotated.decrypt(old_token, CTX) == "hunter2"
    moved = rotated.reencrypt(old_token, CTX)
    assert moved.startswith(f"enc:v1:{rotated.primary}:") and rotated.decrypt(moved, CTX) == "hunter2"
    assert rotated.reencrypt(moved, CTX) == moved
    # A process that loaded the file before the rotation opens the new key's ciphertexts: it re-reads the file.
    assert old_ring.decrypt(moved, CTX) == "hunter2"
    config = {"dsn": f"postgresql://app:{old_token}@db/wh", "headers": {"Authorization": old_token}}
    assert decrypt_all(reencrypt_all(config, rotated, CTX), rotated, CTX) == decrypt_all(config, rotated, CTX)
    assert rotated.primary in reencrypt_all(config, rotated, CTX)["dsn"]


def _create(path: str) -> str:
    return encode_key(ensure_key_file(Path(path))[0])


def test_the_key_file_is_created_once_with_mode_600_even_by_processes_starting_at_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "secrets.key"
    with ProcessPoolExecutor(4) as pool:
        keys = set(pool.map(_create, [str(path)] * 16))
    assert len(keys) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["secrets.key"]  # no temporary file left behind


def test_settings_take_the_key_from_the_variable_or_the_state_folder(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("FLOWTRAIL_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("FLOWTRAIL_SECRETS_KEY", raising=False)
    monkeypatch.delenv("FLOWTRAIL_SECRETS_KEY_FILE", raising=False)
    ring = Keyring.from_settings(CommonSettings())
    assert (tmp_path / "secrets.key").exists() and ring.path == tmp_path / "secrets.key"
    keys = [new_key(), new_key()]
    monkeypatch.setenv("FLOWTRAIL_SECRETS_KEY", ",".join(encode_key(k) for k in keys))
    settings = CommonSettings()
    assert "FLOWTRAIL" not in repr(settings) and encode_key(keys[0]) not in repr(settings)
    from_env = Keyring.from_settings(settings)
    assert from_env.path is None and from_env.key_ids == [Keyring([k]).primary for k in keys]
    monkeypatch.setenv("FLOWTRAIL_SECRETS_KEY", "not-a-key")
    with pytest.raises(ValueError, match=r"32 bytes|base64url"):
        Keyring.from_settings(CommonSettings())


# ---------------------------------------------------------------- inline credentials


def _step_input() -> dict[str, Any]:
    return {
        "url": "https://api.example.com/v1/orders?api_key=k-123456&page=2",
        "headers": {"Authorization": "Bearer tok-abcdef", "X-Api-Key": "key-987654", "Accept": "application/json",
                    "Cookie": "sid={{ trigger.sid }}; theme=dark"},
        "dsn": "postgresql://app:pw-secret-1@db.example:5432/wh",
        "body": {"client_secret": "cs-555555", "count": 3, "password": 424242, "note": "{{ trigger.note }}"},
        "credentials": {"user": "user-314159", "pass": "p-777777"},
    }  # fmt: skip


def test_inline_encryption_hides_exactly_what_masking_hides_and_masks_the_same(ring: Keyring) -> None:
    plain = _step_input()
    encrypted = encrypt_inline(plain, ring, CTX)
    text = str(encrypted)
    for secret in (
        "k-123456",
        "tok-abcdef",
        "key-987654",
        "pw-secret-1",
        "cs-555555",
        "424242",
        "p-777777",
        "user-314159",
    ):
        assert secret not in text
    # What is not a credential stays readable, templates included (they are rendered when the step runs).
    assert encrypted["headers"]["Accept"] == "application/json" and encrypted["body"]["count"] == 3
    assert encrypted["body"]["note"] == "{{ trigger.note }}" and "{{ trigger.sid }}" in encrypted["headers"]["Cookie"]
    assert encrypted["dsn"].startswith("postgresql://app:enc:v1:") and encrypted["dsn"].endswith("@db.example:5432/wh")
    assert "page=2" in encrypted["url"]
    # Shown as before: the masked view of the encrypted input is the masked view of the plain one.
    assert mask_secrets(encrypted) == mask_secrets(plain)
    assert encrypt_inline(encrypted, ring, CTX) == encrypted  # idempotent
    assert contains_ciphertext(encrypted) and not contains_ciphertext(plain)


def test_the_runner_render_opens_what_the_definition_wrote_and_nothing_a_template_produced(ring: Keyring) -> None:
    encrypted = encrypt_inline(_step_input(), ring, CTX)
    smuggled = ring.encrypt("other-secret", CTX)
    context = {"trigger": {"sid": "s-1", "note": smuggled}}
    opened: list[Any] = []

    def literal(text: str) -> Any:
        from services.common.crypto import decrypt_text

        return decrypt_text(text, ring, CTX, opened)

    rendered = render(encrypted, context, literal)
    expected = render(_step_input(), context)
    assert rendered == expected  # every credential back, numbers as numbers
    assert rendered["body"]["note"] == smuggled  # trigger data is never decrypted
    assert "other-secret" not in opened and "tok-abcdef" in str(opened)


# ---------------------------------------------------------------- references to the secrets store


def test_secret_references_are_found_and_masked_where_decide_renders_them() -> None:
    spec = {"headers": {"Authorization": "Bearer {{ secrets.shop_token }}", "X-Trace": "{{ trigger.id }}"},
            "url": "https://x/{{ secrets.\"region\" }}/{{ join(',', [secrets.a1, 'x', vars.secrets.b || 'y']) }}",
            "n": "{{ steps.secrets.output }}"}  # fmt: skip
    assert secret_names(spec) == {"shop_token", "region", "a1"}
    context = with_secrets({"trigger": {"id": "t1"}, "vars": {}, "steps": {}}, masked_secrets(spec))
    shown = render(spec, context)
    assert shown["headers"]["Authorization"] == f"Bearer {MASK}"
    assert shown["url"] == f"https://x/{MASK}/{MASK},x,y"
    assert secret_names({"a": "secrets.x without braces", "b": "{{ trigger.secrets }}"}) == frozenset()


class _Reader:
    def __init__(self, ring: Keyring, values: dict[str, str]) -> None:
        self.keyring = ring
        self.values = values

    async def read(self, tenant_id: str, environment: str, names: Any) -> dict[str, str]:
        return {n: v for n, v in self.values.items() if n in names}


def _pending(ring: Keyring, template: dict[str, Any], trigger: Any = None) -> PendingInput:
    encrypted = encrypt_inline(template, ring, CTX)
    return PendingInput("tenant-a", "PRODUCTION", encrypted, {"trigger": trigger or {}}, secret_names(template), {})


def test_the_runner_resolves_references_and_a_missing_secret_is_a_validation_failure(ring: Keyring) -> None:
    template = {"headers": {"Authorization": "Bearer {{ secrets.tok }}", "X-Inline": "x", "X-Api-Key": "inline-key-1"},
                "echo": "{{ trigger.q }}"}  # fmt: skip
    reader: Any = _Reader(ring, {"tok": "store-value-1"})
    spec, texts = asyncio.run(resolve(_pending(ring, template, {"q": "{{ secrets.tok }}"}), reader))
    assert spec["headers"] == {"Authorization": "Bearer store-value-1", "X-Inline": "x", "X-Api-Key": "inline-key-1"}
    assert spec["echo"] == "{{ secrets.tok }}"  # a reference in trigger data is text, never resolved
    assert texts == {"store-value-1", "inline-key-1"}
    with pytest.raises(Exception) as failed:
        asyncio.run(resolve(_pending(ring, {"h": "{{ secrets.gone }}"}), reader))
    error = failed.value.error  # type: ignore[attr-defined]
    assert error.category == ErrorCategory.VALIDATION and error.code == "secret_not_found" and "gone" in error.message
    with pytest.raises(Exception) as unconfigured:
        asyncio.run(resolve(_pending(ring, {"h": "{{ secrets.tok }}"}), None))
    assert unconfigured.value.error.code == "secrets_unavailable"  # type: ignore[attr-defined]


def test_resolved_values_are_scrubbed_from_outputs_and_errors() -> None:
    outcome = StepOutcome(
        ok=False,
        output={"request": {"headers": {"X-Custom": "store-value-1"}}, "body": "echo: inline-key-1"},
        error=ErrorInfo(category=ErrorCategory.AUTH, message="GET https://x/?k=store-value-1 answered 401",
                        details={"sent": "inline-key-1"}),
        duration_ms=1.0,
    )  # fmt: skip
    clean = scrub(outcome, {"store-value-1", "inline-key-1"})
    assert "store-value-1" not in str(clean) and "inline-key-1" not in str(clean)
    assert clean.output["request"]["headers"]["X-Custom"] == MASK and clean.error is not None
    assert clean.error.message == f"GET https://x/?k={MASK} answered 401"
    assert scrub(outcome, set()) is outcome


def test_key_file_ignores_comments_and_refuses_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "k"
    key = new_key()
    path.write_text(f"# current\n{encode_key(key)}\n\n")
    assert read_key_file(path) == [key]
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no secrets key"):
        read_key_file(path)


# ---------------------------------------------------------------- decide records references masked; the runner resolves


def test_the_ledger_records_references_masked_and_the_runner_gets_them_from_the_store(ring: Keyring) -> None:
    from services.executor.adapters.steps import runner_input
    from services.executor.fold import fold_all
    from tests.unit.drive import Run, error, make_flow, make_trigger

    template = {"url": "https://erp.example.com/x", "headers": {"Authorization": "Bearer {{ secrets.erp }}",
                "X-Echo": "{{ secrets.erp }}", "X-Api-Key": "inline-key-1"}, "n": "{{ trigger.n }}"}  # fmt: skip
    sealed = encrypt_inline(template, ring, inline_context("t1"))  # drive's flows are tenant t1's
    flow = make_flow({"name": "call", "action": "http_request", "input": sealed}, retry={"delays_s": [1, 1]})
    run = Run(flow, make_trigger(payload={"n": 7}))
    run.start()
    [started] = run.of_type("StepStarted")
    assert started.payload.input["headers"] == {"Authorization": MASK, "X-Echo": MASK, "X-Api-Key": MASK}
    assert started.payload.input["n"] == 7
    assert run.state is not None and run.flow is not None
    reader: Any = _Reader(ring, {"erp": "store-value-9"})
    for state in (run.state, fold_all(run.events)):  # live, and rebuilt from the ledger after a crash
        pending = runner_input(state, run.flow.step("call"))  # type: ignore[arg-type]
        assert isinstance(pending, PendingInput) and pending.names == {"erp"}
        spec, texts = asyncio.run(resolve(pending, reader))
        assert spec["headers"] == {"Authorization": "Bearer store-value-9", "X-Echo": "store-value-9",
                                   "X-Api-Key": "inline-key-1"}  # fmt: skip
        assert spec["n"] == 7 and texts == {"store-value-9", "inline-key-1"}
    run.complete(ok=False, err=error("TRANSIENT"))
    run.fire_timer()
    assert run.of_type("StepStarted")[1].payload.input == started.payload.input
    assert isinstance(runner_input(run.state, run.flow.step("call")), PendingInput)


def test_subflow_and_human_input_steps_get_secrets_masked() -> None:
    from services.executor.adapters.steps import runner_input
    from tests.unit.drive import Run, make_flow, make_trigger

    flow = make_flow({"name": "ask", "action": "human_input",
                      "input": {"token": "{{ secrets.erp }}", "question": "ok?"}})  # fmt: skip
    run = Run(flow, make_trigger(payload={}))
    run.start()
    assert run.state is not None and run.flow is not None
    assert runner_input(run.state, run.flow.step("ask")) == {"token": MASK, "question": "ok?"}
