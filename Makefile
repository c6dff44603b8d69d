# The README's commands. Each starts with scripts/bootstrap (idempotent: packages, dockerd, base image, .venv).
SHELL := /bin/bash
PYTHON := .venv/bin/python
PYTEST_ARGS ?=
# Tests run side by side (pytest-xdist); every server, port and container name is private to its worker, and
# tests that share state or a machine-wide resource carry an xdist_group (see tests/conftest.py).
TEST_WORKERS ?= 4

.PHONY: demo test lint bench bootstrap unit clean

bootstrap:
	@scripts/bootstrap

demo: bootstrap
	@scripts/demo

# The architecture's rules that a tool checks: line length and pyflakes over the code, types over the core.
lint: bootstrap
	@.venv/bin/ruff check core plugins
	@.venv/bin/mypy core

# The linters run beside the tests (their half-minute of one core would otherwise hold the suite back) and
# fail `make test` all the same. pytest exits 5 when it collected nothing: that must fail, never pass quietly.
# PYTHONDONTWRITEBYTECODE (set on some CI machines) would make each of the five pytest processes rewrite and
# compile every test module anew (2 s of CPU each, against 0.5 s from pytest's cache).
test: bootstrap
	@lint_log=$$(mktemp); $(MAKE) --no-print-directory lint > "$$lint_log" 2>&1 & lint=$$!; \
	env -u PYTHONDONTWRITEBYTECODE $(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests were collected" >&2; status=1; fi; \
	if ! wait $$lint; then cat "$$lint_log" >&2; echo "make test: lint failed" >&2; status=1; \
	else cat "$$lint_log"; fi; rm -f "$$lint_log"; exit $$status

unit: bootstrap
	@$(PYTHON) -m pytest tests/unit $(PYTEST_ARGS)

bench: bootstrap
	@for script in bench/*.py; do echo "== $$script"; $(PYTHON) "$$script" || exit 1; done

clean:
	-@bin/dbdeck sandbox down
	rm -rf .venv *.egg-info .pytest_cache
