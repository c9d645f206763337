"""Webhook deliveries, the pure part (docs/intake.md#webhook-triggers): a flow's hook URL token, the upstream's
signature checked, its body decoded into the run input, its headers as the run records them, and its delivery id.
The route that does the I/O around these is services/ingest/routes/webhooks.py.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson

from schemas.flows import MASK, TriggerConfig, is_secret_key
from services.common.crypto import PREFIX, Keyring, SecretsKeyError
from services.common.http import body_problem
from services.common.idempotency import MAX_KEY_LENGTH, derived_run_ids
from services.common.templating import TemplateError, evaluate

# A text body becomes the run input `{"text": <body>}`.
TEXT_KEY = "text"
_TOKEN_CONTEXT = "webhook-url"
_TOKEN = re.compile(r"([0-9a-f]{8})\.([A-Za-z0-9_\-]{38,1000})")
_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")
_TEXT_TYPES = ("application/xml", "application/x-ndjson", "application/yaml")
_SIGNATURE_NAMES = ("signature", "hmac")
_MAX_HEADER = 8192


class Refused(Exception):
    """A delivery refused: the HTTP status, the error code and the message the upstream gets."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class HookAddress:
    """What a hook URL's token names: the flow (tenant, environment, id) and the URL generation it was issued in."""

    tenant_id: str
    environment: str
    flow_id: str
    generation: int


# ---------------------------------------------------------------- the hook URL


def hook_token(keyring: Keyring, address: HookAddress) -> str:
    """An unguessable token naming the flow: its address encrypted and authenticated with the secrets key (AES-GCM),
    so ingest needs no table to resolve it, and every token issued stays valid while its key is in the keyring and
    the flow's `url_generation` is unchanged."""
    plain = [address.tenant_id, address.environment, address.flow_id, address.generation]
    sealed = keyring.encrypt(plain, _TOKEN_CONTEXT)
    kid, body = sealed[len(PREFIX) :].split(":", 1)
    return f"{kid}.{body}"


def open_hook_token(keyring: Keyring, token: str) -> HookAddress | None:
    """The address a token names, or None for anything that is not a token this deployment issued."""
    m = _TOKEN.fullmatch(token)
    if m is None:
        return None
    try:
        plain = keyring.decrypt(f"{PREFIX}{m.group(1)}:{m.group(2)}", _TOKEN_CONTEXT)
    except SecretsKeyError:
        return None
    tenant_id, environment, flow_id, generation = plain
    return HookAddress(tenant_id, environment, flow_id, generation)


# ---------------------------------------------------------------- the signature


def verify_signature(trigger: TriggerConfig, header: str | None, body: bytes, secret: str, now: float) -> None:
    """Refused (401) unless `header` holds an HMAC-SHA256 of the signed content under `secret`, compared in
    constant time. `body`: the header is the signature, optionally `sha256=`-prefixed (GitHub). `t.body`: the header
    is Stripe's `t=<unix time>,v1=<signature>[,v1=…]` over `<t>.<body>`, and `t` must be within `tolerance_s`."""
    name = trigger.signature_header
    if header is None or not header.strip():
        raise Refused(401, "signature_missing", f"the delivery has no {name} header; it must be signed")
    if trigger.signed_content == "body":
        content, candidates, sent_at = body, [_strip_prefix(header.strip())], None
    else:
        sent_at, candidates = _stripe_header(header, name)
        content = str(sent_at).encode() + b"." + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    if not any(hmac.compare_digest(digest, _decoded(c, trigger.signature_scheme)) for c in candidates):
        raise Refused(401, "signature_invalid",
                      f"the {name} header does not match the delivery ({trigger.signature_scheme} of "
                      f"{'the body' if trigger.signed_content == 'body' else '<t>.<body>'})")  # fmt: skip
    if sent_at is not None and abs(now - sent_at) > trigger.tolerance_s:
        raise Refused(401, "signature_expired",
                      f"the {name} timestamp t={sent_at} is {abs(now - sent_at):.0f} s from now; at most "
                      f"{trigger.tolerance_s} s are accepted (a replayed delivery?)")  # fmt: skip


def sign(trigger: TriggerConfig, body: bytes, secret: str, at: int | None = None) -> str:
    """The header value an upstream sends for `body` (tests and docs examples use it)."""
    content = body if at is None else str(at).encode() + b"." + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    value = digest.hex() if trigger.signature_scheme == "hmac-sha256-hex" else base64.b64encode(digest).decode()
    return value if at is None else f"t={at},v1={value}"


def _strip_prefix(value: str) -> str:
    return value[7:] if value.lower().startswith("sha256=") else value


def _stripe_header(header: str, name: str | None) -> tuple[int, list[str]]:
    sent_at: int | None = None
    stamps = 0
    candidates = []
    for part in header.split(",") if len(header) <= _MAX_HEADER else ():
        key, _, value = part.strip().partition("=")
        if key == "t":
            stamps += 1  # two timestamps: which one was signed is ambiguous
            if value.isascii() and value.isdigit() and len(value) <= 12:
                sent_at = int(value)
        elif key == "v1" and value:
            candidates.append(value)
    if sent_at is None or stamps != 1 or not candidates:
        raise Refused(401, "signature_malformed", f"the {name} header must be `t=<unix time>,v1=<signature>`")
    return sent_at, candidates


def _decoded(value: str, scheme: str) -> bytes:
    """The signature's bytes, or b"" (which matches nothing) when it is not hex / base64."""
    try:
        if scheme == "hmac-sha256-hex":
            return bytes.fromhex(value)
        return base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4), validate=True)
    except (ValueError, binascii.Error):
        return b""


# ---------------------------------------------------------------- the body


def decode_body(content_type: str | None, body: bytes) -> Any:
    """The run input a delivery's body becomes: JSON as it is, a form as an object (a repeated field as a list),
    text as `{"text": …}`, an empty body as null. Refused: JSON that does not parse, bytes that are not text in
    their charset (UTF-8 by default), NUL characters (PostgreSQL stores none), and other media types (415)."""
    if not body:
        return None
    media, charset = _media_type(content_type)
    if _JSON_TYPE.match(media):
        if (problem := body_problem(body)) is not None:
            raise Refused(*problem)
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise Refused(400, "invalid_body", f"body: not JSON ({exc})") from None
        return _without_nul(value)
    if media == "application/x-www-form-urlencoded":
        text = _text(body, charset or "utf-8")
        try:
            fields = parse_qsl(text, keep_blank_values=True, encoding=charset or "utf-8", errors="strict")
        except UnicodeDecodeError as exc:
            raise Refused(400, "invalid_body", f"body: a form field is not {charset or 'utf-8'} text ({exc})") from None
        form: dict[str, Any] = {}
        for key, value in fields:
            held = form.get(key)
            form[key] = value if held is None else [*held, value] if isinstance(held, list) else [held, value]
        return _without_nul(form)
    if not media or media.startswith("text/") or media in _TEXT_TYPES:
        return _without_nul({TEXT_KEY: _text(body, charset or "utf-8")})
    raise Refused(415, "unsupported_media_type",
                  f"Content-Type {media!r}: a webhook takes JSON, a form (application/x-www-form-urlencoded) "
                  "or text")  # fmt: skip


def _media_type(content_type: str | None) -> tuple[str, str | None]:
    if not content_type:
        return "", None
    media, *params = content_type.split(";")
    charset = None
    for param in params:
        key, _, value = param.strip().partition("=")
        if key.lower() == "charset":
            charset = value.strip().strip('"').lower() or None
    if charset is not None:
        try:
            codecs.lookup(charset)
        except LookupError:
            raise Refused(415, "unsupported_media_type", f"charset {charset!r} is not known") from None
    return media.strip().lower(), charset


def _text(body: bytes, charset: str) -> str:
    try:
        return body.decode(charset)
    except UnicodeDecodeError as exc:
        raise Refused(400, "invalid_body", f"body: not {charset} text: {exc.reason} at byte {exc.start}") from None


def _without_nul(value: Any) -> Any:
    if _has_nul(value):
        raise Refused(400, "invalid_body", "body: a NUL character is not accepted")
    return value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


# ---------------------------------------------------------------- headers and the delivery


def recorded_headers(headers: Iterable[tuple[str, str]], trigger: TriggerConfig) -> dict[str, str]:
    """The request's headers as the run records them: names in lower case, repeats joined with `, `, and the value
    of every credential (Authorization, Cookie, `*-Api-Key`, `*token*`…) and signature header `***`."""
    signature = (trigger.signature_header or "").lower()
    out: dict[str, str] = {}
    for raw_name, value in headers:
        name = raw_name.lower()
        if name == signature or is_secret_key(name) or any(s in name for s in _SIGNATURE_NAMES) or "token" in name:
            value = MASK
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def delivery_id(headers: Iterable[tuple[str, str]], trigger: TriggerConfig, run_input: Any) -> str | None:
    """The upstream's id of this delivery: its `delivery_id_header`, else what `delivery_id_path` finds in the
    decoded body (a string or an integer); None without either. 400 when it is not 1 to 255 printable ASCII
    characters."""
    wanted = trigger.delivery_id_header.lower()
    value = next((v for n, v in headers if n.lower() == wanted), None)
    where = trigger.delivery_id_header
    if value is None and trigger.delivery_id_path is not None:
        where = f"the body's {trigger.delivery_id_path}"
        try:
            found = evaluate(trigger.delivery_id_path, run_input)
        except TemplateError:
            found = None
        value = str(found) if isinstance(found, str | int) and not isinstance(found, bool) else None
    if value is None:
        return None
    if not 0 < len(value) <= MAX_KEY_LENGTH or not value.isascii() or not value.isprintable():
        raise Refused(400, "invalid_request", f"{where} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    return value


def delivery_run_id(address: HookAddress, delivery: str) -> str:
    """The run of a delivery: derived like a keyed trigger's (services/common/idempotency.py), so every redelivery
    names the same run and the executor starts it once (invariant 9). The key holds a control character, which no
    Idempotency-Key can, so it never meets a trigger's."""
    return derived_run_ids(address.tenant_id, address.environment, f"webhook\x1f{address.flow_id}\x1f{delivery}", 1)[0]
