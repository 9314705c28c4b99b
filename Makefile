# `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= config.yaml

.PHONY: install run test bench clean

install: $(VENV)/.installed

# Re-install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

run: install
	$(VENV)/bin/nstd run --config $(CONFIG)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) var .pytest_cache build *.egg-info
