# The two set-up commands of the README. Each installs what it needs (CPU build of torch, pinned so
# pip does not fetch the CUDA wheels) and then runs.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install --disable-pip-version-check -q torch==2.13.0

.PHONY: quickstart test install
install:
	$(PIP_INSTALL) -e .

quickstart: install
	dfmkit run quickstart_digits

test:
	$(PIP_INSTALL) -e ".[test]"
	$(PYTHON) -m pytest -q
