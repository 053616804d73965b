"""Supervised fine-tuning of a pretrained GPT on questions and answers or chat (task "sft").

Commands (the CPU demo, after `experiments/gpt.py:tiny` has pretrained runs/gpt_tiny):
  python -m experiments.few_shot --workdir=runs/gpt_tiny --shots=1        # before fine-tuning
  python -m train.main --config=experiments/gpt_sft.py:tiny --workdir=runs/gpt_sft
  python -m train.main --config=experiments/gpt_sft.py:tiny --workdir=runs/gpt_sft_lora \
      --config.model.lora_rank=8 --config.opt.learning_rate=5e-3
  python -m experiments.chat --workdir=runs/gpt_sft --prompt="Whose son was Boaz?"

The default data are free-form genealogy questions about one Bible verse (data/chat.py
bible_qa), with whole books held out for dev; your own data: --config.data.source=train.jsonl
--config.data.eval_source=dev.jsonl ({"prompt", "response"} or {"messages": [...]} lines, or
prompt<TAB>response TSV). `python -m experiments.sft_data --config=...` prints the exact
rendered examples and the packing figures without training.

Variants: smoke (tests: a from-scratch model, seconds), tiny (the CPU demo, from gpt_tiny).
The model's shape always follows config.init_from's run (train/tasks/sft.py configure).

Measured (2-core CPU, 2026-12-02, from the `make demo` runs/gpt_tiny, 600 steps): dev exact
match on the 149 held-out questions 14.8% with full fine-tuning (1m22s), 12.8% with LoRA rank 8
at lr 5e-3 (73,728 trained parameters, 1m54s), against 0.0% for the base model with 0, 1 or 3
plain-text shots (experiments.few_shot). docs/gpt.md "Supervised fine-tuning (SFT) and LoRA" has the rest.
"""
import ml_collections

from experiments import gpt

PRESETS = ("smoke", "tiny")

def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown GPT SFT variant {arg!r}; choose smoke or tiny")
    c = gpt.get_config(arg)
    c.task = "sft"
    c.init_from = "runs/gpt_tiny" if arg == "tiny" else ""  # a GPT run folder
    c.model.dropout_rate = 0.0
    c.data = ml_collections.ConfigDict(dict(
        source="bible", eval_source="", bible_version="4", cache_dir="", tokenizer_type="bpe",
        max_len=c.model.max_len, packing=True,
        # Dev answers generated at every eval (0: all dev conversations), greedy at 0.
        eval_generations=200, max_new_tokens=16, eval_temperature=0.0))
    c.opt.update(learning_rate=1e-3, warmup_steps=50, weight_decay=0.0)
    if arg == "smoke":
        c.data.eval_generations, c.data.max_new_tokens = 8, 4
    else:  # tiny
        c.batch_size = c.eval_batch_size = 16
        c.num_train_steps, c.eval_every_steps, c.log_every_steps = 600, 200, 25
        c.checkpoint_every_steps, c.num_eval_steps = 200, 0
    return c
