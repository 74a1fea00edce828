# make demo / make test create .venv on first use. torch is pinned first so pip takes the CPU build
# that lies on disk instead of resolving a multi-GB CUDA build from the index.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.m2convert-installed
TORCH_VERSION ?= 2.13.0
# pytest worker processes; each test file runs whole in one of them (module fixtures are built once).
TEST_WORKERS ?= 2

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/m2convert demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

clean:
	rm -rf $(VENV) build *.egg-info
