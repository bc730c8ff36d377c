"""Vetted outbound connections: resolve a host once, refuse what is not public, connect to exactly what was vetted.

A check that resolves a name and a connect that resolves it again can see two answers (DNS rebinding: public
for the check, 127.0.0.1 or the cloud's metadata address for the connect). Here the one lookup's addresses
are checked and kept, and the socket is opened to those addresses only: nothing resolves the name again.
HTTP(S) goes through urllib3 on that socket, so the Host header, TLS SNI and the certificate check still use
the name, never the address.
"""
from __future__ import annotations

import functools
import ipaddress
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    from urllib3 import HTTPConnectionPool

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata and host services on addresses the registries call public (Azure's wireserver), and the
# others by name, though the ranges below already refuse them (link-local, shared, unique local).
METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "168.63.129.16", "100.100.100.200", "fd00:ec2::254"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the last 32 bits are an IPv4 address a NAT64 gateway reaches


class ResolveFailed(OSError):
    """The name did not resolve (perhaps for now: DNS fails and recovers)."""


class AddressRefused(OSError):
    """The name resolves to an address outbound connections may not reach."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to {address}, a loopback, link-local, private, metadata, multicast or "
                         "reserved address")
        self.host, self.address = host, address


@dataclass(frozen=True)
class Vetted:
    """A host name, a port, and the addresses its one lookup gave that passed the check."""

    host: str
    port: int
    sockaddrs: tuple[tuple[int, tuple], ...]  # (family, sockaddr) as getaddrinfo gave them, in its order


def refused(ip: IPAddress) -> bool:
    """True for every address that is not plainly public, and for public ones that carry or are a refused one."""
    if ip in METADATA:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and refused(embedded):
            return True
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified)


def vet(host: str, port: int, allow_private: bool = False) -> Vetted:
    """The one DNS lookup of a connection: every address must pass (unless `allow_private`), or none is used."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ResolveFailed(f"{host!r} does not resolve ({exc})") from None
    sockaddrs: list[tuple[int, tuple]] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        if not allow_private and refused(ipaddress.ip_address(sockaddr[0].split("%", 1)[0])):
            raise AddressRefused(host, sockaddr[0])
        if (family, sockaddr) not in sockaddrs:
            sockaddrs.append((family, sockaddr))
    if not sockaddrs:
        raise ResolveFailed(f"{host!r} has no IPv4 or IPv6 address")
    return Vetted(host, port, tuple(sockaddrs))


def open_socket(vetted: Vetted, timeout: float | None,
                options: Iterable[tuple[int, int, int]] = ()) -> socket.socket:
    """A TCP socket connected to the first vetted address that answers; never a new lookup."""
    error: OSError | None = None
    for family, sockaddr in vetted.sockaddrs:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            for option in options:
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    assert error is not None  # vet() never returns an empty list
    raise type(error)(f"{vetted.host} at {', '.join(a[0] for _, a in vetted.sockaddrs)}: {error}")


@functools.cache
def _pool_classes() -> tuple[type, type]:
    """urllib3's pools, their connections opened by open_socket. Made on first use, not on import: the web imports
    this module for vet(), and urllib3's references to ssl must not be loaded before gevent patches ssl (gevent
    warns, and such references would bypass its patch)."""
    from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    class _PinnedConnection(HTTPConnection):
        """urllib3's connection with its socket opened by open_socket (urllib3 would resolve the host again)."""

        def __init__(self, *args, vetted: Vetted, opened: list[socket.socket], **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.vetted, self.opened = vetted, opened

        def _new_conn(self) -> socket.socket:
            timeout = self.timeout if isinstance(self.timeout, (int, float)) else None
            try:
                sock = open_socket(self.vetted, timeout, self.socket_options or ())
                self.opened.append(sock)  # for deadline()
                return sock
            except TimeoutError as exc:
                raise ConnectTimeoutError(self, f"connecting timed out: {exc}") from exc
            except OSError as exc:
                raise NewConnectionError(self, f"could not connect: {exc}") from exc

    class _PinnedTLSConnection(_PinnedConnection, HTTPSConnection):
        """TLS on the vetted socket; SNI and the certificate check use the pool's host, the name."""

    class _PinnedPool(HTTPConnectionPool):
        ConnectionCls = _PinnedConnection

    class _PinnedTLSPool(HTTPSConnectionPool):
        ConnectionCls = _PinnedTLSConnection

    return _PinnedPool, _PinnedTLSPool


def pool(scheme: str, vetted: Vetted, timeout: float, ca_certs: str | None = None) -> HTTPConnectionPool:
    """A urllib3 connection pool for `vetted.host` whose connections go to the vetted addresses only.

    Its `urlopen` follows no redirect unless asked; callers pass `redirect=False, retries=False` to be plain about
    it. HTTPS verifies the certificate against the name (the system's CAs, or `ca_certs`). No proxy from the
    environment applies: the connection is direct, to what was vetted.
    """
    opened: list[socket.socket] = []
    plain_pool, tls_pool = _pool_classes()
    if scheme == "https":
        http = tls_pool(vetted.host, vetted.port, timeout=timeout, maxsize=1, retries=False,
                              cert_reqs="CERT_REQUIRED", ca_certs=ca_certs, vetted=vetted, opened=opened)
    elif scheme == "http":
        http = plain_pool(vetted.host, vetted.port, timeout=timeout, maxsize=1, retries=False, vetted=vetted,
                           opened=opened)
    else:
        raise ValueError(f"no pool for scheme {scheme!r}")
    http.opened = opened
    return http


@contextmanager
def deadline(http: HTTPConnectionPool, seconds: float) -> Iterator[None]:
    """Shuts down every socket `http` opened once `seconds` have passed in the block. A timeout bounds each read,
    not the request: a peer that trickles a byte at a time would otherwise hold it (and its worker) for ever."""
    def shut() -> None:
        for sock in list(http.opened):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns; the caller's request fails
            except OSError:
                pass  # closed already
    timer = threading.Timer(seconds, shut)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
