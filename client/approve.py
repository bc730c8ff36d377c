"""How `ccd` shows a tool approval request and answers it: asked on the terminal, or told how to answer."""
from __future__ import annotations

import json
import os
import select
import sys
from typing import TextIO

from client.api import ApiError, Client, Conflict, Event

# What the terminal prompt takes: behavior and remember.
CHOICES = {"y": ("allow", False), "yes": ("allow", False), "a": ("allow", True), "always": ("allow", True),
           "n": ("deny", False), "no": ("deny", False)}
QUESTION = "Allow? [y]es / [n]o / [a]lways allow (remember for this session): "
# While the question waits, how often ccd checks that the approval is still pending: it may be answered
# elsewhere (another client, the console) or time out, and then the question is withdrawn.
POLL_SECONDS = 2.0
MAX_INPUT_CHARS = 4000  # a Write's whole file would bury the question


def input_text(tool_input: object) -> str:
    """A tool's input as indented JSON, cut short when it is very long."""
    text = json.dumps(tool_input, indent=2, ensure_ascii=False)
    if len(text) > MAX_INPUT_CHARS:
        text = f"{text[:MAX_INPUT_CHARS]}\n… ({len(text) - MAX_INPUT_CHARS} more characters)"
    return text


def request_text(data: dict) -> str:
    """An approval.requested event's data as the lines ccd shows: the tool, its input, the deadline."""
    lines = [f"approval requested: {data.get('tool_name')} (request {data.get('request_id')})",
             *("  " + line for line in input_text(data.get("input")).splitlines())]
    if data.get("deadline"):
        lines.append(f"  denied unless answered by {data['deadline']}")
    return "\n".join(lines)


def how_to_answer(turn_id: str, request_id: str) -> str:
    """The ccd command that answers an approval, for a terminal that cannot be asked."""
    return f"  answer with: ccd approve {turn_id} {request_id} [--deny [--message M]] [--remember]"


def resolved_text(data: dict) -> str:
    """An approval.resolved event's data as one line: what was decided, by whom and how."""
    text = f"[approval {data.get('request_id')}: {data.get('status')}"
    if data.get("decided_by"):
        text += f" by {data['decided_by']}"
    if data.get("via"):
        text += f" via {data['via']}"
    if data.get("message"):
        text += f": {data['message']}"
    return text + "]"


def is_terminal(stream: TextIO) -> bool:
    """True when `stream` is a terminal that a person can answer on."""
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False


class Approver:
    """Handles the approval events of one followed turn: shows each request and, on a terminal, asks
    and answers it; without one, prints how to answer it. Writes to `out` (stderr: stdout is the answer)."""

    def __init__(self, client: Client, interactive: bool, stdin: TextIO | None = None,
                 out: TextIO | None = None) -> None:
        self.client, self.interactive = client, interactive
        self.stdin, self.out = stdin or sys.stdin, out or sys.stderr
        self.asked: set[tuple[str, str]] = set()  # a resumed stream replays events: ask once

    def handle(self, event: Event) -> bool:
        """Shows (and answers) an approval event; False for any other event."""
        kind, data, turn_id = event.get("type"), event.get("data") or {}, event.get("turn_id") or ""
        if kind == "approval.resolved":
            self.say(resolved_text(data))
            return True
        if kind != "approval.requested":
            return False
        key = (turn_id, str(data.get("request_id")))
        if key in self.asked:
            return True
        self.asked.add(key)
        if not self.pending(*key):
            return True  # answered already (a replayed event): its approval.resolved line follows
        self.say(request_text(data))
        if not self.interactive:
            self.say(how_to_answer(*key))
            return True
        self.ask(*key)
        return True

    def ask(self, turn_id: str, request_id: str) -> None:
        """Asks on the terminal until it gets an answer, then sends it; gives up when the approval is
        answered elsewhere or times out, or stdin ends."""
        while True:
            line = self.read_line(QUESTION, turn_id, request_id)
            if line is None:
                return
            choice = CHOICES.get(line.strip().lower())
            if choice is not None:
                break
            self.say("please answer y, n or a")
        behavior, remember = choice
        message = None
        if behavior == "deny":
            line = self.read_line("Message for the model (Enter for none): ", turn_id, request_id)
            if line is None:
                return
            message = line.strip() or None
        try:
            self.client.answer_approval(turn_id, request_id, behavior, message=message, remember=remember)
        except Conflict as exc:
            self.say(f"not answered: {exc.message}")
        except ApiError as exc:
            self.say(f"could not answer: {exc}")
            self.say(how_to_answer(turn_id, request_id))

    def read_line(self, question: str, turn_id: str, request_id: str) -> str | None:
        """One line typed after `question`; None when stdin ends or the approval stops being pending."""
        self.out.write(question)
        self.out.flush()
        while True:
            ready, _, _ = select.select([self.stdin], [], [], POLL_SECONDS)
            if ready:
                line = self.stdin.readline()
                if not line:
                    self.say("\n(stdin ended: not answered)")
                    self.say(how_to_answer(turn_id, request_id))
                    return None
                return line
            if not self.pending(turn_id, request_id):
                self.say("\n(no longer waiting: answered elsewhere or timed out)")
                return None

    def pending(self, turn_id: str, request_id: str) -> bool:
        """True while the approval waits for an answer (also when the API cannot be asked just now)."""
        try:
            approvals = self.client.approvals(turn_id)
        except ApiError:
            return True
        return any(a.get("request_id") == request_id and a.get("status") == "pending" for a in approvals)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)
