# Quickstart: `make demo` (train a tiny GPT on CPU and sample from it), `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
DEMO_DIR ?= runs/gpt_tiny

.PHONY: demo test bench clean-demo

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

demo: $(STAMP)
	$(PY) -m train.main --config=experiments/gpt.py:tiny --workdir=$(DEMO_DIR)
	$(PY) -m experiments.sample --workdir=$(DEMO_DIR) --prompt="And God said" --show_probs=10 \
		--temperature=0.7 --top_k=40 --num_samples=2 --max_new_tokens=60
	$(PY) -m experiments.sample --workdir=$(DEMO_DIR) --prompt="And God said" \
		--temperature=1.0 --num_samples=2 --max_new_tokens=60 --seed=1
	$(PY) -m experiments.compare $(DEMO_DIR) --out=$(DEMO_DIR)/loss.png

bench: $(STAMP)
	$(PY) -m experiments.bench --config=experiments/gpt.py:bench_small
	$(PY) -m experiments.bench --config=experiments/gpt.py:bench_124m

clean-demo:
	rm -rf $(DEMO_DIR)
