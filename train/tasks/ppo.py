"""Reinforcement learning of GPT from a reward: PPO (task "ppo") and GRPO (task "grpo").

The task's hooks, composed from the parts in train/rl/. One training step is one batch of
prompts (config.batch_size of them, each sampled config.rl.group_size times):
  1. rollout: responses sampled from the current policy with the KV cache, inside one jitted
     loop (models/decoding.sample), with each token's log-probability (train/rl/rollout.py);
  2. reward: on the host, a score per response from a reward function named in the config
     ("fn:module:function", called with the prompts, the responses and the reference answers)
     or a trained reward-model run ("model:RUN", train/tasks/reward.py) (train/rl/rewards.py);
  3. update: one jitted function runs the policy, the reference and the value head over the
     rollouts, computes advantages (train/rl/advantages.py), then config.rl.epochs passes of
     config.rl.minibatches clipped-objective steps (a lax.scan of optimizer updates,
     train/rl/update.py).
PPO (Ziegler et al. 2019; Ouyang et al. 2022; Schulman et al. 2017): a value head and GAE,
the KL to the reference a per-token reward. GRPO (Shao et al. 2024): group-standardised scores,
no value head, the KL a loss term. Eval (train/rl/evaluate.py): sampled dev answers, their mean
score and KL to the reference. The reference is the model the run starts from
(config.init_from): with LoRA the same weights with the adapters switched off, else a frozen
copy on the devices.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data import chat, chat_template
from data.errors import DataError
from train import step as step_lib
from train.rl import evaluate, rewards, rollout, settings, update
from train.tasks import lm, posttrain

VALUE_HEAD = settings.VALUE_HEAD
FRESH_HEADS = (VALUE_HEAD,)  # with LoRA the value head trains alongside the adapters
load_pretrained = posttrain.load_pretrained
loss_fn = update.loss_fn
summarize = evaluate.summarize
evaluate_predictions = evaluate.evaluate_predictions
final_report = evaluate.final_report


def configure(config):
    """The RL settings checked, and the init_from run's architecture (as SFT)."""
    settings.check(config)
    posttrain.configure(config)


def init_extra(config):
    """The adaptive KL coefficient's starting value (TrainState.extra)."""
    return {"kl_coef": jnp.asarray(config.rl.kl_coef, jnp.float32)}


def init_params(model, config, rng):
    params = lm.init_params(model, config, rng)
    if settings.has_value_head(config):
        params[VALUE_HEAD] = posttrain.scalar_head(config.model.d_model)
    return params


def flops_per_token(config) -> float:
    """Per rollout token, roughly: the update's epochs of forward and backward passes, plus the
    forward passes of the policy and the reference before them (each a third of a pass)."""
    return lm.flops_per_token(config) * (config.rl.epochs + 2 / 3)


def build_model(config, **overrides):
    """The Learner; with overrides (decode=True for sampling) the plain GPT."""
    net = lm.build_model(config, **overrides)
    return net if overrides else update.Learner(net, config)


def init_batch(config, batch_size):
    """A rollout minibatch of the real shapes and dtypes (the dry run's memory estimate)."""
    p, n = settings.prompt_width(config), config.rl.max_new_tokens
    f = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
    batch = {"prompt": jnp.zeros((batch_size, p), jnp.int32),
             "prompt_valid": jnp.ones((batch_size, p), jnp.int32),
             "tokens": jnp.zeros((batch_size, n), jnp.int32), "old_logp": f(batch_size, n),
             "advantages": f(batch_size, n), "token_weight": f(batch_size, n),
             "old_values": f(batch_size, n), "returns": f(batch_size, n),
             "ref_logp": f(batch_size, n), "kl_coef": f(batch_size)}
    return batch


def bench_batch(config):
    rng = np.random.default_rng(0)
    batch = jax.tree.map(np.asarray, init_batch(config, config.batch_size))
    batch["tokens"] = rng.integers(0, config.model.vocab_size, batch["tokens"].shape,
                                   dtype=np.int32)
    batch["prompt"] = rng.integers(0, config.model.vocab_size, batch["prompt"].shape,
                                   dtype=np.int32)
    batch["advantages"] = rng.normal(size=batch["advantages"].shape).astype(np.float32)
    batch["token_weight"][:] = 1.0
    return batch


# ---- data --------------------------------------------------------------------------------------

def _split(conversations, fmt):
    return ([fmt.prompt(c.turns[:-1]) for c in conversations],
            [c.turns[-2][1] if len(c.turns) > 1 else "" for c in conversations],
            [tuple(c.answers) for c in conversations])


def prepare_data(config, workdir) -> dict:
    """The prompts of SFT's data (the last assistant turn of each conversation is the
    reference answer a reward function may read), the reference model's weights (held on the
    host until the step places them) and the reward."""
    d, rl = config.data, config.rl
    posttrain.check_lengths(config)
    if rl.max_new_tokens >= d.max_len:
        raise DataError(f"config.rl.max_new_tokens={rl.max_new_tokens} leaves no room for a "
                        f"prompt in config.data.max_len={d.max_len}; lower it")
    train, dev = posttrain.train_and_dev(config, chat.bible_qa, chat.read_conversations)
    tokenizer = posttrain.load_tokenizer(config, workdir, [])
    fmt = chat_template.chat_format(tokenizer)
    pad_id, width = tokenizer.pad_id or 0, settings.prompt_width(config)
    n_dev = len(dev) if not d.eval_generations else min(d.eval_generations, len(dev))
    train_prompts, train_questions, train_refs = _split(train, fmt)
    dev_prompts, dev_questions, dev_refs = _split(dev[:n_dev], fmt)
    data = {
        "train_rows": rollout.prompt_rows(train_prompts, width, pad_id),
        "eval_rows": None, "tokenizer": tokenizer, "chat": fmt,
        "train_text": (train_questions, train_refs),
        "dev_rows": rollout.prompt_rows(dev_prompts, width, pad_id),
        "dev_text": (dev_questions, dev_refs),
        "info": {"train_prompts": len(train), "dev_prompts": n_dev, "reward": rl.reward,
                 "reference": "adapters_off" if step_lib.uses_lora(config) else "copy"}}
    # Loaded here, outside the mesh context the loop later enters.
    data["reward"] = rewards.load_reward(config, tokenizer)
    if not step_lib.uses_lora(config):
        data["reference_weights"] = posttrain.base_params(config)
    return data


# ---- the step ----------------------------------------------------------------------------------

def place_reference(weights, shardings):
    """The frozen reference copy, placed like the policy's weights (a value head of a PPO
    init_from run is dropped)."""
    return jax.device_put({k: v for k, v in weights.items() if k in shardings},
                          {k: shardings[k] for k in weights if k in shardings})


def make_train_step(setup, config, data):
    """train_step(state, batch, rng): rollout (jitted), reward (host), update (jitted)."""
    rl, tokenizer = config.rl, data["tokenizer"]
    end_id = data["chat"].end_id
    group = 1 if settings.has_value_head(config) else rl.group_size  # PPO: the value head
    if not step_lib.uses_lora(config):
        data["reference"] = place_reference(data.pop("reference_weights"),
                                            setup.param_shardings)
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    data["rollout_fn"] = rollout_fn = rollout.make_rollout_fn(config, end_id, replicated)
    tx, schedule = update.make_optimizer(config)
    learner = update.Learner(lm.build_model(config), config)
    update_fn = jax.jit(update.make_update(learner, tx, schedule, config, end_id),
                        donate_argnums=0,
                        in_shardings=(setup.state_shardings, None, None, None, None),
                        out_shardings=(setup.state_shardings, None))
    stall, last = {"cut": 0, "flat": 0}, {}

    def train_step(state, batch, rng):
        t0 = time.perf_counter()
        step = int(jax.device_get(state.step))  # waits for the previous update
        rng = jax.random.fold_in(rng, step)
        params = step_lib.full_params(state.params, state.frozen)
        t1 = time.perf_counter()
        rows = rollout_fn(params, batch["prompt"], batch["prompt_valid"], batch["index"],
                          jax.random.fold_in(rng, 0))
        host = jax.device_get(rows)
        t2 = time.perf_counter()
        scores = rollout.score_rollouts(data, host, data["train_text"], end_id, tokenizer,
                                        step=step + 1)
        rollout.check_stall(stall, host["tokens"], scores, end_id, rl.stall_steps, step + 1,
                            group)
        t3 = time.perf_counter()
        args = (data.get("reference"), rows, scores, jax.random.fold_in(rng, 1))
        last["args"] = args
        state, out = update_fn(state, *args)
        jax.block_until_ready(out["loss_sum"])
        t4 = time.perf_counter()
        # Host wall seconds of this step's parts (the previous update's tail counts as its own).
        return state, dict(out, time_rollout_sum=t2 - t1, time_reward_sum=t3 - t2,
                           time_update_sum=t4 - t3 + (t1 - t0))

    def update_memory(state):
        """Per-device bytes XLA assigns the compiled update (arguments + temporaries)."""
        stats = update_fn.lower(state, *last["args"]).compile().memory_analysis()
        return {"update_bytes": int(stats.argument_size_in_bytes + stats.temp_size_in_bytes)}

    train_step.update_memory = update_memory
    return train_step
