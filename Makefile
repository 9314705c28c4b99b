# `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= config.yaml

.PHONY: install install-test run test browser redis bench clean

# What running needs, and only that (a service's environment gets no pytest, Celery or Redis client).
install: $(VENV)/.installed

# The suite's extra on top: pytest, and the cluster's Celery and Redis client it drives.
install-test: $(VENV)/.installed-test

# Re-install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

run: install
	$(VENV)/bin/nstd run --config $(CONFIG)

test: install-test
	$(PY) -m pytest -q

# Debian's headless Chromium, for the status page's browser test (.ci/run does this too).
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
browser:
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

# Debian's redis-server, for the distributed tests (they start their own on a free port; the
# package's own service is not needed) and for a cluster's broker (docs/distributed.md).
redis:
	[ -x /usr/bin/redis-server ] || ($(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server)

clean:
	rm -rf $(VENV) var .pytest_cache build *.egg-info
