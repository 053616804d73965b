"""Multi-head attention: the fast and reference paths agree, query blocks change nothing, the
reference path is the softmax formula, masks are right."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention


def _attention_outputs(mask_kwargs, kv=None, seed=0):
    x = jax.random.normal(jax.random.key(seed), (2, 7, 16))
    outs = []
    for impl in ("fast", "reference"):
        mod = attention.MultiHeadAttention(num_heads=4, head_dim=4, implementation=impl)
        params = jax.jit(lambda x, kv: mod.init(jax.random.key(1), x, kv, **mask_kwargs))(x, kv)
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
        mod = attention.MultiHeadAttention(num_heads=4, head_dim=4, implementation=impl,
                                           query_blocks=blocks)
        params = jax.jit(mod.init)(jax.random.key(1), x)
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
    got = jax.jit(attention.reference_attention)(q, k, v)[0, :, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_mask_blocks_padding_other_segments_and_future():
    seg = jnp.array([[1, 1, 2, 0]])
    mask = np.asarray(jax.jit(lambda s: attention.make_attention_mask(s, causal=True))(seg))[0, 0]
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask, expected)
