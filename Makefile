# make demo / make test create .venv on first use from the committed lock (constraints.txt: the exact
# versions the suite last passed with). torch is pinned first so pip takes the CPU build that lies on disk
# instead of resolving a multi-GB CUDA build from the index. pyproject.toml keeps ranges for library users;
# make test-latest tries the newest releases those ranges admit in a separate venv, and make lock writes
# them into constraints.txt once the suite passes there.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.m2convert-installed
LOCK := constraints.txt
TORCH_VERSION ?= 2.13.0
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
# pytest worker processes; each test file runs whole in one of them (module fixtures are built once).
TEST_WORKERS ?= 2
PYTEST_ARGS := -q -n $(TEST_WORKERS) --dist loadfile --durations=15

.PHONY: demo test venv test-latest lock clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c $(LOCK) -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/m2convert demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# A fresh venv from the newest releases pyproject admits (torch stays at TORCH_VERSION); its versions go to
# $(LATEST_VENV)/versions.txt, then the suite runs there. A failure here is an upstream change to look at,
# while make test keeps its locked set.
test-latest:
	rm -rf $(LATEST_VENV)
	python3 -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install -q torch==$(TORCH_VERSION)
	$(LATEST_PY) -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" torch==$(TORCH_VERSION)
	$(LATEST_PY) -m pip freeze --all --exclude-editable > $(LATEST_VENV)/versions.txt
	$(LATEST_PY) -m pytest $(PYTEST_ARGS)

# Refresh the lock: the newest set, written only after the whole suite passed with it.
lock: test-latest
	{ echo "# The exact versions make demo / make test install (pip -c), written by make lock on $$(date -u +%F)"; \
	  echo "# after the suite passed with them on Python $$($(LATEST_PY) -c 'import platform; print(platform.python_version())')."; \
	  sed -E 's/^(torch==[^+]*)\+.*/\1/' $(LATEST_VENV)/versions.txt; } > $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info
