"""Shared layers: the feed-forward is its formula, positions follow the paper."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers


def test_sinusoidal_positions_follow_section_3_5():
    pe = np.asarray(layers.sinusoidal_positions(jnp.arange(6)[None], 8))[0]
    for pos in range(6):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert pe[pos, 2 * i] == pytest.approx(np.sin(angle), abs=1e-5)
            assert pe[pos, 2 * i + 1] == pytest.approx(np.cos(angle), abs=1e-5)


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
