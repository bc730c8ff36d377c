"""The web console: GET / and its static files (web/console/), open to all; the page holds no data,
everything it shows comes from the authenticated API with the token the user pastes."""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_from_directory

ASSETS = Path(__file__).resolve().parent.parent / "console"
# The page loads only its own files and talks only to this origin (HTTP and WebSocket).
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
          "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

console = Blueprint("console", __name__, static_folder=str(ASSETS), static_url_path="/console")


@console.get("/")
def index():
    """The console page; it asks for a token and then uses the public API like any client."""
    response = send_from_directory(ASSETS, "index.html")
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["Cache-Control"] = "no-cache"
    return response
