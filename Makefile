# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
# torch is pinned by constraints.txt: without it pip pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: install
	$(BIN)/edgecp demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check edgecp tests tools

clean:
	rm -rf $(VENV) edgecp-demo edgecp-out .pytest_cache
