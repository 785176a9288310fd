# Flywheel: `make run` and `make test` are the whole set-up on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# GPU=1: CUDA builds of torch (PyTorch's index) and jax (the `gpu` extra), both for CUDA 13; JAX may then use the GPU.
GPU ?=
TORCH_CUDA_INDEX ?= https://download.pytorch.org/whl/cu130
# TORCH_INDEX: where the CPU build of torch comes from (empty: pip's configured index; from plain PyPI, whose Linux
# wheel is the CUDA build, give https://download.pytorch.org/whl/cpu)
TORCH_INDEX ?=
STAMP := $(VENV)/.installed$(if $(GPU),-gpu,)
ifeq ($(GPU),)
export JAX_PLATFORMS ?= cpu
endif
export XLA_PYTHON_CLIENT_PREALLOCATE = false

.PHONY: install run test bench fidelity lint proto clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
ifeq ($(GPU),)
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(BIN)/pip install --quiet -e '.[dev]'
else
	$(BIN)/pip install --quiet 'torch==2.13.0+cu130' --index-url $(TORCH_CUDA_INDEX)
	$(BIN)/pip install --quiet -e '.[dev,gpu]'
	$(BIN)/python -c "import torch, importlib.metadata as m; plugins = {d.name for d in m.distributions()} & {'jax-cuda13-plugin'}; \
		assert torch.version.cuda and plugins, f'GPU=1 gave torch {torch.__version__} (CUDA {torch.version.cuda}), jax CUDA plugin: {plugins or None}'"
endif
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/flywheel run

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=12

bench: $(STAMP)
	$(BIN)/python -m benchmarks.physics
	$(BIN)/python -m benchmarks.agreement
	$(BIN)/python -m benchmarks.world_model --threads 1
	$(BIN)/python -m benchmarks.grading
	$(BIN)/python -m benchmarks.service --engine mujoco
	$(BIN)/python -m benchmarks.policies --no-ppo

fidelity: $(STAMP)
	$(BIN)/python -m benchmarks.fidelity $(if $(QUICK),--quick,)

.PHONY: sim2real
sim2real: $(STAMP)   # reality transitions to 0.9 success: flywheel vs PPO in reality vs PPO in the wrong engine (QUICK=1: a check)
	$(BIN)/python -m benchmarks.sim2real $(if $(QUICK),--quick)

lint: $(STAMP)
	$(BIN)/ruff check .

proto: $(STAMP)
	$(BIN)/python -m services.proto.generate

clean:
	rm -rf $(VENV) .pytest_cache
