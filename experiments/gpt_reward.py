"""A reward model on a GPT run: a scalar head trained on preference pairs (task "reward").

Commands (the CPU demo, after experiments/gpt_sft.py:tiny has fine-tuned runs/gpt_sft):
  python -m train.main --config=experiments/gpt_reward.py:tiny --workdir=runs/gpt_reward
  python -m train.main --config=experiments/gpt_reward.py:tiny --workdir=runs/gpt_reward_lora \
      --config.model.lora_rank=8 --config.opt.learning_rate=1e-3

The pairs are DPO's (experiments/gpt_dpo.py): the genealogy questions with a wrong name
rejected, or your own JSONL --config.data.source=train.jsonl --config.data.eval_source=dev.jsonl
with lines {"prompt", "chosen", "rejected"} (and "system"). The loss is Bradley-Terry
(train/tasks/reward.py); eval logs accuracy and mean margin on the held-out pairs. PPO scores
its rollouts with such a run: --config.rl.reward=model:runs/gpt_reward (experiments/gpt_ppo.py).

Variants: smoke (tests, seconds; init_from is set by the test), tiny (from runs/gpt_sft).

Measured (2-core CPU, 2026-12-03, 300 steps from the SFT demo run, 2m22s): held-out pair
accuracy 0.617, mean margin 1.141 (0.631 at step 200). docs/gpt.md "Reward model".
"""
import ml_collections

from experiments import gpt_dpo


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = gpt_dpo.pairs_config(arg, "reward model")
    c.task = "reward"
    c.data.eval_generations = 0  # a reward model generates nothing (unused)
    c.opt.update(learning_rate=3e-4, warmup_steps=20, weight_decay=0.0)
    return c
