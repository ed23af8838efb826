# loraplex — the two commands: `make serve` and `make test`.
# Setup is idempotent: stamps in .venv/ make a second run instant when nothing changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
TORCH_VERSION ?= 2.13.0
# Where torch comes from. Empty: the default package index (on Linux x86-64 that wheel is the
# CUDA build, several GB, unless pip is configured with a local CPU wheel). For the CPU-only wheel:
#   make serve TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)
PYTEST_ARGS ?=

.PHONY: setup model serve demo test test-unit test-integration test-store-shared test-fleet bench stress fidelity proto \
        clean help test-client-install test-demo gpu-check test-adapters test-prefix-cache test-engine-process \
        test-engine-thread

help:
	@echo "make serve   set up .venv, fetch the default model, start the server on 127.0.0.1:50051"
	@echo "make demo   train a small adapter, upload it, compare replies without and with it"
	@echo "make test    set up .venv, fetch the default model, run the test suite"
	@echo "make test-engine-thread   the service tests against the in-process engine (--engine-process off)"
	@echo "make bench   run the benchmark suite and rewrite BENCHMARKS.md"
	@echo "make proto   regenerate the gRPC stubs in loraplex/v1 from proto/"

$(PY):
	$(PYTHON) -m venv $(VENV)

# The CPU wheel of torch first, so that nothing later can pull a multi-GB CUDA build.
$(VENV)/.torch-$(TORCH_VERSION): | $(PY)
	$(BIN)/pip install --disable-pip-version-check -q $(TORCH_INDEX) "torch==$(TORCH_VERSION)"
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch-$(TORCH_VERSION)
	$(BIN)/pip install --disable-pip-version-check -q "torch==$(TORCH_VERSION)" -e ".[server,dev]"
	@touch $@

setup: $(VENV)/.installed

model: setup
	$(BIN)/loraplex model fetch-default
	$(PY) -m loraplex.server.kernels.native    # compile the fused CPU kernels once (~30 s)

serve: model
	$(BIN)/loraplex serve --model default

# A first adapter: train the demo LoRA once, upload it (to the server on :50051, or one started
# on free ports), print replies without and with it.
demo: model
	$(BIN)/loraplex demo

test: model
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: model
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

# Every store test case against PostgreSQL (pgserver) + S3 (moto); `make test` runs one case per test.
test-store-shared: setup
	$(PY) -m pytest tests/unit/store tests/integration/test_shared_store_kill.py -m slow $(PYTEST_ARGS)

# Prefix caching: chunked prefill + preemption on a small KV cache (cache on == off), and the
# default model with cached prefixes vs PEFT (slow; the tiny-model checks run in `make test`).
test-prefix-cache: model
	$(PY) -m pytest tests/unit/test_prefix_cache.py tests/unit/test_prefix_cache_engine.py \
		tests/integration/test_prefix_cache_oracle.py -m "slow or not slow" $(PYTEST_ARGS)

# `loraplex fleet` on a local Ray cluster: 2 replicas, affinity, a replica kill, the front-door rule table,
# residency-aware routing, Ray ports and logs (slow; not in `make test`).
test-fleet: model
	$(PY) -m pytest tests/integration/test_fleet.py tests/integration/test_fleet_scale.py tests/integration/test_fleet_front_door_table.py tests/integration/test_fleet_shedding.py tests/integration/test_fleet_residency.py -m "slow or not slow" $(PYTEST_ARGS)

# DoRA / embedding / modules_to_save adapters vs PEFT on the default model (slow; not in `make test`).
test-adapters: model
	$(PY) -m pytest tests/integration/test_adapter_kinds_oracle.py -m "slow or not slow" $(PYTEST_ARGS)

# Both EngineClient implementations (issue 36) run the same service tests: `make test` against the
# engine-core process (the default of `loraplex serve`), this against the in-process engine thread
# (`--engine-process off`: tests, the fleet's replicas).
ENGINE_CLIENT_TESTS := tests/integration/test_grpc_generation.py tests/integration/test_openai_http.py \
	tests/integration/test_grpc_structured.py tests/integration/test_openai_structured.py \
	tests/integration/test_grpc_auth.py tests/integration/test_openai_tools.py \
	tests/integration/test_adapter_chat_template.py tests/integration/test_client_sdk.py \
	tests/integration/test_front_door_http.py tests/integration/test_front_door_table.py \
	tests/integration/test_hardening.py tests/integration/test_security.py \
	tests/integration/test_fuzz_rpcs.py tests/integration/test_replica_trailer.py tests/integration/test_tool_markers.py
test-engine-thread: model
	$(PY) -m pytest $(ENGINE_CLIENT_TESTS) --engine-process off $(PYTEST_ARGS)

# The served decode rate through the engine process vs the main-thread engine (default model; slow).
test-engine-process: model
	$(PY) -m pytest tests/integration/test_served_decode_rate.py -m slow $(PYTEST_ARGS)

bench: model
	$(PY) bench/suite.py $(BENCH_ARGS)

stress: model
	$(PY) -m pytest tests/stress -m slow $(PYTEST_ARGS)

# `pip install .` (no extras) into a fresh venv: SDK + client CLI against a real server, no torch.
test-client-install: model
	$(PY) -m pytest tests/integration/test_client_install.py -m slow $(PYTEST_ARGS)

# `loraplex demo` end to end: trains the demo adapter, uses a running server and starts one (slow).
test-demo: model
	$(PY) -m pytest tests/integration/test_demo.py -m slow $(PYTEST_ARGS)

# On a CUDA machine: install, tests/gpu, bnb-nf4 serve with 16 adapters, bench -> gpu-check/gpu_check.json
gpu-check:
	scripts/gpu_check.sh

fidelity: model
	$(PY) bench/fidelity.py

proto: setup
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
