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

.PHONY: venv install test demo bench lab lint clean labext labext-dev browser-deps

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -e '.[$(EXTRAS)]'
	$(PY) -m ipykernel install --sys-prefix --name llmops-jupyter --display-name "Python (llmops-jupyter)" >/dev/null
	touch $@

venv install: $(STAMP)

# -- JupyterLab extension (labextension/ → llmops_jupyter/labextension/, git-ignored) ---------------------------
# npm ci only when package.json/package-lock.json changed; the build only when a source is newer than the output.
LABEXT_DIR  := labextension
LABEXT_OUT  := llmops_jupyter/labextension/package.json
LABEXT_DEPS := $(LABEXT_DIR)/node_modules/.package-lock.json
LABEXT_SRC  := $(wildcard $(LABEXT_DIR)/src/*.ts $(LABEXT_DIR)/style/* $(LABEXT_DIR)/schema/*.json) \
               $(LABEXT_DIR)/package.json $(LABEXT_DIR)/tsconfig.json
LABEXT_LINK := $(VENV)/share/jupyter/labextensions/llmops-jupyter

# `npm ci` refuses a lock file missing other platforms' optional packages (partial registry mirrors drop them);
# `npm install` then installs the same locked versions.
$(LABEXT_DEPS): $(LABEXT_DIR)/package.json $(LABEXT_DIR)/package-lock.json
	cd $(LABEXT_DIR) && (npm ci --no-audit --no-fund || npm install --no-audit --no-fund)
	touch $@

$(LABEXT_OUT): $(LABEXT_SRC) $(LABEXT_DEPS)
	cd $(LABEXT_DIR) && npm run build:prod
	touch $@

labext: $(LABEXT_OUT)

# The editable install does not copy share/ data: link the built extension into the venv so Lab finds it
# (check with `.venv/bin/jupyter labextension list`).
$(LABEXT_LINK): | $(STAMP) $(LABEXT_OUT)
	$(VENV)/bin/jupyter-builder develop --overwrite .

labext-dev: labext $(LABEXT_LINK)

# Browser tests drive Debian's chromium (Playwright's own browser download does not work offline).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "warning: chromium not installed; browser tests will be skipped (fail under CI=true)"

test: labext $(STAMP) labext-dev browser-deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check llmops_jupyter tests bench

# DEMO_ARGS: notebook parameter overrides, e.g. make demo DEMO_ARGS="-p max_steps 300 -p eval_limit 60"
demo: $(STAMP)
	$(PY) -m llmops_jupyter.demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .llmops demo-out build dist llmops_jupyter/labextension labextension/node_modules labextension/lib

lab: labext-dev
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=$(CURDIR)
