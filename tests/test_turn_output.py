"""How the wrapper's records become a turn's outcome, read from the sample Claude Code turn."""
import json
from pathlib import Path

import pytest

from workers.turn_output import TurnOutput

SAMPLE = Path(__file__).resolve().parent.parent.parent / "shared" / "docs" / "samples" / "claude-code-2.1.330-stream-json.jsonl"


def sample_lines() -> list[str]:
    if SAMPLE.exists():
        return SAMPLE.read_text().splitlines()
    # Outside the team checkout: a minimal turn of the same shape.
    return [json.dumps({"type": "system", "subtype": "init", "session_id": "s"}),
            json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": "BASH-RESULT: hello ",
                        "usage": {"input_tokens": 10, "output_tokens": 14}, "total_cost_usd": 0.00032})]


def feed(lines: list[str], exit_record: dict | None) -> TurnOutput:
    out = TurnOutput()
    for n, line in enumerate(lines, 1):
        out.take(f"{n}\t{line}")
    if exit_record is not None:
        out.take("exit\t" + json.dumps(exit_record))
    return out


def test_a_clean_turn_succeeds_and_passes_lines_through_unchanged():
    lines = sample_lines()
    out = TurnOutput()
    passed = [out.take(f"{n}\t{line}") for n, line in enumerate(lines, 1)]
    out.take('exit\t{"code": 0, "timed_out": false, "stderr": ""}')
    assert passed == [json.loads(line) for line in lines]
    assert out.outcome() == ("succeeded", None, None)
    assert out.saw_init and out.result["result"] == "BASH-RESULT: hello "


def test_invalid_json_fails_the_turn_and_says_so():
    out = feed(sample_lines()[:1] + ["{truncated"], {"code": 0})
    status, error, reason = out.outcome()
    assert status == "failed" and "not a JSON object" in error and "{truncated" in error
    assert reason == "invalid_output"


def test_nonzero_exit_without_result_reports_the_last_stderr_line():
    out = feed(sample_lines()[:1], {"code": 1, "stderr": "warming up\nError: session not found"})
    assert out.outcome() == ("failed", "Claude Code exited with code 1: Error: session not found", "exit_code")


def test_error_result_reports_the_model_api_status():
    result = {"type": "result", "is_error": True, "api_error_status": 500, "result": "API Error: 500 boom"}
    out = feed([json.dumps(result)], {"code": 1})
    status, error, _ = out.outcome()
    assert status == "failed" and "model API status 500" in error and "API Error: 500 boom" in error


@pytest.mark.parametrize("exit_record,status", [(None, "failed"), ({"code": -9, "timed_out": True}, "timed_out")])
def test_missing_exit_or_timeout(exit_record, status):
    assert feed(sample_lines()[:1], exit_record).outcome()[0] == status


def test_an_oversized_line_becomes_a_truncated_marker_with_its_type_and_size():
    out = TurnOutput()
    big = json.dumps({"type": "assistant", "message": {"content": "x" * 5000}})
    head = f"7\t{big}"[:300]
    line = out.take(head, size=len(big) + 2, cut=True)
    assert line["type"] == "assistant"
    assert line["ccd_truncated"]["original_bytes"] == len(big)
    assert big.startswith(line["ccd_truncated"]["head"])
    assert out.truncated == 1 and out.number == 7 and out.invalid is None


def test_a_line_over_the_event_limit_is_passed_on_truncated_but_still_read():
    out = TurnOutput(max_event=1000)
    result = {"type": "result", "is_error": False, "result": "r" * 3000, "usage": {}}
    line = out.take("3\t" + json.dumps(result))
    out.take('exit\t{"code": 0}')
    assert line["type"] == "result" and line["ccd_truncated"]["original_bytes"] == len(json.dumps(result))
    assert out.result["result"] == "r" * 3000 and out.outcome()[0] == "succeeded"


def test_output_past_the_turn_limit_stops_passing_lines_and_fails_with_output_limit():
    out = TurnOutput(max_bytes=1100)
    lines = [json.dumps({"type": "stream_event", "pad": "y" * 300}) for _ in range(5)]
    passed = [out.take(f"{n}\t{line}") for n, line in enumerate(lines, 1)]
    out.take('exit\t{"code": 0, "cancelled": true}')
    assert [p is not None for p in passed] == [True, True, True, False, False]
    status, error, reason = out.outcome()
    assert (status, reason) == ("failed", "output_limit") and "1100 bytes" in error


def test_an_out_of_memory_kill_is_named():
    out = feed(sample_lines()[:1], {"code": -9, "oom_killed": True})
    assert out.outcome()[2] == "out_of_memory"


def test_claude_codes_own_error_list_is_named():
    result = {"type": "result", "is_error": True, "subtype": "error_during_execution",
              "errors": ["Error: transcript unreadable"]}
    _, error, reason = feed([json.dumps(result)], {"code": 1}).outcome()
    assert reason == "claude_error" and "transcript unreadable" in error
