"""The fused output layer + cross-entropy against the unfused computation it replaces."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import losses


@functools.partial(jax.jit, static_argnames=("vocab", "dim"))
def _inputs(vocab=37, dim=8):
    k = jax.random.split(jax.random.key(3), 3)
    x_BLD = jax.random.normal(k[0], (2, 5, dim))
    embedding_VD = jax.random.normal(k[1], (vocab, dim))
    targets_BL = jax.random.randint(k[2], (2, 5), 0, vocab)
    weights_BL = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
    return x_BLD, embedding_VD, targets_BL, weights_BL


def _reference(x_BLD, embedding_VD, targets_BL, eps):
    """Logits, then optax's cross-entropy against the smoothed one-hot target."""
    logits_BLV = x_BLD @ embedding_VD.T
    vocab = logits_BLV.shape[-1]
    soft_BLV = optax.smooth_labels(jax.nn.one_hot(targets_BL, vocab), eps)
    smoothed_BL = optax.softmax_cross_entropy(logits_BLV, soft_BLV)
    nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
    correct_BL = (jnp.argmax(logits_BLV, -1) == targets_BL).astype(jnp.float32)
    return smoothed_BL, nll_BL, correct_BL


@pytest.mark.parametrize("eps,chunk_length", [(0.0, None), (0.1, None), (0.1, 1)])
def test_values_and_gradients_match_the_unfused_loss(eps, chunk_length):
    """chunk_length=1 walks the 5 positions in 5 chunks; None is one chunk at this size."""
    x_BLD, embedding_VD, targets_BL, weights_BL = _inputs()
    # Make a few targets the argmax so that `correct` is not trivially all zeros.
    targets_BL = jax.jit(lambda x, e, t: t.at[0, :2].set(jnp.argmax(x[0, :2] @ e.T, -1)))(
        x_BLD, embedding_VD, targets_BL)

    def objective(fn, **kw):
        def f(x, e):
            smoothed, nll, correct = fn(x, e, targets_BL, eps, **kw)
            # Different weights on the two losses exercise both cotangents.
            return jnp.sum(smoothed * weights_BL) + 0.3 * jnp.sum(nll * weights_BL), correct
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

    (ours, ours_correct), ours_grads = jax.jit(objective(
        losses.tied_cross_entropy, chunk_length=chunk_length))(x_BLD, embedding_VD)
    (ref, ref_correct), ref_grads = jax.jit(objective(_reference))(x_BLD, embedding_VD)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    np.testing.assert_array_equal(ours_correct, ref_correct)
    assert ref_correct.sum() >= 2
    for g, r in zip(ours_grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_smoothed_loss_by_hand():
    """Two tokens, logits (0, log 3): p = (1/4, 3/4); target 1, eps 0.2 gives
    q = (0.1, 0.9): loss = -(0.1 log 1/4 + 0.9 log 3/4)."""
    x = jnp.array([[[1.0]]])
    embedding = jnp.array([[0.0], [np.log(3.0)]])
    smoothed, nll, correct = jax.jit(lambda x, e, t: losses.tied_cross_entropy(x, e, t, 0.2))(
        x, embedding, jnp.array([[1]]))
    np.testing.assert_allclose(smoothed, [[-(0.1 * np.log(0.25) + 0.9 * np.log(0.75))]],
                               rtol=1e-6)
    np.testing.assert_allclose(nll, [[-np.log(0.75)]], rtol=1e-6)
    assert correct.tolist() == [[1.0]]


def test_bfloat16_inputs_give_float32_losses_and_input_dtype_gradients():
    x_BLD, embedding_VD, targets_BL, _ = _inputs()
    x16 = x_BLD.astype(jnp.bfloat16)
    smoothed, _, _ = jax.jit(lambda x, e, t: losses.tied_cross_entropy(x, e, t, 0.1))(
        x16, embedding_VD, targets_BL)
    assert smoothed.dtype == jnp.float32
    gx, ge = jax.jit(jax.grad(
        lambda x, e: jnp.sum(losses.tied_cross_entropy(x, e, targets_BL, 0.1)[0]),
        argnums=(0, 1)))(x16, embedding_VD)
    assert gx.dtype == jnp.bfloat16 and ge.dtype == jnp.float32
    ref = jax.jit(lambda x, e, t: _reference(x, e, t, 0.1)[0])(x_BLD, embedding_VD, targets_BL)
    np.testing.assert_allclose(smoothed, ref, rtol=3e-2)


def test_default_chunks_fit_the_cpu_budget_and_divide_the_length():
    # 16 x 256 x 8192 logits are 128 MiB; 64 positions (32 MiB) is the largest divisor that fits.
    assert losses.default_chunk_length(16, 256, 8192, "cpu") == 64
    assert losses.default_chunk_length(16, 256, 8192, "gpu") == 256
    assert losses.default_chunk_length(1, 7, 2 ** 23, "cpu") == 1  # never below one position
    with pytest.raises(ValueError, match="does not divide"):
        losses.tied_cross_entropy(*_inputs()[:3], 0.0, chunk_length=2)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_padded_vocabulary_and_logit_bias_equal_the_unpadded_loss(eps):
    """Rows past vocab_size (vocabulary padding) change neither the loss nor any gradient of
    the real rows, and get zero gradient; a logit bias (Marian's final_logits_bias) gets the
    gradient of logits + bias written out."""
    x_BLD, embedding_VD, targets_BL, weights_BL = _inputs(vocab=37)

    @jax.jit
    def with_padding(embedding_VD):
        bias_V = jax.random.normal(jax.random.key(5), (37,))
        padded_VD = jnp.concatenate([embedding_VD,
                                     jax.random.normal(jax.random.key(6), (27, 8))])
        return bias_V, padded_VD, jnp.concatenate([bias_V, jnp.full((27,), 4.0)])
    bias_V, padded_VD, padded_bias_V = with_padding(embedding_VD)

    def objective(x, e, b, padded):
        if padded:
            out = losses.tied_cross_entropy(x, e, targets_BL, eps, bias_V=b, vocab_size=37)
        else:  # the bias written out, against optax's unfused loss
            logits = x @ e.T + b
            soft = optax.smooth_labels(jax.nn.one_hot(targets_BL, 37), eps)
            out = (optax.softmax_cross_entropy(logits, soft),
                   optax.softmax_cross_entropy_with_integer_labels(logits, targets_BL))
        return jnp.sum(out[0] * weights_BL) + 0.3 * jnp.sum(out[1] * weights_BL)

    grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2)), static_argnums=3)
    ref, (gx_ref, ge_ref, gb_ref) = grad(x_BLD, embedding_VD, bias_V, False)
    ours, (gx, ge, gb) = grad(x_BLD, padded_VD, padded_bias_V, True)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ge[:37], ge_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gb[:37], gb_ref, rtol=1e-4, atol=1e-6)
    assert not np.asarray(ge[37:]).any() and not np.asarray(gb[37:]).any()
