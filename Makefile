# cc-docker: `make run` starts everything, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test fuzz install image migrate compose-check clean

run: install
	$(BIN)/python scripts/run.py

test: install
	$(BIN)/python -m pytest

# The fuzzing test at full strength: new requests each run, 60 per operation, 1,000 at least in all.
fuzz: install
	CCD_FUZZ_EXAMPLES=$${CCD_FUZZ_EXAMPLES:-60} CCD_FUZZ_MIN_REQUESTS=1000 CCD_FUZZ_RANDOM=1 \
		$(BIN)/python -m pytest -s -q -p no:randomly tests/test_fuzz.py

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
