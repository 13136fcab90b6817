# llmlab: `make run` and `make test` do all set-up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export WANDB_MODE ?= offline
export TIKTOKEN_CACHE_DIR ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run test test-fast bench clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned in the same command as lightning/bitsandbytes so pip never pulls a CUDA build
	$(BIN)/pip install -q "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

# legacy TRL 0.11.4 wheel, never installed: tests/alignment/test_losses.py reads its PPO code (TRL removed PPO since)
REF_TRL := $(VENV)/reference/trl-0.11.4-py3-none-any.whl
$(REF_TRL): $(STAMP)
	$(BIN)/pip download -q --no-deps --only-binary=:all: "trl==0.11.4" -d $(VENV)/reference

install: $(STAMP) $(REF_TRL)  ## create .venv and install llmlab with its dev extras

run: $(STAMP)  ## train the default experiment (GPT on Shakespeare, ~10 min on 2 CPU cores)
	$(BIN)/llmlab train

test: $(STAMP) $(REF_TRL)  ## run the whole test suite
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=15

test-fast: $(STAMP) $(REF_TRL)  ## unit tests only (skip end-to-end runs)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)  ## benchmarks against reference implementations (tables in outputs/bench/)
	$(BIN)/llmlab bench gpt --out outputs/bench/gpt
	$(BIN)/llmlab bench bert --out outputs/bench/bert
	$(BIN)/llmlab bench t5 --out outputs/bench/t5
	$(BIN)/llmlab bench word2vec --variants
	$(BIN)/llmlab bench glove
	$(BIN)/llmlab bench peft --out outputs/bench/peft

clean:  ## remove the venv and run outputs
	rm -rf $(VENV) outputs/*/ .pytest_cache
