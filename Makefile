# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
# torch is pinned by constraints.txt: without it pip pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# optimum's own environment (optimum-onnx pins transformers < 4.58), for the test that loads an export with it
OPTIMUM = .venv-optimum

.PHONY: install install-test demo test lint clean

# the demo needs edgecp[full] only; the tests add pytest, ruff, bitsandbytes and ray on top of it (edgecp[test])
install: $(VENV)/.installed-full
install-test: $(VENV)/.installed-test

$(VENV)/.installed-full: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[full]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-full pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: $(VENV)/.installed-full
	$(BIN)/edgecp demo

$(OPTIMUM)/.installed: requirements-optimum.txt
	$(PYTHON) -m venv $(OPTIMUM)
	$(OPTIMUM)/bin/python -m pip install -q --upgrade pip
	$(OPTIMUM)/bin/python -m pip install -q -r requirements-optimum.txt
	touch $@

test: $(VENV)/.installed-test $(OPTIMUM)/.installed
	EDGECP_OPTIMUM_PYTHON=$(CURDIR)/$(OPTIMUM)/bin/python $(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check edgecp tests tools

clean:
	rm -rf $(VENV) $(OPTIMUM) edgecp-demo edgecp-out .pytest_cache
