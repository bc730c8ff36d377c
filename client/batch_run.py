"""`ccd batch run`: a JSONL file of prompts in, a JSONL file of results out, resumable."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from client.api import Client, NotFound, batch_body
from client.console import UsageError, say


def read_prompts(path: Path, session: str | None, model: str | None) -> list[dict]:
    """The batch items of a JSONL file, each with a custom_id (its line number when not given)."""
    items, seen = [], set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        item = parse_prompt_line(line, f"{path}:{number}")
        item["custom_id"] = str(item.get("custom_id") or number)
        if item["custom_id"] in seen:
            raise UsageError(f"{path}:{number}: custom_id {item['custom_id']!r} appears twice")
        seen.add(item["custom_id"])
        items.append(with_target(item, session, model))
    if not items:
        raise UsageError(f"{path} holds no prompts")
    return items


def parse_prompt_line(line: str, where: str) -> dict:
    """One input line as an item: {"prompt", "custom_id"?, "session_id"?, "config"?}."""
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise UsageError(f"{where}: not JSON ({exc})") from None
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise UsageError(f'{where}: each line must be an object with a "prompt" string')
    unknown = set(item) - {"prompt", "custom_id", "session_id", "config"}
    if unknown:
        raise UsageError(f"{where}: unknown fields {sorted(unknown)}")
    return item


def with_target(item: dict, session: str | None, model: str | None) -> dict:
    """The item aimed at its own session or config, else --session, else a new session (+ --model)."""
    if item.get("session_id") or item.get("config") is not None:
        return item
    if session:
        return {**item, "session_id": session}
    return {**item, "config": {"model": model} if model else {}}


def read_results(path: Path) -> dict[str, dict]:
    """The results already in the --out file, by custom_id (a torn last line is ignored)."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict) and result.get("custom_id") is not None:
            done[str(result["custom_id"])] = result
    return done


def idempotency_key_of(body: bytes) -> str:
    """A key derived from the exact submission, so a re-run after a crash finds the same batch."""
    return "ccd-batch-" + hashlib.sha256(body).hexdigest()


class Progress:
    """A progress bar on stderr when it is a terminal, else a line every few seconds."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.width, self.done, self.failed = total, width, 0, 0
        self.tty = sys.stderr.isatty()
        self.printed_at = 0.0

    def add(self, result: dict) -> None:
        """Counts one finished item and redraws."""
        self.done += 1
        self.failed += result.get("status") != "succeeded"
        self.show()

    def show(self, force: bool = False) -> None:
        """Draws the bar (terminal) or prints a line at most every 5 s (otherwise)."""
        filled = self.width * self.done // max(self.total, 1)
        text = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}"
        text += f" ({self.failed} failed)" if self.failed else ""
        if self.tty:
            sys.stderr.write("\r" + text)
            sys.stderr.flush()
        elif force or time.monotonic() - self.printed_at >= 5 or self.done == self.total:
            self.printed_at = time.monotonic()
            say(text)

    def end(self) -> None:
        """Finishes the bar's line."""
        if self.tty:
            sys.stderr.write("\n")


class ResultsFile:
    """The --out JSONL file, appended one flushed line per finished item."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = read_results(path)
        self.file = path.open("a", encoding="utf-8")
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            self.file.write("\n")  # a crash tore the last line: start a fresh one

    def add(self, result: dict) -> bool:
        """Appends a result unless its custom_id is already recorded; True when appended."""
        custom_id = str(result.get("custom_id"))
        if custom_id in self.done:
            return False
        self.file.write(json.dumps(result, separators=(",", ":")) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.done[custom_id] = result
        return True

    def close(self) -> None:
        self.file.close()


def marker_path(out: Path) -> Path:
    """Where a run notes the batch it is following, so a re-run after a crash reattaches to it."""
    return out.with_name(out.name + ".batch")


def collect(client: Client, batch_id: str, results: ResultsFile, progress: Progress | None) -> None:
    """Streams the batch's results into the --out file as they arrive."""
    for result in client.batch_results(batch_id, follow=True):
        if results.add(result) and progress is not None:
            progress.add(result)


def reattach(client: Client, out: Path, results: ResultsFile) -> None:
    """Finishes collecting the batch an interrupted run was following, if any."""
    marker = marker_path(out)
    if not marker.exists():
        return
    batch_id = marker.read_text().strip()
    try:
        client.batch(batch_id)
    except NotFound:
        marker.unlink()
        return
    say(f"reattaching to batch {batch_id} of an interrupted run")
    collect(client, batch_id, results, None)
    marker.unlink()


def run_batch(client: Client, pending: list[dict], concurrency: int, out: Path, results: ResultsFile) -> None:
    """Submits one batch (reattaching to it if an earlier run submitted the same) and follows it."""
    key = idempotency_key_of(batch_body(pending, concurrency))
    batch = client.create_batch(pending, concurrency, idempotency_key=key)
    marker_path(out).write_text(batch["id"] + "\n")
    say(f"batch {batch['id']}: {len(pending)} items, concurrency {concurrency}")
    progress = Progress(len(pending))
    progress.show(force=True)
    try:
        collect(client, batch["id"], results, progress)
    except KeyboardInterrupt:
        progress.end()
        say(f"interrupted; batch {batch['id']} keeps running. Re-run the same command to collect "
            f"its results, or stop it with: ccd batch cancel {batch['id']}")
        raise
    progress.end()
    marker_path(out).unlink(missing_ok=True)
