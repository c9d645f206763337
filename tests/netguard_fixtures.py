"""The network guard tests' fixtures, loaded by a test module with `pytest_plugins = ["tests.netguard_fixtures"]`:
`dns` (every lookup answered by a FakeDNS), `dials` (httpcore's connections recorded, any but loopback refused) and
`listener` (a loopback listener counting the connections it accepts). The doubles are in tests/netguard_support.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.netguard_support import Dials, FakeDNS, Listener, install_dial_guard, install_fake_dns, open_listener


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    return install_fake_dns(monkeypatch)


@pytest.fixture
def dials(monkeypatch: pytest.MonkeyPatch) -> Dials:
    return install_dial_guard(monkeypatch)


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    async with open_listener() as box:
        yield box
