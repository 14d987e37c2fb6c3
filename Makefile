# Everything a fresh clone needs: `make test` and `make train` install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: install test train bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision come from the machine's local wheel cache (a CUDA build that runs on CPU).
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) tests

train: install
	PATH=$(abspath $(BIN)):$$PATH bash tools/make_train.sh

# Every benchmark runs even when an earlier one misses its target; the exit status says whether any missed.
BENCHMARKS := bench_prep bench_tpavi bench_loader bench_train

bench: install
	@status=0; for name in $(BENCHMARKS); do \
	  echo "== tools/$$name.py"; PATH=$(abspath $(BIN)):$$PATH $(BIN)/python tools/$$name.py || status=1; \
	done; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info
