"""The API's own description: GET /openapi.json, open to all (it holds no data, only the API's shape)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from web import openapi

docs = Blueprint("docs", __name__)


@docs.get("/openapi.json")
def openapi_document():
    """The OpenAPI 3.1 document, built once per app from its URL map and request models."""
    document = current_app.extensions.get("ccd.openapi")
    if document is None:
        document = current_app.extensions["ccd.openapi"] = openapi.build(current_app)
    return jsonify(document)
