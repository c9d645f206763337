"""The SSRF guard: outbound connections may not reach private, loopback, link-local or reserved addresses.

The guard sits at the connection. A name is resolved once, every address it resolves to is checked, and the
connection goes to a checked address — the client never resolves the name a second time, so a DNS answer
that changes between check and connect (rebinding) cannot reach a private network. The original name stays
the Host header and the TLS server name (SNI and certificate check). See docs/network-guard.md.

- HTTP (httpx): `guarded_client` builds a client whose connection pool dials through `GuardedBackend`.
- PostgreSQL (asyncpg): `guard_dsn` parses the DSN with asyncpg's own parser, checks every host the driver
  would try and answers the connect arguments that pin the connection to the checked addresses.
- Kafka (aiokafka): `kafka_bootstrap` pins the bootstrap servers; `guard_kafka_client` checks (and pins)
  every broker the cluster advertises before the client connects to it.

`check_url` and `check_host` remain for early, clear refusals when a URL is registered; they are not the
defence. A blocked address raises `BlockedAddress`; a name that does not resolve raises `UnresolvableHost`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import typing
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpcore
import httpx

log = logging.getLogger(__name__)

ALLOW_HINT = "set FLOWTRAIL_EXECUTOR_ALLOW_PRIVATE_NETWORKS=true to allow it"

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
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, broadcast
        "::/96",  # unspecified, loopback and IPv4-compatible ::a.b.c.d (deprecated, never routed)
        "64:ff9b::/96",  # NAT64 well-known prefix: a gateway translates it to any IPv4 address behind it
        "64:ff9b:1::/48",  # NAT64 local-use prefix (RFC 8215): the embedding depends on a local prefix length
        "100::/64",  # discard
        "2001:db8::/32",  # documentation
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
_BLOCKED_V4 = tuple(n for n in BLOCKED_NETWORKS if n.version == 4)
_BLOCKED_V6 = tuple(n for n in BLOCKED_NETWORKS if n.version == 6)
# IPv6 forms that embed or translate an IPv4 address, checked through the IPv4 address they carry
# (IPv4-mapped ::ffff:0:0/96 and Teredo 2001::/32 come from ipaddress's own properties).
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # IPv4-translated ::ffff:0:a.b.c.d (SIIT, RFC 2765)
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")  # 6to4: 2002:AABB:CCDD::/48 carries A.B.C.D


class BlockedAddress(Exception):
    """The name resolves to (or the URL names) an address this deployment may not call."""


class UnresolvableHost(OSError):
    """The name does not resolve (or resolves to nothing): nothing was connected."""


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, translated, 6to4, both ends of Teredo)."""
    out: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        out.append(ip.ipv4_mapped)
    if ip in _TRANSLATED:
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip in _SIX_TO_FOUR:
        out.append(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
    if ip.teredo is not None:
        out.extend(ip.teredo)  # (server, client): the client is stored inverted; ipaddress undoes that
    return out


def is_blocked(address: str) -> bool:
    """True for an address in BLOCKED_NETWORKS, or an IPv6 address whose embedded IPv4 address is."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return any(ip in net for net in _BLOCKED_V4)
    if any(ip in net for net in _BLOCKED_V6):
        return True
    return any(is_blocked(str(v4)) for v4 in embedded_ipv4(ip))


def _refusal(host: str, address: str) -> BlockedAddress:
    return BlockedAddress(f"{host} resolves to {address}, a private or reserved address; {ALLOW_HINT}")


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, each once, in the resolver's order. The only resolution the guarded
    paths do: they connect to what this answered."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvableHost(f"cannot resolve {host}: {exc}") from exc
    addresses: list[str] = []
    for info in infos:
        if info[0] not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UnresolvableHost(f"cannot resolve {host}: no IPv4 or IPv6 address")
    return addresses


async def checked_addresses(host: str, port: int) -> list[str]:
    """Resolve `host` once and answer its addresses, refusing it when ANY of them is blocked."""
    if not host or host.startswith("/"):
        raise BlockedAddress(f"{host or 'an empty host'} is a local socket; name a public host")
    addresses = await resolve(host, port)
    for address in addresses:
        if is_blocked(address):
            raise _refusal(host, address)
    return addresses


async def check_url(url: str, *, allow_private: bool) -> None:
    """An early check when a URL is registered: http(s) only, with a host that resolves to public addresses.
    Connections are checked again where they are made (guarded_client)."""
    try:
        parts = urlsplit(url)
        scheme, hostname, port = parts.scheme, parts.hostname, parts.port
    except ValueError as exc:  # an unclosed [IPv6 literal, a port that is not a number or out of range
        raise BlockedAddress(f"URL {url!r} is not valid: {exc}") from None
    if scheme not in ("http", "https"):
        raise BlockedAddress(f"scheme {scheme!r} is not allowed; use http or https")
    if not hostname:
        raise BlockedAddress(f"URL {url!r} has no host")
    if allow_private:
        return
    await check_host(hostname, port or (443 if scheme == "https" else 80))


async def check_host(host: str, port: int) -> None:
    """Resolve `host` and refuse it when any address it resolves to is blocked (unix sockets included)."""
    await checked_addresses(host, port)


# ---------------------------------------------------------------- HTTP: the connection-level guard


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend: resolves the request's host once, refuses it when any address is blocked,
    and dials a checked address. httpcore passes the request's host to `start_tls` as the server name, so
    SNI and the certificate check keep the name; the Host header is the URL's, untouched."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await checked_addresses(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} took longer than {timeout}s") from None
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedAddress(f"{path} is a local socket; name a public host")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


_TRANSPORT_ARGS = ("verify", "cert", "trust_env", "http1", "http2", "limits", "retries", "local_address",
                   "socket_options")  # fmt: skip


def guarded_transport(
    *, backend: httpcore.AsyncNetworkBackend | None = None, **kwargs: Any
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection goes through GuardedBackend (no proxy, no unix socket)."""
    transport = httpx.AsyncHTTPTransport(**kwargs)
    pool = transport._pool
    assert isinstance(pool, httpcore.AsyncConnectionPool)
    # Connections are made lazily with the pool's backend: replacing it before the first request is enough.
    pool._network_backend = backend or GuardedBackend()
    return transport


def guarded_client(allow_private: bool, **httpx_kwargs: Any) -> httpx.AsyncClient:
    """The client every outbound HTTP path uses. With `allow_private` it is a plain httpx.AsyncClient;
    otherwise each connection is resolved once, checked and pinned (GuardedBackend). A blocked address
    raises BlockedAddress and a name that does not resolve UnresolvableHost from the request call; env
    proxies are not used then (a proxy would dial on the guard's behalf)."""
    if allow_private:
        return httpx.AsyncClient(**httpx_kwargs)
    transport_kwargs = {k: httpx_kwargs.pop(k) for k in _TRANSPORT_ARGS if k in httpx_kwargs}
    if "transport" in httpx_kwargs or "mounts" in httpx_kwargs:
        raise TypeError("guarded_client builds its own transport")
    return httpx.AsyncClient(transport=guarded_transport(**transport_kwargs), **httpx_kwargs)


# ---------------------------------------------------------------- PostgreSQL: hosts as asyncpg sees them

# Indirections that name hosts or files the guard cannot see through: refused in a guarded DSN.
_INDIRECT = ("service", "servicefile", "passfile")


class _PinnedTLS(ssl.SSLContext):
    """The SSL context asyncpg built for the DSN, told the name each pinned address stands for, so the TLS
    server name (SNI, certificate check) is the host the DSN named rather than the address dialled."""

    names: dict[str, str]

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None
                 ) -> ssl.SSLObject:  # fmt: skip
        if isinstance(server_hostname, str):
            server_hostname = self.names.get(server_hostname, server_hostname)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def dsn_addresses(dsn: str) -> tuple[list[tuple[str, int] | str], Any]:
    """The addresses asyncpg would try for `dsn`, in its order, parsed by asyncpg's own parser: host lists,
    empty hosts, `host=`/`port=` query parameters, percent-encoded and bracketed hosts, PGHOST and the unix
    socket fallback. A `(host, port)` tuple per TCP address, a path per unix socket; and asyncpg's
    connection parameters (ssl, sslmode…)."""
    from asyncpg import connect_utils  # the driver's private parser: exactly the hosts it will try

    given = parse_qs(urlsplit(dsn).query, keep_blank_values=True)
    for key in _INDIRECT:
        if key in given:
            raise BlockedAddress(f"the dsn's `{key}` parameter names hosts or files the guard cannot check")
    addrs, params = connect_utils._parse_connect_dsn_and_args(
        dsn=dsn, host=None, port=None, user=None, password=None, passfile=None, database=None, ssl=None,
        service=None, servicefile=None, direct_tls=None, server_settings=None, target_session_attrs=None,
        krbsrvname=None, gsslib=None,
    )  # fmt: skip
    return list(addrs), params


async def guard_dsn(dsn: str, *, allow_private: bool) -> dict[str, Any]:
    """Check every host asyncpg would try for `dsn`; answer the extra `asyncpg.connect`/`create_pool`
    arguments that make it connect to the checked addresses (empty when private networks are allowed).

    Each host is resolved once and refused when any of its addresses is blocked; a unix socket (a host
    starting with `/`, or no host at all, which falls back to PGHOST or the local socket) is refused.
    The pinned addresses are passed as `host`/`port` lists; when the DSN asks for certificate checks
    (sslmode require, verify-ca, verify-full) its SSL context is passed too, taught to use the DSN's host
    name for SNI and the certificate check. With sslmode prefer/allow (asyncpg's default is prefer) the
    fallback to plain text is asyncpg's and the TLS attempt carries no server name."""
    from asyncpg import connect_utils

    if urlsplit(dsn).scheme not in ("postgresql", "postgres"):
        raise BlockedAddress("dsn must be a postgresql:// URL")
    if allow_private:
        return {}
    addrs, params = dsn_addresses(dsn)
    hosts: list[str] = []
    ports: list[int] = []
    names: dict[str, str] = {}
    for addr in addrs:
        if isinstance(addr, str):
            raise BlockedAddress(f"the dsn reaches the local socket {addr}; name a public host")
        host, port = addr
        if not host:
            raise BlockedAddress("the dsn names an empty host; name a public host")
        for address in await checked_addresses(host, port):
            hosts.append(address)
            ports.append(port)
            names.setdefault(address, host)
    pinned: dict[str, Any] = {"host": hosts, "port": ports}
    context = params.ssl
    if isinstance(context, ssl.SSLContext) and params.sslmode >= connect_utils.SSLMode.require:
        context.__class__ = _PinnedTLS  # same layout: only wrap_bio differs
        typing.cast(_PinnedTLS, context).names = names
        pinned["ssl"] = context
        if params.ssl_negotiation is connect_utils.SSLNegotiation.direct:
            pinned["direct_tls"] = True
    return pinned


# ---------------------------------------------------------------- Kafka: bootstrap servers and advertised brokers


async def kafka_bootstrap(servers: Iterable[tuple[str, int]]) -> str:
    """`host:port,…` of the checked addresses of every bootstrap server (each resolved once)."""
    out: list[str] = []
    for host, port in servers:
        for address in await checked_addresses(host, port):
            out.append(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
    if not out:
        raise BlockedAddress("no bootstrap server named")
    return ",".join(out)


class KafkaGuard:
    """Checks every broker an aiokafka client is about to connect to, as the cluster advertises it in its
    metadata: the advertised name is resolved once, refused when any address is blocked (the client gets no
    connection, as for an unreachable broker, and `refused` keeps why), else pinned to a checked address."""

    def __init__(self) -> None:
        self.refused: BlockedAddress | UnresolvableHost | None = None

    def install(self, client: Any) -> None:
        original = client._get_conn

        async def _get_conn(node_id: Any, **kwargs: Any) -> Any:
            cluster = client.cluster
            broker = cluster.broker_metadata(node_id)
            if broker is not None:
                try:
                    address = (await checked_addresses(broker.host, broker.port))[0]
                except (BlockedAddress, UnresolvableHost) as exc:
                    self.refused = exc
                    log.warning("kafka broker %s refused: %s", node_id, exc)
                    return None
                pinned = broker._replace(host=address)
                for table in (cluster._brokers, cluster._bootstrap_brokers):
                    if table.get(node_id) == broker:
                        table[node_id] = pinned
            return await original(node_id, **kwargs)

        client._get_conn = _get_conn

    async def check_cluster(self, client: Any) -> None:
        """After bootstrap: refuse a cluster that advertises any broker at a blocked address (each advertised
        name resolved and checked), or whose brokers the guard already refused."""
        if self.refused is not None:
            raise self.refused
        for broker in client.cluster.brokers():
            await checked_addresses(broker.host, broker.port)
