"""Reinforcement learning of GPT from a reward (PPO, GRPO), in parts: the task module is
train/tasks/ppo.py, which composes them into the loop's hooks.

  settings.py    config.rl checked before any work; the reward's syntax
  rewards.py     fn:MODULE:FUNCTION and model:RUN rewards, the default answer_f1
  rollout.py     sampling the responses, decoding and scoring them, the stall check
  advantages.py  per-token log-probs, KL estimators, GAE, whitening, group advantages
  update.py      the clipped objective and the update over rollout minibatches
  evaluate.py    sampled dev answers, the step metrics' means, the closing line
"""
