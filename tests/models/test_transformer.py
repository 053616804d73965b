"""The encoder-decoder Transformer: sizes, padding invariance, causality, cached decoding."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import transformer as tf

SMALL = tf.TransformerConfig(vocab_size=53, max_len=32, num_layers=2, d_model=32, num_heads=4,
                             d_ff=64, dropout_rate=0.0)


@pytest.fixture(scope="module")
def params():
    variables = jax.jit(tf.Transformer(SMALL).init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32),
                                                    jnp.ones((1, 8), jnp.int32))
    return nn.meta.unbox(variables["params"])


@pytest.fixture(scope="module")
def forward():
    model = tf.Transformer(SMALL)
    return jax.jit(lambda p, s, t, ss=None, ts=None: model.apply({"params": p}, s, t, ss, ts))


# Vaswani et al. table 3: base 65M, big 213M parameters, with a shared 37k BPE vocabulary.
@pytest.mark.parametrize("d,heads,ff,expected,rel", [(512, 8, 2048, 65e6, 0.05),
                                                     (1024, 16, 4096, 213e6, 0.02)])
def test_parameter_counts_match_the_paper(d, heads, ff, expected, rel):
    config = tf.TransformerConfig(vocab_size=37000, max_len=256, num_layers=6, d_model=d,
                                  num_heads=heads, d_ff=ff)
    assert tf.count_params(config) == pytest.approx(expected, rel=rel)


def test_one_embedding_serves_source_target_and_output(params):
    embeddings = [k for k in params if "embed" in k]
    assert embeddings == ["embed"] and params["embed"]["embedding"].shape == (53, 32)


def test_source_padding_changes_nothing(params, forward):
    src = jax.random.randint(jax.random.key(1), (1, 7), 4, 53)
    tgt = jax.random.randint(jax.random.key(2), (1, 6), 4, 53)
    short = forward(params, src, tgt)
    padded = forward(params, jnp.pad(src, ((0, 0), (0, 5))), tgt)  # pad id 0 -> segment 0
    np.testing.assert_allclose(padded, short, atol=1e-5)


def test_decoder_change_at_t_never_moves_earlier_outputs(params, forward):
    src = jax.random.randint(jax.random.key(3), (1, 7), 4, 53)
    tgt = jax.random.randint(jax.random.key(4), (1, 9), 4, 53)
    perturb = jax.jit(lambda tgt, t: tgt.at[0, t].set((tgt[0, t] + 5) % 53))
    base = np.asarray(forward(params, src, tgt))
    for t in (0, 4, 8):
        changed = np.asarray(forward(params, src, perturb(tgt, t)))
        np.testing.assert_allclose(changed[0, :t], base[0, :t], atol=1e-6)
        assert not np.allclose(changed[0, t:], base[0, t:], atol=1e-4)


def test_packed_pairs_never_see_each_other(params, forward):
    src = jax.random.randint(jax.random.key(5), (1, 10), 4, 53)
    tgt = jax.random.randint(jax.random.key(6), (1, 8), 4, 53)
    src_seg, tgt_seg = jnp.array([[1] * 4 + [2] * 6]), jnp.array([[1] * 3 + [2] * 5])
    model = tf.Transformer(SMALL)
    pos = lambda seg: jnp.concatenate([jnp.arange((seg == k).sum()) for k in (1, 2)])[None]
    packed = jax.jit(lambda p, *args: model.apply({"params": p}, *args))(
        params, src, tgt, src_seg, tgt_seg, pos(src_seg), pos(tgt_seg))
    alone = forward(params, src[:, 4:], tgt[:, 3:])  # pair 2 on its own
    np.testing.assert_allclose(packed[0, 3:], alone[0], atol=1e-5)


def test_incremental_decoding_equals_the_full_decoder(params, forward):
    src = jnp.pad(jax.random.randint(jax.random.key(7), (2, 6), 4, 53), ((0, 0), (0, 3)))
    tgt = jax.random.randint(jax.random.key(8), (2, 10), 4, 53)
    full = forward(params, src, tgt)
    decoder = tf.Transformer(dataclasses.replace(SMALL, decode=True))
    cache, encoded, src_seg, cross_kv = jax.jit(
        lambda p, s: tf.init_decode_cache(decoder, p, s, 10))(params, src)
    step = jax.jit(lambda c, t, i: decoder.apply(
        {"params": params, "cache": c}, t, encoded, src_seg, None, jnp.full(t.shape, i), True,
        cross_kv, method=tf.Transformer.decode, mutable=["cache"]))
    pieces = []
    for i in range(10):
        logits, variables = step(cache, tgt[:, i:i + 1], i)
        cache = variables["cache"]
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-5)


def test_every_parameter_has_logical_axis_names():
    boxed = jax.eval_shape(lambda: tf.Transformer(SMALL).init(
        jax.random.key(0), jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)


def _loss_and_grads(config, params, src, tgt):
    model = tf.Transformer(config)

    def loss(p):
        logits = model.apply({"params": p}, src, tgt[:, :-1]).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[:, 1:, None], -1))
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_gives_the_same_loss_and_gradients(params, remat):
    src = jax.random.randint(jax.random.key(9), (2, 7), 4, 53)
    tgt = jax.random.randint(jax.random.key(10), (2, 9), 4, 53)
    loss, grads = _loss_and_grads(SMALL, params, src, tgt)
    loss_r, grads_r = _loss_and_grads(dataclasses.replace(SMALL, remat=remat), params, src, tgt)
    assert float(loss_r) == pytest.approx(float(loss), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_r, grads)


def test_bf16_compute_tracks_fp32(params):
    src = jax.random.randint(jax.random.key(11), (2, 7), 4, 53)
    tgt = jax.random.randint(jax.random.key(12), (2, 9), 4, 53)
    loss, _ = _loss_and_grads(SMALL, params, src, tgt)
    loss_bf16, grads = _loss_and_grads(dataclasses.replace(SMALL, dtype="bfloat16"), params,
                                       src, tgt)
    assert float(loss_bf16) == pytest.approx(float(loss), rel=1e-2)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # fp32 master weights


def _full_forward_beam_search(params, src, beam_size, max_len):
    """Beam search whose logits come from the uncached full forward pass over each beam's
    prefix (an independent path: no KV cache, no cross-attention projections kept)."""
    from models import decoding
    model = tf.Transformer(SMALL)
    rows = src.shape[0] * beam_size
    src_N = jnp.repeat(src, beam_size, axis=0)

    def logits_fn(tokens_N1, state):
        prefix = state["prefix"].at[:, state["step"]].set(tokens_N1[:, 0])
        logits = model.apply({"params": params}, src_N, prefix)
        last = jax.lax.dynamic_slice_in_dim(logits, state["step"], 1, axis=1)
        return last, {"prefix": prefix, "step": state["step"] + 1}

    state = {"prefix": jnp.zeros((rows, max_len), jnp.int32), "step": jnp.array(0)}
    return jax.jit(lambda state: decoding.beam_search(
        logits_fn, state, src.shape[0], beam_size=beam_size, max_len=max_len, bos_id=2,
        eos_id=3, alpha=0.6))(state)


def test_beam_search_encodes_each_sentence_once_and_matches_the_uncached_search(params):
    src = jnp.pad(jax.random.randint(jax.random.key(13), (2, 6), 4, 53), ((0, 0), (0, 2)))
    decoder = tf.Transformer(dataclasses.replace(SMALL, decode=True))
    encoder_rows = []

    def record(next_fun, args, kwargs, context):
        # (The cache is sized by an abstract init, which computes nothing.)
        if isinstance(context.module, tf.Encoder) and not context.module.is_initializing():
            encoder_rows.append(args[0].shape[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        tokens, scores = jax.jit(lambda p, s: tf.translate_ids(decoder, p, s, beam_size=3,
                                                               alpha=0.6, max_len=12))(params, src)
    assert encoder_rows == [2]  # 2 sentences, not 2 x 3 beams
    ref_tokens, ref_scores = _full_forward_beam_search(params, src, beam_size=3, max_len=12)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
