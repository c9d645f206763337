"""A tiny synchronous Kafka probe: one Metadata request over a plain socket, no event loop needed."""

from __future__ import annotations

import socket
import struct

_METADATA_API_KEY = 3
_METADATA_VERSION = 1
_CORRELATION_ID = 0x464C5754  # "FLWT"
_CLIENT_ID = b"flowtrail-launcher"


def _metadata_request() -> bytes:
    header = struct.pack(">hhih", _METADATA_API_KEY, _METADATA_VERSION, _CORRELATION_ID, len(_CLIENT_ID))
    # Metadata v1 body: an empty topic array asks for brokers only, no topics.
    body = struct.pack(">i", 0)
    payload = header + _CLIENT_ID + body
    return struct.pack(">i", len(payload)) + payload


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        chunks += chunk
    return bytes(chunks)


def kafka_broker_count(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> int | None:
    """How many brokers a Metadata request to ``host:port`` lists; None when no Kafka answers there."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_metadata_request())
            (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
            if size < 8 or size > 16 * 1024 * 1024:
                return None
            response = _recv_exactly(sock, size)
    except (OSError, ConnectionError, struct.error):
        return None
    correlation_id, brokers = struct.unpack_from(">ii", response)
    if correlation_id != _CORRELATION_ID or brokers < 0:
        return None
    return int(brokers)


def kafka_answers(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    """True when a Kafka broker on ``host:port`` answers Metadata and lists at least one (ready) broker."""
    count = kafka_broker_count(port, host, timeout)
    return count is not None and count > 0
