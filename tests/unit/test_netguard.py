"""The SSRF guard: steps, syncs and deliveries may not reach private, loopback, link-local or reserved addresses,
checked where they connect (services.common.netguard)."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpcore
import httpx
import pytest
from aiokafka.structs import BrokerMetadata
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import ErrorInfo
from services.common import netguard
from services.common.netguard import (
    BLOCKED_NETWORKS,
    BlockedAddress,
    GuardedBackend,
    KafkaGuard,
    UnresolvableHost,
    check_url,
    dsn_addresses,
    guard_dsn,
    guarded_transport,
    is_blocked,
    kafka_bootstrap,
)
from services.executor.adapters.actions_base import StepCall, StepError, StepOutcome
from services.executor.adapters.actions_sync import SyncRecordsActions
from services.executor.adapters.steps import StepRunners
from tests.netguard_support import PUBLIC_LOOKING, Dials, FakeDNS, Listener

pytest_plugins = ["tests.netguard_fixtures"]  # dns, dials, listener

BLOCKED = [
    "127.0.0.1", "127.255.255.254",  # loopback
    "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",  # private
    "169.254.0.1", "169.254.169.254",  # link-local, cloud metadata
    "100.64.0.1", "100.127.255.254",  # carrier-grade NAT
    "0.0.0.0", "0.1.2.3",  # this network
    "192.0.2.1", "198.51.100.7", "203.0.113.9", "198.18.0.1", "192.0.0.8",  # documentation, benchmarking, IETF
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",  # multicast, reserved, broadcast
    "::", "::1",  # unspecified, loopback
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:0.0.0.0",  # IPv4-mapped
    "fc00::1", "fd12:3456:789a::1",  # unique local
    "fe80::1", "fe80::1%eth0", "febf::1",  # link-local (with a zone too)
    "ff02::1",  # multicast
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "100::1",  # discard
]  # fmt: skip
PUBLIC = [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "172.15.255.255", "172.32.0.0", "100.63.255.255", "100.128.0.0",
    "169.253.255.255", "11.0.0.1", "192.167.1.1", "2606:4700:4700::1111", "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
]  # fmt: skip


@pytest.mark.parametrize("address", BLOCKED)
def test_non_public_addresses_are_blocked(address: str) -> None:
    assert is_blocked(address) is True


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_blocked(address) is False


def test_a_non_address_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        is_blocked("example.com")


@settings(max_examples=500, deadline=None)
@given(ip=st.ip_addresses(v=4))
def test_every_non_global_ipv4_address_is_blocked_mapped_or_not(ip: ipaddress.IPv4Address) -> None:
    if not ip.is_global or ip.is_multicast:
        assert is_blocked(str(ip)), ip
    # An IPv4 address and its IPv4-mapped IPv6 form get the same answer.
    assert is_blocked(f"::ffff:{ip}") == is_blocked(str(ip))


@settings(max_examples=300, deadline=None)
@given(ip=st.ip_addresses(v=6))
def test_loopback_link_local_unique_local_and_multicast_ipv6_are_blocked(ip: ipaddress.IPv6Address) -> None:
    if (
        ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_unspecified
        or ip in ipaddress.ip_network("fc00::/7")
    ):
        assert is_blocked(str(ip)), ip


@settings(max_examples=200, deadline=None)
@given(net=st.sampled_from(["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
                            "100.64.0.0/10", "fc00::/7", "fe80::/10"]), data=st.data())  # fmt: skip
def test_every_address_of_a_guarded_range_is_blocked(net: str, data: st.DataObject) -> None:
    network = ipaddress.ip_network(net)
    ip = network[data.draw(st.integers(0, network.num_addresses - 1))]
    assert is_blocked(str(ip))


# ---------------------------------------------------------------- check_url (IP literals: no DNS needed)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.0.0.1:8080/admin",
        "https://10.1.2.3/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/",
        "http://0.0.0.0:5432/",
        "http://[::1]:8000/",
        "http://[::ffff:127.0.0.1]/",
        "http://[fd00::1]/",
        "http://[fe80::1]/",
        "http://localhost/",
        "http://2130706433/",  # 127.0.0.1 written as one number
        "http://0x7f.1/",  # 127.0.0.1 in hex shorthand
    ],
)
async def test_urls_that_resolve_to_private_addresses_are_refused(url: str) -> None:
    with pytest.raises(BlockedAddress, match="a private or reserved address") as info:
        await check_url(url, allow_private=False)
    assert "FLOWTRAIL_EXECUTOR_ALLOW_PRIVATE_NETWORKS" in str(info.value)


async def test_the_refusal_names_the_host_and_address() -> None:
    with pytest.raises(BlockedAddress, match=r"^169\.254\.169\.254 resolves to 169\.254\.169\.254"):
        await check_url("http://169.254.169.254/", allow_private=False)


@pytest.mark.parametrize("url", ["http://8.8.8.8/", "https://1.1.1.1:8443/path?q=1", "http://[2606:4700::1111]/"])
async def test_public_addresses_pass(url: str) -> None:
    await check_url(url, allow_private=False)


@pytest.mark.parametrize("url", ["http://127.0.0.1/", "http://10.0.0.1/", "http://[::1]/", "http://localhost:9/"])
async def test_allow_private_lets_private_addresses_through(url: str) -> None:
    await check_url(url, allow_private=True)


@pytest.mark.parametrize("allow_private", [False, True])
@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://8.8.8.8/", "gopher://127.0.0.1/", "8.8.8.8"])
async def test_only_http_and_https_are_allowed_even_with_private_allowed(url: str, allow_private: bool) -> None:
    with pytest.raises(BlockedAddress, match="is not allowed; use http or https"):
        await check_url(url, allow_private=allow_private)


@pytest.mark.parametrize("url", ["http://", "https:///path", "http://:80/"])
async def test_a_url_without_host_is_refused(url: str) -> None:
    with pytest.raises(BlockedAddress, match="has no host"):
        await check_url(url, allow_private=False)


# ---------------------------------------------------------------- IPv6 forms that embed or translate IPv4


def six_to_four(v4: str) -> str:
    return str(ipaddress.IPv6Address((0x2002 << 112) | (int(ipaddress.IPv4Address(v4)) << 80) | 0x1234))


def teredo(server: str, client: str) -> str:
    client_bits = int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF  # Teredo stores the client inverted
    return str(ipaddress.IPv6Address((0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64) | client_bits))


def translated(v4: str) -> str:
    return str(ipaddress.IPv6Address((0xFFFF << 32 << 16) | int(ipaddress.IPv4Address(v4))))  # ::ffff:0:a.b.c.d


EMBEDDED_BLOCKED = [
    ("IPv4-compatible loopback", "::127.0.0.1"),
    ("IPv4-compatible private", "::10.0.0.1"),
    ("IPv4-compatible public (deprecated form: the whole ::/96)", "::8.8.8.8"),
    ("IPv4-mapped loopback", "::ffff:127.0.0.1"),
    ("IPv4-mapped metadata", "::ffff:169.254.169.254"),
    ("IPv4-translated loopback", translated("127.0.0.1")),
    ("IPv4-translated private", translated("192.168.1.1")),
    ("6to4 of loopback", six_to_four("127.0.0.1")),
    ("6to4 of private", six_to_four("10.1.2.3")),
    ("6to4 of metadata", six_to_four("169.254.169.254")),
    ("Teredo, client loopback", teredo("8.8.8.8", "127.0.0.1")),
    ("Teredo, server private", teredo("10.0.0.1", "8.8.4.4")),
    ("NAT64 well-known of loopback", "64:ff9b::7f00:1"),
    ("NAT64 well-known of public (the whole /96)", "64:ff9b::808:808"),
    ("NAT64 local-use", "64:ff9b:1::7f00:1"),
    ("NAT64 local-use, any", "64:ff9b:1:abcd::1"),
    ("documentation", "2001:db8::1"),
    ("site-local", "fec0::1"),
]
EMBEDDED_PUBLIC = [
    ("IPv4-translated public", translated("8.8.8.8")),
    ("6to4 of public", six_to_four("8.8.8.8")),
    ("Teredo of public server and client", teredo("8.8.8.8", "1.1.1.1")),
]


@pytest.mark.parametrize(("form", "address"), EMBEDDED_BLOCKED, ids=[f for f, _ in EMBEDDED_BLOCKED])
def test_ipv6_forms_carrying_a_blocked_ipv4_address_are_blocked(form: str, address: str) -> None:
    assert is_blocked(address) is True, (form, address)


@pytest.mark.parametrize(("form", "address"), EMBEDDED_PUBLIC, ids=[f for f, _ in EMBEDDED_PUBLIC])
def test_ipv6_forms_carrying_a_public_ipv4_address_are_public(form: str, address: str) -> None:
    assert is_blocked(address) is False, (form, address)


@settings(max_examples=400, deadline=None)
@given(ip=st.ip_addresses(v=4))
def test_every_embedding_of_an_ipv4_address_gets_its_answer(ip: ipaddress.IPv4Address) -> None:
    expected = is_blocked(str(ip))
    assert is_blocked(six_to_four(str(ip))) == expected
    assert is_blocked(translated(str(ip))) == expected
    assert is_blocked(f"::ffff:{ip}") == expected
    assert is_blocked(teredo("8.8.8.8", str(ip))) == expected  # the client end
    assert is_blocked(teredo(str(ip), "8.8.8.8")) == expected  # the server end
    assert is_blocked(f"::{ip}") is True  # IPv4-compatible: deprecated, never routed
    assert is_blocked(f"64:ff9b::{ip}") is True  # NAT64: reaches whatever the gateway can


def test_the_blocked_list_is_explicit_and_reviewable() -> None:
    listed = {str(n) for n in BLOCKED_NETWORKS}
    for net in ("127.0.0.0/8", "169.254.0.0/16", "::/96", "64:ff9b::/96", "64:ff9b:1::/48", "fc00::/7", "fe80::/10"):
        assert net in listed


# ---------------------------------------------------------------- the guard at the connection, on real code paths
#
# Network rule: nothing here connects anywhere but loopback, and no name is looked up on the network (FakeDNS
# answers every lookup; the dial guard refuses any non-loopback connection httpcore is asked to make).


@pytest.fixture
async def runners() -> AsyncIterator[StepRunners]:
    r = StepRunners(allow_private_networks=False, time_scale=1.0, max_body_bytes=4096)
    yield r
    await r.close()


async def run_step(runners: StepRunners, action: str, spec: dict[str, Any]) -> StepOutcome:
    call = StepCall(run_id="run-1", step="s", action=action, attempt=1, input=spec, started_at=datetime.now(UTC),
                    timeout_s=10)  # fmt: skip
    return await runners.run(call)


def refused(outcome: StepOutcome) -> tuple[str, str | None, str]:
    assert not outcome.ok and outcome.error is not None, outcome
    return outcome.error.category.value, outcome.error.code, outcome.error.message


async def test_http_request_resolves_once_and_connects_to_the_address_it_checked(
    runners: StepRunners, dns: FakeDNS, dials: Dials, listener: Listener
) -> None:
    # DNS rebinding: a public answer to the first lookup, loopback to every later one. The guard's lookup is the
    # only one, and the connection goes to the address that lookup answered (refused by the test, never dialled).
    dns.script("rebind.test", [PUBLIC_LOOKING], ["127.0.0.1"])
    outcome = await run_step(runners, "http_request", {"url": f"http://rebind.test:{listener.port}/admin"})

    assert refused(outcome)[:2] == ("TRANSIENT", "network")
    assert dns.calls["rebind.test"] == 1
    assert dials.made == [(PUBLIC_LOOKING, listener.port)]
    assert listener.accepted == 0


async def test_http_request_refuses_a_name_when_any_of_its_addresses_is_blocked(
    runners: StepRunners, dns: FakeDNS, dials: Dials, listener: Listener
) -> None:
    dns.script("mixed.test", [PUBLIC_LOOKING, "127.0.0.1"])
    dns.script("loop.test", ["127.0.0.1"])
    dns.script("mapped.test", ["::ffff:127.0.0.1"])
    for host in ("mixed.test", "loop.test", "mapped.test"):
        outcome = await run_step(runners, "http_request", {"url": f"http://{host}:{listener.port}/"})
        category, code, message = refused(outcome)
        assert (category, code) == ("VALIDATION", "blocked_address"), host
        assert host in message and "FLOWTRAIL_EXECUTOR_ALLOW_PRIVATE_NETWORKS" in message
    assert dials.made == [] and listener.accepted == 0


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.1.2.3", "[::1]", "[::ffff:127.0.0.1]", "localhost", "2130706433", "0x7f.1", "[::127.0.0.1]"],
)
async def test_http_request_to_a_loopback_literal_never_connects(
    runners: StepRunners, dns: FakeDNS, dials: Dials, listener: Listener, host: str
) -> None:
    outcome = await run_step(runners, "http_request", {"url": f"http://{host}:{listener.port}/"})
    assert refused(outcome)[:2] == ("VALIDATION", "blocked_address")
    assert dials.made == [] and listener.accepted == 0


async def test_http_request_to_a_name_that_does_not_resolve_is_a_classified_failure(
    runners: StepRunners, dns: FakeDNS, dials: Dials
) -> None:
    outcome = await run_step(runners, "http_request", {"url": "http://nowhere.test/"})
    category, code, message = refused(outcome)
    assert (category, code) == ("TRANSIENT", "unresolvable_host") and "nowhere.test" in message
    assert dials.made == []


async def test_allow_private_networks_leaves_the_connection_alone(dns: FakeDNS, dials: Dials) -> None:
    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hello, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    runners = StepRunners(allow_private_networks=True, time_scale=1.0, max_body_bytes=4096)
    try:
        outcome = await run_step(runners, "http_request", {"url": f"http://127.0.0.1:{port}/"})
    finally:
        await runners.close()
        server.close()
    assert outcome.ok and outcome.output["body"] == "ok"


async def test_the_guarded_client_keeps_the_name_for_the_host_header_and_tls(dns: FakeDNS) -> None:
    # What httpcore does with the name after connect_tcp: the Host header and start_tls's server_hostname.
    seen: dict[str, Any] = {}

    class Stream(httpcore.AsyncNetworkStream):
        async def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                            timeout: float | None = None,  # noqa: ASYNC109
                            ) -> httpcore.AsyncNetworkStream:  # fmt: skip
            seen["sni"] = server_hostname
            raise httpcore.ConnectError("stop here")

    class Inner(httpcore.AsyncNetworkBackend):
        async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                              local_address: str | None = None, socket_options: Any = None) -> Any:  # fmt: skip
            seen["dialled"] = (host, port)
            return Stream()

    dns.script("api.example.test", [PUBLIC_LOOKING])
    transport = guarded_transport(backend=GuardedBackend(inner=Inner()))
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError, match="stop here"):
            await client.get("https://api.example.test/")
    assert seen == {"dialled": (PUBLIC_LOOKING, 443), "sni": "api.example.test"}


# ---------------------------------------------------------------- sync_records over HTTP


@pytest.fixture
async def shop() -> AsyncIterator[str]:
    """A trusted connector's loopback stand-in serving two records."""

    async def orders(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"orders": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(orders, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()


def sync_spec(source: dict[str, Any], destination: dict[str, Any]) -> dict[str, Any]:
    return {"source": source, "destination": destination, "key": "id", "mapping": {"name": "name"},
            "entity": "order", "system": "shop", "dest_system": "erp",
            "window": {"updated_since": None, "updated_until": None}}  # fmt: skip


async def test_sync_records_source_and_destination_urls_are_guarded_where_they_connect(
    dns: FakeDNS, dials: Dials, listener: Listener, shop: str
) -> None:
    dns.script("rebind.test", [PUBLIC_LOOKING], ["127.0.0.1"])
    dns.script("inside.test", ["10.0.0.7", PUBLIC_LOOKING])
    actions = SyncRecordsActions(connectors={"shop": shop}, allow_private=False, max_output_bytes=64 * 1024,
                                 http=None)  # fmt: skip
    loop_url = f"http://127.0.0.1:{listener.port}/orders"
    try:
        # A flow's source URL on loopback, or a name resolving to a private address: refused, nothing dialled.
        for url in (loop_url, f"http://[::1]:{listener.port}/orders", f"http://inside.test:{listener.port}/o"):
            source = {"kind": "http", "url": url, "records_path": "orders"}
            error = await sync_failure(actions, sync_spec(source, {"kind": "http", "url": "http://erp.test/x"}))
            assert (error.category.value, error.code) == ("VALIDATION", "blocked_address"), url
        # The source is the operator's connector (trusted, on loopback); the destination a flow URL on loopback.
        source = {"kind": "http", "connector": "shop", "path": "/orders.json", "records_path": "orders"}
        error = await sync_failure(actions, sync_spec(source, {"kind": "http", "url": loop_url}))
        assert (error.category.value, error.code) == ("VALIDATION", "blocked_address")
        # Rebinding on the destination: one lookup, the connection to what it answered.
        rebound = {"kind": "http", "url": f"http://rebind.test:{listener.port}/", "concurrency": 1}
        error = await sync_failure(actions, sync_spec(source, rebound))
        assert (error.category.value, error.code) == ("TRANSIENT", "network")
        assert dns.calls["rebind.test"] == 1
        error = await sync_failure(actions, sync_spec(source, {"kind": "http", "url": "http://nowhere.test/"}))
        assert (error.category.value, error.code) == ("TRANSIENT", "unresolvable_host")
    finally:
        await actions.close()
    assert dials.public() == [(PUBLIC_LOOKING, listener.port)]
    assert listener.accepted == 0


async def sync_failure(actions: SyncRecordsActions, spec: dict[str, Any]) -> ErrorInfo:
    call = StepCall(run_id="run-1", step="sync", action="sync_records", attempt=1, input=spec,
                    started_at=datetime.now(UTC), timeout_s=10)  # fmt: skip
    with pytest.raises(StepError) as caught:
        await actions.sync(call)
    return caught.value.error


# ---------------------------------------------------------------- DSNs, read as asyncpg reads them


def dsn_forms(port: int) -> list[str]:
    return [
        f"postgresql://u@127.0.0.1:{port}/db",
        f"postgresql://u@127.0.0.1:{port},@8.8.8.8/db",  # the reported bypass: asyncpg tries 127.0.0.1 first
        f"postgresql://u@8.8.8.8,127.0.0.1:{port}/db",  # one public host does not make the others public
        f"postgresql://u@rebind.test:{port}/db",
        f"postgresql://u@%31%32%37.0.0.1:{port}/db",  # percent-encoded
        f"postgresql://u@[::1]:{port}/db",
        f"postgresql://u@[::ffff:127.0.0.1]:{port}/db",
        f"postgresql://u@[64:ff9b::7f00:1]:{port}/db",
        f"postgresql:///db?host=127.0.0.1&port={port}",  # host in the query
        f"postgresql://u@/db?host=localhost&port={port}",
        "postgresql:///db?host=/tmp",  # a unix socket
        "postgresql://u@/db",  # no host: PGHOST or the local sockets
        f"postgresql://u@8.8.8.8:{port}/db?service=prod",  # a service file names hosts the guard cannot see
        f"postgresql://u@8.8.8.8:{port}/db?passfile=/etc/shadow",
    ]


async def test_database_query_dsn_forms_are_refused_before_anything_connects(
    runners: StepRunners, dns: FakeDNS, listener: Listener
) -> None:
    dns.script("rebind.test", ["127.0.0.1"])
    for dsn in dsn_forms(listener.port):
        outcome = await run_step(runners, "database_query", {"dsn": dsn, "query": "SELECT 1"})
        assert refused(outcome)[:2] == ("VALIDATION", "blocked_address"), dsn
    assert listener.accepted == 0


async def test_a_dsn_host_that_does_not_resolve_is_a_classified_failure(runners: StepRunners, dns: FakeDNS) -> None:
    outcome = await run_step(runners, "database_query", {"dsn": "postgresql://u@nowhere.test/db", "query": "SELECT 1"})
    assert refused(outcome)[:2] == ("TRANSIENT", "unresolvable_host")


async def test_sync_records_postgres_source_and_destination_dsns_are_guarded(
    dns: FakeDNS, dials: Dials, listener: Listener, shop: str
) -> None:
    actions = SyncRecordsActions(connectors={"shop": shop}, allow_private=False, max_output_bytes=64 * 1024,
                                 http=None)  # fmt: skip
    http_source = {"kind": "http", "connector": "shop", "path": "/orders.json", "records_path": "orders"}
    dns.script("rebind.test", ["127.0.0.1"])
    try:
        for dsn in dsn_forms(listener.port)[:4]:
            source = {"kind": "postgresql", "dsn": dsn, "query": "SELECT 1"}
            error = await sync_failure(actions, sync_spec(source, {"kind": "http", "url": "http://erp.test/"}))
            assert (error.category.value, error.code) == ("VALIDATION", "blocked_address"), dsn
            dest = {"kind": "postgresql", "dsn": dsn, "table": "orders", "key_columns": ["name"]}
            error = await sync_failure(actions, sync_spec(http_source, dest))
            assert (error.category.value, error.code) == ("VALIDATION", "blocked_address"), dsn
    finally:
        await actions.close()
    assert listener.accepted == 0 and dials.public() == []


@pytest.mark.parametrize(
    ("dsn", "seen"),
    [
        ("postgresql://u@a.test:1,@b.test/db", [("a.test", 1), ("@b.test", 5432)]),
        ("postgresql://u@a.test,b.test:7/db", [("a.test", 5432), ("b.test", 7)]),
        ("postgresql://u@/db?host=a.test,b.test&port=1,2", [("a.test", 1), ("b.test", 2)]),
        ("postgresql://u@a.test/db?host=b.test", [("a.test", 5432)]),  # the netloc wins, as in asyncpg
        ("postgresql://u@%61.test/db", [("a.test", 5432)]),
        ("postgresql://u@[::1]:9/db", [("::1", 9)]),
        ("postgresql://u@a.test/db?hostaddr=127.0.0.1", [("a.test", 5432)]),  # asyncpg sends it as a setting
        ("postgresql:///db?host=/run/pg", ["/run/pg/.s.PGSQL.5432"]),
    ],
)
def test_dsn_hosts_are_read_by_asyncpgs_own_parser(dsn: str, seen: list[Any]) -> None:
    assert dsn_addresses(dsn)[0] == seen


async def test_a_guarded_dsn_is_pinned_to_its_checked_addresses_with_the_name_kept_for_tls(dns: FakeDNS) -> None:
    dns.script("db.example.test", [PUBLIC_LOOKING, "93.184.216.35"], ["127.0.0.1"])
    pinned = await guard_dsn("postgresql://u@db.example.test:6432/app?sslmode=require", allow_private=False)
    assert pinned["host"] == [PUBLIC_LOOKING, "93.184.216.35"] and pinned["port"] == [6432, 6432]
    assert dns.calls["db.example.test"] == 1
    context = pinned["ssl"]
    tls = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=PUBLIC_LOOKING)
    assert tls.server_hostname == "db.example.test"  # SNI and the certificate check use the DSN's name
    # prefer (asyncpg's default): asyncpg keeps its own plain-text fallback; only the hosts are pinned.
    plain = await guard_dsn("postgresql://u@8.8.8.8/app", allow_private=False)
    assert plain == {"host": ["8.8.8.8"], "port": [5432]}
    assert await guard_dsn("postgresql://u@127.0.0.1/app", allow_private=True) == {}


# ---------------------------------------------------------------- Kafka


async def test_kafka_bootstrap_servers_are_checked_and_pinned(dns: FakeDNS) -> None:
    dns.script("kafka.test", [PUBLIC_LOOKING])
    dns.script("rebind-kafka.test", ["127.0.0.1"])
    assert await kafka_bootstrap([("kafka.test", 9092), ("2606:4700::1111", 9093)]) == (
        f"{PUBLIC_LOOKING}:9092,[2606:4700::1111]:9093"
    )
    for servers in ([("rebind-kafka.test", 9092)], [("kafka.test", 9092), ("127.0.0.1", 19092)], []):
        with pytest.raises(BlockedAddress):
            await kafka_bootstrap(servers)
    with pytest.raises(UnresolvableHost):
        await kafka_bootstrap([("nowhere.test", 9092)])


async def test_advertised_kafka_brokers_are_checked_before_the_client_connects(dns: FakeDNS) -> None:
    dns.script("broker-1.test", [PUBLIC_LOOKING])
    dns.script("broker-2.test", ["10.0.0.9"])
    dialled: list[str] = []

    class Cluster:
        _brokers = {
            1: BrokerMetadata(1, "broker-1.test", 9092, None),
            2: BrokerMetadata(2, "broker-2.test", 9092, None),
        }
        _bootstrap_brokers: dict[int, Any] = {}

        def broker_metadata(self, node_id: int) -> Any:
            return self._brokers.get(node_id)

        def brokers(self) -> set[Any]:
            return set(self._brokers.values())

    class Client:
        cluster = Cluster()

        async def _get_conn(self, node_id: int, **kwargs: Any) -> str:
            dialled.append(self.cluster._brokers[node_id].host)
            return "conn"

    client = Client()
    guard = KafkaGuard()
    guard.install(client)
    assert await client._get_conn(1) == "conn" and dialled == [PUBLIC_LOOKING]  # pinned to the checked address
    assert await client._get_conn(2) is None and dialled == [PUBLIC_LOOKING]  # refused: no connection
    assert isinstance(guard.refused, BlockedAddress) and "broker-2.test" in str(guard.refused)
    with pytest.raises(BlockedAddress):
        await guard.check_cluster(client)


async def test_every_redirect_hop_is_guarded_where_it_connects(
    dns: FakeDNS, dials: Dials, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only here, 127.0.0.1 counts as public (the "public" server that redirects); 127.0.0.2 stays loopback.
    real = netguard.is_blocked
    monkeypatch.setattr(netguard, "is_blocked", lambda address: address != "127.0.0.1" and real(address))
    inside = Listener()
    server = await asyncio.start_server(inside._accept, "127.0.0.2", 0)
    inside_port = server.sockets[0].getsockname()[1]
    dns.script("internal.test", ["127.0.0.2"])

    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 302 Found\r\nLocation: http://internal.test:%d/admin\r\nContent-Length: 0\r\n"
                     b"Connection: close\r\n\r\n" % inside_port)  # fmt: skip
        await writer.drain()
        writer.close()

    public = await asyncio.start_server(redirect, "127.0.0.1", 0)
    runners = StepRunners(allow_private_networks=False, time_scale=1.0, max_body_bytes=4096)
    try:
        url = f"http://127.0.0.1:{public.sockets[0].getsockname()[1]}/start"
        outcome = await run_step(runners, "http_request", {"url": url})
    finally:
        await runners.close()
        for s in (server, public):
            s.close()
    category, code, message = refused(outcome)
    assert (category, code) == ("VALIDATION", "blocked_address") and "internal.test" in message
    assert inside.accepted == 0 and dials.public() == []
