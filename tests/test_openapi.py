"""GET /openapi.json: a valid OpenAPI 3.1 document of every route, built from the request models."""
from __future__ import annotations

import copy
import re

import jsonschema
import pytest
import schemathesis
from openapi_spec_validator import validate
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from core.envelope import Event
from web import create_app, openapi
from web.schemas import ChatRequest, CreateSession, EventsQuery


@pytest.fixture(scope="module")
def document(app):
    response = app.test_client().get("/openapi.json")  # no Authorization header
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.get_json()


def operations(document):
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            yield path, method, op


def test_document_is_valid_openapi_3_1(document):
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_rule_and_method_of_the_url_map_is_documented(app, document):
    assert openapi.undocumented(app) == []
    for rule, methods in openapi.documented_rules(app):
        path, _ = openapi.openapi_path(rule.rule)
        for method in methods:
            op = document["paths"][path][method.lower()]
            assert op["summary"] != "undocumented", (path, method)


def test_a_new_route_without_an_entry_is_reported(api_settings):
    fresh = create_app(api_settings)
    fresh.add_url_rule("/api/v1/brand-new/<thing_id>", "api.brand_new", lambda thing_id: "")
    assert openapi.undocumented(fresh) == ["/api/v1/brand-new/<thing_id> (api.brand_new)"]


def test_request_bodies_and_queries_are_the_validating_models(document):
    schemas = document["components"]["schemas"]
    for model in (ChatRequest, CreateSession):
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields)
        assert schemas[model.__name__]["additionalProperties"] is False  # extra="forbid", as validated
    chat = document["paths"]["/api/v1/sessions/{session_id}/chat"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatRequest"}
    events = document["paths"]["/api/v1/sessions/{session_id}/events"]["get"]
    query = {p["name"]: p for p in events["parameters"] if p["in"] == "query"}
    assert set(query) == set(EventsQuery.model_fields)
    assert query["limit"]["schema"]["maximum"] == EventsQuery.model_fields["limit"].metadata[1].le


def test_every_api_operation_needs_a_bearer_token_and_documents_its_errors(document):
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert document["security"] == [{"bearerAuth": []}]
    for path, method, op in operations(document):
        responses = op["responses"]
        if path.startswith("/api/"):
            assert "security" not in op, path
            assert {"401", "403", "503"} <= set(responses), (method, path)
        else:
            assert op["security"] == [], path
        if "{" in path:
            assert "404" in responses, (method, path)
        if "requestBody" in op:
            assert {"400", "413"} <= set(responses), (method, path)
        for status, response in responses.items():
            if status.startswith(("4", "5")):
                assert response == {"$ref": f"#/components/responses/E{status}"}
    error = document["components"]["responses"]["E404"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}


def test_the_event_envelope_is_a_component_that_real_frames_match(document):
    schema = {**document["components"]["schemas"]["Event"], "components": document["components"]}
    frame = Event(session_id="s", type="claude.assistant", data={"x": 1}, turn_id="t", seq=3, id="1-0").frame()
    jsonschema.validate(frame, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**frame, "type": "made.up"}, schema)


def test_websocket_and_sse_protocols_are_described(document):
    ws = document["paths"]["/api/v1/sessions/{session_id}/stream"]["get"]
    assert "101" in ws["responses"]
    for phrase in ('"type": "chat"', '"type": "cancel"', '"type": "reply"', "1011", "?since="):
        assert phrase in ws["description"]
    sse = document["paths"]["/api/v1/sessions/{session_id}/events"]["get"]
    assert "text/event-stream" in sse["responses"]["200"]["content"]
    for phrase in ("Last-Event-ID", "retry: 2000", "keep-alive", "stream.gap"):
        assert phrase in sse["description"]


def test_the_fuzz_checks_catch_an_answer_the_document_does_not_allow(app, document, auth):
    """What tests/test_fuzz.py relies on: a status or body the document does not list fails the checks."""
    doc = copy.deepcopy(document)
    del doc["paths"]["/healthz"]["get"]["responses"]["200"]
    doc["paths"]["/readyz"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] = {
        "type": "object", "required": ["nothing-sends-this"]}
    schema = schemathesis.openapi.from_dict(doc)
    schema.app = app
    healthz = schema["/healthz"]["GET"].Case()
    with pytest.raises(FailureGroup, match="Undocumented status code"):
        healthz.validate_response(healthz.call(), checks=[status_code_conformance])
    readyz = schema["/readyz"]["GET"].Case()
    with pytest.raises(FailureGroup, match="Response violates schema"):
        readyz.validate_response(readyz.call(), checks=[response_schema_conformance])


def test_docs_page_serves_swagger_ui_from_the_package_with_nothing_from_the_internet(app):
    client = app.test_client()
    page = client.get("/docs")  # no Authorization header
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert '"/openapi.json"' in html
    assert "http://" not in html and "https://" not in html
    assets = re.findall(r'(?:src|href)="(/docs/[^"]+)"', html)
    assert {"/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"} <= set(assets)
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert len(response.get_data()) > 100, asset
    # Swagger UI renders OpenAPI 3.1 from version 5 on.
    major = re.search(r'name="swagger-ui-version" content="(\d+)\.', html)
    assert major and int(major.group(1)) >= 5
    assert client.get("/docs/..%2Fsetup.cfg").status_code == 404
    assert client.get("/docs/flask_swagger_ui.py").status_code == 404
