# Set-up and everyday commands. Torch is installed first and pinned, so no dependency pulls a
# multi-GB CUDA build onto a CPU machine; override TORCH_SPEC on GPU machines.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test clean

$(BIN)/rosa-train: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/rosa-train

demo: install
	$(BIN)/rosa-train

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
