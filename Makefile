# The two Quick start commands: `make train` and `make test`. Each sets up its own virtual
# environment from scratch with nothing but Python and pip. `make test-fast` is the inner loop:
# every test but the slow ones (subprocess runs, full-model parity, multi-process).
#   PYTHON=...  the interpreter (default python3; on these machines Python 3.12 is
#               `PYENV_VERSION=3.12.1 make test PYTHON=python3.12 VENV=.venv312`)
#   VENV=...    where the environment lives (default .venv)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
# (the grep drops pip's warnings about local index folders this machine's pip config names)

# torch builds that run on the CPU and install from this project's machines' local wheel cache
# on Python 3.11 (torchvision is needed by timm, the oracle of the timm-layout parity tests;
# pytorchcv is the oracle of the pytorchcv layouts: BAM-, SE- and CBAM-ResNets).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1 timm pytorchcv

.PHONY: setup torch train detect-demo test test-fast test-docs mutants clean

# `make train` needs the library and its training application (the train extra, with oneDNN for
# the CPU path: the cpu extra); `make test` everything the tests import (the test extra).
$(VENV)/.venv-done:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip 2>&1 | { grep -v "is ignored" || true; }
	touch $@

$(VENV)/.train-done: pyproject.toml $(VENV)/.venv-done
	$(PIP) install -e '.[train,cpu]' 2>&1 | { grep -v "is ignored" || true; }
	$(PY) -c "import cbam_jax"
	touch $@

$(VENV)/.setup-done: pyproject.toml $(VENV)/.train-done
	$(PIP) install -e '.[test]' 2>&1 | { grep -v "is ignored" || true; }
	touch $@

setup: $(VENV)/.setup-done

# torch for conversion and the parity tests; skipped where the Python has no CPU build of the pins.
$(VENV)/.torch-done: $(VENV)/.setup-done
	@if $(PY) -c "import sys; sys.exit(sys.version_info[:2] != (3, 11))"; then \
	  $(PIP) install $(TORCH_PINS) 2>&1 | { grep -v "is ignored" || true; }; \
	  $(PY) -c "import torch, timm, pytorchcv"; \
	else echo "torch: skipped on this Python (pinned CPU builds exist for 3.11); torch tests will skip"; fi
	touch $@

torch: $(VENV)/.torch-done

# The main job: a CBAM-ResNet-18 on scikit-learn's real 8x8 digits (offline; a few minutes on a CPU).
# Starts afresh in runs/default each time (train.py itself resumes an existing workdir).
train: $(VENV)/.train-done
	rm -rf runs/default
	$(PY) train.py --config configs/default.py --workdir runs/default

# The detection demo (docs/detection.md): an FCOS detector on a CBAM-ResNet-18 trained on generated
# shapes (offline; a few minutes on a CPU), then `cbam-jax detect` on held-out images, drawn.
detect-demo: $(VENV)/.setup-done
	rm -rf runs/detect_shapes
	$(PY) train.py --config configs/detection_shapes.py --workdir runs/detect_shapes
	$(PY) -m cbam_jax.detection.data runs/detect_shapes/samples 4
	$(VENV)/bin/cbam-jax detect runs/detect_shapes/samples --pretrained runs/detect_shapes --out runs/detect_shapes/drawn

# -n auto: one pytest worker per CPU (pytest-xdist); compiling dominates and XLA compiles on one thread.
test: torch
	$(PY) -m pytest -q -n auto --durations=15

test-fast: setup
	$(PY) -m pytest -q -n auto -m "not slow"

# Every code block of README.md and docs/*.md, and every link (tests/test_docs.py).
test-docs: setup
	$(PY) -m pytest -q tests/test_docs.py

# Mutation testing (docs/mutation.md): mutants of the checksum, the loss scaling and the ONNX
# elementwise table against the tests that cover them; writes docs/mutation-report.txt. Long (tens of
# minutes on two cores), so not part of `make test`. MUTANTS="layouts cbam ..." picks other targets.
MUTANTS ?=
mutants: torch
	$(PIP) install 'mutmut>=3.8,<4' 2>&1 | { grep -v "is ignored" || true; }
	$(PY) tools/mutants.py $(MUTANTS)

clean:
	rm -rf .venv .venv312 build *.egg-info
