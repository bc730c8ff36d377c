"""The host firewall for the sessions' network, fail closed: sessions start only while its rules are in place.

From the sessions' bridge the host answers only at the model proxy's and the API's ports (iptables INPUT); nothing
is forwarded from or to the bridge but connections to those ports that Docker forwards to a container (a published
port, as under compose), and their answers (DOCKER-USER); no IPv6 at all (ip6tables INPUT and FORWARD). The
internal network already has no route out, and services bound to 127.0.0.1 are out of reach; these rules also close
host services that listen on every address. With CCD_HOST_FIREWALL=true the worker installs and checks them itself;
with `external` another component does (compose's host-firewall keeper, `python -m workers firewall`), and the
worker checks the status file it writes (CCD_HOST_FIREWALL_STATUS).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from core.errors import Unavailable
from core.settings import Settings

log = logging.getLogger(__name__)

# A check that passed holds this long: a burst of session starts reads the rules once (each read costs ~25 ms).
RECHECK_SECONDS = 2.0
# The keeper re-applies the rules this often (a Docker or firewall restart can drop them); its status file is stale,
# and sessions stop starting, after three missed rounds.
KEEPER_SECONDS = 10.0
STATUS_MAX_AGE_SECONDS = 3 * KEEPER_SECONDS
SIOCGIFADDR = 0x8915
ADVICE = ("run the worker as root with iptables (CCD_HOST_FIREWALL=true), or run `python -m workers firewall` on the "
          "host and set CCD_HOST_FIREWALL=external")


class FirewallMissing(Unavailable):
    """The host firewall for the sessions' bridge is not in place: no session may start."""

    code = "host_firewall_missing"


def bridge_name(network) -> str:
    """The host interface of a Docker bridge network."""
    options = network.attrs.get("Options") or {}
    return options.get("com.docker.network.bridge.name") or f"br-{network.id[:12]}"


def allowed_ports(settings: Settings) -> list[int]:
    """The host ports a session may reach: the model proxy's, and the API's when agents get it."""
    ports = [settings.model_proxy_port]
    if settings.session_api_url:
        url = urlsplit(settings.session_api_url)
        ports.append(url.port or (443 if url.scheme == "https" else 80))
    return sorted(set(ports))


def rules(bridge: str, ports: list[int]) -> dict[tuple[str, str], list[list[str]]]:
    """Each (tool, chain)'s rules for the bridge, in order; they go at the top of the chain, before any broader
    ACCEPT (ufw, firewalld, Docker's own)."""
    established = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"]
    host = [["-i", bridge, *established, "-j", "ACCEPT"]]
    host += [["-i", bridge, "-p", "tcp", "--dport", str(port), "-j", "ACCEPT"] for port in ports]
    host += [["-i", bridge, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"], ["-i", bridge, "-j", "DROP"]]
    # A published port is DNAT'd to its container, so reaching it is forwarded traffic: allowed for these ports only.
    forwarded = [["-i", bridge, "-p", "tcp", "-m", "conntrack", "--ctstate", "DNAT", "--ctorigdstport", str(port),
                  "-j", "ACCEPT"] for port in ports]
    forwarded += [["-o", bridge, "-p", "tcp", "-m", "conntrack", "--ctstate", "DNAT", "--ctorigdstport", str(port),
                   "--ctdir", "REPLY", "-j", "ACCEPT"] for port in ports]
    forwarded += [["-i", bridge, *established, "-j", "RETURN"], ["-i", bridge, "-j", "DROP"],
                  ["-o", bridge, "-j", "DROP"]]
    no_ipv6 = [["-i", bridge, "-j", "DROP"]]
    return {("iptables", "INPUT"): host, ("iptables", "DOCKER-USER"): forwarded,
            ("ip6tables", "INPUT"): no_ipv6, ("ip6tables", "FORWARD"): no_ipv6 + [["-o", bridge, "-j", "DROP"]]}


def _normal(spec: list[str]) -> list[str]:
    """A rule as `iptables -S` prints it and as we write it alike: no implicit `-m tcp`, ctstates sorted."""
    out, i = [], 0
    while i < len(spec):
        if spec[i] == "-m" and i + 1 < len(spec) and spec[i + 1] in ("tcp", "udp"):
            i += 2
            continue
        out.append(",".join(sorted(spec[i].split(","))) if out and out[-1] == "--ctstate" else spec[i])
        i += 1
    return out


def _mentions(spec: list[str], bridge: str) -> bool:
    return any(flag in ("-i", "-o") and value == bridge for flag, value in zip(spec, spec[1:]))


def _ours(saved: str, chain: str, bridge: str) -> list[list[str]]:
    """The rules of `chain` on the bridge, in order, from iptables-save's output."""
    found = []
    for line in saved.splitlines():
        spec = line.split()
        if spec[:2] == ["-A", chain] and _mentions(spec[2:], bridge):
            found.append(_normal(spec[2:]))
    return found


def _tools() -> dict[str, str]:
    found = {tool: shutil.which(tool) for tool in ("iptables", "ip6tables")}
    if found["iptables"] is None:
        raise FirewallMissing("iptables is not installed (apt-get install iptables)")
    if found["ip6tables"] is None and Path("/proc/net/if_inet6").exists():
        raise FirewallMissing("ip6tables is not installed, and this host has IPv6 (apt-get install iptables)")
    return {tool: path for tool, path in found.items() if path}


def _save(tool: str) -> str:
    proc = subprocess.run([f"{tool}-save", "-t", "filter"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FirewallMissing(f"{tool}-save failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _with_others(bridge: str, ports: list[int], saved_ipv4: str) -> list[int]:
    """Our ports and those the bridge's rules already let through: another worker of this host (a second stack, a
    worker being replaced) may guard the same bridge for other ports, and neither may take the other's away (they
    would rewrite each other's rules on every check)."""
    found = set(ports)
    for chain, flag in (("INPUT", "--dport"), ("DOCKER-USER", "--ctorigdstport")):
        for spec in _ours(saved_ipv4, chain, bridge):
            if flag in spec and spec[-1] == "ACCEPT" and spec[spec.index(flag) + 1].isdigit():
                found.add(int(spec[spec.index(flag) + 1]))
    return sorted(found)


def missing(bridge: str, ports: list[int]) -> list[str]:
    """What is wrong with the bridge's rules ("iptables INPUT", …), empty when all are in place and in order."""
    tools = _tools()
    wrong, saved = [], {tool: _save(path) for tool, path in tools.items()}
    for (tool, chain), specs in rules(bridge, _with_others(bridge, ports, saved["iptables"])).items():
        if tool in saved and _ours(saved[tool], chain, bridge) != [_normal(s) for s in specs]:
            wrong.append(f"{tool} {chain}")
    return wrong


def install(bridge: str, ports: list[int]) -> None:
    """Puts the bridge's rules at the top of each chain, in order (idempotent: chains already right are left be)."""
    tools = _tools()
    for (tool, chain), specs in rules(bridge, _with_others(bridge, ports, _save(tools["iptables"]))).items():
        if tool not in tools:
            continue
        exe = tools[tool]
        if _ours(_save(exe), chain, bridge) == [_normal(s) for s in specs]:
            continue
        if chain == "DOCKER-USER":  # Docker makes it; made here too, so the rules hold before Docker's first start
            subprocess.run([exe, "-N", chain], capture_output=True)
            if subprocess.run([exe, "-C", "FORWARD", "-j", chain], capture_output=True).returncode != 0:
                _run(exe, "-I", "FORWARD", "1", "-j", chain)
        _remove(exe, chain, bridge)
        for spec in reversed(specs):
            _run(exe, "-I", chain, "1", *spec)


def guard(bridge: str, settings: Settings) -> bool:
    """Installs the rules for the bridge interface; False, with an error saying what to do, if it cannot."""
    ports = allowed_ports(settings)
    try:
        install(bridge, ports)
    except (OSError, subprocess.CalledProcessError, FirewallMissing) as exc:
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        log.error("could not guard the host from session network %s (bridge %s): %s. No session starts until the "
                  "rules are in place: %s", settings.session_network, bridge, detail, ADVICE)
        return False
    log.info("host firewall: sessions on %s reach the host only at ports %s", bridge, ports)
    return True


def interface_address(name: str) -> str | None:
    """The IPv4 address of a network interface in this network namespace; None when it has none or is not here."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


class Gate:
    """The worker's check before every session start: the sessions' network and the rules guarding it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._passed_at = 0.0

    def passed_recently(self) -> bool:
        return time.monotonic() - self._passed_at < RECHECK_SECONDS

    def require(self, network, gateway: str) -> None:
        """Returns when sessions may start on `network`; FirewallMissing saying what to do otherwise."""
        bridge = self.check_network(network)
        ports = allowed_ports(self.settings)
        if self.settings.host_firewall == "true":
            self._require_own(bridge, gateway, ports)
        elif self.settings.host_firewall_status:
            self._require_status(bridge, gateway, ports)
        self._passed_at = time.monotonic()

    def check_network(self, network) -> str:
        """The bridge to guard: the network's own, as the engine names it, which must be CCD_SESSION_BRIDGE when
        that is set (a keeper guards that name), on a network without IPv6."""
        bridge = bridge_name(network)
        wanted = self.settings.session_bridge
        if wanted and bridge != wanted:
            raise FirewallMissing(
                f"network {self.settings.session_network} has bridge {bridge}, not CCD_SESSION_BRIDGE={wanted}, which "
                "the host firewall guards (the network was made before that was set): stop its sessions, remove it "
                f"(docker network rm {self.settings.session_network}) and the worker makes it again")
        if network.attrs.get("EnableIPv6"):
            raise FirewallMissing(f"network {self.settings.session_network} has IPv6 enabled: sessions must have "
                                  "none; remove the network and the worker makes it again without")
        return bridge

    def _require_own(self, bridge: str, gateway: str, ports: list[int]) -> None:
        address = interface_address(bridge)
        if address != gateway:
            raise FirewallMissing(
                f"the worker sees no interface {bridge} with the sessions' gateway {gateway} (it found "
                f"{address or 'none'}): it is not in the host's network namespace, so its firewall rules would guard "
                "nothing. Set CCD_HOST_FIREWALL=external and run `python -m workers firewall` on the host")
        try:
            wrong = missing(bridge, ports)
        except FirewallMissing as exc:
            raise FirewallMissing(f"{exc}; sessions start only behind the host firewall: {ADVICE}") from None
        if wrong:
            if not guard(bridge, self.settings) or missing(bridge, ports):
                raise FirewallMissing(f"the host firewall rules for {bridge} are not in place ({', '.join(wrong)}) "
                                      f"and could not be installed: {ADVICE}")
            log.warning("host firewall rules for %s were missing (%s): installed them again", bridge, ", ".join(wrong))

    def _require_status(self, bridge: str, gateway: str, ports: list[int]) -> None:
        path = self.settings.host_firewall_status
        try:
            status = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise FirewallMissing(f"no host firewall status in {path} ({exc}): is the host-firewall keeper "
                                  "(`python -m workers firewall`) running with the same CCD_HOST_FIREWALL_STATUS?") from None
        age = time.time() - float(status.get("at") or 0)
        problems = []
        if not status.get("ok"):
            problems.append(f"the keeper reports: {status.get('error') or 'rules not in place'}")
        if age > STATUS_MAX_AGE_SECONDS:
            problems.append(f"its status is {age:.0f} s old")
        if status.get("bridge") != bridge:
            problems.append(f"it guards {status.get('bridge')!r}, the sessions' bridge is {bridge!r}")
        if status.get("address") != gateway:
            problems.append(f"its bridge has address {status.get('address')!r}, the sessions' gateway is {gateway}")
        if not set(ports) <= set(status.get("ports") or []):
            problems.append(f"it allows ports {status.get('ports')}, sessions need {ports}")
        if problems:
            raise FirewallMissing("the host firewall keeper's rules are not in place for this network: "
                                  + "; ".join(problems))


def watch(settings: Settings) -> threading.Thread:
    """Checks the rules every CCD_FIREWALL_CHECK_SECONDS in a thread of the worker's main process, and with
    CCD_HOST_FIREWALL=true puts back what a firewall reload or an engine restart dropped: running sessions and warm
    pool containers are guarded between starts too, not only when one starts."""
    from workers.runtime import DockerRuntime  # here: the runtime imports this module

    def loop() -> None:
        runtime = DockerRuntime(settings)
        while True:
            time.sleep(settings.firewall_check_seconds)
            try:
                runtime.require_firewall(fresh=True)  # logs a warning when it puts rules back
            except FirewallMissing as exc:
                log.error("host firewall: running sessions on this host are not guarded: %s", exc)
            except Exception:  # e.g. the engine is restarting: the next pass looks again
                log.exception("host firewall: the periodic check failed")

    thread = threading.Thread(target=loop, name="firewall-watcher", daemon=True)
    thread.start()
    return thread


def write_status(path: str, status: dict) -> None:
    """The keeper's status for the worker, replaced whole (a reader never sees half a file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    partial.write_text(json.dumps(status))
    partial.replace(target)


def keep_guarding(settings: Settings, every: float = KEEPER_SECONDS, rounds: int | None = None) -> None:
    """Applies the rules for CCD_SESSION_BRIDGE now and every `every` seconds after, and says so in the status file:
    compose's host-firewall service, which has the host's network but no Docker socket."""
    if not settings.session_bridge:
        raise SystemExit("error: set CCD_SESSION_BRIDGE (the sessions' bridge interface name) for the firewall role")
    bridge, ports = settings.session_bridge, allowed_ports(settings)
    while rounds is None or rounds > 0:
        ok = guard(bridge, settings)
        try:
            wrong = missing(bridge, ports) if ok else ["not installed"]
        except FirewallMissing as exc:
            wrong = [str(exc)]
        address = interface_address(bridge)  # the worker checks it is the sessions' gateway
        error = ", ".join(wrong) or (None if address else f"no interface {bridge} on this host yet")
        if settings.host_firewall_status:
            write_status(settings.host_firewall_status, {"ok": not wrong, "bridge": bridge, "address": address,
                                                         "ports": ports, "at": time.time(), "error": error})
        rounds = None if rounds is None else rounds - 1
        if rounds != 0:
            time.sleep(every)


def _run(exe: str, *args: str) -> None:
    subprocess.run([exe, *args], capture_output=True, text=True, check=True)


def _remove(exe: str, chain: str, bridge: str) -> None:
    """Deletes the chain's rules on the bridge, by their spec (never by number: other hosts' rules may move)."""
    listing = subprocess.run([exe, "-S", chain], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        spec = line.split()
        if spec[:2] == ["-A", chain] and _mentions(spec[2:], bridge):
            subprocess.run([exe, "-D", chain, *spec[2:]], capture_output=True)


def unguard(network) -> None:
    """Removes every rule on the network's bridge (before the network itself is removed)."""
    unguard_bridge(bridge_name(network))


def unguard_bridge(bridge: str) -> None:
    """Removes every rule on the bridge interface, in each chain we write to."""
    for tool, chain in rules(bridge, []):
        exe = shutil.which(tool)
        if exe is not None:
            _remove(exe, chain, bridge)
