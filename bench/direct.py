"""The baseline the service is measured against: a Claude Code turn run directly with `docker exec … claude -p`
in a session's container, through the Docker API (`exec_create`/`exec_start`, no CLI start-up in the figure)."""
from __future__ import annotations

import time
import uuid

from workers.model_proxy import mint_model_credential
from workers.runtime import ExecResult


class DirectTurns:
    """Turns of one conversation of its own, run straight in a container: --session-id first, then --resume."""

    def __init__(self, bench, session_id: str) -> None:
        self.bench, self.session_id = bench, session_id
        self.container = bench.container_of(session_id).id
        self.conversation, self.started = str(uuid.uuid4()), False
        self.env = {"ANTHROPIC_BASE_URL": bench.runtime.model_proxy_url(),
                    "ANTHROPIC_API_KEY": mint_model_credential(bench.settings.jwt_secret, session_id, 6 * 3600)}

    def argv(self) -> list[str]:
        """The command line the wrapper gives Claude Code for a session with the default config."""
        flag = "--resume" if self.started else "--session-id"
        return ["claude", "-p", "--output-format", "stream-json", "--verbose", "--include-partial-messages",
                flag, self.conversation, "--permission-mode", "bypassPermissions"]

    def run(self, prompt: str) -> float:
        """One turn, start to exit; returns its wall time in seconds."""
        result: list[ExecResult] = []
        start = time.monotonic()
        lines = sum(1 for _ in self.bench.runtime.exec_lines(self.container, self.argv(), self.env,
                                                              prompt.encode(), result))
        elapsed = time.monotonic() - start
        if not result or result[0].exit_code != 0 or lines == 0:
            raise RuntimeError(f"direct claude -p failed: {result[0] if result else 'no result'}")
        self.started = True
        return elapsed
