# microtune: `make serve` runs the server on the bundled demo repository, `make test` runs the
# whole test suite. Both create .venv and install everything on first use.
PYTHON ?= python3
VENV   ?= .venv
EXTRAS ?= cpu,test
BIN    := $(VENV)/bin
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: setup serve test test-fast lint proto demo-repository bench bench-quick bench-fast \
	bench-observability clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "microtune needs Python >= 3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
		{ echo "python venv failed: on Debian, apt-get install python3-venv"; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*
	@touch $@

serve: setup
	$(BIN)/microtune serve $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check server runtime scripts tests bench
	$(BIN)/python scripts/gen_proto.py --check
	$(BIN)/python scripts/build_demo_repository.py --check

proto: setup
	$(BIN)/python scripts/gen_proto.py

demo-repository: setup
	$(BIN)/python scripts/build_demo_repository.py

bench: setup
	$(BIN)/python bench/run.py $(ARGS)

bench-quick: setup
	$(BIN)/python bench/run.py --quick $(ARGS)

bench-fast: setup
	$(BIN)/python bench/fast_runtime.py $(ARGS)

bench-observability: setup
	$(BIN)/python bench/observability_overhead.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
