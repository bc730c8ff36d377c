"""The host firewall for the sessions' network: from it, the host answers only at the model proxy's
and the API's ports (iptables INPUT rules on the network's bridge).

The internal network already keeps sessions from routing anywhere beyond the host, and services
bound to 127.0.0.1 are out of reach; these rules also close host services that listen on every
address. Best effort: without iptables or the right to use it, the worker logs what to add.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import time
from urllib.parse import urlsplit

from core.settings import Settings

log = logging.getLogger(__name__)


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


def rules(bridge: str, ports: list[int]) -> tuple[list[list[str]], list[list[str]]]:
    """(rules to put first in INPUT, rules to put last): let answers and the allowed ports in, refuse the rest."""
    first = [["-i", bridge, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]]
    first += [["-i", bridge, "-p", "tcp", "--dport", str(port), "-j", "ACCEPT"] for port in ports]
    last = [["-i", bridge, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"], ["-i", bridge, "-j", "DROP"]]
    return first, last


def guard(bridge: str, settings: Settings) -> bool:
    """Installs the rules for the bridge interface (idempotent); False, with a warning saying what to add, if not."""
    first, last = rules(bridge, allowed_ports(settings))
    iptables = shutil.which("iptables")
    changed = False
    try:
        if iptables is None:
            raise OSError("iptables is not installed")
        # All at the top of INPUT, so no broader ACCEPT further down (ufw, firewalld) comes first:
        # the refusals go in first, then the accepts above them.
        if not all(_present(iptables, rule) for rule in last):
            changed = True
            for rule in first + last:
                while _present(iptables, rule):
                    _run(iptables, "-D", "INPUT", *rule)
            for rule in reversed(last):
                _run(iptables, "-I", "INPUT", "1", *rule)
        for rule in reversed(first):
            if not _present(iptables, rule):
                changed = True
                _run(iptables, "-I", "INPUT", "1", *rule)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        shown = "; ".join("iptables -I INPUT " + " ".join(r) for r in first)
        log.warning("could not guard the host from session network %s (%s): host services listening on all "
                    "addresses are reachable from sessions. Add, as root: %s; iptables -A INPUT -i %s -j DROP",
                    settings.session_network, detail, shown, bridge)
        return False
    log.log(logging.INFO if changed else logging.DEBUG, "host firewall: sessions on %s reach the host only at "
            "ports %s", bridge, allowed_ports(settings))
    return True


def keep_guarding(settings: Settings, every: float = 60.0) -> None:
    """Applies the rules for CCD_SESSION_BRIDGE now and every minute after, since a Docker or firewall restart can
    drop them: compose's host-firewall service, which has the host's network but no Docker socket."""
    if not settings.session_bridge:
        raise SystemExit("error: set CCD_SESSION_BRIDGE (the sessions' bridge interface name) for the firewall role")
    while True:
        guard(settings.session_bridge, settings)
        time.sleep(every)


def _present(iptables: str, rule: list[str]) -> bool:
    return subprocess.run([iptables, "-C", "INPUT", *rule], capture_output=True).returncode == 0


def _run(iptables: str, *args: str) -> None:
    subprocess.run([iptables, *args], capture_output=True, text=True, check=True)


def unguard(network) -> None:
    """Removes every INPUT rule on the network's bridge (before the network itself is removed)."""
    iptables = shutil.which("iptables")
    if iptables is None:
        return
    bridge = bridge_name(network)
    listing = subprocess.run([iptables, "-S", "INPUT"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        spec = line.split()
        if spec[:2] == ["-A", "INPUT"] and f"-i {bridge} " in f"{line} ":
            subprocess.run([iptables, "-D", "INPUT", *spec[2:]], capture_output=True)
