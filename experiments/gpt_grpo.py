"""GRPO of a GPT run against a reward (task "grpo", train/tasks/ppo.py): group_size samples per
prompt, advantages standardised within each group, no value head.

Commands (the CPU demo, after experiments/gpt_sft.py:tiny has fine-tuned runs/gpt_sft):
  python -m train.main --config=experiments/gpt_grpo.py:tiny --workdir=runs/gpt_grpo
  python -m train.main --config=experiments/gpt_grpo.py:tiny --workdir=runs/gpt_grpo_lora \
      --config.model.lora_rank=8 --config.opt.learning_rate=1e-3

Prompts and rewards as experiments/gpt_ppo.py.
Variants: smoke (tests, seconds; init_from is set by the test), tiny (from runs/gpt_sft).

Measured (2-core CPU, 2026-12-03, 150 steps from the SFT demo run, 3m20s): dev reward (answer
F1, sampled) 0.096 at KL 0.44 nats to the SFT run, which scores 0.094. docs/gpt.md "PPO and GRPO".
"""
import ml_collections

from experiments import gpt_ppo


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = gpt_ppo.rl_config(arg, "grpo")
    # Shao et al. 2024 (sec. 4.2): 0.04 for the KL term, estimated with k3; groups of 4 here
    # (64 in the paper) to fit a CPU.
    c.rl.update(kl_coef=0.04, kl_estimator="k3", group_size=4, epochs=1)
    c.batch_size = 8  # prompts per step: 32 responses
    return c
