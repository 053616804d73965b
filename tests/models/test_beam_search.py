"""Beam search against fake, deterministic logits functions, checked by hand and brute force."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import decoding

EOS, BOS = 0, 1


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _bigram_fn(logits_VV):
    """A model whose next-token logits depend only on the previous token; the cache is unused."""
    table = jnp.asarray(logits_VV, jnp.float32)
    return lambda tokens_N1, cache: (table[tokens_N1[:, 0]][:, None], cache)


def _hand_score(tokens, next_logp, alpha):
    """Total log-prob of `tokens` (cut after EOS) over the length penalty, in float64."""
    history, total = [BOS], 0.0
    for token in tokens:
        total += next_logp(history)[token]
        history.append(int(token))
        if token == EOS:
            break
    length = len(history) - 1
    return total / ((5 + length) / 6) ** alpha


def _bigram_logp(logits_VV):
    logp_VV = _log_softmax(logits_VV)
    return lambda history: logp_VV[history[-1]]


def _all_sequences(vocab_size, max_len):
    """Every hypothesis: ends at its first EOS, or runs to max_len without one."""
    for length in range(1, max_len + 1):
        for seq in itertools.product(range(vocab_size), repeat=length):
            if EOS not in seq[:-1] and (seq[-1] == EOS or length == max_len):
                yield list(seq) + [0] * (max_len - length)


def _search(logits_fn, cache, batch_size, **kw):
    kw = {"bos_id": BOS, "eos_id": EOS, **kw}
    tokens, scores = jax.jit(lambda c: decoding.beam_search(logits_fn, c, batch_size, **kw))(
        cache)
    return np.asarray(tokens), np.asarray(scores)


@pytest.mark.parametrize("length,alpha,expected", [
    (1, 0.6, 1.0), (5, 0.6, 1.3586552), (10, 0.6, 1.7328621), (7, 1.0, 2.0), (3, 0.0, 1.0),
    (20, 0.2, 1.3303250)])
def test_length_penalty_matches_gnmt_formula(length, alpha, expected):
    np.testing.assert_allclose(decoding.length_penalty(length, alpha), expected, rtol=1e-6)


@pytest.mark.parametrize("seed,eos_reachable", [(0, True), (1, True), (2, False)])
def test_beam_size_one_is_greedy(seed, eos_reachable):
    vocab_size, max_len = 8, 7
    logits_VV = 2.0 * np.random.default_rng(seed).normal(size=(vocab_size, vocab_size))
    # With K = 1, beam search still keeps the best finished hypothesis, so it departs from greedy
    # when an EOS that is not the argmax outscores the greedy continuation. Keeping EOS either
    # the argmax or negligible in each row rules that out; it is the argmax after the third
    # greedy token (or nowhere).
    logits_VV[:, EOS] = -50.0
    prev, path = BOS, []
    for _ in range(max_len):
        prev = int(np.argmax(logits_VV[prev]))
        path.append(prev)
    if eos_reachable:
        logits_VV[path[2], EOS] = logits_VV[path[2]].max() + 1.0
    greedy, prev = [], BOS
    while len(greedy) < max_len and prev != EOS:
        prev = int(np.argmax(logits_VV[prev]))
        greedy.append(prev)
    assert (EOS in greedy) == eos_reachable

    search = jax.jit(lambda cache: decoding.beam_search(
        _bigram_fn(logits_VV), cache, 1, beam_size=1, max_len=max_len, bos_id=BOS, eos_id=EOS,
        alpha=0.0))
    tokens, scores = search(jnp.zeros(1))
    assert tokens.shape == (1, 1, max_len) and tokens.dtype == jnp.int32
    assert scores.shape == (1, 1) and scores.dtype == jnp.float32
    np.testing.assert_array_equal(tokens[0, 0], greedy + [0] * (max_len - len(greedy)))
    np.testing.assert_allclose(scores[0, 0], _hand_score(greedy, _bigram_logp(logits_VV), 0.0),
                               rtol=1e-5)


def test_two_beams_find_what_greedy_misses():
    # Tokens: EOS, BOS, A, B, C. Greedy takes A (0.5), whose continuations are flat; the best
    # sequence is B EOS (0.4 * 0.9) through the second-best first token.
    probs_VV = np.array([
        [0.2, 0.2, 0.2, 0.2, 0.2],  # after EOS (never fed)
        [0.02, 0.01, 0.5, 0.4, 0.07],  # after BOS
        [0.1, 0.01, 0.34, 0.3, 0.25],  # after A
        [0.9, 0.01, 0.03, 0.03, 0.03],  # after B
        [0.4, 0.01, 0.2, 0.2, 0.19],  # after C
    ])
    logits_VV, max_len = np.log(probs_VV), 4
    next_logp = _bigram_logp(logits_VV)
    ranked = sorted(_all_sequences(5, max_len), key=lambda s: -_hand_score(s, next_logp, 0.0))
    best = ranked[0]
    assert best[0] == 3  # B, not greedy's A

    kw = dict(max_len=max_len, alpha=0.0)
    beam2, scores2 = _search(_bigram_fn(logits_VV), jnp.zeros(2), 1, beam_size=2, **kw)
    greedy, greedy_scores = _search(_bigram_fn(logits_VV), jnp.zeros(1), 1, beam_size=1, **kw)
    np.testing.assert_array_equal(beam2[0, 0], best)
    np.testing.assert_allclose(scores2[0, 0], _hand_score(best, next_logp, 0.0), rtol=1e-5)
    assert greedy[0, 0, 0] == 2 and greedy_scores[0, 0] < scores2[0, 0] - 0.5


def test_exhaustive_beam_ranks_every_sequence_like_brute_force():
    # With 3 tokens and max_len 4 there are 31 hypotheses, and K = 32 beams never drop a
    # candidate (at most 8 live beams x 3 tokens <= 2K), so the search must return all 31 in
    # brute-force order, plus one empty slot.
    # The logits depend on the position too (a cache counter): with a bigram table, sequences
    # made of the same transitions in another order would tie and their order be arbitrary.
    max_len, alpha = 4, 0.6
    logits_TVV = np.random.default_rng(3).normal(size=(max_len, 3, 3))
    table = jnp.asarray(logits_TVV, jnp.float32)

    def logits_fn(tokens_N1, pos):
        return table[pos, tokens_N1[:, 0]][:, None], pos + 1

    seqs = list(_all_sequences(3, max_len))
    hand = np.array([_hand_score(s, lambda h: _log_softmax(logits_TVV[len(h) - 1, h[-1]]), alpha)
                     for s in seqs])
    order = np.argsort(-hand)
    tokens, scores = _search(logits_fn, jnp.int32(0), 1, beam_size=32, max_len=max_len,
                             alpha=alpha)
    np.testing.assert_array_equal(tokens[0, :31], np.array(seqs)[order])
    np.testing.assert_allclose(scores[0, :31], hand[order], rtol=1e-5)
    assert scores[0, 31] == -np.inf and not tokens[0, 31].any()


def test_scores_are_penalised_log_probs_sorted_best_first():
    vocab_size, max_len, beam_size, alpha = 6, 6, 3, 0.6
    logits_VV = 1.5 * np.random.default_rng(4).normal(size=(vocab_size, vocab_size))
    logits_VV[:, EOS] += 1.0  # finish at mixed lengths
    next_logp = _bigram_logp(logits_VV)
    tokens, scores = _search(_bigram_fn(logits_VV), jnp.zeros(beam_size), 1, beam_size=beam_size,
                             max_len=max_len, alpha=alpha)
    lengths = set()
    for seq, score in zip(tokens[0], scores[0]):
        np.testing.assert_allclose(score, _hand_score(seq, next_logp, alpha), rtol=1e-5)
        length = list(seq).index(EOS) + 1 if EOS in seq else max_len
        assert not seq[length:].any()  # zeros after EOS
        lengths.add(length)
    assert len(lengths) > 1, "the table should produce hypotheses of several lengths"
    assert np.all(np.diff(scores[0]) <= 0)
    assert len({tuple(s) for s in tokens[0]}) == beam_size


def test_cache_rows_follow_their_beams():
    # The fake model keeps each row's fed tokens in the cache and reads its logits from a hash
    # of that history (and of the row's sentence) only, never from the token it is given, so a
    # cache row that does not follow its beam produces logits for the wrong prefix.
    batch_size, beam_size, max_len, vocab_size = 2, 3, 6, 6
    n_rows = batch_size * beam_size
    table_PV = np.random.default_rng(5).normal(size=(101, vocab_size))
    table_PV[:, EOS] = -1e9  # never finish, so the returned beams are the last live ones
    weights = np.random.default_rng(6).integers(1, 1000, size=max_len)
    seen = {}

    def logits_fn(tokens_N1, cache):
        history_NT, sentence_N, pos = cache
        history_NT = history_NT.at[:, pos].set(tokens_N1[:, 0])
        jax.debug.callback(lambda p, h: seen.__setitem__(int(p), np.asarray(h)), pos, history_NT)
        row_hash_N = (history_NT @ weights + 37 * sentence_N + 13 * pos) % 101
        return jnp.asarray(table_PV, jnp.float32)[row_hash_N][:, None], (history_NT, sentence_N,
                                                                          pos + 1)

    def next_logp(sentence, history):
        padded = np.array(history + [0] * (max_len - len(history)))
        return _log_softmax(table_PV[(padded @ weights + 37 * sentence
                                      + 13 * (len(history) - 1)) % 101])

    cache = (jnp.zeros((n_rows, max_len), jnp.int32),
             jnp.repeat(jnp.arange(batch_size, dtype=jnp.int32), beam_size), jnp.int32(0))
    tokens, scores = _search(logits_fn, cache, batch_size, beam_size=beam_size, max_len=max_len,
                             alpha=0.6)
    last_history_NT = seen[max_len - 1]  # the fed prefixes at the final call
    for b in range(batch_size):
        rows = {tuple(h) for h in last_history_NT[b * beam_size:(b + 1) * beam_size]}
        for seq, score in zip(tokens[b], scores[b]):
            assert (BOS,) + tuple(seq[:-1]) in rows
            hand = _hand_score(seq, lambda h, b=b: next_logp(b, h), 0.6)
            np.testing.assert_allclose(score, hand, rtol=1e-5)


def _count_calls(eos_at_call):
    """Beam search over a model that emits EOS almost surely at call `eos_at_call`."""
    calls = []
    favours_eos_V = jnp.array([30.0, 0.0, 0.0, 0.0, 0.0])
    before_V = jnp.array([-30.0, 0.3, 0.2, 0.1, 0.0])

    def logits_fn(tokens_N1, count):
        jax.debug.callback(lambda c: calls.append(int(c)), count)
        logits_V = jnp.where(count == eos_at_call, favours_eos_V, before_V)
        return jnp.broadcast_to(logits_V, (tokens_N1.shape[0], 1, 5)), count + 1

    tokens, _ = _search(logits_fn, jnp.int32(0), 2, beam_size=3, max_len=20, alpha=0.6)
    return max(calls) + 1, tokens


def test_stops_early_once_no_live_beam_can_win():
    n_calls, tokens = _count_calls(eos_at_call=2)
    assert n_calls <= 3
    assert (tokens[:, :, 2] == EOS).all() and not tokens[:, :, 3:].any()
    n_calls, tokens = _count_calls(eos_at_call=-1)  # never: runs to max_len
    assert n_calls == 20 and not (tokens == EOS).any()


def test_sentences_decode_independently_of_the_batch():
    # Each sentence has its own bigram table (chosen by a per-row cache leaf, as encoder
    # outputs would be); sentence 0 favours EOS and settles early, sentence 1 runs longer.
    vocab_size, beam_size, max_len = 7, 3, 8
    logits_SVV = np.random.default_rng(7).normal(size=(2, vocab_size, vocab_size))
    logits_SVV[0, :, EOS] += 2.0
    logits_SVV[1, :, EOS] -= 2.0
    table = jnp.asarray(logits_SVV, jnp.float32)

    def logits_fn(tokens_N1, sentence_N):
        return table[sentence_N, tokens_N1[:, 0]][:, None], sentence_N

    def run(sentences):
        cache = jnp.repeat(jnp.array(sentences, jnp.int32), beam_size)
        return _search(logits_fn, cache, len(sentences), beam_size=beam_size, max_len=max_len)

    together_tokens, together_scores = run([0, 1])
    for b in range(2):
        alone_tokens, alone_scores = run([b])
        np.testing.assert_array_equal(together_tokens[b], alone_tokens[0])
        np.testing.assert_allclose(together_scores[b], alone_scores[0], rtol=1e-6)
    assert not np.array_equal(together_tokens[0], together_tokens[1])
