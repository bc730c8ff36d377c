"""The scripted model's choice of reply: CALL scripts step by step, and RUN as before."""
from __future__ import annotations

import json

from tests.model_server import content_blocks, plan_reply

TOOLS = [{"name": "Bash"}, {"name": "mcp__ccd__spawn_child"}, {"name": "mcp__ccd__wait_for_child"}]
SCRIPT = ('CALL: mcp__ccd__spawn_child {"prompt": "SAY: hi"}\n'
          'CALL: mcp__ccd__wait_for_child {"session_id": "{{session_id}}", "turn_id": "{{turn_id}}", '
          '"timeout_seconds": {{depth}}}')


def request(*messages: dict, tools: list | None = None) -> dict:
    return {"model": "m", "messages": list(messages), "tools": TOOLS if tools is None else tools}


def user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def assistant_call(name: str) -> dict:
    return {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": name, "input": {}}]}


def result(text: str) -> dict:
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                         "content": [{"type": "text", "text": text}]}]}


SPAWNED = json.dumps({"session_id": "s-1", "turn_id": "t-1", "status": "queued", "depth": 2})


def test_first_call_uses_the_given_tool_name_and_input():
    plan = plan_reply(request(user(SCRIPT)))
    block = content_blocks(plan)[0]
    assert block["type"] == "tool_use"
    assert block["name"] == "mcp__ccd__spawn_child" and block["input"] == {"prompt": "SAY: hi"}


def test_second_call_waits_for_the_first_result_and_fills_in_its_keys():
    plan = plan_reply(request(user(SCRIPT), assistant_call("mcp__ccd__spawn_child"), result(SPAWNED)))
    assert plan["name"] == "mcp__ccd__wait_for_child"
    assert plan["tool"] == {"session_id": "s-1", "turn_id": "t-1", "timeout_seconds": 2}


def test_placeholder_stays_when_the_previous_result_is_not_json():
    script = 'CALL: Bash {"command": "true"}\nCALL: Bash {"command": "echo {{x}}"}'
    plan = plan_reply(request(user(script), assistant_call("Bash"), result("plain text")))
    assert plan["tool"] == {"command": "echo {{x}}"}


def test_after_the_last_call_the_reply_quotes_its_result():
    done = json.dumps({"status": "succeeded", "result": "hi"})
    plan = plan_reply(request(user(SCRIPT), assistant_call("mcp__ccd__spawn_child"), result(SPAWNED),
                              assistant_call("mcp__ccd__wait_for_child"), result(done)))
    assert plan == {"text": "TOOL-RESULT: " + done}


def test_a_tool_the_request_does_not_offer_gets_no_tool():
    plan = plan_reply(request(user("CALL: mcp__ccd__list_children {}")))
    assert plan == {"text": "NO-TOOL: mcp__ccd__list_children"}


def test_a_new_prompt_starts_its_own_script():
    earlier = [user(SCRIPT), assistant_call("mcp__ccd__spawn_child"), result(SPAWNED),
               {"role": "assistant", "content": [{"type": "text", "text": "done"}]}]
    plan = plan_reply(request(*earlier, user('CALL: mcp__ccd__spawn_child {"prompt": "again"}')))
    assert plan["tool"] == {"prompt": "again"}


def test_side_requests_without_tools_still_get_ok():
    assert plan_reply(request(user(SCRIPT), tools=[])) == {"text": "OK"}


def test_run_still_calls_bash_and_answers_with_bash_result():
    first = plan_reply(request(user("RUN: echo hello")))
    assert content_blocks(first)[0]["name"] == "Bash" and first["tool"]["command"] == "echo hello"
    second = plan_reply(request(user("RUN: echo hello"), assistant_call("Bash"), result("hello\n")))
    assert second == {"text": "BASH-RESULT: hello"}
