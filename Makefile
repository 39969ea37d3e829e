# The two set-up commands of the README. Both create .venv on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: demo test install install-test clean

$(PY):
	python3 -m venv $(VENV)

# Stamp files make a second `make demo` / `make test` skip the (slow) dependency install
# until setup.cfg changes.
$(VENV)/.installed: $(PY) setup.cfg pyproject.toml
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/herbens demo

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs openset teachers data/demo submissions/*.csv reports
