"""Shared layers: attention paths agree, masks are right, positions follow the paper."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers


def _attention_outputs(mask_kwargs, kv=None, seed=0):
    x = jax.random.normal(jax.random.key(seed), (2, 7, 16))
    outs = []
    for impl in ("fast", "reference"):
        mod = layers.MultiHeadAttention(num_heads=4, head_dim=4, implementation=impl)
        params = mod.init(jax.random.key(1), x, kv, **mask_kwargs)
        outs.append(jax.jit(lambda p, x, kv: mod.apply(p, x, kv, **mask_kwargs))(params, x, kv))
    return outs


@pytest.mark.parametrize("case", ["plain", "causal", "segments", "causal_segments", "cross"])
def test_fast_attention_matches_reference(case):
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3]])
    kwargs = {"plain": {}, "causal": {"causal": True}, "segments": {"segment_ids_BL": seg},
              "causal_segments": {"causal": True, "segment_ids_BL": seg}, "cross": {}}[case]
    kv = jax.random.normal(jax.random.key(5), (2, 5, 16)) if case == "cross" else None
    fast, ref = _attention_outputs(kwargs, kv)
    np.testing.assert_allclose(fast, ref, atol=1e-5)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("segments", [False, True])
def test_query_blocked_causal_attention_equals_full_attention(impl, segments):
    """Blocks of 2 queries over length 8: outputs and gradients equal the one-block path."""
    x = jax.random.normal(jax.random.key(2), (2, 8, 16))
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 2, 2, 2, 2, 3, 3, 3]]) if segments else None

    def run(blocks):
        mod = layers.MultiHeadAttention(num_heads=4, head_dim=4, implementation=impl,
                                        query_blocks=blocks)
        params = mod.init(jax.random.key(1), x)
        f = lambda p, x: jnp.sum(jnp.sin(mod.apply(p, x, segment_ids_BL=seg, causal=True)))
        dots = str(jax.make_jaxpr(f)(params, x)).count("dot_general")
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x), dots

    ((full, full_grads), full_dots), ((blocked, blocked_grads), blocked_dots) = run(1), run(4)
    assert blocked_dots == full_dots + 3 * 2  # Q K^T and P V once per extra block
    np.testing.assert_allclose(blocked, full, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(blocked_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_reference_attention_is_the_softmax_formula():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 3, 1, 2)).astype(np.float32) for _ in range(3))
    logits = q[0, :, 0] @ k[0, :, 0].T / np.sqrt(2.0)
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = weights @ v[0, :, 0]
    got = layers.reference_attention(q, k, v)[0, :, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_mask_blocks_padding_other_segments_and_future():
    seg = jnp.array([[1, 1, 2, 0]])
    mask = np.asarray(layers.make_attention_mask(seg, causal=True))[0, 0]
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_sinusoidal_positions_follow_section_3_5():
    pe = np.asarray(layers.sinusoidal_positions(jnp.arange(6)[None], 8))[0]
    for pos in range(6):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert pe[pos, 2 * i] == pytest.approx(np.sin(angle), abs=1e-5)
            assert pe[pos, 2 * i + 1] == pytest.approx(np.cos(angle), abs=1e-5)


@pytest.mark.parametrize("pre_ln", [True, False])
def test_block_params_all_carry_logical_names(pre_ln):
    block = layers.SelfAttentionBlock(num_heads=2, d_ff=32, pre_ln=pre_ln, activation="relu")
    variables = block.init(jax.random.key(0), jnp.ones((1, 4, 16)))
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(
        x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim


def test_post_ln_output_is_normalised_and_pre_ln_is_not():
    x = 5.0 + 3.0 * jax.random.normal(jax.random.key(0), (1, 4, 16))
    for pre_ln in (True, False):
        block = layers.SelfAttentionBlock(num_heads=2, d_ff=32, pre_ln=pre_ln)
        y = block.apply(block.init(jax.random.key(1), x), x)
        std = float(jnp.std(y, axis=-1).mean())
        assert (abs(std - 1.0) < 1e-3) != pre_ln


def test_feed_forward_matches_formula():
    ff = layers.FeedForward(d_ff=8, activation="relu")
    x = jax.random.normal(jax.random.key(0), (1, 3, 4))
    params = nn.meta.unbox(ff.init(jax.random.key(1), x))["params"]
    w1, b1 = params["wi"]["kernel"], params["wi"]["bias"]
    w2, b2 = params["wo"]["kernel"], params["wo"]["bias"]
    expected = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    np.testing.assert_allclose(ff.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


def test_split_sinusoids_are_the_interleaved_ones_reordered_and_exact():
    """Marian's layout: all sines, then all cosines; the float64 table is the correctly
    rounded value at every position."""
    positions = jnp.arange(100)[None]
    interleaved = np.asarray(layers.sinusoidal_positions(positions, 8, max_len=100))[0]
    split = np.asarray(layers.sinusoidal_positions(positions, 8, layout="split",
                                                   max_len=100))[0]
    np.testing.assert_array_equal(split[:, :4], interleaved[:, 0::2])
    np.testing.assert_array_equal(split[:, 4:], interleaved[:, 1::2])
    exact = np.sin(99 / 10000 ** (2 * 1 / 8))
    assert split[99, 1] == np.float32(exact)
    computed = np.asarray(layers.sinusoidal_positions(positions, 8))[0]
    np.testing.assert_allclose(computed, interleaved, atol=1e-5)
