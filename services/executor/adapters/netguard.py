"""Refuses requests to private, loopback, link-local, CGNAT and other non-public addresses (SSRF guard)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

# Explicit list rather than ipaddress's is_private alone, so the guarded ranges are reviewable.
BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # this network
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local (cloud metadata)
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
        "::/128",  # unspecified
        "::1/128",  # loopback
        "64:ff9b::/96",  # NAT64 (embeds IPv4)
        "100::/64",  # discard
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "ff00::/8",  # multicast
    )
)


class BlockedAddress(Exception):
    """The URL resolves to an address flows may not call."""


def is_blocked(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    return any(ip in net for net in BLOCKED_NETWORKS if net.version == ip.version)


async def check_url(url: str, *, allow_private: bool) -> None:
    """Resolve the URL's host and refuse it when any address it resolves to is blocked."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BlockedAddress(f"scheme {parts.scheme!r} is not allowed; use http or https")
    if not parts.hostname:
        raise BlockedAddress(f"URL {url!r} has no host")
    if allow_private:
        return
    await check_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))


async def check_host(host: str, port: int) -> None:
    """Resolve `host` and refuse it when any address it resolves to is blocked (unix sockets included)."""
    if not host or host.startswith("/"):
        raise BlockedAddress(f"{host or 'an empty host'} is a local socket; name a public host")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {host}: {exc}") from exc
    for info in infos:
        address = str(info[4][0])
        if is_blocked(address):
            raise BlockedAddress(
                f"{host} resolves to {address}, a private or reserved address; "
                "set FLOWTRAIL_EXECUTOR_ALLOW_PRIVATE_NETWORKS=true to allow it"
            )
