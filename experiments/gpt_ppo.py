"""PPO of a GPT run against a reward (task "ppo", train/tasks/ppo.py).

Commands (the CPU demo, after experiments/gpt_sft.py:tiny has fine-tuned runs/gpt_sft):
  python -m train.main --config=experiments/gpt_ppo.py:tiny --workdir=runs/gpt_ppo
  python -m train.main --config=experiments/gpt_ppo.py:tiny --workdir=runs/gpt_ppo_lora \
      --config.model.lora_rank=8 --config.opt.learning_rate=1e-3
  python -m train.main --config=experiments/gpt_ppo.py:tiny --workdir=runs/gpt_ppo_rm \
      --config.rl.reward=model:runs/gpt_reward

The prompts are SFT's (the genealogy questions, or --config.data.source=train.jsonl
--config.data.eval_source=dev.jsonl in SFT's formats). The reward is a function named
fn:MODULE:FUNCTION, called with the questions, the sampled responses and the reference answers
and returning one float per response (default: train.rl.rewards.answer_f1, the token F1 of the
response against the reference answer), or model:RUN, a reward-model run
(experiments/gpt_reward.py).

Variants: smoke (tests, seconds; init_from is set by the test), tiny (from runs/gpt_sft).

Measured (2-core CPU, 2026-12-03, 150 steps from the SFT demo run; experiments/rl_frontier.py):
training-prompt reward 0.866-0.883 at KL 0.08-0.23 nats to the SFT run (0.903), dev 0.081-0.094
(SFT 0.094) for kl_coef 0.2-0.01. docs/gpt.md "PPO and GRPO".
"""
import ml_collections

from experiments import gpt

PRESETS = ("smoke", "tiny")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    c = rl_config(arg, "ppo")
    # Ziegler et al. 2019 / Ouyang et al. 2022 settings, scaled to the CPU demo.
    c.rl.update(kl_coef=0.05, kl_estimator="k1", group_size=1)
    return c


def rl_config(arg: str, task: str) -> ml_collections.ConfigDict:
    """The GPT config of `arg` for an RL task (ppo, grpo) from runs/gpt_sft."""
    if arg not in PRESETS:
        raise ValueError(f"unknown GPT {task} variant {arg!r}; choose smoke or tiny")
    c = gpt.get_config(arg)
    c.task = task
    c.init_from = "runs/gpt_sft" if arg == "tiny" else ""
    c.model.dropout_rate = 0.0  # the trainer's log-probs must equal the sampler's
    c.data = ml_collections.ConfigDict(dict(
        source="bible", eval_source="", bible_version="4", cache_dir="", tokenizer_type="bpe",
        # Dev prompts sampled (at rl.temperature) at every eval; 0: all of them.
        max_len=c.model.max_len, eval_generations=200, max_new_tokens=16))
    c.rl = ml_collections.ConfigDict(dict(
        reward="fn:train.rl.rewards:answer_f1",
        temperature=1.0, max_new_tokens=16,
        kl_coef=0.05, kl_estimator="k1",  # k1 | k2 | k3 (train/rl/advantages.py)
        adaptive_kl=False, kl_target=6.0, kl_horizon=10000,  # Ziegler et al. 2019
        epochs=2, minibatches=2, clip=0.2, vf_clip=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
        whiten=True, group_size=1,
        stall_steps=10))  # stop after this many steps with nothing to learn (0: never)
    # 1e-4 on the 1M-parameter tiny model: a clip fraction of a few percent (1e-5 barely moves).
    c.opt.update(learning_rate=1e-4, warmup_steps=0, weight_decay=0.0)
    if arg == "smoke":
        c.rl.max_new_tokens, c.data.eval_generations = 6, 8
        c.batch_size = 8
        c.num_train_steps, c.eval_every_steps = 4, 4
    else:  # tiny
        c.batch_size = 16
        c.num_train_steps, c.eval_every_steps, c.log_every_steps = 200, 50, 10
        c.checkpoint_every_steps, c.num_eval_steps = 50, 0
    return c
