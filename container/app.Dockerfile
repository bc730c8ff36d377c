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
# iptables: the host-firewall service applies the sessions' rules from this image.
RUN apt-get update && apt-get install -y --no-install-recommends iptables && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir ".[ops]"
ENV PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["gunicorn", "-c", "python:web.gunicorn_conf", "-b", "0.0.0.0:8000", "web.wsgi:app"]
