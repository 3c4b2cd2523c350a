# The README's two commands: `make demo` (the toy distillation benchmark, quick mode) and `make test`.
PYTHON ?= python3
VLLM_VENV ?= .venv-vllm

.PHONY: install tiny demo tiny-demo toy test test-vllm

install:
	PYTHON=$(PYTHON) bash scripts/setup.sh

tiny: install
	$(PYTHON) scripts/make_tiny_models.py

# The on-policy effect on one seed: builds the walk task's teacher and student, distils with gkd-train
# (lmbda 0 and 1) and prints the results table with both error rates and their ratio.
demo: install
	$(PYTHON) examples/toy/run.py --quick

# The full grid (three tasks, lmbda x beta, two seeds): under 40 minutes on two cores.
toy: install
	$(PYTHON) examples/toy/run.py

# The smallest distillation run: the tiny random-ish models of scripts/make_tiny_models.py.
tiny-demo: tiny
	gkd-train --config examples/tiny.yaml

# The default suite, then the vLLM tests: in this environment when it has vLLM (a GPU machine with
# gkd[vllm]), else in $(VLLM_VENV) with the CPU build of vLLM.
test: install
	$(PYTHON) -m pytest
	@if $(PYTHON) -c "import vllm" 2>/dev/null; then echo "vLLM tests: run above"; else $(MAKE) test-vllm; fi

test-vllm:
	PYTHON=$(PYTHON) GKD_VLLM_VENV=$(VLLM_VENV) bash scripts/setup_vllm_env.sh
	# DeepSpeed's CPU extensions built for this environment's versions, apart from the main environment's
	TORCH_EXTENSIONS_DIR=$${TORCH_EXTENSIONS_DIR:-$(VLLM_VENV)/torch_extensions} \
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(VLLM_VENV)/bin/python -m pytest -m vllm
