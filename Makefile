# Quickstart: `make demo` (train a tiny GPT on CPU and sample from it), `make test`.
# `make bert-demo`: pretrain a tiny BERT, fine-tune it twice, answer a question, embed a word.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
TEST_STAMP := $(VENV)/.test-installed-$(shell cksum requirements-test.txt | cut -d' ' -f1)
DEMO_DIR ?= runs/gpt_tiny
BERT_DIR ?= runs/bert_tiny

.PHONY: demo bert-demo test bench clean-demo

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $(STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	rm -f $(VENV)/.test-installed-* && touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal tests

demo: $(STAMP)
	$(PY) -m train.main --config=experiments/gpt.py:tiny --workdir=$(DEMO_DIR)
	$(PY) -m experiments.sample --workdir=$(DEMO_DIR) --prompt="And God said" --show_probs=10 \
		--temperature=0.7 --top_k=40 --num_samples=2 --max_new_tokens=60
	$(PY) -m experiments.sample --workdir=$(DEMO_DIR) --prompt="And God said" \
		--temperature=1.0 --num_samples=2 --max_new_tokens=60 --seed=1
	$(PY) -m experiments.compare $(DEMO_DIR) --out=$(DEMO_DIR)/loss.png

bert-demo: $(STAMP)
	$(PY) -m train.main --config=experiments/bert.py:tiny --workdir=$(BERT_DIR)
	$(PY) -m train.main --config=experiments/bert_classify.py:tiny --workdir=$(BERT_DIR)_cls \
		--config.init_from=$(BERT_DIR)
	$(PY) -m train.main --config=experiments/bert_squad.py:tiny --workdir=$(BERT_DIR)_qa \
		--config.init_from=$(BERT_DIR)
	$(PY) -m experiments.predict_qa --workdir=$(BERT_DIR)_qa \
		--context="Now these are the generations of Terah. Terah became the father of Abram, Nahor, and Haran. Haran became the father of Lot." \
		--question="Who did Haran become the father of?"
	$(PY) -m experiments.embed --workdir=$(BERT_DIR) --word=light

bench: $(STAMP)
	$(PY) -m experiments.bench --config=experiments/gpt.py:bench_small
	$(PY) -m experiments.bench --config=experiments/gpt.py:bench_124m
	$(PY) -m experiments.bench --config=experiments/bert.py:bert_bench_mini
	$(PY) -m experiments.bench --config=experiments/bert.py:bert_bench_base
	$(PY) -m experiments.bench --config=experiments/transformer.py:transformer_bench_small
	$(PY) -m experiments.bench --config=experiments/transformer.py:transformer_bench_base

clean-demo:
	rm -rf $(DEMO_DIR) $(BERT_DIR) $(BERT_DIR)_cls $(BERT_DIR)_qa
