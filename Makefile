# Every target sets itself up from nothing: .venv with CPU torch first (constrained), the project editable with
# its extras, a kernel spec inside the venv; then it runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
EXTRAS ?= dev
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
comma  := ,
PYTEST_ARGS ?=
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: venv install test demo bench lab lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -e '.[$(EXTRAS)]'
	$(PY) -m ipykernel install --sys-prefix --name llmops-jupyter --display-name "Python (llmops-jupyter)" >/dev/null
	touch $@

venv install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check llmops_jupyter tests bench

demo: $(STAMP)
	$(PY) -m llmops_jupyter.demo

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .llmops build dist llmops_jupyter/labextension labextension/node_modules labextension/lib
