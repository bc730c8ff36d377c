"""A real S3-protocol server for the tests: moto_server (from `moto[server]`) on loopback."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import requests

from tests import stack

ACCESS_KEY = SECRET_KEY = "testing"  # moto accepts any keys; these are the conventional ones


class S3Server:
    """moto_server on 127.0.0.1 and a free port; `endpoint` is "127.0.0.1:PORT" as the minio client wants it."""

    def __init__(self) -> None:
        self.port = stack.free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.process: stack.Process | None = None

    def start(self, timeout: float = 30.0) -> "S3Server":
        """Starts the server and waits until it answers."""
        executable = Path(sys.executable).parent / "moto_server"  # installed into the same venv as pytest
        if not executable.exists():
            raise RuntimeError(f"{executable} is missing: pip install 'moto[server]>=5.0,<6'")
        self.process = stack.Process("moto", [str(executable), "-H", "127.0.0.1", "-p", str(self.port)],
                                     dict(os.environ))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise RuntimeError(f"moto_server exited:\n{self.process.tail()}")
            try:
                requests.get(f"http://{self.endpoint}/", timeout=1)
                return self
            except requests.RequestException:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
