"""Secrets at rest: the keyring, self-describing ciphertexts, and inline credentials encrypted at the edge.

A ciphertext is one string, `enc:v1:<key id>:<base64url(nonce ‖ AES-256-GCM ciphertext ‖ tag)>`, so it fits
anywhere a credential was (a header value, a DSN's password, a `key=value` parameter) and names the key that
opens it. The key id is derived from the key (8 hex digits of a SHA-256), so a key file is just keys.

Every ciphertext is bound to a context (GCM associated data): `inline:<tenant>` for credentials inside flow
definitions and connector configs, `secret:<tenant>:<environment>:<name>` for the secrets store. A ciphertext
copied to another tenant, or to another secret's row, does not decrypt.

The keys come from `FLOWTRAIL_SECRETS_KEY` (comma-separated, the first encrypts) or from the key file
(`FLOWTRAIL_SECRETS_KEY_FILE`, default `<state dir>/secrets.key`, one key a line, the first encrypts), which is
created with mode 600 when missing. Rotation puts a new key first and keeps the old ones for what cannot be
rewritten (the flows topic). See docs/secrets.md.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas.flows import MASK, FlowDefinition, any_text, is_secret_key

PREFIX = "enc:v1:"
TOKEN = re.compile(r"enc:v1:([0-9a-f]{8}):([A-Za-z0-9_\-]{38,})")
KEY_BYTES = 32
_NONCE_BYTES = 12
# Plaintext tags: a string decrypts to a string, anything else to the JSON value it was.
_STR, _JSON = b"s", b"j"
# How often a keyring backed by a file looks at the file for a rotation made by another process.
_RELOAD_S = 1.0
# Resolved values shorter than this are not scrubbed from step outputs (every "a" would become "***").
MIN_REDACTED_CHARS = 3

_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/?#@\s]*:)([^@\s/?#]+)(@)")
_KEY_VALUE = re.compile(r"(^|[?&;\s])([A-Za-z0-9_.\-]+)=([^&;#\s]*)")
_TEMPLATE = re.compile(r"\{\{\s*(.+?)\s*\}\}")


class SecretsKeyError(ValueError):
    """A ciphertext that does not open: an unknown key id, another context (tenant, name), or tampered."""


class KeySettings(Protocol):
    state_dir: Path

    @property
    def secrets_key_value(self) -> str: ...

    @property
    def secrets_key_path(self) -> Path: ...


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"flowtrail-secrets-key:" + key).hexdigest()[:8]


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


def decode_keys(text: str) -> list[bytes]:
    """Keys as written in the key file (one a line, `#` comments) or in FLOWTRAIL_SECRETS_KEY (comma-separated)."""
    keys = []
    for line in text.replace(",", "\n").splitlines():
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            key = base64.urlsafe_b64decode(item + "=" * (-len(item) % 4))
        except ValueError:
            raise ValueError("a secrets key is not base64url") from None
        if len(key) != KEY_BYTES:
            raise ValueError(f"a secrets key must be {KEY_BYTES} bytes (base64url), not {len(key)}")
        keys.append(key)
    return keys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ---------------------------------------------------------------- the key file


def _write_private(path: Path, keys: Sequence[bytes]) -> Path:
    """A new file next to `path`, mode 600, holding the keys; the caller links or renames it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, ("".join(f"{encode_key(k)}\n" for k in keys)).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def read_key_file(path: Path) -> list[bytes]:
    keys = decode_keys(path.read_text())
    if not keys:
        raise ValueError(f"{path} holds no secrets key")
    return keys


def ensure_key_file(path: Path) -> list[bytes]:
    """The file's keys; a missing file is created with one new key, mode 600. Processes starting at once agree:
    the file appears complete in one step (a link of a finished file, which fails if another won) and every
    process then reads the one that exists."""
    try:
        return read_key_file(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_private(path, [new_key()])
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process created it first: use that one
    finally:
        os.unlink(tmp)
    return read_key_file(path)


def add_key_to_file(path: Path) -> tuple[bytes, list[bytes]]:
    """Rotation: a new key first in the file, the previous ones kept after it (atomic replace, mode 600)."""
    old = ensure_key_file(path)
    key = new_key()
    os.replace(_write_private(path, [key, *old]), path)
    return key, old


# ---------------------------------------------------------------- the keyring


class Keyring:
    """Encrypts with the first key, decrypts with any. Backed by a file, it notices a rotation made by another
    process (the file changed) and picks the new key up: a secret re-encrypted under it still opens here."""

    def __init__(self, keys: Sequence[bytes], path: Path | None = None) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self.path = path
        self._set(keys)
        self._checked = time.monotonic()
        self._stamp = self._file_stamp()

    def _set(self, keys: Sequence[bytes]) -> None:
        self._keys = {key_id(k): AESGCM(k) for k in keys}
        self.primary = key_id(keys[0])

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino

    def _refresh(self, force: bool = False) -> None:
        if self.path is None or (not force and time.monotonic() - self._checked < _RELOAD_S):
            return
        self._checked = time.monotonic()
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return
        try:
            self._set(read_key_file(self.path))
            self._stamp = stamp
        except (OSError, ValueError):
            pass  # keep the keys we have; the file may be mid-edit by hand

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    @classmethod
    def from_settings(cls, settings: KeySettings) -> Keyring:
        if settings.secrets_key_value:
            return cls(decode_keys(settings.secrets_key_value))
        path = settings.secrets_key_path
        return cls(ensure_key_file(path), path)

    def encrypt(self, value: Any, context: str) -> str:
        self._refresh()
        payload = _STR + value.encode() if isinstance(value, str) else _JSON + orjson.dumps(value)
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._keys[self.primary].encrypt(nonce, payload, context.encode())
        return f"{PREFIX}{self.primary}:{_b64(nonce + sealed)}"

    def decrypt(self, token: str, context: str) -> Any:
        m = TOKEN.fullmatch(token)
        if m is None:
            raise SecretsKeyError("not a Flowtrail ciphertext")
        kid, body = m.groups()
        if kid not in self._keys:
            self._refresh(force=True)
        aead = self._keys.get(kid)
        if aead is None:
            raise SecretsKeyError(f"encrypted with key {kid}, which this process does not have")
        try:
            raw = _unb64(body)
            payload = aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], context.encode())
        except (InvalidTag, ValueError):
            raise SecretsKeyError(
                f"a ciphertext of key {kid} does not open here (another tenant or tampered)"
            ) from None
        return payload[1:].decode() if payload[:1] == _STR else orjson.loads(payload[1:])

    def reencrypt(self, token: str, context: str) -> str:
        """The same value under the current key (unchanged when it already is)."""
        if token.startswith(f"{PREFIX}{self.primary}:"):
            return token
        return self.encrypt(self.decrypt(token, context), context)


def is_ciphertext(value: Any) -> bool:
    return isinstance(value, str) and TOKEN.fullmatch(value) is not None


def contains_ciphertext(value: Any) -> bool:
    return any_text(value, lambda text: PREFIX in text)


def inline_context(tenant_id: str) -> str:
    return f"inline:{tenant_id}"


def store_context(tenant_id: str, environment: str, name: str) -> str:
    return f"secret:{tenant_id}:{environment}:{name}"


# ---------------------------------------------------------------- inline credentials, encrypted at the edge


def encrypt_inline(value: Any, keyring: Keyring, context: str) -> Any:
    """`value` with every credential `mask_secrets` would hide encrypted in place: a secret key's value, a URL's
    password, a secret `key=value` parameter. Templates (`{{ … }}`) stay readable, so they are still rendered;
    the text around them is encrypted. Idempotent: ciphertexts are left as they are."""
    if isinstance(value, str):
        return _encrypt_text(value, keyring, context)
    if isinstance(value, dict):
        return {
            k: _encrypt_whole(v, keyring, context) if is_secret_key(str(k)) and v not in (None, "")
            else encrypt_inline(v, keyring, context)
            for k, v in value.items()
        }  # fmt: skip
    if isinstance(value, list | tuple):
        return [encrypt_inline(v, keyring, context) for v in value]
    return value


def _encrypt_whole(value: Any, keyring: Keyring, context: str) -> Any:
    """A secret key's value: all of it, its string leaves one by one when it is a container."""
    if isinstance(value, str):
        if PREFIX in value:
            return value
        if "{{" not in value:
            return keyring.encrypt(value, context)
        return _around_templates(value, lambda text: keyring.encrypt(text, context) if _secret_part(text) else text)
    if isinstance(value, dict):
        return {k: _encrypt_whole(v, keyring, context) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encrypt_whole(v, keyring, context) for v in value]
    if value is None:
        return value
    return keyring.encrypt(value, context)  # a number or boolean: it decrypts to the same JSON value


# Text beside a template in a secret value that is not itself a secret: "Bearer {{ secrets.token }}".
_AUTH_SCHEMES = frozenset({"bearer", "basic", "token", "digest", "bot"})


def _secret_part(text: str) -> bool:
    return bool(text.strip()) and text.strip().lower() not in _AUTH_SCHEMES


def _plain(part: str) -> bool:
    return bool(part) and "{{" not in part and "}}" not in part and PREFIX not in part and MASK != part


def _encrypt_text(text: str, keyring: Keyring, context: str) -> str:
    if "://" not in text and "=" not in text:
        return text

    def password(m: re.Match[str]) -> str:
        part = m.group(2)
        return f"{m.group(1)}{keyring.encrypt(part, context)}{m.group(3)}" if _plain(part) else m.group(0)

    def parameter(m: re.Match[str]) -> str:
        if not is_secret_key(m.group(2)) or not _plain(m.group(3)):
            return m.group(0)
        return f"{m.group(1)}{m.group(2)}={keyring.encrypt(m.group(3), context)}"

    return _KEY_VALUE.sub(parameter, _URL_PASSWORD.sub(password, text))


def _around_templates(text: str, literal: Callable[[str], str]) -> str:
    """`literal` applied to the text outside `{{ … }}`; the templates as they are."""
    out, pos = [], 0
    for m in _TEMPLATE.finditer(text):
        out += [literal(text[pos : m.start()]), m.group(0)]
        pos = m.end()
    out.append(literal(text[pos:]))
    return "".join(out)


def seal_flow(definition: FlowDefinition, keyring: Keyring) -> FlowDefinition:
    """A flow definition with the credentials in its step inputs encrypted (for its tenant), as the flows topic
    holds it."""
    context = inline_context(definition.tenant_id)
    steps = tuple(s.model_copy(update={"input": encrypt_inline(s.input, keyring, context)}) for s in definition.steps)
    return definition.model_copy(update={"steps": steps})


def open_flow(definition: FlowDefinition, keyring: Keyring) -> FlowDefinition:
    """The definition as it was written, its step inputs' ciphertexts opened (to compare with a new one)."""
    context = inline_context(definition.tenant_id)
    steps = tuple(s.model_copy(update={"input": decrypt_all(s.input, keyring, context)}) for s in definition.steps)
    return definition.model_copy(update={"steps": steps})


# ---------------------------------------------------------------- where a credential is used


def decrypt_text(text: str, keyring: Keyring, context: str, opened: list[Any] | None = None) -> Any:
    """A string with its ciphertexts opened: a whole ciphertext gives back the value it was (any JSON type), one
    inside a longer string its text. Each value opened is appended to `opened` (to scrub it from outputs)."""
    if PREFIX not in text:
        return text
    if TOKEN.fullmatch(text):
        value = keyring.decrypt(text, context)
        if opened is not None:
            opened.append(value)
        return value

    def one(m: re.Match[str]) -> str:
        value = keyring.decrypt(m.group(0), context)
        if opened is not None:
            opened.append(value)
        return value if isinstance(value, str) else orjson.dumps(value).decode()

    return TOKEN.sub(one, text)


def decrypt_all(value: Any, keyring: Keyring, context: str) -> Any:
    """Every ciphertext in a stored value (a connector config) opened."""
    if isinstance(value, str):
        return decrypt_text(value, keyring, context)
    if isinstance(value, dict):
        return {k: decrypt_all(v, keyring, context) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [decrypt_all(v, keyring, context) for v in value]
    return value


def reencrypt_all(value: Any, keyring: Keyring, context: str) -> Any:
    """Every ciphertext in a stored value moved to the current key."""
    if isinstance(value, str):
        if PREFIX not in value:
            return value
        return TOKEN.sub(lambda m: keyring.reencrypt(m.group(0), context), value)
    if isinstance(value, dict):
        return {k: reencrypt_all(v, keyring, context) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [reencrypt_all(v, keyring, context) for v in value]
    return value


def plaintexts(values: Iterable[Any]) -> set[str]:
    """The strings worth scrubbing from what a step returns: each resolved value, and its string leaves."""
    out: set[str] = set()
    for value in values:
        if isinstance(value, str):
            if len(value) >= MIN_REDACTED_CHARS:
                out.add(value)
        elif isinstance(value, dict):
            out |= plaintexts(value.values())
        elif isinstance(value, list | tuple):
            out |= plaintexts(value)
        elif value is not None and not isinstance(value, bool):
            text = orjson.dumps(value).decode()
            if len(text) >= MIN_REDACTED_CHARS:
                out.add(text)
    return out


def redact(value: Any, secret_texts: set[str]) -> Any:
    """`value` with every occurrence of a resolved secret replaced by `***` (longest first)."""
    if not secret_texts:
        return value
    ordered = sorted(secret_texts, key=len, reverse=True)
    return _redact(value, ordered)


def _redact(value: Any, ordered: list[str]) -> Any:
    if isinstance(value, str):
        for s in ordered:
            if s in value:
                value = value.replace(s, MASK)
        return value
    if isinstance(value, dict):
        return {_redact(k, ordered) if isinstance(k, str) else k: _redact(v, ordered) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, ordered) for v in value]
    return value
