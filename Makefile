# The README's two commands: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# PyTorch only for the converter and its tests (`pip install .[convert]`); the demo does not need it.
CONVERT_STAMP := $(VENV)/.installed-convert
# FastDeploy 1.0.7 has wheels for Python <= 3.10 only: its test runs in a second environment.
FD_PYTHON ?= $(shell for p in $(HOME)/.pyenv/versions/3.10*/bin/python3 $$(command -v python3.10); do \
	"$$p" -c "" 2>/dev/null && echo "$$p" && break; done)
FD_VENV := .venv-fastdeploy
FD_STAMP := $(FD_VENV)/.installed
# The chat page's test drives Debian's Chromium and its chromedriver (packages chromium, chromium-driver).
CHROMIUM_STAMP := $(VENV)/.installed-chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

$(CONVERT_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,convert]"
	touch $(CONVERT_STAMP)

$(FD_STAMP):
	@if [ -n "$(FD_PYTHON)" ]; then \
		$(FD_PYTHON) -m venv $(FD_VENV) && \
		$(FD_VENV)/bin/python -m pip install --quiet "fastdeploy-python==1.0.7" "numpy<2" && touch $(FD_STAMP); \
	else \
		echo "no Python 3.10 found: the FastDeploy tests will be skipped (under CI=true they fail)"; \
	fi

$(CHROMIUM_STAMP): $(STAMP)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		touch $@; \
	elif command -v apt-get >/dev/null; then \
		{ $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			chromium chromium-driver && touch $@; } || \
		echo "apt-get could not install chromium and chromium-driver: the chat page tests will be skipped (under CI=true they fail)"; \
	else \
		echo "no apt-get: install Chromium and chromedriver yourself, or the chat page tests will be skipped (under CI=true they fail)"; \
	fi

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python finetune_generation.py
	$(BIN)/python export_generation_model.py --onnx
	$(BIN)/python infer_generation.py
	$(BIN)/python infer_generation.py --backend onnxruntime
	$(BIN)/python -m infer.demo_client

# -rs lists every skipped test with its reason; with CI=true (.ci/run) a skip fails the run (tests/conftest.py), a
# skipped module as a collection error, after which the other modules still run.
test: $(CONVERT_STAMP) $(FD_STAMP) $(CHROMIUM_STAMP)
	$(BIN)/python -m pytest -q -rs --continue-on-collection-errors

clean:
	rm -rf $(VENV) $(FD_VENV) checkpoints
