"""Test doubles for the network guard's tests: a resolver that never leaves the machine, a dial recorder that
refuses every address but loopback, and loopback listeners counting the connections they accept.

Network rule for every test using them: nothing connects anywhere but 127.0.0.0/8 and ::1, and no name is
looked up on the network. Names in `FakeDNS.answers` get the scripted answers (a sequence: the n-th lookup
gets the n-th answer, the last one repeats); IP literals and `localhost` are answered locally as the system
would; any other name does not resolve.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpcore
import pytest

_real_getaddrinfo = socket.getaddrinfo
_real_connect_tcp = httpcore.AnyIOBackend.connect_tcp


def _is_literal(host: str) -> bool:
    """An address the system parses without asking DNS: IPv6/IPv4, also inet_aton's forms (2130706433, 0x7f.1)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        try:
            socket.inet_aton(host)
        except OSError:
            return False
    return True


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@dataclass
class FakeDNS:
    answers: dict[str, list[list[str]]] = field(default_factory=dict)
    calls: collections.Counter[str] = field(default_factory=collections.Counter)

    def script(self, name: str, *answers: list[str]) -> None:
        self.answers[name] = list(answers)

    def getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
                    ) -> list[Any]:  # fmt: skip
        name = host.decode() if isinstance(host, bytes) else str(host)
        self.calls[name] += 1
        if _is_literal(name) or name == "localhost":
            return _real_getaddrinfo(host, port, family, type, proto, flags)  # answered locally, no network
        script = self.answers.get(name)
        if not script:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answer = script[min(self.calls[name], len(script)) - 1]
        if not answer:  # scripted to stop resolving
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for address in answer:
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr: tuple[Any, ...] = (address, int(port or 0), 0, 0) if fam == socket.AF_INET6 else (
                address, int(port or 0))  # fmt: skip
            out.append((fam, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return out


@dataclass
class Dials:
    """Every TCP connection httpcore was asked to open: loopback ones go ahead, any other is refused here."""

    made: list[tuple[str, int]] = field(default_factory=list)

    def public(self) -> list[tuple[str, int]]:
        return [d for d in self.made if not _loopback(d[0])]


def install_fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    """Every lookup of the process (loop.getaddrinfo runs socket.getaddrinfo) goes to a FakeDNS."""
    fake = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


def install_dial_guard(monkeypatch: pytest.MonkeyPatch) -> Dials:
    """httpcore's connections are recorded, and refused unless they go to loopback."""
    record = Dials()

    async def connect_tcp(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        record.made.append((host, port))
        if not _loopback(host):
            raise httpcore.ConnectError(f"the test refuses to dial {host}:{port}")
        return await _real_connect_tcp(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", connect_tcp)
    return record


@dataclass
class Listener:
    """A TCP listener on loopback that counts the connections it accepts (and closes them)."""

    port: int = 0
    accepted: int = 0
    host: str = "127.0.0.1"
    servers: list[asyncio.Server] = field(default_factory=list)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.close()


@asynccontextmanager
async def open_listener() -> AsyncIterator[Listener]:
    """One port on 127.0.0.1 and, when the machine has IPv6, the same port on ::1."""
    box = Listener()
    server = await asyncio.start_server(box._accept, "127.0.0.1", 0)
    box.port = server.sockets[0].getsockname()[1]
    box.servers.append(server)
    try:
        box.servers.append(await asyncio.start_server(box._accept, "::1", box.port))
    except OSError:
        pass  # no IPv6 loopback here: the [::1] cases then find nothing listening, which they also assert
    try:
        yield box
    finally:
        for s in box.servers:
            s.close()
            await s.wait_closed()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


PUBLIC_LOOKING = "93.184.216.34"  # never dialled: the dial guard refuses it in the tests
