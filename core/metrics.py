"""Prometheus plumbing shared by the web tier and the workers: multiprocess mode, the exposition, the scrape token.

prometheus-client chooses between in-process and multiprocess values when it is first imported, from
PROMETHEUS_MULTIPROC_DIR; so this module imports it only inside functions, and `use_private_multiprocess_dir`
must run before anything that defines a metric is imported.
"""
from __future__ import annotations

import hmac
import os
import shutil
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def use_private_multiprocess_dir(name: str) -> Path:
    """Gives this process (and the children it forks) a fresh, empty multiprocess directory of its own.

    The directory is named after the process id, and emptied first, so counts of an earlier process that
    had the same id are gone; directories of `name` left by processes that no longer run are removed.
    """
    base = Path(tempfile.gettempdir())
    for stale in base.glob(f"{name}-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    path = base / f"{name}-{os.getpid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    empty_directory(path)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def empty_directory(path: str | Path) -> None:
    """Removes the files in a multiprocess directory (creating it when missing): counts start again from zero."""
    Path(path).mkdir(parents=True, exist_ok=True)
    for entry in Path(path).iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class _Forward:
    """Yields another registry's metrics, so a scrape registry can add collectors of its own."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def collect(self):
        yield from self.registry.collect()


def exposition(*collectors) -> tuple[bytes, str]:
    """The text exposition of this process's metrics (every process's in multiprocess mode), plus `collectors`."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_mode():
        MultiProcessCollector(registry)
    else:
        registry.register(_Forward(REGISTRY))
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def scrape_allowed(authorization: str | None, token: str) -> bool:
    """True when no metrics token is set, or the Authorization header is `Bearer <token>`."""
    if not token:
        return True
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())
