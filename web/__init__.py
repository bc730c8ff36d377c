"""The Flask front end: REST API, WebSocket stream, JWT auth, error mapping."""
from __future__ import annotations

from flask import Flask

from core.settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """Builds the app from settings (the environment by default)."""
    import web.routes  # noqa: F401  (registers the routes on the blueprint)
    from web import request_ids
    from web.api import api
    from web.context import WebContext
    from web.errors import register_error_handlers
    from web.health import health
    from web import metrics
    from web.routes.console import console
    from web.routes.docs import docs
    from web.stream import sock

    settings = settings or Settings.from_env()
    app = Flask(__name__)
    request_ids.init_app(app)  # first: every later hook, view and error handler logs with the request's id
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # A WebSocket message is a request body too: the same limit (a bigger one closes the socket, 1009).
    app.config["SOCK_SERVER_OPTIONS"] = {"ping_interval": settings.ws_ping_seconds,
                                         "max_message_size": settings.max_body_bytes}
    app.json.sort_keys = False
    app.extensions["ccd"] = WebContext(settings)
    register_error_handlers(app)
    metrics.instrument(app)
    app.register_blueprint(health)
    app.register_blueprint(docs)
    app.register_blueprint(metrics.metrics)
    app.register_blueprint(console)
    app.register_blueprint(api)
    sock.init_app(app)
    return app
