"""The RL settings (config.rl) checked before any work is done, and the reward's syntax.

Each check names the key, the bound and the preset's value, so a typo on the command line is
one clear line (train/main.py prints a ConfigError with exit status 2). The settings
themselves are documented where they act: the KL estimators and GAE in advantages.py, the
clipping and the adaptive KL coefficient in update.py, the stall check in rollout.py.
"""
from train.errors import ConfigError

VALUE_HEAD = "value_head"  # PPO's value head: a D->1 linear layer on the policy's hidden states
ESTIMATORS = ("k1", "k2", "k3")  # of KL(pi || ref), advantages.kl_terms

# (low, high or None, low excluded) of each numeric key, and the preset's value for the message.
RANGES = {"clip": (0, None, True), "vf_clip": (0, None, True), "vf_coef": (0, None, False),
          "gamma": (0, 1, False), "lam": (0, 1, False), "kl_target": (0, None, True),
          "kl_horizon": (0, None, True), "stall_steps": (0, None, False),
          "max_new_tokens": (1, None, False)}
PRESET_HINTS = {"clip": "0.2", "vf_clip": "0.2", "vf_coef": "0.1", "gamma": "1.0",
                "lam": "0.95", "kl_target": "6.0", "kl_horizon": "10000", "stall_steps": "10",
                "max_new_tokens": "16"}


def has_value_head(config) -> bool:
    """PPO learns a value baseline; GRPO's baseline is its group's mean score instead."""
    return config.task == "ppo"


def prompt_width(config) -> int:
    """Prompt tokens of a rollout row: data.max_len less the room for the response."""
    return config.data.max_len - config.rl.max_new_tokens


def check(config):
    """config.init_from set and every config.rl value usable; a ConfigError otherwise."""
    if not config.get("init_from"):
        raise ConfigError(f"{config.task} fine-tunes a GPT run (usually an SFT run): set "
                          "--config.init_from=RUN, e.g. runs/gpt_sft")
    rl = config.rl
    if rl.kl_estimator not in ESTIMATORS:
        raise ConfigError(f"config.rl.kl_estimator={rl.kl_estimator!r} is not one of "
                          f"{ESTIMATORS}")
    if not rl.temperature > 0:
        raise ConfigError(f"config.rl.temperature={rl.temperature} must be > 0: the policy is "
                          "the sampling distribution (1.0 is the usual value)")
    if rl.kl_coef < 0:
        raise ConfigError(f"config.rl.kl_coef={rl.kl_coef} must be >= 0")
    group = rl.group_size
    if group < 1 or (config.task == "grpo" and group < 2):
        raise ConfigError(f"config.rl.group_size={group}: GRPO compares the responses to one "
                          "prompt, so it needs at least 2 (4 is usual)" if config.task == "grpo"
                          else f"config.rl.group_size={group} must be >= 1")
    rollouts = config.batch_size * group
    if rl.minibatches < 1 or rollouts % rl.minibatches:
        raise ConfigError(f"config.rl.minibatches={rl.minibatches} must divide the "
                          f"{rollouts} rollouts of a step (batch_size x group_size)")
    if rl.epochs < 1:
        raise ConfigError(f"config.rl.epochs={rl.epochs} must be >= 1")
    check_ranges(rl)
    parse_reward(rl.reward)  # the syntax, before any work


def check_ranges(rl):
    """Each key of RANGES within its bounds."""
    for key, (low, high, low_open) in RANGES.items():
        value = rl[key]
        if not (value > low if low_open else value >= low) or (high is not None and value > high):
            bound = f"> {low}" if low_open else f">= {low}"
            raise ConfigError(f"config.rl.{key}={value} must be {bound}"
                              + (f" and <= {high}" if high is not None else "")
                              + f"; the preset's value is {PRESET_HINTS[key]}")


def parse_reward(spec: str):
    """("fn", "module", "function") or ("model", RUN) of config.rl.reward."""
    kind, _, rest = spec.partition(":")
    if kind == "fn" and rest.count(":") == 1 and all(rest.split(":")):
        return ("fn", *rest.split(":"))
    if kind == "model" and rest:
        return ("model", rest)
    raise ConfigError(f"config.rl.reward={spec!r} names no reward: use fn:MODULE:FUNCTION (a "
                      "function of prompts, responses and reference answers, e.g. "
                      "fn:train.rl.rewards:answer_f1) or model:RUN (a reward-model run "
                      "folder, experiments/gpt_reward.py)")
