"""Shared core of cc-docker: settings, models, events, queues and the session/turn services."""
