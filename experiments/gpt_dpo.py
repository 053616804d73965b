"""Direct preference optimisation of a GPT run (task "dpo", train/tasks/dpo.py).

Commands (the CPU demo, after experiments/gpt_sft.py:tiny has fine-tuned runs/gpt_sft):
  python -m train.main --config=experiments/gpt_dpo.py:tiny --workdir=runs/gpt_dpo
  python -m train.main --config=experiments/gpt_dpo.py:tiny --workdir=runs/gpt_dpo_lora \
      --config.model.lora_rank=8 --config.opt.learning_rate=1e-3
  python -m train.main --config=experiments/gpt_dpo.py:tiny --workdir=runs/gpt_ipo \
      --config.dpo.loss_type=ipo

The default pairs are the genealogy questions of the SFT demo (data/preferences.py
bible_pairs): the right name is chosen, a plausible wrong one (the answer of another question
of the same kind) rejected. Your own pairs: --config.data.source=train.jsonl
--config.data.eval_source=dev.jsonl, lines {"prompt", "chosen", "rejected"} (and "system").
The reference is the init_from run: its log-probabilities precomputed once, or with LoRA the
same weights with the adapters off (config.dpo.reference).

Variants: smoke (tests, seconds; init_from is set by the test), tiny (from runs/gpt_sft).

Measured (2-core CPU, 2026-12-03, 300 steps from the SFT demo run, 149 dev pairs): eval DPO loss
0.729, pair accuracy 0.550, dev exact match 7.4% (the SFT run: 14.8%); at lr 1e-5 0.685, 0.570
and 10.7%; LoRA rank 8 at lr 1e-3 0.762, 0.570 and 5.4%. docs/gpt.md "Preference tuning (DPO)".
"""
import ml_collections

from experiments import gpt

PRESETS = ("smoke", "tiny")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = pairs_config(arg, "DPO")
    c.task = "dpo"
    # beta 0.1 as in Rafailov et al. 2023 (sec. 6); loss "sigmoid" (DPO) or "ipo".
    c.dpo = ml_collections.ConfigDict(dict(beta=0.1, loss_type="sigmoid", reference="auto"))
    c.opt.update(learning_rate=1e-4, warmup_steps=20, weight_decay=0.0)
    return c


def pairs_config(arg: str, what: str) -> ml_collections.ConfigDict:
    """The GPT config of `arg` over preference pairs, from runs/gpt_sft (DPO, reward models)."""
    if arg not in PRESETS:
        raise ValueError(f"unknown GPT {what} variant {arg!r}; choose smoke or tiny")
    c = gpt.get_config(arg)
    c.init_from = "runs/gpt_sft" if arg == "tiny" else ""  # a GPT run folder (SFT)
    c.model.dropout_rate = 0.0  # the policy must equal the reference at step 0
    c.data = ml_collections.ConfigDict(dict(
        source="bible", eval_source="", bible_version="4", cache_dir="", tokenizer_type="bpe",
        max_len=c.model.max_len,
        # Greedy dev answers at every eval (0: all dev pairs), scored against the chosen one.
        eval_generations=200, max_new_tokens=16, eval_temperature=0.0))
    if arg == "smoke":
        c.data.eval_generations, c.data.max_new_tokens = 4, 4
    else:  # tiny
        c.batch_size = c.eval_batch_size = 16
        c.num_train_steps, c.eval_every_steps, c.log_every_steps = 300, 100, 25
        c.checkpoint_every_steps, c.num_eval_steps = 100, 0
    return c
