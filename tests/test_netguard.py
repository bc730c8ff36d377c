"""The vetted connect (core/netguard.py): one DNS lookup, refused addresses, the socket on the vetted address, and
TLS still checked against the name. A resolver stands in for the DNS server (socket.getaddrinfo, answering as a
rebinding attacker's server would); the HTTP servers and the TLS handshake are real."""
from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time

import pytest
from urllib3.exceptions import HTTPError, SSLError

from core import netguard
from tests.receiver import Receiver


class Resolver:
    """Answers lookups of `name` with the next of `answers` (the last one from then on); other names as usual."""

    def __init__(self, monkeypatch, name: str, *answers: str) -> None:
        self.name, self.answers, self.lookups = name, list(answers), 0
        real = socket.getaddrinfo

        def getaddrinfo(host, port, *args, **kwargs):
            if host != name:
                return real(host, port, *args, **kwargs)
            answer = self.answers[min(self.lookups, len(self.answers) - 1)]
            self.lookups += 1
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (answer, int(port)))]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def post(scheme: str, host: str, port: int, allow_private: bool, **pool_args):
    """A POST through the vetted connect, as webhook delivery makes it."""
    http = netguard.pool(scheme, netguard.vet(host, port, allow_private), timeout=pool_args.pop("timeout", 5),
                         **pool_args)
    try:
        return http.urlopen("POST", "/hook", body=b"{}", redirect=False, retries=False)
    finally:
        http.close()


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.5", "169.254.169.254",
                                     "168.63.129.16", "100.100.100.200", "100.64.0.1", "0.0.0.0", "224.0.0.1",
                                     "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fd00:ec2::254",
                                     "ff02::1", "::ffff:127.0.0.1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1"])
def test_loopback_private_link_local_metadata_multicast_and_reserved_addresses_are_refused(address):
    assert netguard.refused(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address):
    assert not netguard.refused(ipaddress.ip_address(address))


def test_a_rebinding_name_is_looked_up_once_and_the_connection_goes_to_the_public_address_it_gave(monkeypatch):
    """The attacker's DNS answers a public address to the check and 127.0.0.1 to any later lookup: the request
    never reaches the loopback server, because nothing looks the name up a second time."""
    trap = Receiver()
    resolver = Resolver(monkeypatch, "rebind.example", "93.184.215.14", "127.0.0.1")
    try:
        with pytest.raises(HTTPError) as err:
            post("http", "rebind.example", trap.port, allow_private=False, timeout=1)
        assert "93.184.215.14" in str(err.value)  # where the one connection attempt went
        assert resolver.lookups == 1 and trap.header("Host") == []
    finally:
        trap.stop()


def test_a_name_that_resolves_to_loopback_is_refused_before_any_connection(monkeypatch):
    trap = Receiver()
    resolver = Resolver(monkeypatch, "inside.example", "127.0.0.1")
    try:
        with pytest.raises(netguard.AddressRefused):
            post("http", "inside.example", trap.port, allow_private=False)
        assert resolver.lookups == 1 and trap.header("Host") == []
    finally:
        trap.stop()


def test_every_connection_of_a_vetted_pool_goes_to_the_vetted_address_with_the_name_as_host(monkeypatch):
    """With private addresses allowed both answers pass; the pool's connections (the server closes each after one
    request, so the second request makes a new one) still go where the one lookup said, never looking again."""
    vetted = Receiver()
    other = Receiver(address="127.0.0.2", port=vetted.port)
    resolver = Resolver(monkeypatch, "pinned.example", "127.0.0.1", "127.0.0.2")
    http = netguard.pool("http", netguard.vet("pinned.example", vetted.port, allow_private=True), timeout=5)
    try:
        for _ in range(2):
            assert http.urlopen("POST", "/hook", body=b"{}", redirect=False, retries=False).status == 200
        assert vetted.header("Host") == [f"pinned.example:{vetted.port}"] * 2 and other.header("Host") == []
        assert resolver.lookups == 1
        # A new lookup is a new vetting, and its answer is where that connection goes.
        assert post("http", "pinned.example", vetted.port, allow_private=True).status == 200
        assert other.header("Host") == [f"pinned.example:{vetted.port}"] and resolver.lookups == 2
    finally:
        http.close()
        vetted.stop()
        other.stop()


def certificate(tmp_path, names: list[str]) -> tuple[str, ssl.SSLContext]:
    """A CA (its file) and a server TLS context with a certificate it signed for `names` and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False).sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return str(ca_path), context


def test_https_sends_the_name_as_sni_and_checks_the_certificate_against_the_name_not_the_address(
        monkeypatch, tmp_path):
    ca, context = certificate(tmp_path, ["hook.example"])
    seen: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: seen.append(name)
    server = Receiver(tls=context)
    Resolver(monkeypatch, "hook.example", "127.0.0.1")
    try:
        assert post("https", "hook.example", server.port, allow_private=True, ca_certs=ca).status == 200
        assert seen == ["hook.example"] and server.header("Host") == [f"hook.example:{server.port}"]
    finally:
        server.stop()


def test_https_refuses_a_certificate_for_another_name_even_when_it_covers_the_address(monkeypatch, tmp_path):
    ca, context = certificate(tmp_path, ["other.example"])  # and 127.0.0.1, where the name resolves
    server = Receiver(tls=context)
    Resolver(monkeypatch, "hook.example", "127.0.0.1")
    try:
        with pytest.raises(SSLError, match="hook.example"):
            post("https", "hook.example", server.port, allow_private=True, ca_certs=ca)
        assert server.header("Host") == []
    finally:
        server.stop()


def test_a_deadline_ends_a_request_whose_answer_trickles_in_slower_than_any_read_timeout():
    """A peer that sends its status line a byte every 0.2 s never trips a 1 s read timeout; the deadline ends it."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1")
        while not stop.is_set():
            try:
                conn.sendall(b" ")
            except OSError:
                return
            time.sleep(0.2)
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    http = netguard.pool("http", netguard.vet("127.0.0.1", listener.getsockname()[1], allow_private=True), timeout=1)
    started = time.monotonic()
    try:
        with pytest.raises(HTTPError), netguard.deadline(http, 1.5):
            http.urlopen("POST", "/hook", body=b"{}", redirect=False, retries=False)
        assert 1.4 < time.monotonic() - started < 5
    finally:
        stop.set()
        http.close()
        listener.close()
