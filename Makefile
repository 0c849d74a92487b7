# The README's commands. `make train` and `make test` each do all of their own set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST_DEBIAN := /usr/share/datasets/fashion-mnist

.PHONY: install data browser train test lint bench

install: $(VENV)/.installed

# Reinstalls when the dependencies change. The constraints file pins torch/torchvision.
# torch's CUDA build and its libraries take about 7 GB; with less free, pip fails midway with ENOSPC.
$(VENV)/.installed: pyproject.toml constraints.txt
	@free_gb=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free_gb" -lt 8 ]; then \
		echo "make install: $$free_gb GB free here, the environment needs about 7 GB; if pip stops with 'No space left on device', free disk and run it again" >&2; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# Real Fashion-MNIST: the Debian package dataset-fashion-mnist, installed when missing and apt is at hand.
data:
	@if [ -f $(FMNIST_DEBIAN)/t10k-labels-idx1-ubyte.gz ] || [ -f data/fashion_mnist/t10k-labels-idx1-ubyte.gz ]; then \
		echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
		sudo -n apt-get update -qq && sudo -n DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST: no local copy and no apt; train.py downloads it if the network allows"; \
	fi

# Debian's headless Chromium and its driver, for the browser tests of the demo page and the prediction gallery
# (skipped, saying why, without them).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "chromium: found"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
		sudo -n apt-get update -qq && sudo -n DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "chromium: not installed and no apt; the browser test will skip"; \
	fi

# The default recipe on real Fashion-MNIST; extra overrides: make train ARGS="model=resnet18 input.image_size=64"
train: install data
	$(PY) train.py $(ARGS)

test: install browser
	OMP_NUM_THREADS=2 $(PY) -m pytest -q $(ARGS)

# Style, and the import contract of pyproject.toml (layers, no cycles; tests/test_layers.py runs it too).
lint: install
	$(VENV)/bin/ruff check src tests bench *.py
	$(VENV)/bin/ruff format --check src tests bench *.py
	$(VENV)/bin/lint-imports --no-cache

# Speed against a plain PyTorch loop and torchvision's pipeline, and the default recipe's accuracy: bench/results.md
bench: install data
	$(PY) -m bench.run $(ARGS)
