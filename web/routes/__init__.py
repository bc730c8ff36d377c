"""The API's routes, one module per resource; importing them registers them on the blueprint."""
from web.routes import approvals, batches, events, files, sessions, tokens, turns  # noqa: F401
