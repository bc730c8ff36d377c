"""The web console at GET / in a real headless Chromium, against the real stack: a pasted token, a new
session, a reply that streams into the page while the turn runs, the finished turn with cost and
duration, a dropped socket that resumes from the last event, a folded tool call, cancel and stop, and a turn's tool
approvals answered with Allow and Deny."""
from __future__ import annotations

import re
import secrets

import pytest
import requests
from playwright.sync_api import Browser, Page, expect

from tests.approval_requests import Approvals
from tests.stack import LOG_DIR

pytestmark = pytest.mark.docker
TURN_SECONDS = 90_000  # ms: a turn, container start included


@pytest.fixture
def console(browser: Browser, stack_env):
    """A fresh page (own storage) on the console, with every script error and console error it logs."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(30_000)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.goto(stack_env["base"] + "/")
    yield page, problems, sockets
    context.close()


class Owner:
    """The API as the page's owner, to check what the page shows against what the API says."""

    def __init__(self, base: str, jwt: str) -> None:
        self.base, self.headers = base, {"Authorization": f"Bearer {jwt}"}

    def get(self, path: str) -> dict:
        resp = requests.get(self.base + path, headers=self.headers, timeout=30)
        assert resp.status_code == 200, (path, resp.status_code, resp.text)
        return resp.json()


def sign_in_and_create_session(page: Page, jwt: str) -> str:
    """Pastes the token, creates a session with the button; returns the id the page shows."""
    page.fill("#token", jwt)
    page.click("#token-form button")
    expect(page.locator("#sessions")).to_contain_text("no sessions yet")
    expect(page.locator("#session")).to_be_hidden()  # until a session is open
    page.click("#create")
    expect(page.locator("#session-id")).to_have_text(re.compile(r"^[0-9a-f-]{36}$"))
    sid = page.locator("#session-id").inner_text()
    expect(page.locator(f'#sessions li[data-id="{sid}"] .status')).to_have_count(1)
    expect(page.locator("#connection")).to_have_text("live")
    return sid


def new_owner_with_session(page: Page, stack_env, token) -> tuple[str, str, Owner, str]:
    """A fresh owner signed in on the page with a new session: (owner, token, the API as the owner, session id)."""
    owner = f"console-{secrets.token_hex(3)}"
    jwt = token(owner)
    return owner, jwt, Owner(stack_env["base"], jwt), sign_in_and_create_session(page, jwt)


def send(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#prompt-form button")
    expect(page.locator("#prompt")).to_have_value("")  # cleared once the API took it


def turn(page: Page, n: int):
    return page.locator("#log section.turn").nth(n)


def test_console_streams_a_reply_live_resumes_after_a_drop_and_folds_tool_calls(console, stack_env, token):
    page, problems, sockets = console
    _, jwt, api, sid = new_owner_with_session(page, stack_env, token)
    assert page.evaluate("localStorage.getItem('ccd.token')") == jwt

    # A slow scripted reply: its text is in the page while the turn is still running.
    send(page, "SLOW: 3")
    first = turn(page, 0)
    expect(first.locator(".user")).to_have_text("SLOW: 3")
    page.wait_for_function("""() => {
        const t = document.querySelector('#log section.turn');
        return t && t.dataset.status === 'running' && /tick\\d+ tick\\d+/.test(t.querySelector('.assistant')?.textContent || '');
    }""", timeout=TURN_SECONDS)
    expect(first).to_have_attribute("data-status", "succeeded", timeout=TURN_SECONDS)

    # What the page streamed is the turn's whole answer; the footer has the turn's cost and duration.
    turns = api.get(f"/api/v1/sessions/{sid}/turns")["items"]
    assert [t["status"] for t in turns] == ["succeeded"], turns
    done = turns[0]
    assert done["result"].endswith("SLOW-DONE") and done["result"].startswith("tick0 "), done["result"]
    assert first.locator(".assistant").inner_text() == done["result"]
    assert first.locator("footer .turn-status").inner_text() == "succeeded"
    cost = first.locator("footer .cost").inner_text()
    duration = first.locator("footer .duration").inner_text()
    # Shown to 4 decimals (6 below a cent): within half of its last digit of the turn's (metered) cost.
    shown = re.fullmatch(r"\$\d+\.(\d+)", cost)
    assert shown and abs(float(cost[1:]) - done["cost_usd"]) <= 10 ** -len(shown.group(1)) / 2 + 1e-12, (cost, done)
    assert done["duration_ms"] > 0 and re.fullmatch(r"\d+\.\d s", duration), duration
    assert abs(float(duration[:-2]) - done["duration_ms"] / 1000) <= 0.051, (duration, done["duration_ms"])

    # The socket drops: the page reconnects from the last event it had, and nothing is shown twice.
    last_id = page.evaluate("""() => {
        const s = window.ccdConsole.state, id = s.lastId;
        s.socket.close(4000, 'dropped by the test');
        return id;
    }""")
    assert last_id and len(sockets) == 1 and "since=" not in sockets[0], sockets
    expect(page.locator("#connection")).to_have_text("live", timeout=15_000)
    assert len(sockets) == 2 and sockets[1].endswith(f"&since={last_id}"), sockets

    # A tool call after the reconnect: folded into <details>, with its result inside.
    send(page, "RUN: echo console-tool-output")
    second = turn(page, 1)
    expect(second).to_have_attribute("data-status", "succeeded", timeout=TURN_SECONDS)
    tool = second.locator("details.tool")
    expect(tool.locator("summary")).to_have_text("Bash echo console-tool-output")
    expect(tool.locator("pre.result")).to_have_text("console-tool-output")
    expect(tool.locator("pre.result")).to_be_hidden()  # folded until opened
    tool.locator("summary").click()
    expect(tool.locator("pre.result")).to_be_visible()
    expect(second.locator(".assistant")).to_have_text("BASH-RESULT: console-tool-output")
    expect(page.locator("#log section.turn")).to_have_count(2)
    expect(page.locator(f'#sessions li[data-id="{sid}"] .turns')).to_have_text("2 turns")
    assert first.locator(".assistant").inner_text() == done["result"]  # the replay after the drop added nothing

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    shot = LOG_DIR / "console.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, len(data)
    assert problems == []


def test_console_shows_api_errors_cancels_a_running_turn_and_stops_the_session(console, stack_env, token):
    page, problems, _ = console
    # A bad token: the API's error code and message are on the page.
    page.fill("#token", "not-a-jwt")
    page.click("#token-form button")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("invalid_token: ")

    owner = f"console-{secrets.token_hex(3)}"
    api = Owner(stack_env["base"], token(owner))
    sid = sign_in_and_create_session(page, token(owner))
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#cancel")).to_be_disabled()

    send(page, "SLOW: 60")
    running = turn(page, 0)
    expect(running.locator(".assistant")).to_contain_text("tick1", timeout=TURN_SECONDS)
    expect(running).to_have_attribute("data-status", "running")
    page.click("#cancel")
    expect(running).to_have_attribute("data-status", "cancelled", timeout=30_000)
    expect(running.locator("footer .turn-status")).to_have_text("cancelled")
    expect(page.locator("#cancel")).to_be_disabled()
    turns = api.get(f"/api/v1/sessions/{sid}/turns")["items"]
    assert [t["status"] for t in turns] == ["cancelled"], turns
    assert "SLOW-DONE" not in running.locator(".assistant").inner_text()

    page.click("#stop")
    expect(page.locator("#session-status")).to_have_text("stopped", timeout=60_000)
    assert api.get(f"/api/v1/sessions/{sid}")["status"] == "stopped"
    expect(page.locator(f'#sessions li[data-id="{sid}"] .status')).to_have_text("stopped")
    # The refused token's 401 is the one console error: Chromium logs every failed request.
    assert [p for p in problems if "401" not in p] == [], problems


def test_console_shows_pending_approvals_and_answers_them_with_allow_and_deny(console, stack_env, token):
    page, problems, _ = console
    owner, _, api, sid = new_owner_with_session(page, stack_env, token)
    send(page, "SLOW: 90")
    running = turn(page, 0)
    expect(running).to_have_attribute("data-status", "running", timeout=TURN_SECONDS)
    turn_row = api.get(f"/api/v1/sessions/{sid}/turns")["items"][0]
    approvals = Approvals(stack_env["settings"])
    try:
        # Live: the approval.requested event shows the tool, its input and the buttons.
        approvals.open(turn_row, "toolu_console_allow", "echo allowed-from-the-console")
        asked = running.locator('.approval[data-request-id="toolu_console_allow"]')
        expect(asked.locator(".tool-name")).to_have_text("Bash")
        expect(asked.locator("pre.approval-input")).to_contain_text('"command": "echo allowed-from-the-console"')
        expect(asked).to_have_attribute("data-status", "pending")
        asked.locator("button.allow").click()
        expect(asked).to_have_attribute("data-status", "allowed")
        expect(asked.locator(".approval-state")).to_have_text(f"allowed by {owner} via rest")  # its approval.resolved
        expect(asked.locator("button")).to_have_count(0)
        answered = api.get(f"/api/v1/turns/{turn_row['id']}/approvals")["approvals"]
        assert [(a["request_id"], a["status"]) for a in answered] == [("toolu_console_allow", "allowed")], answered
        assert owner in answered[0]["decided_by"]

        # Without an event (as when its approval.requested is no longer kept): the page finds it through the API
        # when it opens the session, beside the answered one replayed from the events.
        approvals.open(turn_row, "toolu_console_deny", "echo denied-from-the-console", publish=False)
        page.reload()
        page.click(f'#sessions li[data-id="{sid}"] button')
        expect(page.locator("#connection")).to_have_text("live")
        pending = turn(page, 0).locator('.approval[data-request-id="toolu_console_deny"]')
        expect(pending.locator("pre.approval-input")).to_contain_text("echo denied-from-the-console")
        expect(turn(page, 0).locator('.approval[data-request-id="toolu_console_allow"]')).to_have_attribute(
            "data-status", "allowed")
        pending.locator("button.deny").click()
        expect(pending).to_have_attribute("data-status", "denied")
        expect(pending.locator(".approval-state")).to_contain_text(f"denied by {owner}")
        statuses = [a["status"] for a in api.get(f"/api/v1/turns/{turn_row['id']}/approvals")["approvals"]]
        assert statuses == ["allowed", "denied"], statuses

        # Answering one that was answered meanwhile shows the API's 409.
        approvals.open(turn_row, "toolu_console_late", "echo late")
        late = turn(page, 0).locator('.approval[data-request-id="toolu_console_late"]')
        expect(late).to_have_attribute("data-status", "pending")
        # The page misses its approval.resolved (the socket is deaf meanwhile) and answers after another client.
        page.evaluate("() => { const s = window.ccdConsole.state; s.heard = s.socket.onmessage; s.socket.onmessage = null; }")
        requests.post(f"{stack_env['base']}/api/v1/turns/{turn_row['id']}/approvals/toolu_console_late",
                      json={"behavior": "deny"}, headers=api.headers, timeout=30).raise_for_status()
        late.locator("button.allow").click()
        expect(page.locator("#error")).to_contain_text("approval_resolved: ")
        expect(late).to_have_attribute("data-status", "denied")  # as the API has it now
        expect(late.locator(".approval-state")).to_contain_text(f"denied by {owner}")
        page.evaluate("() => { const s = window.ccdConsole.state; s.socket.onmessage = s.heard; }")
    finally:
        approvals.close()
    page.click("#cancel")
    expect(running).to_have_attribute("data-status", "cancelled", timeout=30_000)
    # The refused answer's 409 is the one console error: Chromium logs every failed request.
    assert [p for p in problems if "409" not in p] == [], problems
