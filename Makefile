# The README's two commands. Both create .venv and install requirements.txt when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: book test

book: $(STAMP)
	$(VENV)/bin/jupyter-book build --all -W .

test: $(STAMP)
	$(VENV)/bin/pytest

$(STAMP): requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)
