# Two commands do all set-up on a fresh machine:
#   make serve   create .venv, install, serve the default model on http://127.0.0.1:8000
#   make test    create .venv, install, lint and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel on these machines; GPU users: make TORCH_SPEC='torch>=2.4' ...
TORCH_SPEC ?= torch==2.13.0
MODEL ?= models/k2-nano-instruct
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test test-slow lint nano

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/kimi-k2 serve --model $(MODEL) --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: lint
	$(PY) -m pytest -q -p no:cacheprovider --run-slow

# Rebuild models/k2-nano-{base,instruct} from nothing (corpus, synthetic chats, tokenizer, pretrain, SFT, FP8 export).
# On a CPU the first recipes are shortened (about two hours on the 2-core box; BASE_STEPS=N SFT_STEPS=M to change that);
# GPU=1 make nano runs them as they stand, as for the shipped models.
nano: install
	scripts/build_nano.sh
