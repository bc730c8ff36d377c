"""Fuzzing: schemathesis sends generated requests (valid and invalid) to every operation of the
served OpenAPI document, through the WSGI app: no 5xx, and every answer is as documented.

CCD_FUZZ_EXAMPLES sets the examples per operation (a few in `make test`, more in `make fuzz`);
CCD_FUZZ_MIN_REQUESTS makes the run fail when it sent fewer requests than that in total;
CCD_FUZZ_RANDOM=1 draws new requests each run instead of the same ones.
No worker runs: tasks go to queues nobody consumes, so turns stay queued and sessions `creating`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace

import pytest
import schemathesis
from hypothesis import HealthCheck, settings as hypothesis_settings, strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

from client.tokens import mint_token

EXAMPLES = int(os.environ.get("CCD_FUZZ_EXAMPLES", "10"))
MIN_REQUESTS = int(os.environ.get("CCD_FUZZ_MIN_REQUESTS", "0"))
# The same requests every run (`make test`), unless CCD_FUZZ_RANDOM=1 (`make fuzz`) explores new ones.
DERANDOMIZE = os.environ.get("CCD_FUZZ_RANDOM", "") != "1"
OWNER = "fuzzer"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
ID_PARAMETERS = ("session_id", "turn_id", "batch_id")


@pytest.fixture(scope="module")
def fuzz_app(api_settings):
    """The API with short waits (a chat's `wait` or a file request holds a request 1 s at most, not minutes),
    and room for the sessions and turns fuzzing makes (the limits have their own tests)."""
    from web import create_app

    return create_app(replace(api_settings, max_wait_seconds=1, files_timeout_seconds=1,
                              owner_max_sessions=1_000_000, owner_max_queued_turns=1_000_000))


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_app):
    return schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)


class RealIds:
    """Makes a session with a queued turn and a batch of the fuzzing owner, so that requests reach past the 404."""

    def __init__(self, app, secret: str) -> None:
        self.client, self.secret = app.test_client(), secret
        self.shared = self.make()

    def make(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {mint_token(self.secret, OWNER, 600)}"}
        session = self.client.post("/api/v1/sessions", json={}, headers=headers)
        assert session.status_code == 201, session.get_json()
        sid = session.get_json()["id"]
        turn = self.client.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "SAY: hi"}, headers=headers)
        assert turn.status_code == 202, turn.get_json()
        batch = self.client.post("/api/v1/batches", json={"items": [{"prompt": "SAY: b", "session_id": sid}]},
                                 headers=headers)
        assert batch.status_code == 202, batch.get_json()
        return {"session_id": sid, "turn_id": turn.get_json()["id"], "batch_id": batch.get_json()["id"]}

    def for_case(self, case) -> dict[str, str]:
        """Fresh ones for a request that ends what it reaches (stop, delete, cancel), the shared ones otherwise."""
        ends_it = case.method.upper() == "DELETE" or case.path.endswith(("/stop", "/cancel"))
        return self.make() if ends_it else self.shared


@pytest.fixture(scope="module")
def real_ids(fuzz_app, api_settings):
    return RealIds(fuzz_app, api_settings.jwt_secret)


@pytest.fixture(scope="module")
def sent():
    """Counts the generated requests; the total is printed (and checked against CCD_FUZZ_MIN_REQUESTS)."""
    counts: dict[str, dict[int, int]] = {}
    yield counts
    total = sum(sum(by_status.values()) for by_status in counts.values())
    print(f"\nfuzz: {total} generated requests over {len(counts)} operations (CCD_FUZZ_EXAMPLES={EXAMPLES})",
          file=sys.stderr)
    for label, by_status in sorted(counts.items()):
        print(f"  {label}: {dict(sorted(by_status.items()))}", file=sys.stderr)
    assert total >= MIN_REQUESTS, f"only {total} requests generated; CCD_FUZZ_MIN_REQUESTS is {MIN_REQUESTS}"


def without_endless_streams(case) -> None:
    """Against a real id, a streamed chat or a followed batch answers until the turn or batch ends: with
    no worker, never (the WSGI transport reads the whole body). Those modes are tested end to end."""
    if isinstance(case.body, dict) and "stream" in case.body:
        case.body["stream"] = False
    if case.operation.path.endswith("/results") and isinstance(case.query, dict):
        case.query.pop("follow", None)


schema = schemathesis.pytest.from_fixture("fuzz_schema").exclude(
    # The WebSocket needs a real socket to upgrade, which the WSGI transport does not have (a plain GET
    # only gets 400 websocket_required); tests/test_api.py and the end-to-end tests drive the protocol.
    operation_id="api_stream")


@schema.parametrize()
@schema.given(data=st.data())
@hypothesis_settings(max_examples=EXAMPLES, deadline=None, derandomize=DERANDOMIZE, database=None,
                     suppress_health_check=list(HealthCheck))
def test_every_operation_answers_generated_requests_as_documented(case, data, real_ids, api_settings, sent):
    if set(case.path_parameters or {}) & set(ID_PARAMETERS) and data.draw(st.integers(0, 3), label="real ids"):
        ids = real_ids.for_case(case)
        for name in ID_PARAMETERS:
            if name in case.path_parameters:
                case.path_parameters[name] = ids[name]
        without_endless_streams(case)
    # A fresh token each time: an empty POST /tokens/revoke revokes the token it is sent with.
    token = mint_token(api_settings.jwt_secret, OWNER, 600)
    response = case.call(headers={"Authorization": f"Bearer {token}"})
    by_status = sent.setdefault(case.operation.label, {})
    by_status[response.status_code] = by_status.get(response.status_code, 0) + 1
    case.validate_response(response, checks=CHECKS)
