# The README's two set-up commands, and the one that updates constraints.txt. Each makes a virtual environment
# (.venv, or VENV=path) when there is none and installs dfmkit into it at the versions CI tests (constraints.txt pins
# every dependency, torch at the CPU build 2.13.0, so pip does not fetch the CUDA wheels), then runs.
VENV ?= .venv
PYTHON = $(VENV)/bin/python
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: quickstart test install constraints

$(PYTHON):
	python3 -m venv $(VENV)

install: $(PYTHON)
	$(PIP) -c constraints.txt -e .

quickstart: install
	$(VENV)/bin/dfmkit run quickstart_digits

test: $(PYTHON)
	$(PIP) -c constraints.txt -e ".[test,bench]"
	$(PYTHON) -m pytest -q

# Resolve the newest versions in a fresh environment and pin them (torch stays at the CPU build 2.13.0).
constraints:
	rm -rf .constraints-venv && python3 -m venv .constraints-venv
	.constraints-venv/bin/python -m pip install --disable-pip-version-check -q torch==2.13.0 -e ".[test,bench]"
	{ sed -n '1,3p' constraints.txt; .constraints-venv/bin/python -m pip freeze --exclude-editable \
	  | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .constraints-venv
