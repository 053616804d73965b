"""The output layer and its softmax cross-entropy in one differentiable op.

GPT's and the Transformer's output layer is the transposed token embedding (Press & Wolf
2017; Vaswani et al. 2017, sec. 3.4), and at small model widths it is the largest matmul of
the step: logits_BLV = x_BLD E_VD^T. Written naively (logits, then log_softmax, then
take_along_axis, then argmax for the accuracy), autodiff walks the B,L,V logits many times:
a scatter for the gathered target, a broadcast for the smoothing term, a separate argmax
pass, and a transposed copy of the logit gradient for the embedding gradient.

`tied_cross_entropy` is one custom-VJP op. The forward pass keeps the fp32 logits and their
log-sum-exp; the backward pass forms the logit gradient in one elementwise pass,

  d loss / d logits = g_s (p - (1 - eps) onehot(t) - eps / V) + g_n (p - onehot(t)),

(p = softmax(logits); g_s and g_n are the cotangents of the smoothed and the plain
cross-entropy), then two matmuls give the gradients of x and of E. Label smoothing follows
Szegedy et al. 2016 (sec. 7): the target puts 1 - eps on the reference token and eps / V
everywhere, so the smoothed loss is (1 - eps) nll + eps (lse - mean(logits)).

Both passes walk the sequence in chunks of `chunk_length` positions (all rows of the batch
at once), so each chunk's logits and logit gradient are formed, reduced and multiplied while
they are still in cache instead of streaming the whole B x L x V array through memory
between separate passes. The default chunk keeps one chunk's logits within 32 MiB on CPU (a
size that fits the caches and still gives large matmuls); on accelerators it is the whole
sequence.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

_ROWS_BY_COLUMNS = (((1,), (1,)), ((), ()))  # a @ b.T
_COLUMNS_BY_COLUMNS = (((0,), (0,)), ((), ()))  # a.T @ b
# Logits per chunk (batch rows x chunk length x vocab) by platform: 32 MiB of fp32 on CPU.
_CHUNK_LOGITS = {"cpu": 2 ** 23}


def default_chunk_length(batch, length, vocab, platform=None):
    """The largest divisor of `length` whose chunk (batch x chunk x vocab logits) fits the
    platform's budget; at least 1, and `length` itself off CPU."""
    budget = _CHUNK_LOGITS.get(platform or jax.default_backend())
    if budget is None:
        return length
    fits = [c for c in range(1, length + 1) if length % c == 0 and batch * c * vocab <= budget]
    return max(fits, default=1)


def tied_cross_entropy(x_BLD, embedding_VD, targets_BL, label_smoothing=0.0,
                       chunk_length=None, *, bias_V=None, vocab_size=None):
    """(smoothed loss, cross-entropy, correct) per position for logits = x E^T (+ bias), fp32.

    `correct` is 1.0 where the target's logit is the largest (the argmax accuracy; an exact
    tie with another token also counts) and carries no gradient. `chunk_length` (a divisor
    of L; default: default_chunk_length) only changes speed, not the numbers. `vocab_size`
    below E's row count marks the rows past it as vocabulary padding: their logits are
    masked out of the softmax and of the smoothing term, so they get no gradient either.
    """
    batch, length, _ = x_BLD.shape
    rows = embedding_VD.shape[0]
    if chunk_length is None:
        chunk_length = default_chunk_length(batch, length, rows)
    if length % chunk_length:
        raise ValueError(f"chunk_length {chunk_length} does not divide the length {length}")
    return _tied_cross_entropy(x_BLD, embedding_VD, bias_V, targets_BL,
                               float(label_smoothing), chunk_length, int(vocab_size or rows))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _tied_cross_entropy(x_BLD, embedding_VD, bias_V, targets_BL, eps, chunk, valid):
    out, _ = _forward(x_BLD, embedding_VD, bias_V, targets_BL, eps, chunk, valid)
    return out


def _chunk(a, i, chunk):
    """Positions [i * chunk, (i + 1) * chunk) of every row of a (B, L, ...) array, flattened
    to (B * chunk, ...)."""
    part = lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=1)
    return part.reshape(-1, *a.shape[2:])


def _unchunk(stacked, batch):
    """(K, B * chunk, ...) chunk results back to (B, K * chunk, ...)."""
    k, n = stacked.shape[:2]
    parts = stacked.reshape(k, batch, n // batch, *stacked.shape[2:])
    return jnp.moveaxis(parts, 0, 1).reshape(batch, k * (n // batch), *stacked.shape[2:])


def _valid_columns(rows, valid):
    """Boolean V mask of the real vocabulary, or None when there is no padding."""
    return None if valid >= rows else jnp.arange(rows) < valid


def _forward(x_BLD, embedding_VD, bias_V, targets_BL, eps, chunk, valid):
    batch, length, _ = x_BLD.shape
    # Products in the compute dtype (XLA:CPU has no bf16 x bf16 -> fp32 dot), softmax in fp32.
    embedding_VD_c = embedding_VD.astype(x_BLD.dtype)
    columns_V = _valid_columns(embedding_VD.shape[0], valid)

    def step(_, i):
        logits_NV = lax.dot_general(_chunk(x_BLD, i, chunk), embedding_VD_c,
                                    _ROWS_BY_COLUMNS).astype(jnp.float32)
        if bias_V is not None:
            logits_NV = logits_NV + bias_V.astype(jnp.float32)
        if columns_V is None:
            mean_N = jnp.mean(logits_NV, axis=-1)
        else:
            mean_N = jnp.sum(jnp.where(columns_V, logits_NV, 0.0), axis=-1) / valid
            logits_NV = jnp.where(columns_V, logits_NV, jnp.finfo(jnp.float32).min)
        max_N = jnp.max(logits_NV, axis=-1)
        lse_N = max_N + jnp.log(jnp.sum(jnp.exp(logits_NV - max_N[:, None]), axis=-1))
        target_N = jnp.take_along_axis(logits_NV, _chunk(targets_BL, i, chunk)[:, None],
                                       axis=-1)[:, 0]
        return None, (logits_NV, (lse_N, target_N, max_N, mean_N))

    # The logits stay stacked by chunk, (K, B * chunk, V): the backward pass walks them in
    # the same order, so they are never laid out as (B, L, V).
    _, (logits_KNV, stats) = lax.scan(step, None, jnp.arange(length // chunk))
    lse_BL, target_BL, max_BL, mean_BL = (_unchunk(s, batch) for s in stats)
    nll_BL = lse_BL - target_BL
    smoothed_BL = (1.0 - eps) * nll_BL + eps * (lse_BL - mean_BL)
    correct_BL = (target_BL >= max_BL).astype(jnp.float32)
    return (smoothed_BL, nll_BL, correct_BL), (x_BLD, embedding_VD, bias_V, targets_BL,
                                               logits_KNV, lse_BL)


def _backward(eps, chunk, valid, residuals, cotangents):
    x_BLD, embedding_VD, bias_V, targets_BL, logits_KNV, lse_BL = residuals
    g_smoothed_BL, g_nll_BL, _ = cotangents
    batch, length, dim = x_BLD.shape
    vocab = embedding_VD.shape[0]
    embedding_VD_c = embedding_VD.astype(x_BLD.dtype)
    columns_V = _valid_columns(vocab, valid)
    # The smoothing target's eps / V share, on the real vocabulary only.
    smooth_V = (jnp.full((vocab,), eps / valid, jnp.float32) if columns_V is None
                else jnp.where(columns_V, eps / valid, 0.0))

    def step(carry, inputs):
        dembedding_DV, dbias_V = carry
        i, logits_NV = inputs
        g_s_N, g_n_N = _chunk(g_smoothed_BL, i, chunk), _chunk(g_nll_BL, i, chunk)
        p_NV = jnp.exp(logits_NV - _chunk(lse_BL, i, chunk)[:, None])
        onehot_NV = (jnp.arange(vocab, dtype=targets_BL.dtype)
                     == _chunk(targets_BL, i, chunk)[:, None])
        dlogits_NV = ((g_s_N + g_n_N)[:, None] * p_NV
                      - jnp.where(onehot_NV, ((1.0 - eps) * g_s_N + g_n_N)[:, None], 0.0)
                      - smooth_V * g_s_N[:, None])
        dbias_V += jnp.sum(dlogits_NV, axis=0)
        dlogits_NV = dlogits_NV.astype(x_BLD.dtype)
        # E's gradient as (x^T dlogits)^T: the big operand stays in its row-major layout.
        dembedding_DV += lax.dot_general(_chunk(x_BLD, i, chunk), dlogits_NV,
                                         _COLUMNS_BY_COLUMNS).astype(jnp.float32)
        return (dembedding_DV, dbias_V), dlogits_NV @ embedding_VD_c

    (dembedding_DV, dbias_V), dx_KND = lax.scan(
        step, (jnp.zeros((dim, vocab), jnp.float32), jnp.zeros((vocab,), jnp.float32)),
        (jnp.arange(length // chunk), logits_KNV))
    dtargets = jnp.zeros(targets_BL.shape, jax.dtypes.float0)
    dbias_V = None if bias_V is None else dbias_V.astype(bias_V.dtype)
    return (_unchunk(dx_KND, batch), dembedding_DV.T.astype(embedding_VD.dtype), dbias_V,
            dtargets)


_tied_cross_entropy.defvjp(_forward, _backward)
