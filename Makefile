# microtune: `make serve` runs the server on the bundled demo repository, `make test` runs the
# whole test suite. Both create .venv and install everything on first use.
PYTHON ?= python3
VENV   ?= .venv
EXTRAS ?= cpu,test
BIN    := $(VENV)/bin
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
extras := $(subst $(comma), ,$(EXTRAS))
# The onnxruntime distribution the EXTRAS install, and the one they exclude (none, when they
# name neither cpu nor gpu).
ORT       := $(if $(filter gpu,$(extras)),onnxruntime-gpu,$(if $(filter cpu,$(extras)),onnxruntime))
ORT_OTHER := $(if $(filter gpu,$(extras)),onnxruntime,$(if $(filter cpu,$(extras)),onnxruntime-gpu))

# Run before each install. onnxruntime and onnxruntime-gpu install the same `onnxruntime`
# module and pip lets both in: the second installed silently wins, and uninstalling one
# deletes files the other needs. A .venv set up with the other variant (EXTRAS switched
# between cpu and gpu) so loses both, and the install brings back the one EXTRAS asks for.
define one_onnxruntime
	@if [ -n "$(filter cpu,$(extras))" ] && [ -n "$(filter gpu,$(extras))" ]; then \
		echo "EXTRAS=$(EXTRAS): cpu and gpu exclude each other (one onnxruntime)"; exit 1; fi
	@if [ -n "$(ORT_OTHER)" ] && [ -x $(BIN)/python ] && \
		$(BIN)/python -m pip show -q $(ORT_OTHER) >/dev/null 2>&1; then \
		echo "EXTRAS=$(EXTRAS) wants $(ORT), not $(ORT_OTHER): uninstalling both first"; \
		$(BIN)/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu; fi
endef

.PHONY: setup serve test test-fast lint proto demo-repository bench bench-quick bench-fast \
	bench-observability clean one-onnxruntime

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "microtune needs Python >= 3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
		{ echo "python venv failed: on Debian, apt-get install python3-venv"; exit 1; }
	$(one_onnxruntime)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*
	@touch $@

one-onnxruntime:
	$(one_onnxruntime)

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
