"""Reinforcement learning of GPT from a reward: PPO (task "ppo") and GRPO (task "grpo").

One training step is one batch of prompts (config.batch_size of them, each sampled
config.rl.group_size times):
  1. rollout: responses sampled from the current policy with the KV cache, inside one jitted
     loop (models/decoding.sample), with each token's log-probability;
  2. reward: on the host, a score per response from a reward function named in the config
     ("fn:module:function", called with the prompts, the responses and the reference answers)
     or a trained reward-model run ("model:RUN", train/tasks/reward.py);
  3. update: one jitted function runs the policy, the reference and the value head over the
     rollouts, computes advantages, then config.rl.epochs passes of config.rl.minibatches
     clipped-objective steps (a lax.scan of optimizer updates).
The sampler and the trainer are the same model code, so the sampler's log-probabilities equal
the training pass's (in fp32 to 1e-5, tested; logged every step as sampler_error, the largest
|trainer - sampler| log-prob). The "old" log-probs of the ratio are the training pass's own, so
the ratio is exactly 1 at the first update even in bf16, where the two paths round differently.

PPO (Ziegler et al. 2019; Ouyang et al. 2022): per-token reward -kl_coef * KL_t plus the score
at the response's last token; a value head on the policy's hidden states (a D->1 linear layer,
"value_head"); GAE (Schulman et al. 2016) with config.rl.gamma and lam, advantages whitened over
the batch; clipped policy loss (Schulman et al. 2017, eq. 7) plus vf_coef times the clipped
value loss. The KL coefficient is fixed or adaptive (Ziegler et al. 2019, sec. 2.2: moved
towards a target KL over a horizon; kept in TrainState.extra, so resume is exact).
GRPO (Shao et al. 2024, sec. 4.1): group_size samples per prompt, the advantage of each
response its score standardised within its group, no value head; the KL to the reference is a
loss term (estimator k3 by default) and each response's tokens are averaged before responses
are (eq. 3).

KL estimators (Schulman 2020, "Approximating KL divergence"), with log r = log pi - log ref of
the sampled token: k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r. Each is an
estimate of KL(pi || ref) when tokens are drawn from pi; k1 is unbiased but can be negative,
k3 is unbiased and never negative, k2 is biased and never negative.

The reference is the model the run starts from (config.init_from): with LoRA the same weights
with the adapters switched off (no second copy), else a frozen copy on the devices.
Safeguard: a run stops with StalledError when for config.rl.stall_steps steps in a row every
response was cut at the length limit, or every score in the batch was equal.
Eval: sampled answers to the dev prompts, their mean score, KL to the reference (the sampled
k1 sum per response), length and share cut at the limit; samples in eval_generations.jsonl.
"""
import functools
import importlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from data import chat
from data.errors import DataError
from models import gpt, layers
from train import loop, optim
from train import step as step_lib
from train.config import ConfigError
from train.tasks import dpo, lm, reward, sft

VALUE_HEAD = "value_head"
FRESH_HEADS = (VALUE_HEAD,)  # with LoRA the value head trains alongside the adapters
ESTIMATORS = ("k1", "k2", "k3")
SAMPLES_FILE = "eval_generations.jsonl"
load_pretrained = sft.load_pretrained


class StalledError(loop.DivergedError):
    """Steps in a row with nothing to learn from: every response cut, or every score equal."""


def has_value_head(config) -> bool:
    return config.task == "ppo"


# ---- configuration -----------------------------------------------------------------------------

def configure(config):
    """The init_from run's architecture (as SFT), and the RL settings checked."""
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
    ranges = {"clip": (0, None, True), "vf_clip": (0, None, True), "vf_coef": (0, None, False),
              "gamma": (0, 1, False), "lam": (0, 1, False), "kl_target": (0, None, True),
              "kl_horizon": (0, None, True), "stall_steps": (0, None, False),
              "max_new_tokens": (1, None, False)}
    for key, (low, high, low_open) in ranges.items():
        value = rl[key]
        if not (value > low if low_open else value >= low) or (high is not None and value > high):
            bound = f"> {low}" if low_open else f">= {low}"
            raise ConfigError(f"config.rl.{key}={value} must be {bound}"
                              + (f" and <= {high}" if high is not None else "")
                              + f"; the preset's value is {PRESET_HINTS[key]}")
    parse_reward(rl.reward)  # the syntax, before any work
    sft.configure(config)


PRESET_HINTS = {"clip": "0.2", "vf_clip": "0.2", "vf_coef": "0.1", "gamma": "1.0",
                "lam": "0.95", "kl_target": "6.0", "kl_horizon": "10000", "stall_steps": "10",
                "max_new_tokens": "16"}


def parse_reward(spec: str):
    """("fn", "module", "function") or ("model", RUN) of config.rl.reward."""
    kind, _, rest = spec.partition(":")
    if kind == "fn" and rest.count(":") == 1 and all(rest.split(":")):
        return ("fn", *rest.split(":"))
    if kind == "model" and rest:
        return ("model", rest)
    raise ConfigError(f"config.rl.reward={spec!r} names no reward: use fn:MODULE:FUNCTION (a "
                      "function of prompts, responses and reference answers, e.g. "
                      "fn:experiments.gpt_ppo:answer_f1) or model:RUN (a reward-model run "
                      "folder, experiments/gpt_reward.py)")


def init_extra(config):
    """The adaptive KL coefficient's starting value (TrainState.extra)."""
    return {"kl_coef": jnp.asarray(config.rl.kl_coef, jnp.float32)}


def init_params(model, config, rng):
    params = lm.init_params(model, config, rng)
    if has_value_head(config):
        params[VALUE_HEAD] = reward.scalar_head(config.model.d_model)
    return params


def flops_per_token(config) -> float:
    """Per rollout token, roughly: the update's epochs of forward and backward passes, plus the
    forward passes of the policy and the reference before them (each a third of a pass)."""
    return lm.flops_per_token(config) * (config.rl.epochs + 2 / 3)


# ---- data --------------------------------------------------------------------------------------

def prompt_width(config) -> int:
    return config.data.max_len - config.rl.max_new_tokens


def prompt_rows(prompts, width, pad_id):
    """Left-padded prompt rows (prompts too long keep BOS and their end), and their index."""
    tokens, valid = gpt.left_pad([sft.fit_prompt(p, width) for p in prompts], width, pad_id)
    return {"prompt": tokens, "prompt_valid": valid,
            "index": np.arange(len(prompts), dtype=np.int32)}


def _split(conversations, tokenizer, ids):
    return ([chat.prompt_tokens(c.turns[:-1], tokenizer, ids) for c in conversations],
            [c.turns[-2][1] if len(c.turns) > 1 else "" for c in conversations],
            [tuple(c.answers) for c in conversations])


def prepare_data(config, workdir) -> dict:
    """The prompts of SFT's data (the last assistant turn of each conversation is the
    reference answer a reward function may read), the reference model's weights (held on the
    host until the step places them) and the reward."""
    d, rl = config.data, config.rl
    sft.check_lengths(config)
    if rl.max_new_tokens >= d.max_len:
        raise DataError(f"config.rl.max_new_tokens={rl.max_new_tokens} leaves no room for a "
                        f"prompt in config.data.max_len={d.max_len}; lower it")
    train, dev = sft.train_and_dev(config, chat.bible_qa, chat.read_conversations)
    tokenizer = sft.load_tokenizer(config, workdir, [])
    ids = chat.chat_token_ids(tokenizer)
    pad_id = tokenizer.pad_id or 0
    n_dev = len(dev) if not d.eval_generations else min(d.eval_generations, len(dev))
    train_prompts, train_questions, train_refs = _split(train, tokenizer, ids)
    dev_prompts, dev_questions, dev_refs = _split(dev[:n_dev], tokenizer, ids)
    data = {
        "train_rows": prompt_rows(train_prompts, prompt_width(config), pad_id),
        "eval_rows": None, "tokenizer": tokenizer, "chat_ids": ids,
        "train_text": (train_questions, train_refs),
        "dev_rows": prompt_rows(dev_prompts, prompt_width(config), pad_id),
        "dev_text": (dev_questions, dev_refs),
        "info": {"train_prompts": len(train), "dev_prompts": n_dev, "reward": rl.reward,
                 "reference": "adapters_off" if step_lib.uses_lora(config) else "copy"}}
    # Loaded here, outside the mesh context the loop later enters.
    data["reward"] = load_reward(config, tokenizer)
    if not step_lib.uses_lora(config):
        data["reference_weights"] = sft.base_params(config)
    return data


# ---- rewards -----------------------------------------------------------------------------------

def load_reward(config, tokenizer):
    """A host function (questions, responses, references, prompt ids, response ids) -> B
    float scores, from config.rl.reward."""
    parsed = parse_reward(config.rl.reward)
    if parsed[0] == "fn":
        _, module_name, name = parsed
        try:
            fn = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"config.rl.reward={config.rl.reward!r}: {e}") from None
        return lambda questions, responses, refs, *_: call_reward_fn(
            fn, config.rl.reward, questions, responses, refs)
    return load_reward_model(parsed[1], config, tokenizer)


def call_reward_fn(fn, name, questions, responses, refs):
    """fn's scores, checked: one finite number per response."""
    out = fn(list(questions), list(responses), list(refs))
    try:
        scores = np.asarray(out, np.float32)
    except (TypeError, ValueError):
        raise DataError(f"the reward function {name} returned {type(out).__name__}, not "
                        "numbers; it must return one float per response") from None
    if scores.shape != (len(responses),):
        raise DataError(f"the reward function {name} returned shape {scores.shape} for "
                        f"{len(responses)} responses; it must return one float per response, "
                        f"shape ({len(responses)},)")
    if not np.all(np.isfinite(scores)):
        raise DataError(f"the reward function {name} returned non-finite scores "
                        f"{scores[~np.isfinite(scores)][:4].tolist()}; return finite floats")
    return scores


def load_reward_model(run, config, tokenizer):
    """The scores of a reward-model run (task "reward") on (prompt ids + response ids + end),
    compiled once for the step's shapes."""
    from train import tasks
    rconfig, rtokenizer, params, task = tasks.load_run(run, families=("gpt",))
    if task.name != "reward":
        raise DataError(f"config.rl.reward=model:{run} is a {task.name} run; it must be a "
                        "reward-model run (experiments/gpt_reward.py)")
    probe = "Whose son was Boaz? Obed, the son of Boaz."
    if (rtokenizer.vocab_size != tokenizer.vocab_size
            or rtokenizer.encode(probe) != tokenizer.encode(probe)):
        raise DataError(f"the reward model {run} has another tokenizer than this run's; train "
                        "it from the same base run (config.init_from)")
    net = task.build_model(rconfig)
    length = rconfig.data.max_len
    end_id = chat.chat_token_ids(tokenizer)["end"]
    score_fn = jax.jit(lambda p, rows: reward.scores(net, p, rows))

    def score(questions, responses, refs, prompt_ids, response_ids):
        rows = {k: np.zeros((len(prompt_ids), length), np.int32)
                for k in ("inputs", "positions", "segment_ids")}
        rows["weights"] = np.zeros((len(prompt_ids), length), np.float32)
        for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            full = (list(p) + list(r) + [end_id])[-(length + 1):]
            n = len(full) - 1
            rows["inputs"][b, :n] = full[:-1]
            rows["positions"][b, :n] = np.arange(n)
            rows["segment_ids"][b, :n] = 1
            rows["weights"][b, max(n - len(r) - 1, 0):n] = 1.0
        return np.asarray(score_fn(params, rows), np.float32)

    return score


# ---- per-token quantities ----------------------------------------------------------------------

def reference_params(params, reference, lora):
    """The reference model's weights: with LoRA the policy's with the adapters switched off."""
    return dpo.switch_off_adapters(params) if lora else reference


def padded_batches(rows, size):
    """(real row count, rows) per batch of `size`; the last one filled with copies of its
    first row, so every batch has one shape (one compilation)."""
    n = len(rows["index"])
    for start in range(0, n, size):
        real = min(size, n - start)
        part = {k: v[start:start + size] for k, v in rows.items()}
        yield real, {k: np.concatenate([v, np.repeat(v[:1], size - real, 0)])
                     for k, v in part.items()}


def kl_terms(logp, ref_logp, estimator):
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (module docstring)."""
    log_r = logp - ref_logp
    if estimator == "k1":
        return log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    return jnp.exp(-log_r) - 1.0 + log_r


def sequences(prompt_BP, valid_BP, tokens_BN):
    """(inputs, positions, segment ids) of prompt + response, left padding masked out: the
    hidden state at column P - 1 + t predicts response token t."""
    inputs = jnp.concatenate([prompt_BP, tokens_BN[:, :-1]], axis=1)
    segment = jnp.concatenate([valid_BP, jnp.ones_like(tokens_BN[:, :-1])], axis=1)
    positions = jnp.maximum(jnp.cumsum(segment, axis=1) - 1, 0) * segment
    return inputs, positions.astype(jnp.int32), segment.astype(jnp.int32)


def token_outputs(net, params, rows, temperature, *, value=False):
    """(log pi of each response token B,N; entropy B,N; values B,N or None), fp32, with the
    policy softmax(logits / temperature) the sampler draws from."""
    inputs, positions, segment = sequences(rows["prompt"], rows["prompt_valid"], rows["tokens"])
    base = {k: v for k, v in params.items() if k != VALUE_HEAD}
    x_BLD = net.apply({"params": base}, inputs, positions, segment, hidden_only=True)
    x_BND = x_BLD[:, rows["prompt"].shape[1] - 1:]
    embedding = base["wte"]["embedding"]
    logits = layers.mask_padded_logits(x_BND @ embedding.T.astype(x_BND.dtype),
                                       net.config.vocab_size)
    logp_BNV = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    logp_BN = jnp.take_along_axis(logp_BNV, rows["tokens"][..., None], axis=-1)[..., 0]
    p_BNV = jnp.exp(logp_BNV)  # masked vocabulary rows: p = 0 and log p = -inf, counted as 0
    entropy_BN = -jnp.sum(jnp.where(p_BNV > 0, p_BNV * logp_BNV, 0.0), axis=-1)
    values = None
    if value:
        head = params[VALUE_HEAD]
        values = (x_BND.astype(jnp.float32) @ head["kernel"].astype(jnp.float32))[..., 0]
        values = values + head["bias"][0].astype(jnp.float32)
    return logp_BN, entropy_BN, values


def response_mask(tokens_BN, end_id):
    """1 up to and including each row's first end_id (all ones for a row cut at the limit)."""
    is_end = (tokens_BN == end_id).astype(jnp.int32)
    before = jnp.cumsum(is_end, axis=1) - is_end  # ends strictly before t
    return (before == 0).astype(jnp.float32)


def gae(rewards_BN, values_BN, mask_BN, gamma, lam):
    """(advantages, returns) by generalised advantage estimation over the masked tokens."""
    next_values = jnp.concatenate([values_BN[:, 1:] * mask_BN[:, 1:],
                                   jnp.zeros_like(values_BN[:, :1])], axis=1)
    deltas = (rewards_BN + gamma * next_values - values_BN) * mask_BN
    next_mask = jnp.concatenate([mask_BN[:, 1:], jnp.zeros_like(mask_BN[:, :1])], axis=1)

    def back(carry, xs):
        delta, m = xs
        adv = delta + gamma * lam * m * carry
        return adv, adv

    _, adv_NB = jax.lax.scan(back, jnp.zeros(rewards_BN.shape[0]),
                             (deltas.T, next_mask.T), reverse=True)
    advantages = adv_NB.T * mask_BN
    return advantages, (advantages + values_BN) * mask_BN


def whiten(x, mask):
    count = jnp.maximum(jnp.sum(mask), 1.0)
    mean = jnp.sum(x * mask) / count
    var = jnp.sum(((x - mean) * mask) ** 2) / count
    return (x - mean) * jax.lax.rsqrt(var + 1e-8) * mask


def group_advantages(scores_B, group_size):
    """Each score standardised within its group of group_size consecutive rows (GRPO)."""
    g = scores_B.reshape(-1, group_size)
    mean, std = jnp.mean(g, axis=1, keepdims=True), jnp.std(g, axis=1, keepdims=True)
    return ((g - mean) / (std + 1e-4)).reshape(-1)


# ---- the loss ----------------------------------------------------------------------------------

def loss_fn(params, batch, rng, *, model, train):
    """The clipped policy loss (plus the value loss for PPO, the KL term for GRPO) summed over
    the weighted tokens of a rollout minibatch, plus metric sums. `model` is the GPT with the
    RL settings bound (a `Learner`)."""
    rl = model.rl
    logp, entropy, values = token_outputs(model.net, params, batch, rl.temperature,
                                          value=model.value)
    w = batch["token_weight"]
    log_ratio = logp - batch["old_logp"]
    ratio = jnp.exp(log_ratio)
    adv = batch["advantages"]
    clipped = jnp.clip(ratio, 1.0 - rl.clip, 1.0 + rl.clip)
    pg = jnp.maximum(-adv * ratio, -adv * clipped)
    total = lambda x: jnp.sum(x * w)  # noqa: E731
    sums = {"policy_loss_sum": total(pg), "entropy_sum": total(entropy),
            "clipfrac_sum": total((jnp.abs(ratio - 1.0) > rl.clip).astype(jnp.float32)),
            "approx_kl_sum": total(ratio - 1.0 - log_ratio), "weight_sum": jnp.sum(w)}
    loss = pg
    if model.value:
        old_v, ret = batch["old_values"], batch["returns"]
        v_clipped = old_v + jnp.clip(values - old_v, -rl.vf_clip, rl.vf_clip)
        v_loss = 0.5 * jnp.maximum((values - ret) ** 2, (v_clipped - ret) ** 2)
        loss = loss + rl.vf_coef * v_loss
        sums["value_loss_sum"] = total(v_loss)
    else:  # GRPO: the KL to the reference as a loss term
        kl = kl_terms(logp, batch["ref_logp"], rl.kl_estimator)
        loss = loss + batch["kl_coef"][:, None] * kl
        sums["kl_loss_sum"] = total(kl)
    sums["loss_sum"] = total(loss)
    return sums["loss_sum"], sums


class Learner:
    """The GPT and the RL settings loss_fn reads (static: bound into the jitted update)."""

    def __init__(self, net, config):
        self.net, self.value = net, has_value_head(config)
        self.rl = config.rl

    def init(self, *args, **kwargs):
        return self.net.init(*args, **kwargs)

    def apply(self, *args, **kwargs):
        return self.net.apply(*args, **kwargs)

    @property
    def config(self):
        return self.net.config


def build_model(config, **overrides):
    """The Learner; with overrides (decode=True for sampling) the plain GPT."""
    net = lm.build_model(config, **overrides)
    return net if overrides else Learner(net, config)


def init_batch(config, batch_size):
    """A rollout minibatch of the real shapes and dtypes (the dry run's memory estimate)."""
    p, n = prompt_width(config), config.rl.max_new_tokens
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


# ---- the step ----------------------------------------------------------------------------------

def make_train_step(setup, config, data):
    """train_step(state, batch, rng): rollout (jitted), reward (host), update (jitted)."""
    rl, tokenizer = config.rl, data["tokenizer"]
    end_id, group = data["chat_ids"]["end"], rl.group_size
    lora = step_lib.uses_lora(config)
    net = lm.build_model(config)
    learner = Learner(net, config)
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    # epochs x minibatches optimizer updates per step: the schedule runs over all of them (the
    # same optimizer as setup.tx, so the state's layout is the same).
    per_step = rl.epochs * rl.minibatches
    opt = config.opt.copy_and_resolve_references()
    opt.warmup_steps = config.opt.warmup_steps * per_step  # warmup_steps counts train steps
    tx, schedule = optim.make_optimizer(opt, config.num_train_steps * per_step,
                                        config.model.d_model)
    if not lora:  # the frozen copy, placed like the policy's weights
        weights = data.pop("reference_weights")
        shardings = setup.param_shardings  # (a value head of a PPO init_from run is dropped)
        data["reference"] = jax.device_put(
            {k: v for k, v in weights.items() if k in shardings},
            {k: shardings[k] for k in weights if k in shardings})
    data["rollout_fn"] = rollout_fn = make_rollout_fn(config, end_id, replicated)

    def prepare(state, reference, rows, scores):
        """Advantages and the other per-token arrays of the whole rollout batch."""
        params = step_lib.full_params(state.params, state.frozen)
        mask = response_mask(rows["tokens"], end_id)
        logp, _, values = token_outputs(net, params, rows, rl.temperature,
                                        value=learner.value)
        ref_logp, _, _ = token_outputs(net, jax.lax.stop_gradient(
            reference_params(params, reference, lora)), rows, rl.temperature)
        # The trainer's own log-probs are the "old" ones: equal to the sampler's in fp32
        # (sampler_error, tested to 1e-5), and the ratio is exactly 1 at the first update even in
        # bf16, where the KV-cache path and the full pass round differently.
        old_logp = logp
        kl_coef = state.extra["kl_coef"] if rl.adaptive_kl else jnp.float32(rl.kl_coef)
        kl_seq = jnp.sum(kl_terms(old_logp, ref_logp, "k1") * mask, axis=1)
        length = jnp.sum(mask, axis=1)
        out = dict(rows, old_logp=old_logp, ref_logp=ref_logp,
                   kl_coef=jnp.full(length.shape, kl_coef))
        if learner.value:
            penalty = kl_terms(old_logp, ref_logp, rl.kl_estimator) * mask
            last = jax.nn.one_hot(length.astype(jnp.int32) - 1, mask.shape[1]) * mask
            rewards = -kl_coef * penalty + scores[:, None] * last
            adv, returns = gae(rewards, values, mask, rl.gamma, rl.lam)
            out.update(advantages=whiten(adv, mask) if rl.whiten else adv, returns=returns,
                       old_values=values, token_weight=mask)
            resid = (returns - values) * mask
            count = jnp.maximum(jnp.sum(mask), 1.0)
            var_r = jnp.sum((returns * mask - jnp.sum(returns * mask) / count) ** 2 * mask)
            var_e = jnp.sum((resid - jnp.sum(resid) / count) ** 2 * mask)
            explained = 1.0 - var_e / jnp.maximum(var_r, 1e-8)
        else:
            adv = group_advantages(scores, group)[:, None] * mask
            out.update(advantages=adv, token_weight=mask / jnp.maximum(length, 1.0)[:, None])
            explained = None  # no value head
        stats = {"sampler_error": jnp.max(jnp.abs(logp - rows["old_logp"]) * mask),
                 "kl": jnp.mean(kl_seq), "explained_variance": explained, "kl_coef": kl_coef,
                 "length": length}
        return out, stats

    def update(state, reference, rows, scores, rng):
        batch, stats = prepare(state, reference, rows, scores)
        n = rows["tokens"].shape[0]
        size = n // rl.minibatches
        orders = jnp.stack([jax.random.permutation(jax.random.fold_in(rng, e), n)
                            for e in range(rl.epochs)]).reshape(-1, size)
        grad_fn = jax.value_and_grad(
            lambda p, frozen, mb: loss_fn(step_lib.full_params(p, frozen), mb, None,
                                          model=learner, train=True), has_aux=True)

        def one(carry, index):
            params, opt_state, _ = carry
            mb = {k: v[index] for k, v in batch.items()}
            (_, sums), grads = grad_fn(params, state.frozen, mb)
            count = jnp.maximum(sums["weight_sum"], 1e-9)
            grads = jax.tree.map(lambda g: g / count, grads)
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)

            def apply(_):
                updates, new_opt = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), new_opt

            params, opt_state = jax.lax.cond(finite, apply, lambda _: (params, opt_state),
                                             None)
            sums = dict(sums, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
            return (params, opt_state, grad_norm), sums

        (params, opt_state, grad_norm), per = jax.lax.scan(
            one, (state.params, state.opt_state, jnp.float32(0.0)), orders)
        # Means over the minibatch updates of this step (each a per-token mean).
        out = {k[:-4]: jnp.mean(per[k] / jnp.maximum(per["weight_sum"], 1e-9))
               for k in per if k.endswith("_sum") and k != "weight_sum"}
        first_clip = per["clipfrac_sum"][0] / jnp.maximum(per["weight_sum"][0], 1e-9)
        extra = state.extra
        if rl.adaptive_kl:  # Ziegler et al. 2019, sec. 2.2
            error = jnp.clip(stats["kl"] / rl.kl_target - 1.0, -0.2, 0.2)
            extra = {"kl_coef": extra["kl_coef"] * (1.0 + error * n / rl.kl_horizon)}
        # A step with any non-finite minibatch leaves the whole state as it was (the loop then
        # stops, or skips the step with config.skip_nonfinite_steps).
        bad = jnp.max(per["nonfinite"]) > 0
        params, opt_state, extra = jax.lax.cond(
            bad, lambda: (state.params, state.opt_state, state.extra),
            lambda: (params, opt_state, extra))
        metrics_out = {
            **{f"{k}_sum": v for k, v in out.items()},
            "weight_sum": jnp.float32(1.0),
            "score_sum": jnp.mean(scores), "score_std_sum": jnp.std(scores),
            "kl_sum": stats["kl"], "kl_coef_sum": stats["kl_coef"],
            "first_clipfrac_sum": first_clip,
            "sampler_error_sum": stats["sampler_error"],
            "response_length_sum": jnp.mean(stats["length"]),
            "truncated_sum": jnp.mean((jnp.sum((rows["tokens"] == end_id), 1) == 0)
                                      .astype(jnp.float32)),
            "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
            "learning_rate": schedule(state.step * per_step),
            "nonfinite": jnp.max(per["nonfinite"]),
            "updates_sum": jnp.float32(per_step)}
        if stats["explained_variance"] is not None:
            metrics_out["explained_variance_sum"] = stats["explained_variance"]
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  extra=extra)
        return new_state, metrics_out

    update_fn = jax.jit(update, donate_argnums=0,
                        in_shardings=(setup.state_shardings, None, None, None, None),
                        out_shardings=(setup.state_shardings, None))
    stall = {"cut": 0, "flat": 0}
    questions, refs = data["train_text"]

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
        scores = score_rollouts(data, host, (questions, refs), end_id, tokenizer)
        check_stall(stall, host["tokens"], scores, end_id, rl.stall_steps, step + 1,
                    1 if learner.value else group)  # PPO's baseline is the value head
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

    last = {}
    train_step.update_memory = update_memory
    return train_step


def make_rollout_fn(config, end_id, replicated):
    """jitted (params, prompt, valid, index, rng) -> rollout rows (each prompt repeated
    group_size times, sampled tokens and their log-probs), replicated on every device."""
    rl, group = config.rl, config.rl.group_size
    decode = lm.build_model(config, decode=True)
    fn = functools.partial(gpt.generate, decode, max_new_tokens=rl.max_new_tokens,
                           temperature=rl.temperature, eos_id=end_id, return_logprobs=True)

    def rollout(params, prompt, valid, index, rng):
        prompt, valid, index = (jnp.repeat(x, group, axis=0) for x in (prompt, valid, index))
        base = {k: v for k, v in params.items() if k != VALUE_HEAD}
        tokens, logp = fn(base, prompt, rng, prompt_valid_BP=valid)
        return {"prompt": prompt, "prompt_valid": valid, "index": index, "tokens": tokens,
                "old_logp": logp}

    return jax.jit(rollout, out_shardings=replicated)


def decode_responses(tokens_BN, end_id, tokenizer):
    """(response ids cut before end_id, their text)."""
    ids = [row[:row.index(end_id)] if end_id in row else row for row in tokens_BN.tolist()]
    return ids, [tokenizer.decode(r).strip() for r in ids]


def score_rollouts(data, host, text, end_id, tokenizer):
    questions, refs = text
    response_ids, responses = decode_responses(host["tokens"], end_id, tokenizer)
    index = host["index"].tolist()
    prompt_ids = [row[valid > 0].tolist() for row, valid in
                  zip(host["prompt"], host["prompt_valid"])]
    return data["reward"]([questions[i] for i in index], responses, [refs[i] for i in index],
                          prompt_ids, response_ids)


def check_stall(stall, tokens_BN, scores, end_id, limit, step, group):
    """Counts steps in a row with every response cut at the limit, or every score equal (with
    groups, GRPO: equal within every group, so every advantage is zero); StalledError at
    `limit` of either."""
    cut = not np.any(tokens_BN == end_id)
    flat = bool(np.all(np.ptp(scores.reshape(-1, group), axis=1) == 0) if group > 1
                else np.ptp(scores) == 0)
    stall["cut"] = stall["cut"] + 1 if cut else 0
    stall["flat"] = stall["flat"] + 1 if flat else 0
    reasons = []
    if limit and stall["cut"] >= limit:
        reasons.append(f"every response ran to the length limit ({tokens_BN.shape[1]} tokens) "
                       "without <|end|>")
    if limit and stall["flat"] >= limit:
        reasons.append(("the responses to each prompt all got the same score" if group > 1
                        else f"every response in the batch got the same score "
                        f"({float(scores[0]):.4g})") + ", so every advantage is zero")
    if reasons:
        raise StalledError(
            f"step {step}: for {limit} steps in a row " + " and ".join(reasons) + ": nothing "
            "to learn from. Check the reward (config.rl.reward) on a few responses, start from a "
            "run that answers and ends its answers (an SFT run), raise "
            "--config.rl.max_new_tokens, or sample more widely (--config.rl.temperature, "
            "--config.rl.group_size); --config.rl.stall_steps=0 turns this check off")


# ---- metrics and eval --------------------------------------------------------------------------

def summarize(sums: dict) -> dict:
    """Means over the logged steps of each per-step value (weight_sum counts the steps)."""
    count = max(float(sums.get("weight_sum", 0.0)), 1e-9)
    out = {k[:-4]: float(v) / count for k, v in sums.items()
           if k.endswith("_sum") and k != "weight_sum"}
    out.update({k: float(v) for k, v in sums.items()
                if not k.endswith("_sum") and k != "weight_sum"})
    return out


def evaluate_predictions(params, data, config, workdir) -> dict:
    """Sampled answers to the dev prompts: mean score, KL to the reference (summed sampled k1
    per response), response length, share cut at the limit; the samples in SAMPLES_FILE."""
    rl, rows_all = config.rl, data["dev_rows"]
    end_id, tokenizer = data["chat_ids"]["end"], data["tokenizer"]
    if "eval_fn" not in data:
        mesh = jax.tree.leaves(params)[0].sharding.mesh
        net, lora = lm.build_model(config), step_lib.uses_lora(config)

        def ref_logps(params, reference, rows):
            ref = reference_params(params, reference, lora)
            return token_outputs(net, ref, rows, rl.temperature)[0]

        data["eval_fn"] = jax.jit(ref_logps, out_shardings=NamedSharding(mesh, PartitionSpec()))
        if "rollout_fn" not in data:
            data["rollout_fn"] = make_rollout_fn(config, end_id,
                                                 NamedSharding(mesh, PartitionSpec()))
    scores, kls, lengths, cut, samples = [], [], [], [], []
    rng = jax.random.key(config.seed + 1)
    for i, (real, part) in enumerate(padded_batches(rows_all, config.batch_size)):
        rows = data["rollout_fn"](params, part["prompt"], part["prompt_valid"], part["index"],
                                  jax.random.fold_in(rng, i * config.batch_size))
        ref = data["eval_fn"](params, data.get("reference", data.get("reference_weights")), rows)
        host = jax.device_get(rows)
        keep = np.arange(real * rl.group_size)
        host = {k: v[keep] for k, v in host.items()}
        mask = np.asarray(response_mask(host["tokens"], end_id))
        kls.append(((host["old_logp"] - np.asarray(ref)[keep]) * mask).sum(1))
        scores.append(score_rollouts(data, host, data["dev_text"], end_id, tokenizer))
        lengths.append(mask.sum(1))
        cut.append(~np.any(host["tokens"] == end_id, axis=1))
        _, texts = decode_responses(host["tokens"], end_id, tokenizer)
        for i, answer, s in zip(host["index"].tolist(), texts, scores[-1].tolist()):
            samples.append({"prompt": data["dev_text"][0][i],
                            "reference": list(data["dev_text"][1][i]), "answer": answer,
                            "score": s})
    if jax.process_index() == 0:
        sft._write_jsonl(os.path.join(workdir, SAMPLES_FILE), samples)
    return {"score": float(np.concatenate(scores).mean()),
            "kl": float(np.concatenate(kls).mean()),
            "response_length": float(np.concatenate(lengths).mean()),
            "truncated": float(np.concatenate(cut).mean())}


def final_report(final: dict, info: dict) -> str:
    return (f"final eval ({info['dev_prompts']} dev prompts, sampled): reward "
            f"{final['score']:.4f} at KL {final['kl']:.4f} nats to the reference, mean response "
            f"{final['response_length']:.1f} tokens, {100 * final['truncated']:.0f}% cut at the "
            "length limit")

