"""Webhook deliveries, the pure part (services/ingest/webhooks.py): hook URL tokens, every signature scheme, every
kind of body, the headers a run records, delivery ids; and the webhook options of a flow's trigger."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.flows import STORED_FLOW, TriggerConfig
from services.common.crypto import Keyring, new_key
from services.ingest import webhooks as wh

SECRET = "whsec_0123456789abcdef"
BODY = b'{"id":"evt_1","type":"invoice.paid"}'
NOW = 1_780_000_000
ADDRESS = wh.HookAddress("tenant-a", "PRODUCTION", "orders", 1)


def webhook(**options: object) -> TriggerConfig:
    return TriggerConfig.model_validate({"type": "webhook", **options})


HEX = webhook(signature_header="X-Hub-Signature-256", secret_name="gh")
B64 = webhook(signature_header="X-Signature", secret_name="s", signature_scheme="hmac-sha256-base64")
STRIPE = webhook(signature_header="Stripe-Signature", secret_name="s", signed_content="t.body", tolerance_s=300)
STRIPE_B64 = webhook(signature_header="Sig", secret_name="s", signed_content="t.body",
                     signature_scheme="hmac-sha256-base64")  # fmt: skip


def refused(call: object, *args: object) -> tuple[int, str]:
    with pytest.raises(wh.Refused) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value.status, caught.value.code


# ---------------------------------------------------------------- the hook URL token


def test_a_token_names_its_flow_and_opens_only_with_the_deployments_keys() -> None:
    ring = Keyring([new_key()])
    token = wh.hook_token(ring, ADDRESS)
    assert wh.open_hook_token(ring, token) == ADDRESS
    assert "tenant-a" not in token and "orders" not in token  # sealed, not merely signed
    assert token != wh.hook_token(ring, ADDRESS)  # each issue is new, and each opens
    assert wh.open_hook_token(Keyring([new_key()]), token) is None
    assert wh.open_hook_token(ring, token[:-2] + ("AA" if token[-2:] != "AA" else "BB")) is None
    for junk in ("", "x", "0000000.abc", "../../etc", "a" * 5000, "\x00", token.replace(".", ":")):
        assert wh.open_hook_token(ring, junk) is None


def test_a_token_outlives_a_key_rotation_while_the_old_key_is_kept() -> None:
    old, new = new_key(), new_key()
    token = wh.hook_token(Keyring([old]), ADDRESS)
    assert wh.open_hook_token(Keyring([new, old]), token) == ADDRESS
    assert wh.open_hook_token(Keyring([new]), token) is None


# ---------------------------------------------------------------- signatures


def _hex(content: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), content, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("header", [_hex(BODY), "sha256=" + _hex(BODY), _hex(BODY).upper()])
def test_hex_over_the_body_accepts_the_right_signature_plain_or_prefixed(header: str) -> None:
    wh.verify_signature(HEX, header, BODY, SECRET, NOW)


def test_base64_over_the_body_accepts_standard_and_url_safe_alphabets() -> None:
    digest = hmac.new(SECRET.encode(), BODY, hashlib.sha256).digest()
    wh.verify_signature(B64, base64.b64encode(digest).decode(), BODY, SECRET, NOW)
    wh.verify_signature(B64, base64.urlsafe_b64encode(digest).decode().rstrip("="), BODY, SECRET, NOW)
    assert wh.sign(B64, BODY, SECRET) == base64.b64encode(digest).decode()


@pytest.mark.parametrize("config", [HEX, B64, STRIPE, STRIPE_B64], ids=["hex", "base64", "t.body-hex", "t.body-b64"])
def test_every_scheme_refuses_a_missing_a_bad_and_a_wrong_secrets_signature(config: TriggerConfig) -> None:
    at = NOW if config.signed_content == "t.body" else None
    good = wh.sign(config, BODY, SECRET, at)
    wh.verify_signature(config, good, BODY, SECRET, NOW)
    assert refused(wh.verify_signature, config, None, BODY, SECRET, NOW) == (401, "signature_missing")
    assert refused(wh.verify_signature, config, "  ", BODY, SECRET, NOW) == (401, "signature_missing")
    assert refused(wh.verify_signature, config, wh.sign(config, BODY, "another", at), BODY, SECRET, NOW) == (
        401, "signature_invalid")  # fmt: skip
    assert refused(wh.verify_signature, config, good, BODY + b" ", SECRET, NOW) == (401, "signature_invalid")
    assert refused(wh.verify_signature, config, good, BODY, SECRET + "x", NOW) == (401, "signature_invalid")


def test_t_body_signs_the_timestamp_and_refuses_a_stale_one() -> None:
    header = wh.sign(STRIPE, BODY, SECRET, NOW - 1000)
    assert header == f"t={NOW - 1000},v1={_hex(f'{NOW - 1000}.'.encode() + BODY)}"
    assert refused(wh.verify_signature, STRIPE, header, BODY, SECRET, NOW) == (401, "signature_expired")
    wh.verify_signature(STRIPE, wh.sign(STRIPE, BODY, SECRET, NOW - 299), BODY, SECRET, NOW)
    wh.verify_signature(STRIPE, wh.sign(STRIPE, BODY, SECRET, NOW + 299), BODY, SECRET, NOW)  # a fast clock upstream
    # Moving the timestamp breaks the signature: it is signed.
    forged = header.replace(f"t={NOW - 1000}", f"t={NOW}")
    assert refused(wh.verify_signature, STRIPE, forged, BODY, SECRET, NOW) == (401, "signature_invalid")


def test_t_body_accepts_any_of_several_v1_signatures_as_during_a_secret_rotation() -> None:
    mac = wh.sign(STRIPE, BODY, SECRET, NOW).split("v1=")[1]
    wh.verify_signature(STRIPE, f"t={NOW},v1={'0' * 64},v0=abc,v1={mac}", BODY, SECRET, NOW)


@pytest.mark.parametrize("header", ["v1=abc", f"t={NOW}", f"t=,v1={'a' * 64}", f"t=1e9,v1={'a' * 64}",
                                    f"t={NOW},t={NOW},v1={'a' * 64}", "garbage", f"t={'9' * 40},v1=aa",
                                    "t=\u0661\u0662,v1=aa", "x" * 9000])  # fmt: skip
def test_a_malformed_t_body_header_is_refused_as_such(header: str) -> None:
    assert refused(wh.verify_signature, STRIPE, header, BODY, SECRET, NOW) == (401, "signature_malformed")


@given(st.text(max_size=300))
def test_any_header_is_refused_or_accepted_never_an_exception(header: str) -> None:
    for config in (HEX, B64, STRIPE, STRIPE_B64):
        try:
            wh.verify_signature(config, header, BODY, SECRET, NOW)
        except wh.Refused as exc:
            assert exc.status == 401
        else:
            raise AssertionError(f"accepted {header!r}")


# ---------------------------------------------------------------- bodies


def test_json_is_the_input_as_it_is() -> None:
    assert wh.decode_body("application/json", BODY) == {"id": "evt_1", "type": "invoice.paid"}
    assert wh.decode_body("application/vnd.github+json; charset=utf-8", b"[1, 2]") == [1, 2]
    assert wh.decode_body("application/json", b'"plain"') == "plain"


def test_a_form_is_an_object_and_a_repeated_field_a_list() -> None:
    body = b"name=Ada+Lovelace&tag=a&tag=b&empty=&city=Z%C3%BCrich"
    assert wh.decode_body("application/x-www-form-urlencoded", body) == {
        "name": "Ada Lovelace", "tag": ["a", "b"], "empty": "", "city": "Zürich"}  # fmt: skip


def test_text_is_a_string_under_text() -> None:
    assert wh.decode_body("text/plain", b"hello\nworld") == {"text": "hello\nworld"}
    assert wh.decode_body(None, b"no type") == {"text": "no type"}
    assert wh.decode_body("application/xml", b"<a/>") == {"text": "<a/>"}
    assert wh.decode_body("text/plain; charset=latin-1", "café".encode("latin-1")) == {"text": "café"}
    # Text is text: the six characters \u0000 are not a NUL.
    assert wh.decode_body("text/plain", b"\\u0000") == {"text": "\\u0000"}


@pytest.mark.parametrize("media", ["application/json", "text/plain", "application/x-www-form-urlencoded", None])
def test_an_empty_body_is_a_null_input(media: str | None) -> None:
    assert wh.decode_body(media, b"") is None


@pytest.mark.parametrize(
    ("media", "body", "code"),
    [
        ("application/json", b'{"a": "\\u0000"}', "invalid_request"),  # NUL as a JSON escape
        ("application/json", b'{"a": "\x00"}', "invalid_body"),  # a raw NUL byte
        ("application/json", b'{"a": "\\ud800"}', "invalid_request"),  # a lone surrogate
        ("application/json", b'{"a": 1', "invalid_body"),
        ("application/json", b"\xff\xfe{}", "invalid_body"),
        ("application/json", b'{"a": "\xed\xa0\x80"}', "invalid_body"),  # a surrogate encoded in UTF-8
        ("text/plain", b"a\x00b", "invalid_body"),
        ("text/plain", b"caf\xe9", "invalid_body"),  # Latin-1 sent as UTF-8
        ("text/plain", b"\xed\xa0\x80", "invalid_body"),
        (None, b"\x80", "invalid_body"),
        ("application/x-www-form-urlencoded", b"a=%00", "invalid_body"),
        ("application/x-www-form-urlencoded", b"a%00=1", "invalid_body"),
        ("application/x-www-form-urlencoded", b"a=%ff", "invalid_body"),
        ("application/x-www-form-urlencoded", b"a=%ed%a0%80", "invalid_body"),
        ("application/x-www-form-urlencoded", b"a=\xff", "invalid_body"),
    ],
)
def test_nul_and_bytes_that_are_not_text_are_refused_with_400(media: str | None, body: bytes, code: str) -> None:
    assert refused(wh.decode_body, media, body) == (400, code)


def test_a_json_number_out_of_range_is_refused() -> None:
    assert refused(wh.decode_body, "application/json", b'{"n": 1' + b"0" * 30 + b"}")[0] == 422


@pytest.mark.parametrize("media", ["application/octet-stream", "image/png", "multipart/form-data; boundary=x",
                                   "text/plain; charset=no-such-charset"])  # fmt: skip
def test_other_media_types_are_415(media: str) -> None:
    assert refused(wh.decode_body, media, b"x") == (415, "unsupported_media_type")


# ---------------------------------------------------------------- headers and deliveries


def test_recorded_headers_mask_credentials_and_signatures() -> None:
    headers = [("Content-Type", "application/json"), ("Authorization", "Basic dXNlcjpwYXNz"),
               ("X-Hub-Signature-256", "sha256=abc"), ("Cookie", "s=1"), ("X-Api-Key", "k"),
               ("X-Gitlab-Token", "t"), ("X-GitHub-Event", "push"), ("X-Trace", "a"), ("x-trace", "b")]  # fmt: skip
    assert wh.recorded_headers(headers, HEX) == {
        "content-type": "application/json", "authorization": "***", "x-hub-signature-256": "***",
        "cookie": "***", "x-api-key": "***", "x-gitlab-token": "***", "x-github-event": "push",
        "x-trace": "a, b",
    }  # fmt: skip
    custom = webhook(signature_header="X-Custom-Check", secret_name="s")
    assert wh.recorded_headers([("X-Custom-Check", "v")], custom) == {"x-custom-check": "***"}


def test_a_delivery_id_names_one_run_per_flow() -> None:
    config = webhook(delivery_id_header="X-GitHub-Delivery")
    assert wh.delivery_id([("x-github-delivery", "d-1")], config, None) == "d-1"
    assert wh.delivery_id([("idempotency-key", "d-1")], config, None) is None
    assert wh.delivery_id([("idempotency-key", "d-1")], webhook(), None) == "d-1"
    assert refused(wh.delivery_id, [("idempotency-key", "é")], webhook(), None) == (400, "invalid_request")
    assert refused(wh.delivery_id, [("idempotency-key", "x" * 256)], webhook(), None) == (400, "invalid_request")
    # Stripe sends no delivery header: its event id is in the body.
    stripe = webhook(delivery_id_path="id")
    assert wh.delivery_id([], stripe, {"id": "evt_1"}) == "evt_1"
    assert wh.delivery_id([("idempotency-key", "k")], stripe, {"id": "evt_1"}) == "k"  # the header first
    assert wh.delivery_id([], webhook(delivery_id_path="$.data.n"), {"data": {"n": 7}}) == "7"
    for body in (None, {"text": "x"}, {"id": None}, {"id": True}, {"id": {"a": 1}}, [1, 2]):
        assert wh.delivery_id([], stripe, body) is None
    assert refused(wh.delivery_id, [], stripe, {"id": "é"}) == (400, "invalid_request")
    run = wh.delivery_run_id(ADDRESS, "d-1")
    assert run == wh.delivery_run_id(ADDRESS, "d-1") and run.startswith("run_") and len(run) == 32
    assert run != wh.delivery_run_id(ADDRESS, "d-2")
    assert run != wh.delivery_run_id(wh.HookAddress("tenant-a", "PRODUCTION", "other", 1), "d-1")
    assert run != wh.delivery_run_id(wh.HookAddress("tenant-b", "PRODUCTION", "orders", 1), "d-1")


# ---------------------------------------------------------------- the trigger's options


def test_webhook_options_are_refused_on_other_trigger_types() -> None:
    with pytest.raises(ValidationError, match="signature_header, secret_name: only a webhook trigger"):
        TriggerConfig.model_validate({"type": "api", "signature_header": "X-Sig", "secret_name": "s"})
    with pytest.raises(ValidationError, match="value_format: only a kafka trigger takes these, not webhook"):
        TriggerConfig.model_validate({"type": "webhook", "value_format": "text"})


def test_a_signed_webhook_needs_its_header_and_its_secret() -> None:
    for half in ({"signature_header": "X-Sig"}, {"secret_name": "s"}):
        with pytest.raises(ValidationError, match="a signed webhook needs both"):
            webhook(**half)
    with pytest.raises(ValidationError):
        webhook(signature_header="Bad Header:", secret_name="s")
    with pytest.raises(ValidationError):
        webhook(signature_header="X-Sig", secret_name="not a name")
    with pytest.raises(ValidationError, match="delivery_id_path: invalid JMESPath"):
        webhook(delivery_id_path="data.[")
    # A stored version is read as it was published.
    stored = TriggerConfig.model_validate({"type": "webhook", "signature_header": "X"}, context=STORED_FLOW)
    assert stored.secret_name is None
