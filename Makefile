# cc-docker: `make run` starts everything, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test install image migrate compose-check clean

run: install
	$(BIN)/python scripts/run.py

test: install
	$(BIN)/python -m pytest

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

image:
	bash container/build.sh

migrate: install
	$(BIN)/python -m core.migrate

compose-check:
	docker-compose -f compose.yaml config --quiet

clean:
	rm -rf $(VENV) .run container/.build
