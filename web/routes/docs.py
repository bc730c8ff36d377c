"""The API's own description: GET /openapi.json and the interactive GET /docs, open to all (shape only, no data)."""
from __future__ import annotations

from importlib.metadata import version
from importlib.resources import files

from flask import Blueprint, Response, abort, current_app, jsonify, send_from_directory

from web import openapi

docs = Blueprint("docs", __name__)

# Swagger UI's files come from the flask-swagger-ui package (a pip dependency), so the page works offline.
SWAGGER_DIST = files("flask_swagger_ui") / "dist"
SWAGGER_ASSETS = {"swagger-ui.css", "index.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js",
                  "favicon-32x32.png", "favicon-16x16.png"}

DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>cc-docker API</title>
  <meta name="swagger-ui-version" content="{version}">
  <link rel="stylesheet" href="/docs/swagger-ui.css">
  <link rel="stylesheet" href="/docs/index.css">
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script src="/docs/swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{
      url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true, persistAuthorization: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset], layout: "StandaloneLayout"
    }});
  </script>
</body>
</html>
"""


@docs.get("/openapi.json")
def openapi_document():
    """The OpenAPI 3.1 document, built once per app from its URL map and request models."""
    document = current_app.extensions.get("ccd.openapi")
    if document is None:
        document = current_app.extensions["ccd.openapi"] = openapi.build(current_app)
    return jsonify(document)


@docs.get("/docs")
def docs_page():
    """Swagger UI over /openapi.json: try any call with a token ("Authorize")."""
    return Response(DOCS_PAGE.format(version=version("flask-swagger-ui")), mimetype="text/html")


@docs.get("/docs/<name>")
def docs_asset(name: str):
    """One of Swagger UI's bundled files."""
    if name not in SWAGGER_ASSETS:
        abort(404)
    return send_from_directory(str(SWAGGER_DIST), name, max_age=3600)
