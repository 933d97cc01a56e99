# Quick start: `make train` then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch by default; for CUDA, e.g.
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install train test serve quality tensorboard bench clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) \
		$(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

train: install
	$(BIN)/python scripts/train.py $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

serve: install
	$(BIN)/python scripts/serve.py $(ARGS)

# Five seeds of the default shopper model beside LightGBM and logistic regression, and every
# synthetic data set against its ceiling: reports/quality/quality.md and quality.png.
quality: install $(VENV)/.bench
	$(BIN)/python scripts/quality.py $(ARGS)

$(VENV)/.bench: pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

tensorboard: install
	$(BIN)/tensorboard --logdir logs --host 127.0.0.1 --port 6006

# Training and serving against plain PyTorch / FastAPI baselines; wrk is used when installed.
bench: install
	$(BIN)/python scripts/bench.py $(ARGS)

clean:
	rm -rf logs reports .pytest_cache
