"""Workers: the Celery app and tasks, the Docker runtime, turn execution and the reaper."""
