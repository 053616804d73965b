"""Autoregressive decoding over a `logits_fn(tokens_BL, cache) -> (logits_BLV, cache)` callback.

Sampling (temperature, top-k, top-p) and beam search with GNMT's length penalty, as used by the
translation Transformer (Vaswani et al. 2017, sec. 6.1). The decoders know nothing about the
model: GPT sampling and the translation decoder pass a closure over their parameters. Everything
here is a pure function meant to run under `jax.jit`, with the whole generation loop inside one
`lax.scan` (sampling) or `lax.while_loop` (beam search) so no Python runs per token.
"""
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so an all-filtered row cannot produce NaNs


def _ordered_keys(x):
    """Maps float32 to int32 keys with the same order, so a threshold can be bisected on ints."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _largest_threshold(keys_BV, enough):
    """Per row, the largest key t with enough(keys >= t) true (enough is monotone in t).

    32 bisection steps over the int32 key range find it exactly. This replaces a sort: XLA's
    CPU sort costs about 1 ms per 8k-vocabulary row, 32 vectorised compares cost microseconds.
    """
    lo = jnp.min(keys_BV, axis=-1)  # enough(keys >= min) holds: every token is kept
    hi = jnp.max(keys_BV, axis=-1) + 1  # enough(keys >= max + 1) fails: nothing is kept

    def bisect(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = enough(keys_BV >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, bisect, (lo, hi))
    return lo


def filter_logits(logits_BV, *, top_k=0, top_p=1.0):
    """Keeps the top-k tokens and/or the smallest set whose probability mass reaches top_p.

    Top-p (nucleus, Holtzman et al. 2019): in order of probability, keep a token while the mass
    of the tokens before it is below p, so the token that crosses p is kept and the most likely
    token always survives. Both filters keep every token tied with the last one kept.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    keys_BV = _ordered_keys(logits_BV)
    if top_k and top_k > 0:
        kth = _largest_threshold(keys_BV, lambda kept: jnp.sum(kept, -1) >= top_k)
        logits_BV = jnp.where(keys_BV >= kth[:, None], logits_BV, NEG_INF)
    if top_p < 1.0:
        probs_BV = jax.nn.softmax(logits_BV, axis=-1)
        # The last kept token is the least likely one whose "at least as likely" set already
        # holds mass >= p.
        cut = _largest_threshold(
            keys_BV, lambda kept: jnp.sum(jnp.where(kept, probs_BV, 0.0), -1) >= top_p)
        logits_BV = jnp.where(keys_BV >= cut[:, None], logits_BV, NEG_INF)
    return logits_BV


def next_token(logits_BV, rng, *, temperature=1.0, top_k=0, top_p=1.0):
    """One token per row: argmax at temperature 0, else a draw from the filtered softmax."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    scaled_BV = logits_BV.astype(jnp.float32) / temperature
    filtered_BV = filter_logits(scaled_BV, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, filtered_BV, axis=-1).astype(jnp.int32)


def sample(logits_fn, cache, prompt_BP, rng, *, max_new_tokens, temperature=1.0, top_k=0,
           top_p=1.0, eos_id=-1, prefill_fn=None, return_logprobs=False):
    """Continues each prompt row by `max_new_tokens` tokens; returns B,max_new_tokens.

    The prompt is fed in one call (filling the KV cache), then one token per scan step. After a
    row emits `eos_id`, it keeps emitting `eos_id` (callers cut there). `eos_id` may be a tuple
    of stop ids (a chat template's end of turn and the checkpoint's EOS): a row stops at any of
    them and then repeats the first. Callers jit this with
    their parameters as an argument that `logits_fn` closes over inside the traced function.
    `prefill_fn`, with logits_fn's signature, makes that prompt call instead of logits_fn: a
    model can then mask left-padded prompts of different lengths (models/gpt.generate). The
    first token is drawn from the prompt's last column either way.

    With `return_logprobs`, also B,max_new_tokens float32: each emitted token's log-probability
    under softmax(logits / temperature) (the unfiltered distribution, unscaled at temperature
    0), what a policy-gradient trainer compares its own forward pass with (train/rl/advantages.py).
    Entries after a row's `eos_id` are those of the repeated `eos_id`: callers mask them.
    """
    pick = functools.partial(next_token, temperature=temperature, top_k=top_k, top_p=top_p)
    stops = jnp.asarray(eos_id if isinstance(eos_id, (tuple, list)) else (eos_id,), jnp.int32)
    scale = temperature if temperature > 0 else 1.0

    def logprob(logits_BV, token_B):
        logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32) / scale, axis=-1)
        return jnp.take_along_axis(logp_BV, token_B[:, None], axis=1)[:, 0]

    logits_BPV, cache = (prefill_fn or logits_fn)(prompt_BP, cache)
    rng, step_rng = jax.random.split(rng)
    first_B = pick(logits_BPV[:, -1], step_rng)
    first_logp_B = logprob(logits_BPV[:, -1], first_B)

    def step(carry, step_rng):
        token_B, done_B, cache = carry
        logits_B1V, cache = logits_fn(token_B[:, None], cache)
        new_B = pick(logits_B1V[:, -1], step_rng)
        done_B = done_B | jnp.any(token_B[:, None] == stops, axis=1)
        new_B = jnp.where(done_B, stops[0], new_B)
        return (new_B, done_B, cache), (new_B, logprob(logits_B1V[:, -1], new_B))

    done_B = jnp.zeros(first_B.shape, bool)
    rngs = jax.random.split(rng, max_new_tokens - 1)
    _, (rest_NB, rest_logp_NB) = jax.lax.scan(step, (first_B, done_B, cache), rngs)
    tokens_BN = jnp.concatenate([first_B[:, None], rest_NB.T], axis=1)
    if not return_logprobs:
        return tokens_BN
    return tokens_BN, jnp.concatenate([first_logp_B[:, None], rest_logp_NB.T], axis=1)


# Beam search. Shape letters here: B sentences, K beams per sentence (not the head dim of
# models/layers.py), V vocabulary, T output positions (max_len), C = 2K candidates per sentence,
# N = B * K model rows, where row b * K + k holds beam k of sentence b.


def length_penalty(length, alpha: float):
    """GNMT's length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016, eq. 14); 1 at alpha 0."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


class _Beams(NamedTuple):
    """The while_loop carry: K live and K finished hypotheses per sentence."""
    step: jax.Array  # tokens emitted so far by every live beam
    cache: Any  # the model's state, N rows, row b * K + k following live beam k
    last_BK: jax.Array  # token each live beam feeds next (BOS at step 0)
    live_tokens_BKT: jax.Array  # zeros past `step`
    live_logp_BK: jax.Array  # summed log-probs, best first; -inf marks an empty slot
    finished_tokens_BKT: jax.Array  # end with EOS (or run to max_len), zeros after it
    finished_scores_BK: jax.Array  # log-prob / length_penalty, best first; -inf is empty
    done_B: jax.Array  # sentence settled: no live beam can enter its finished top K


def _take(x_BC, index_BK):
    """Per sentence, the beams (or candidates) at `index_BK`."""
    return jax.vmap(lambda x, i: x[i])(x_BC, index_BK)


def _reorder_cache(cache, parent_BK):
    """Gives row b * K + k the state of beam parent_BK[b, k] of the same sentence."""
    batch_size, beam_size = parent_BK.shape
    n_rows = batch_size * beam_size
    rows_N = (jnp.arange(batch_size)[:, None] * beam_size + parent_BK).reshape(n_rows)

    def reorder(leaf):
        # Per-row leaves (KV caches, repeated encoder outputs) follow their beam; anything else,
        # such as a scalar write index shared by all rows, is the same for every beam.
        if jnp.ndim(leaf) >= 1 and leaf.shape[0] == n_rows:
            return leaf[rows_N]
        return leaf

    return jax.tree.map(reorder, cache)


def _top_k_merge(scores_BA, tokens_BAT, scores_BC, tokens_BCT, k):
    """The k best of two hypothesis pools, best first; on ties the first pool wins."""
    scores_BM = jnp.concatenate([scores_BA, scores_BC], axis=1)
    tokens_BMT = jnp.concatenate([tokens_BAT, tokens_BCT], axis=1)
    top_scores_BK, index_BK = jax.lax.top_k(scores_BM, k)  # stable: lower index first on ties
    return top_scores_BK, _take(tokens_BMT, index_BK)


def _beam_step(state: _Beams, logits_fn, *, max_len, eos_id, alpha):
    """Extends every live beam by one token, then re-selects the live and finished top K."""
    batch_size, beam_size = state.last_BK.shape
    logits_N1V, cache = logits_fn(state.last_BK.reshape(-1, 1), state.cache)
    logp_BKV = jax.nn.log_softmax(logits_N1V[:, -1].astype(jnp.float32), axis=-1)
    logp_BKV = logp_BKV.reshape(batch_size, beam_size, -1)
    vocab_size = logp_BKV.shape[-1]

    # Score every (beam, next token) pair by its total log-prob; empty beams stay at -inf. The
    # best 2K are enough: even if K of them end with EOS, K others remain to stay live.
    cand_logp_BKV = state.live_logp_BK[:, :, None] + logp_BKV
    cand_logp_BC, flat_BC = jax.lax.top_k(
        cand_logp_BKV.reshape(batch_size, beam_size * vocab_size), 2 * beam_size)
    parent_BC, token_BC = flat_BC // vocab_size, flat_BC % vocab_size
    cand_tokens_BCT = _take(state.live_tokens_BKT, parent_BC).at[:, :, state.step].set(token_BC)
    ends_BC = token_BC == eos_id

    # Live: the best K candidates that did not end. The model state of row b * K + k must now
    # be that of the beam the new beam k grew from, before the next call reads it.
    live_logp_BK, pick_BK = jax.lax.top_k(jnp.where(ends_BC, -jnp.inf, cand_logp_BC), beam_size)
    cache = _reorder_cache(cache, _take(parent_BC, pick_BK))

    # Finished: candidates that emitted EOS, scored with the penalty for their length (EOS
    # included), compete with those finished earlier for the K slots. A settled sentence keeps
    # its pool frozen, so its result does not depend on how long the rest of the batch runs.
    length = state.step + 1
    new_scores_BC = jnp.where(ends_BC, cand_logp_BC / length_penalty(length, alpha), -jnp.inf)
    scores_BK, tokens_BKT = _top_k_merge(state.finished_scores_BK, state.finished_tokens_BKT,
                                         new_scores_BC, cand_tokens_BCT, beam_size)
    frozen_B = state.done_B
    scores_BK = jnp.where(frozen_B[:, None], state.finished_scores_BK, scores_BK)
    tokens_BKT = jnp.where(frozen_B[:, None, None], state.finished_tokens_BKT, tokens_BKT)

    # Early stop. Log-probs only decrease as a beam grows, so the most any live beam can still
    # score is its current log-prob over the largest length penalty it could reach: that of
    # max_len for alpha >= 0 (the penalty grows with length), that of one more token for
    # alpha < 0. When even the best live beam cannot beat the K-th finished score, the finished
    # top K is final; comparing with the K-th rather than the best keeps all K beams exact.
    max_penalty = jnp.maximum(length_penalty(length + 1, alpha), length_penalty(max_len, alpha))
    best_possible_B = live_logp_BK[:, 0] / max_penalty
    done_B = frozen_B | (scores_BK[:, -1] >= best_possible_B)
    return _Beams(step=length, cache=cache, last_BK=_take(token_BC, pick_BK),
                  live_tokens_BKT=_take(cand_tokens_BCT, pick_BK), live_logp_BK=live_logp_BK,
                  finished_tokens_BKT=tokens_BKT, finished_scores_BK=scores_BK, done_B=done_B)


def beam_search(logits_fn, cache, batch_size: int, *, beam_size: int, max_len: int, bos_id: int,
                eos_id: int, alpha: float = 0.6):
    """Returns the beam_size best continuations of BOS per sentence, best first.

    Args:
      logits_fn: (tokens_N1, cache) -> (logits_N1V, cache), N = batch_size * beam_size rows; row
        b * K + k is beam k of sentence b.
      cache: model state already sized for N rows (the caller repeats per-sentence state such
        as encoder outputs K times). Leaves whose leading dimension is N are reordered whenever
        beams are re-selected; other leaves (a shared write index) are left alone.
      max_len: most tokens per hypothesis, EOS included; a beam still live there finishes there.
      alpha: GNMT length penalty exponent; 0 ranks by total log-prob.

    Returns:
      tokens_BKT int32 (each beam's tokens after BOS, EOS included, zeros after it) and
      scores_BK float32 (total log-prob / length_penalty(length with EOS)). Slots that no
      hypothesis could fill (fewer than K sequences exist) score -inf with zero tokens.
    """
    shape_BK = (batch_size, beam_size)
    # Only beam 0 starts live: K identical live beams would make step 0 pick K copies of the
    # best token instead of the K best tokens.
    live_logp_BK = jnp.full(shape_BK, -jnp.inf).at[:, 0].set(0.0)
    state = _Beams(
        step=jnp.int32(0), cache=cache, last_BK=jnp.full(shape_BK, bos_id, jnp.int32),
        live_tokens_BKT=jnp.zeros(shape_BK + (max_len,), jnp.int32), live_logp_BK=live_logp_BK,
        finished_tokens_BKT=jnp.zeros(shape_BK + (max_len,), jnp.int32),
        finished_scores_BK=jnp.full(shape_BK, -jnp.inf), done_B=jnp.zeros(batch_size, bool))
    step = functools.partial(_beam_step, logits_fn=logits_fn, max_len=max_len, eos_id=eos_id,
                             alpha=alpha)
    state = jax.lax.while_loop(
        lambda s: (s.step < max_len) & ~jnp.all(s.done_B), step, state)

    # Beams still live at max_len finish there. Sentences that stopped early skip this: their
    # live beams are shorter than max_len and cannot enter the finished top K anyway.
    live_scores_BK = state.live_logp_BK / length_penalty(max_len, alpha)
    live_scores_BK = jnp.where(state.done_B[:, None], -jnp.inf, live_scores_BK)
    scores_BK, tokens_BKT = _top_k_merge(state.finished_scores_BK, state.finished_tokens_BKT,
                                         live_scores_BK, state.live_tokens_BKT, beam_size)
    tokens_BKT = jnp.where(jnp.isneginf(scores_BK)[:, :, None], 0, tokens_BKT)
    return tokens_BKT, scores_BK
