# The cc-docker service image (web, worker, beat) for compose.yaml. The session image is container/Dockerfile.
FROM python:3.11-slim
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY core core
COPY web web
COPY workers workers
COPY wrapper wrapper
COPY client client
COPY migrations migrations
COPY scripts scripts
RUN pip install --no-cache-dir .
ENV PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["gunicorn", "-b", "0.0.0.0:8000", "-k", "gthread", "--threads", "32", "web.wsgi:app"]
