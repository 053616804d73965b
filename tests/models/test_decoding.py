"""Samplers against a fake, deterministic logits function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoding

PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
LOGITS = jnp.log(jnp.asarray(PROBS))[None]


def _kept_distribution(**kw):
    return np.asarray(jax.jit(lambda l: jax.nn.softmax(decoding.filter_logits(l, **kw)))(
        LOGITS))[0]


def test_top_k_keeps_exactly_k_tokens_renormalised():
    got = _kept_distribution(top_k=3)
    np.testing.assert_allclose(got, np.r_[PROBS[:3] / PROBS[:3].sum(), 0, 0, 0], atol=1e-6)


@pytest.mark.parametrize("top_p,kept", [(0.5, 2), (0.65, 2), (0.66, 3), (0.9, 4), (0.01, 1)])
def test_top_p_keeps_smallest_set_reaching_the_mass(top_p, kept):
    # Cumulative mass: 0.4, 0.65, 0.8, 0.9, ... ; a token is kept while the mass before it < p.
    got = _kept_distribution(top_p=top_p)
    expected = np.r_[PROBS[:kept] / PROBS[:kept].sum(), np.zeros(len(PROBS) - kept)]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_top_p_works_on_unsorted_rows():
    perm = np.array([3, 0, 5, 1, 4, 2])
    got = np.asarray(jax.jit(lambda l: jax.nn.softmax(decoding.filter_logits(
        l[:, perm], top_p=0.66)))(LOGITS))[0]
    expected = np.where(np.isin(perm, [0, 1, 2]), PROBS[perm], 0) / PROBS[:3].sum()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def _fake_logits_fn(tokens, cache):
    """Next token is (last token + 1) mod 6 with certainty; cache counts calls."""
    logits = 10.0 * jax.nn.one_hot((tokens + 1) % 6, 6)
    return logits, cache + 1


def test_temperature_zero_is_argmax_and_uses_the_cache():
    out = jax.jit(lambda p, r: decoding.sample(_fake_logits_fn, jnp.int32(0), p, r,
                                               max_new_tokens=5, temperature=0.0))(
        jnp.array([[0, 1], [3, 4]]), jax.random.key(0))
    np.testing.assert_array_equal(out, [[2, 3, 4, 5, 0], [5, 0, 1, 2, 3]])


def test_tokens_after_eos_are_eos():
    out = jax.jit(lambda p, r: decoding.sample(_fake_logits_fn, jnp.int32(0), p, r,
                                               max_new_tokens=6, temperature=0.0, eos_id=4))(
        jnp.array([[1]]), jax.random.key(0))
    np.testing.assert_array_equal(out, [[2, 3, 4, 4, 4, 4]])


def test_prefill_fn_makes_only_the_prompt_call():
    def prefill_fn(tokens, cache):  # jumps by 3, and hands its cache on to the steps
        return 10.0 * jax.nn.one_hot((tokens + 3) % 6, 6), cache + 100

    def logits_fn(tokens, cache):  # the step after the prompt sees the prefill's cache
        return 10.0 * jax.nn.one_hot((tokens + 1 + (cache == 100)) % 6, 6), cache + 1

    out = jax.jit(lambda p, r: decoding.sample(logits_fn, jnp.int32(0), p, r,
                                               max_new_tokens=4, temperature=0.0,
                                               prefill_fn=prefill_fn))(
        jnp.array([[0, 1]]), jax.random.key(0))
    np.testing.assert_array_equal(out, [[4, 0, 1, 2]])


def test_sampling_frequencies_follow_the_filtered_distribution():
    rngs = jax.random.split(jax.random.key(0), 20000)
    draws = jax.jit(jax.vmap(lambda r: decoding.next_token(LOGITS, r, temperature=1.0,
                                                           top_k=3)))(rngs)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=6) / 20000
    np.testing.assert_allclose(freq, np.r_[PROBS[:3] / PROBS[:3].sum(), 0, 0, 0], atol=0.015)


def test_temperature_sharpens():
    rngs = jax.random.split(jax.random.key(1), 20000)
    draws = jax.jit(jax.vmap(lambda r: decoding.next_token(LOGITS, r, temperature=0.5)))(rngs)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=6) / 20000
    expected = PROBS ** 2 / (PROBS ** 2).sum()  # p^(1/T), T = 0.5
    np.testing.assert_allclose(freq, expected, atol=0.015)
