# Two set-up commands: `make demo` and `make test`; each creates .venv when missing.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
NP      ?= 4
STAMP   := $(VENV)/.fltorrent-installed
# torch==2.13.0 first: on these machines it is a local CPU build; a looser pin pulls a multi-GB CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: demo test test-unit test-mpi env lint bench clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,train]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py --np $(NP)

test: test-unit test-mpi

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests --ignore=tests/mpi

test-mpi: $(STAMP)
	bash tests/mpi/run.sh $(BIN)

lint: $(STAMP)
	$(BIN)/ruff check fltorrent_hpc jobs tests
	$(BIN)/ruff format --check fltorrent_hpc jobs tests

bench: $(STAMP)
	$(BIN)/mpiexec -n $(NP) $(BIN)/python jobs/bench_allgather.py --json results/bench_allgather.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
