"""A server with webhooks off (CCD_WEBHOOKS_ENABLED=false, or no CCD_WEBHOOK_SECRET) refuses requests that ask for one:
it could not sign them, and nothing is queued."""
import uuid
from dataclasses import replace

import pytest


@pytest.fixture(scope="module")
def client(api_settings):
    from web import create_app

    return create_app(replace(api_settings, webhooks_enabled=False, webhook_secret="")).test_client()


def test_a_chat_or_batch_asking_for_a_webhook_is_refused_when_webhooks_are_off(client, auth):
    hook = "https://example.com/hook"
    chat = client.post(f"/api/v1/sessions/{uuid.uuid4()}/chat", json={"prompt": "hi", "webhook": hook},
                       headers=auth("webhooks-off-owner"))
    batch = client.post("/api/v1/batches", json={"items": [{"prompt": "x", "config": {}}], "webhook": hook},
                        headers=auth("webhooks-off-owner"))
    for resp in (chat, batch):
        assert resp.status_code == 400, resp.get_json()
        error = resp.get_json()["error"]
        assert error["code"] == "webhooks_disabled" and error["field"] == "webhook", error
        assert "CCD_WEBHOOKS_ENABLED" in error["message"]
    listed = client.get("/api/v1/batches", headers=auth("webhooks-off-owner"))
    assert listed.status_code != 200 or listed.get_json().get("items") == []
