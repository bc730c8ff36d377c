# cc-docker: `make run` starts everything, `make test` runs the whole suite; `make up` deploys with compose.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Compose v2's plugin where there is one, else the standalone docker-compose (1.29 on Debian 12).
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

# `make bench` measures M1–M7 against a private stack: see BENCHMARKS.md.
.PHONY: run test bench fuzz install setup image migrate up down env compose-check clean

run: install
	$(BIN)/python scripts/run.py

test: install
	$(BIN)/python -m pytest

# The benchmark suite (BENCHMARKS.md): a table on stdout and bench/results.json; BENCH_ARGS="--only M1,M4 --quick".
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

# The fuzzing test at full strength: new requests each run, 60 per operation, 1,000 at least in all.
fuzz: install
	CCD_FUZZ_EXAMPLES=$${CCD_FUZZ_EXAMPLES:-60} CCD_FUZZ_MIN_REQUESTS=1000 CCD_FUZZ_RANDOM=1 \
		$(BIN)/python -m pytest -s -q -p no:randomly tests/test_fuzz.py

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@touch $(STAMP)

# Everything `make run` needs, ahead of time: the virtualenv, the session image, the database schema.
setup: install image migrate

# The session image (container/): a debootstrapped Debian, Claude Code from the npm registry, the wrapper.
image:
	bash container/build.sh

migrate: install
	$(BIN)/python -m core.migrate

# The compose deployment (compose.yaml, settings from .env): builds the images, then starts every service.
up: env image
	$(COMPOSE) up -d --build
	$(COMPOSE) ps

down:
	$(COMPOSE) down

# .env for compose: from .env.example when missing; every secret compose requires that is empty gets a fresh value
# (JWT_SECRET, CCD_WEBHOOK_SECRET, POSTGRES_PASSWORD, MINIO_*_KEY, FLOWER_BASIC_AUTH). Set values are kept.
env:
	$(PYTHON) scripts/env_secrets.py .env

# Needs .env: compose.yaml has no default for any secret.
compose-check: env
	$(COMPOSE) -f compose.yaml config --quiet

clean:
	rm -rf $(VENV) .run container/.build
