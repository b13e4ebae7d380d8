# Every target sets itself up from nothing: .venv with torch first (constrained; never a surprise CUDA build, see
# tools/install_torch.py), the project editable with its extras, a kernel spec inside the venv; then it runs.
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu    # pick the torch build (cpu, cu130, ...)
#   make test TORCH_ALLOW_CUDA=1                                     # a CUDA build on a machine without a GPU
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
EXTRAS ?= dev
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
comma  := ,
PYTEST_ARGS ?=
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
TORCH_ALLOW_CUDA ?=
export TORCH_SPEC TORCH_INDEX_URL TORCH_ALLOW_CUDA
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: venv install pg-deps test test-fast test-stress test-gguf smoke-extras demo bench gpu-wheels gpu-check lab lint clean \
        labext labext-dev browser-deps labext-lint labext-unit labext-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) tools/install_torch.py

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

# `npm ci` installs exactly the lock file and never rewrites it (the lock lists every platform's optional packages,
# so `git status` stays clean after `make test`).
$(LABEXT_DEPS): $(LABEXT_DIR)/package.json $(LABEXT_DIR)/package-lock.json
	cd $(LABEXT_DIR) && npm ci --no-audit --no-fund
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

# The extension's own checks (node only, no venv): eslint + prettier + stylelint as in the JupyterLab extension
# template, and its jest unit tests (src/__tests__: the request helper and the panel's state).
labext-lint: $(LABEXT_DEPS)
	cd $(LABEXT_DIR) && npm run lint

labext-unit: $(LABEXT_DEPS)
	cd $(LABEXT_DIR) && npm test

labext-check: labext-lint labext-unit

# Browser tests drive Debian's chromium (Playwright's own browser download does not work offline).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "warning: chromium not installed; browser tests will be skipped (fail under CI=true)"

# The registry suite runs on SQLite and on a real PostgreSQL (tests/pgserver.py starts one per session in a temporary
# data directory, as an unprivileged user); Debian's server package is installed when its initdb is missing.
pg-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq postgresql) \
		|| echo "warning: PostgreSQL not installed; the registry's PostgreSQL tests will be skipped (fail under CI=true)"

# The whole suite, then every README install line in a fresh venv (SMOKE=0 skips that step).
SMOKE ?= 1
test: labext $(STAMP) labext-dev browser-deps labext-check pg-deps
	$(PY) -m pytest $(PYTEST_ARGS)
	@if [ "$(SMOKE)" = "1" ]; then $(MAKE) --no-print-directory smoke-extras; fi

# The inner loop: everything not marked slow or browser (under 3 minutes on 2 cores).
test-fast: $(STAMP) pg-deps
	$(PY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

# The browser, kernel (notebook), fault and serve tests with STRESS_BURNERS CPU-burning processes beside them
# (tools/cpu_burn.py): a wait on the wrong condition, or a sleep standing in for one, fails here rather than once a
# week in CI. The burners stop when pytest ends (pass, fail or Ctrl-C: the trap), when this recipe's shell is gone,
# and by themselves after STRESS_MAX_S seconds whatever happens.
STRESS_BURNERS ?= 2
STRESS_MAX_S   ?= 5400
STRESS_TESTS   ?= tests/server tests/faults tests/stages/serve tests/frontends/test_notebook.py \
                  tests/pipelines/test_example_notebooks.py tests/pipelines/test_failure_line.py \
                  tests/pipelines/test_pipelines.py tests/pipelines/test_papermill_compat.py
test-stress: labext $(STAMP) labext-dev browser-deps
	@$(PY) tools/cpu_burn.py --procs $(STRESS_BURNERS) --seconds $(STRESS_MAX_S) & burn=$$!; \
	trap 'kill $$burn 2>/dev/null; wait $$burn 2>/dev/null' EXIT; \
	trap 'exit 130' INT TERM HUP; \
	$(PY) -m pytest $(STRESS_TESTS) $(PYTEST_ARGS)

# The llama.cpp runtime tests (marked `gguf`; `make test` deselects them): installs the [gguf] extra, whose
# llama-cpp-python builds llama.cpp from source once (~7 min on 2 cores). The built wheel is kept in build/wheels
# (git-ignored) and in pip's wheel cache, so later runs and fresh venvs on this machine reuse it.
# Go (Debian's golang-go) runs the Modelfile TEMPLATE through Go's text/template, the engine Ollama uses.
GGUF_WHEELS := build/wheels
test-gguf: $(STAMP)
	@command -v go >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq golang-go) \
		|| echo "warning: Go not installed; the Modelfile template tests will be skipped"
	@mkdir -p $(GGUF_WHEELS)
	@ls $(GGUF_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
		CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} $(PIP) wheel --no-deps -w $(GGUF_WHEELS) \
		"llama-cpp-python>=0.3.36,<0.4"
	$(PIP) install -q --find-links $(GGUF_WHEELS) -e '.[$(EXTRAS),gguf]'
	$(PY) -m pytest -m gguf tests/stages/export $(PYTEST_ARGS)

# Build the wheel, install it per README install line into fresh venvs, run tools/smoke_extra_check.py in each.
smoke-extras: labext
	$(PY) tools/smoke_extras.py

# ruff, then the extension's lint when node is installed (`make test` always runs it).
lint: $(STAMP)
	$(PY) -m ruff check llmops_jupyter tests bench tools
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory labext-lint; \
		else echo "npm not found: skipping the Lab extension's lint (make labext-lint)"; fi

# DEMO_ARGS: notebook parameter overrides, e.g. make demo DEMO_ARGS="-p max_steps 300 -p eval_limit 60"
demo: $(STAMP)
	$(PY) -m llmops_jupyter.demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) bench/run.py

# The GPU check (docs/finetune.md, "GPU check"): `make gpu-wheels` here, where the package index is reachable, puts the wheels
# a GPU machine may lack into build/gpu-carry/part-N (git-ignored, <= 60 MiB each: one part per call);
# `make gpu-check` there runs tests/gpu, the GPU benchmarks and the demo within 8 minutes with that machine's own
# Python (which must have torch with CUDA; without CUDA it refuses in one line). GPU_CHECK_ARGS=--dry-run: the plan.
GPU_PY ?= python3
GPU_CHECK_ARGS ?=
gpu-wheels: $(STAMP)
	$(PY) tools/gpu_check.py --prepare

gpu-check:
	$(GPU_PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .llmops demo-out build dist llmops_jupyter/labextension labextension/node_modules labextension/lib \
		labextension/coverage

lab: labext-dev
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=$(CURDIR)
