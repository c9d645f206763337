"""The SSRF guard: http_request steps may not call private, loopback, link-local or reserved addresses."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.netguard import BlockedAddress, check_url, is_blocked

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
