"""Rollouts: responses sampled from the current policy, decoded and scored on the host.

The prompts are left-padded rows (prompt_rows); each is repeated config.rl.group_size times
and continued by models/decoding's sampler through gpt.generate, with the KV cache, inside
one jitted function that also returns each sampled token's log-probability. The sampler and
the trainer are the same model code, so those log-probabilities equal the training pass's
(advantages.token_outputs; in fp32 to 1e-5, tested, and logged every step as sampler_error).
The responses are cut at <|end|>, decoded, and scored by the reward (rewards.py).

Safeguard (check_stall): a run stops with StalledError when for config.rl.stall_steps steps in
a row every response was cut at the length limit, or every score in the batch was equal (with
groups: equal within every group), since then every advantage is zero.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from data.errors import DataError
from models import gpt
from train import errors
from train.rl import settings
from train.tasks import lm, posttrain


def prompt_rows(prompts, width, pad_id):
    """Left-padded prompt rows (prompts too long keep BOS and their end), and their index."""
    tokens, valid = gpt.left_pad([posttrain.fit_prompt(p, width) for p in prompts], width,
                                 pad_id)
    return {"prompt": tokens, "prompt_valid": valid,
            "index": np.arange(len(prompts), dtype=np.int32)}


def padded_batches(rows, size):
    """(real row count, rows) per batch of `size`; the last one filled with copies of its
    first row, so every batch has one shape (one compilation)."""
    n = len(rows["index"])
    for start in range(0, n, size):
        real = min(size, n - start)
        part = {k: v[start:start + size] for k, v in rows.items()}
        yield real, {k: np.concatenate([v, np.repeat(v[:1], size - real, 0)])
                     for k, v in part.items()}


def make_rollout_fn(config, end_id, replicated):
    """jitted (params, prompt, valid, index, rng) -> rollout rows (each prompt repeated
    group_size times, sampled tokens and their log-probs), replicated on every device."""
    rl, group = config.rl, config.rl.group_size
    decode = lm.build_model(config, decode=True)
    fn = functools.partial(gpt.generate, decode, max_new_tokens=rl.max_new_tokens,
                           temperature=rl.temperature, eos_id=end_id, return_logprobs=True)

    def rollout(params, prompt, valid, index, rng):
        prompt, valid, index = (jnp.repeat(x, group, axis=0) for x in (prompt, valid, index))
        base = {k: v for k, v in params.items() if k != settings.VALUE_HEAD}
        tokens, logp = fn(base, prompt, rng, prompt_valid_BP=valid)
        return {"prompt": prompt, "prompt_valid": valid, "index": index, "tokens": tokens,
                "old_logp": logp}

    return jax.jit(rollout, out_shardings=replicated)


def decode_responses(tokens_BN, end_id, tokenizer):
    """(response ids cut before end_id, their text)."""
    ids = [row[:row.index(end_id)] if end_id in row else row for row in tokens_BN.tolist()]
    return ids, [tokenizer.decode(r).strip() for r in ids]


def score_rollouts(data, host, text, end_id, tokenizer, step=None):
    """The reward of each rollout in `host` (rows on the host), text = (questions, reference
    answers) by prompt index. At a train step a reward's DataError names the step."""
    questions, refs = text
    response_ids, responses = decode_responses(host["tokens"], end_id, tokenizer)
    index = host["index"].tolist()
    prompt_ids = [row[valid > 0].tolist() for row, valid in
                  zip(host["prompt"], host["prompt_valid"])]
    try:
        return data["reward"]([questions[i] for i in index], responses,
                              [refs[i] for i in index], prompt_ids, response_ids)
    except DataError as e:
        if step is None:
            raise
        # Raised inside the step, before its update: the loop saves nothing after it, so the
        # newest checkpoint stays the last one saved before this step.
        raise DataError(f"step {step}: {e}. Nothing of step {step} was saved; rerunning "
                        "resumes from the newest checkpoint (or starts over if none was "
                        "saved yet)") from e


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
        raise errors.StalledError(
            f"step {step}: for {limit} steps in a row " + " and ".join(reasons) + ": nothing "
            "to learn from. Check the reward (config.rl.reward) on a few responses, start from a "
            "run that answers and ends its answers (an SFT run), raise "
            "--config.rl.max_new_tokens, or sample more widely (--config.rl.temperature, "
            "--config.rl.group_size); --config.rl.stall_steps=0 turns this check off")
