"""GET /docs in a real headless Chromium: Swagger UI renders every operation of /openapi.json from the bundled
files alone, and a call tried from the page reaches the API."""
from __future__ import annotations

import threading

import pytest
from playwright.sync_api import expect
from werkzeug.serving import make_server


@pytest.fixture(scope="module")
def served(app):
    """The app on a loopback port, in this process."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_swagger_ui_renders_every_operation_offline_and_tries_a_call(browser, served, client):
    document = client.get("/openapi.json").get_json()
    operations = sum(len(methods) for methods in document["paths"].values())
    context = browser.new_context()
    page = context.new_page()
    requested: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(served + "/docs")
    expect(page.locator(".opblock")).to_have_count(operations, timeout=30_000)
    expect(page.locator(".info .title")).to_contain_text(document["info"]["title"])
    assert not page.get_by_text("Unable to render this definition").count()
    health = page.locator(".opblock-get", has=page.locator('[data-path="/healthz"]')).first
    health.locator(".opblock-summary").click()
    health.get_by_role("button", name="Try it out").click()
    health.get_by_role("button", name="Execute").click()
    expect(health.locator(".live-responses-table tbody .response-col_status").first).to_have_text("200",
                                                                                  timeout=10_000)
    context.close()
    assert errors == []
    assert requested and all(url.startswith(served + "/") for url in requested), requested
