# The README's two commands. Both create .venv and install requirements.txt when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: book test lab

book: $(STAMP)
	$(VENV)/bin/jupyter-book build --all -W .

test: $(STAMP)
	$(VENV)/bin/pytest

# JupyterLab on notebooks/, on 127.0.0.1 only, with the venv's Python as the kernel (it
# imports transformer_lib, installed editable). Jupyter prints the URL with its token;
# JUPYTER_PORT and JUPYTER_TOKEN choose them. Ctrl-C stops it. Jupyter refuses to run as
# root (in a container, in CI) unless told --allow-root.
lab: $(STAMP)
	@echo "== JupyterLab: open the http://127.0.0.1:... URL printed below"
	JUPYTER_PREFER_ENV_PATH=1 $(VENV)/bin/jupyter lab --no-browser \
	  --ServerApp.ip=127.0.0.1 --ServerApp.root_dir=notebooks \
	  $(if $(filter 0,$(shell id -u)),--allow-root)

$(STAMP): requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)
