# Two commands do all set-up on a fresh machine (Python 3.11 + pip + apt assumed):
#   make demo   - venv, install, Fashion-MNIST, then the main job: train, OBA-prune to ops ratio 0.5, fine-tune
#   make test   - venv, install with test extras, the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/fashion_mnist

.PHONY: demo test data bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

data:
	bash scripts/ensure_fashion_mnist.sh

demo: $(VENV)/.installed data
	$(PY) prune.py --config configs/fashion_mnist.py --workdir $(WORKDIR)

test: $(VENV)/.installed data
	$(PY) -m pytest -n 2 --durations=15 tests

bench: $(VENV)/.installed
	$(PY) bench/score_speed.py

clean:
	rm -rf $(VENV) runs
