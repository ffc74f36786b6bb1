# The README's two commands (book, test), `make lab` and `make portability`. Each creates
# .venv and installs requirements.txt when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: book test lab portability

book: $(STAMP)
	$(VENV)/bin/jupyter-book build --all -W .

test: $(STAMP)
	$(VENV)/bin/pytest

# Every notebook under every imitated machine of tools/numenv.py (README: "Your machine
# and the book's"); ENVS=haswell-1t,sandybridge-2t picks some.
portability: $(STAMP)
	$(VENV)/bin/python tools/portability.py $(if $(ENVS),--envs $(ENVS))

# JupyterLab on 127.0.0.1 only, opening notebooks/, with the venv's Python as the
# kernel (it imports transformer_lib, installed editable). Jupyter prints the URL with
# its token; JUPYTER_PORT and JUPYTER_TOKEN choose them. Ctrl-C stops it. The root is
# the repository, so that Jupytext finds pyproject.toml and saving a notebook also
# updates its .py. Jupyter will not run as root (a container, CI) without --allow-root.
lab: $(STAMP)
	@echo "== JupyterLab: open the http://127.0.0.1:... URL printed below"
	JUPYTER_PREFER_ENV_PATH=1 $(VENV)/bin/jupyter lab --no-browser \
	  --ServerApp.ip=127.0.0.1 --ServerApp.root_dir=. \
	  --LabApp.default_url=/lab/tree/notebooks \
	  $(if $(filter 0,$(shell id -u)),--allow-root)

$(STAMP): requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)
