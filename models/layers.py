"""Shared Transformer layers: attention, feed-forward, embeddings (Vaswani et al. 2017, sec. 3).

BERT, GPT and the encoder-decoder Transformer are all built from these pieces. Every parameter
carries logical axis names (the constants below); `train/sharding.py` maps them onto mesh axes.

Shape-letter key used for tensor names across `models/`:
  B batch, L query/target length, S key/source length, D model width, H heads,
  K head dim (d_k), F feed-forward width, V vocabulary.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import lora

# Logical axis names. Only train/sharding.py knows which mesh axes they land on.
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
HEADS = "heads"
KV = "kv"
MLP = "mlp"
VOCAB = "vocab"
POSITION = "position"
LAYERS = "layers"  # the leading axis of scanned (stacked) layer parameters; never sharded
LORA = "lora_rank"  # the rank axis of LoRA adapters (Projection); in no sharding rule: never split

Dtype = Any


def partitioned(init, names):
    """Wraps an initializer so the parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, names)


def make_attention_mask(q_segment_BL=None, kv_segment_BS=None, *, causal=False, q_len=None,
                        kv_len=None, q_offset=0):
    """Boolean mask B,1,L,S: True where query l may attend to key s.

    Segment ids implement both padding (segment 0 is padding and is never attended to) and
    packing (several documents in one row attend only within their own segment). `causal`
    compares row indices, offset by `q_offset` when the queries continue a cached prefix.
    """
    mask = None
    if q_segment_BL is not None:
        kv_segment_BS = q_segment_BL if kv_segment_BS is None else kv_segment_BS
        same = q_segment_BL[:, :, None] == kv_segment_BS[:, None, :]
        mask = same & (kv_segment_BS != 0)[:, None, :]
        q_len, kv_len = q_segment_BL.shape[1], kv_segment_BS.shape[1]
    if causal:
        q_idx = q_offset + jnp.arange(q_len)
        future = q_idx[:, None] >= jnp.arange(kv_len)[None, :]
        mask = future[None] if mask is None else mask & future[None]
    return None if mask is None else mask[:, None, :, :]


def reference_attention(q_BLHK, k_BSHK, v_BSHK, mask_B1LS=None, dropout_fn=None,
                        heads_first_kv=False, weights_fn=None):
    """softmax(Q K^T / sqrt(d_k) + M) V per head, written out (sec. 3.2.1).

    The 1/sqrt(d_k) keeps the dot products' variance near 1 so the softmax does not saturate.
    The softmax runs in float32 whatever the compute dtype. With `heads_first_kv` the keys and
    values are laid out B,H,S,K (the KV cache's layout). `weights_fn` sees the attention
    weights B,H,L,S (experiments/attention.py records them for its heatmaps).
    """
    kv = "bhsk" if heads_first_kv else "bshk"
    scale = 1.0 / np.sqrt(q_BLHK.shape[-1])
    # Accumulated and returned in fp32, so bf16 inputs are not rounded before the softmax.
    logits_BHLS = jnp.einsum(f"blhk,{kv}->bhls", q_BLHK, k_BSHK,
                             preferred_element_type=jnp.float32) * scale
    if mask_B1LS is not None:
        # A large finite negative rather than -inf: a fully masked (padding) row stays finite.
        logits_BHLS = jnp.where(mask_B1LS, logits_BHLS, jnp.finfo(jnp.float32).min)
    weights_BHLS = jax.nn.softmax(logits_BHLS, axis=-1).astype(v_BSHK.dtype)
    if weights_fn is not None:
        weights_fn(weights_BHLS)
    if dropout_fn is not None:
        weights_BHLS = dropout_fn(weights_BHLS)
    return jnp.einsum(f"bhls,{kv}->blhk", weights_BHLS, v_BSHK)


def _contract(x, w, n):
    """x's last n axes against w's first n: x @ w for N-d operands."""
    axes = tuple(range(x.ndim - n, x.ndim))
    return jax.lax.dot_general(x, w, ((axes, tuple(range(n))), ((), ())))


class Projection(nn.Module):
    """x W + b contracting the last `in_dims` axes; the kernel keeps its full N-d shape.

    Keeping W_Q as D,H,K (rather than D,H*K) lets heads be sharded by name for tensor
    parallelism; `names` are the logical axes of the kernel, the last ones also name the bias.

    With `lora_rank` r > 0 a low-rank update joins the frozen W (LoRA, Hu et al. 2021, sec. 4.1):
    y = x W + b + (alpha / r) (x A) B, A in_shape,r and B r,features. B starts at zero, so the
    adapted model starts as the base model exactly; A ~ N(0, 1/fan_in), so x A keeps x's scale
    whatever the width. A and B carry W's input / output axis names around LORA, so they are
    sharded like W. models/lora.py splits them off for training and merges them into W.
    """
    features: tuple
    names: tuple
    in_dims: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the update is scaled by alpha / rank (sec. 4.1)

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[-self.in_dims:]
        kernel = self.param("kernel", partitioned(nn.initializers.normal(0.02), self.names),
                            in_shape + tuple(self.features), self.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros,
                                              self.names[self.in_dims:]),
                          tuple(self.features), self.param_dtype)
        x = x.astype(self.dtype)
        y = _contract(x, kernel.astype(self.dtype), self.in_dims) + bias.astype(self.dtype)
        if self.lora_rank > 0:  # created after kernel and bias, so their init is unchanged
            y = y + self._low_rank_update(x, in_shape)
        return y

    def _low_rank_update(self, x, in_shape):
        """(alpha / r) (x A) B; the scale applies to x A, the smaller of the two products."""
        n, r, names = self.in_dims, self.lora_rank, tuple(self.names)
        std = 1.0 / np.sqrt(np.prod(in_shape))
        a = self.param("lora_a", partitioned(nn.initializers.normal(std), names[:n] + (LORA,)),
                       in_shape + (r,), self.param_dtype)
        b = self.param("lora_b", partitioned(nn.initializers.zeros, (LORA,) + names[n:]),
                       (r,) + tuple(self.features), self.param_dtype)
        xa = _contract(x, a.astype(self.dtype), n) * (self.lora_alpha / r)
        return _contract(xa, b.astype(self.dtype), 1)


class MultiHeadAttention(nn.Module):
    """Z = W_O concat(Z_1..Z_H), Z_h = attention(x W_Q^h, m W_K^h, m W_V^h) (sec. 3.2.2).

    Self-attention when `kv_BSD` is None, cross-attention otherwise. With `decode=True` the
    keys/values of earlier calls are kept in the 'cache' collection, so incremental decoding
    feeds only the new tokens. The cache length is fixed by the first (initialising) call.
    """
    num_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    implementation: str = "fast"  # jax.nn.dot_product_attention ("xla"/"cudnn" forced), or
    # "reference": the einsum path
    decode: bool = False
    # Causal self-attention in `query_blocks` query blocks, block i attending to keys up to
    # its own end: the same result with (n + 1) / 2n of the score work (5/8 at n = 4), for
    # backends whose attention computes every masked score (XLA:CPU). 1 = off.
    query_blocks: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # LoRA adapters (Projection) of rank lora_rank on the projections named in lora_targets
    # among query, key, value, out; 0: none.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple = lora.TARGETS

    def _projection_kw(self, name):
        rank = self.lora_rank if name in self.lora_targets else 0
        return dict(lora_rank=rank, lora_alpha=self.lora_alpha, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=name)

    def _project(self, x, name):
        return Projection((self.num_heads, self.head_dim), (EMBED, HEADS, KV),
                          **self._projection_kw(name))(x)

    @nn.compact
    def __call__(self, x_BLD, kv_BSD=None, *, segment_ids_BL=None, kv_segment_ids_BS=None,
                 causal=False, deterministic=True, projected_kv=None, only_project_kv=False):
        """Attention output B,L,D; or, with only_project_kv, the keys and values of kv_BSD.

        Cross-attention in incremental decoding projects the encoder output once
        (only_project_kv) and passes the result back as projected_kv at every step.
        """
        if only_project_kv:
            return self._project(kv_BSD, "key"), self._project(kv_BSD, "value")
        q_BLHK = self._project(x_BLD, "query")
        if projected_kv is not None:
            k_BSHK, v_BSHK = projected_kv
        else:
            m_BSD = x_BLD if kv_BSD is None else kv_BSD
            k_BSHK = self._project(m_BSD, "key")
            v_BSHK = self._project(m_BSD, "value")

        if self.decode and kv_BSD is None and projected_kv is None:
            z_BLHK = self._cached_attention(q_BLHK, k_BSHK, v_BSHK, segment_ids_BL)
        else:
            z_BLHK = self._attention(q_BLHK, k_BSHK, v_BSHK, segment_ids_BL, kv_segment_ids_BS,
                                     causal, deterministic)
        return Projection((x_BLD.shape[-1],), (HEADS, KV, EMBED), in_dims=2,
                          **self._projection_kw("out"))(z_BLHK)

    def _attention(self, q_BLHK, k_BSHK, v_BSHK, segment_ids_BL, kv_segment_ids_BS, causal,
                   deterministic):
        """Full-sequence attention with causal / padding / packed-segment masking."""
        length, n = q_BLHK.shape[1], self.query_blocks
        if (causal and n > 1 and kv_segment_ids_BS is None and length == k_BSHK.shape[1]
                and length % n == 0 and not (self.dropout_rate > 0 and not deterministic)):
            return self._blocked_causal_attention(q_BLHK, k_BSHK, v_BSHK, segment_ids_BL,
                                                  deterministic)
        mask_B1LS = None
        if segment_ids_BL is not None or kv_segment_ids_BS is not None:
            q_seg = segment_ids_BL if segment_ids_BL is not None else jnp.ones(
                q_BLHK.shape[:2], jnp.int32)
            mask_B1LS = make_attention_mask(q_seg, kv_segment_ids_BS, causal=causal)
        return self._masked_attention(q_BLHK, k_BSHK, v_BSHK, mask_B1LS,
                                      causal and mask_B1LS is None, deterministic)

    def _masked_attention(self, q_BLHK, k_BSHK, v_BSHK, mask_B1LS, causal_only, deterministic):
        """The attention core on the configured implementation, with `mask_B1LS` (or a plain
        causal mask when `causal_only`)."""
        attn_dropout = self.dropout_rate > 0 and not deterministic
        # "fast" lets JAX pick; "xla" / "cudnn" force one (gpu_check times flash on vs off).
        fused = {"fast": None, "xla": "xla", "cudnn": "cudnn"}
        if self.implementation in fused and not attn_dropout:
            # XLA on CPU/TPU, cuDNN flash attention on GPUs when shapes and dtypes allow. With
            # bf16 inputs the XLA path (jax 0.10) accumulates Q K^T into fp32 and runs the
            # softmax in fp32, casting the weights to bf16 only for the product with V, as the
            # reference path does (tests/models/test_remat_scan_precision.py checks both).
            return jax.nn.dot_product_attention(q_BLHK, k_BSHK, v_BSHK, mask=mask_B1LS,
                                                is_causal=causal_only,
                                                implementation=fused[self.implementation])
        if self.implementation not in (*fused, "reference"):
            raise ValueError(f"unknown attention implementation {self.implementation!r}; "
                             "use 'fast', 'xla', 'cudnn' or 'reference'")
        if causal_only:
            mask_B1LS = make_attention_mask(causal=True, q_len=q_BLHK.shape[1],
                                            kv_len=k_BSHK.shape[1])
        dropout_fn = None
        if attn_dropout:  # dropout on the attention weights needs the explicit path
            dropout_fn = lambda w: nn.Dropout(self.dropout_rate)(w, deterministic=False)
        # Recorded only when the caller makes "intermediates" mutable (attention maps).
        return reference_attention(q_BLHK, k_BSHK, v_BSHK, mask_B1LS, dropout_fn,
                                   weights_fn=lambda w: self.sow("intermediates",
                                                                 "attention_weights", w))

    def _blocked_causal_attention(self, q_BLHK, k_BLHK, v_BLHK, segment_ids_BL, deterministic):
        """Causal self-attention computed per query block against the keys it can see."""
        length = q_BLHK.shape[1]
        size = length // self.query_blocks
        outputs = []
        for i in range(self.query_blocks):
            q, end = slice(i * size, (i + 1) * size), (i + 1) * size
            segments = None if segment_ids_BL is None else (segment_ids_BL[:, q],
                                                            segment_ids_BL[:, :end])
            mask_B1LS = make_attention_mask(*(segments or ()), causal=True, q_len=size,
                                            kv_len=end, q_offset=i * size)
            outputs.append(self._masked_attention(q_BLHK[:, q], k_BLHK[:, :end],
                                                  v_BLHK[:, :end], mask_B1LS, False,
                                                  deterministic))
        return jnp.concatenate(outputs, axis=1)

    def _cached_attention(self, q_BLHK, k_BLHK, v_BLHK, segment_ids_BL=None):
        """Incremental causal self-attention: appends the new keys/values to the cache and
        attends over every real token cached so far.

        The cache is stored heads-first (B,H,S,K): each step's q.k and p.v are then batched
        products over contiguous memory. With a B,S,H,K cache XLA transposed (copied) the whole
        cache at every step, which made CPU decoding about 5x slower per layer.

        `segment_ids_BL` 0 marks padding among the new tokens (prompts of different lengths
        left-padded into one batch); None: all are real. The cache holds one sequence per row,
        so only zero vs non-zero matters. Which slots hold real tokens is kept per row
        (`cached_valid`), so padding written by the prompt call stays masked at every later
        step, while all rows share one write index.
        """
        initialized = self.has_variable("cache", "cached_key")
        b, length, h, k = k_BLHK.shape
        cached_k = self.variable("cache", "cached_key", jnp.zeros, (b, h, length, k),
                                 k_BLHK.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, (b, h, length, k),
                                 v_BLHK.dtype)
        cached_valid = self.variable("cache", "cached_valid", jnp.zeros, (b, length), bool)
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        if not initialized:  # the init call only sizes the cache
            mask = make_attention_mask(causal=True, q_len=length, kv_len=length)
            return reference_attention(q_BLHK, k_BLHK, v_BLHK, mask)
        i = index.value
        cached_k.value = jax.lax.dynamic_update_slice(
            cached_k.value, k_BLHK.transpose(0, 2, 1, 3), (0, 0, i, 0))
        cached_v.value = jax.lax.dynamic_update_slice(
            cached_v.value, v_BLHK.transpose(0, 2, 1, 3), (0, 0, i, 0))
        valid_BL = (jnp.ones((b, length), bool) if segment_ids_BL is None
                    else segment_ids_BL != 0)
        cached_valid.value = jax.lax.dynamic_update_slice(cached_valid.value, valid_BL, (0, i))
        index.value = i + length
        # New token j sits at slot i + j and sees the real tokens among slots 0..i+j; slots past
        # the write head hold zeros and are masked by the same comparison. A left-padding query
        # sees no key at all: its output (finite: uniform attention) is never used. Without padding
        # the slot-is-real test removes nothing the causal one keeps, so the result is the
        # causal-only one bit for bit.
        mask = make_attention_mask(causal=True, q_len=length, kv_len=cached_k.value.shape[2],
                                   q_offset=i) & cached_valid.value[:, None, None, :]
        return reference_attention(q_BLHK, cached_k.value, cached_v.value, mask,
                                   heads_first_kv=True)


# GPT-2 used the tanh approximation of GELU; BERT's released code the exact erf form; Marian
# (opus-mt) models use SiLU / swish, x sigmoid(x) (Ramachandran et al. 2017).
ACTIVATIONS = {"relu": nn.relu, "gelu": lambda x: nn.gelu(x, approximate=True),
               "gelu_exact": lambda x: nn.gelu(x, approximate=False), "silu": nn.silu}


def padded_vocab_size(vocab_size: int, multiple: int = 1) -> int:
    """Rows of the embedding table: vocab_size rounded up to a multiple of `multiple`.

    A published vocabulary such as GPT-2's 50,257 tokens divides by no tensor-parallel degree;
    padded to 50,304 (multiple 128) its rows split evenly. The padded rows are never inputs
    and their logits are masked (mask_padded_logits), so losses and samples are unchanged.
    """
    return -(-vocab_size // multiple) * multiple


def mask_padded_logits(logits_BLV, vocab_size: int):
    """Logits with the entries of padded vocabulary rows (ids >= vocab_size) at the dtype's
    lowest value: softmax gives them probability 0, argmax never picks them."""
    if logits_BLV.shape[-1] == vocab_size:
        return logits_BLV
    valid = jnp.arange(logits_BLV.shape[-1]) < vocab_size
    return jnp.where(valid, logits_BLV, jnp.finfo(logits_BLV.dtype).min)


class FeedForward(nn.Module):
    """FFN(x) = act(x W_1 + b_1) W_2 + b_2, applied at each position (sec. 3.3).

    wi and wo are Projections with nn.Dense's parameters (kernel D,F / F,D and bias, same
    initialisers and numerics), so checkpoints written with nn.Dense load unchanged.
    """
    d_ff: int
    activation: str = "gelu"  # "relu": the Transformer; "gelu": GPT-2; "gelu_exact": BERT
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0  # LoRA adapters on those of wi, wo named in lora_targets; 0: none
    lora_alpha: float = 16.0
    lora_targets: tuple = lora.TARGETS

    def _dense(self, features, names, name):
        rank = self.lora_rank if name in self.lora_targets else 0
        return Projection((features,), names, lora_rank=rank, lora_alpha=self.lora_alpha,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x_BLD, deterministic=True):
        act = ACTIVATIONS[self.activation]
        h_BLF = self._dense(self.d_ff, (EMBED, MLP), "wi")(x_BLD)
        h_BLF = nn.with_logical_constraint(act(h_BLF), (BATCH, LENGTH, MLP))
        h_BLF = nn.Dropout(self.dropout_rate)(h_BLF, deterministic=deterministic)
        return self._dense(x_BLD.shape[-1], (MLP, EMBED), "wo")(h_BLF)


def layer_norm(name, dtype=jnp.float32, param_dtype=jnp.float32, epsilon=1e-5):
    """LayerNorm whose scale and bias carry the `embed` axis name."""
    return nn.LayerNorm(
        epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=partitioned(nn.initializers.ones, (EMBED,)),
        bias_init=partitioned(nn.initializers.zeros, (EMBED,)))


def token_embedding(vocab_size, d_model, name, dtype=jnp.float32, param_dtype=jnp.float32,
                    stddev=0.02):
    """Token lookup table; its `attend` gives output logits when input/output are tied."""
    return nn.Embed(vocab_size, d_model, dtype=dtype, param_dtype=param_dtype, name=name,
                    embedding_init=partitioned(nn.initializers.normal(stddev), (VOCAB, EMBED)))


class LearnedPositionEmbedding(nn.Module):
    """A trained vector per position (GPT, BERT)."""
    max_len: int
    d_model: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, positions_BL):
        table = self.param("embedding", partitioned(nn.initializers.normal(0.01),
                                                    (POSITION, EMBED)),
                           (self.max_len, self.d_model), self.param_dtype)
        return jnp.take(table, positions_BL, axis=0).astype(self.dtype)


POSITION_LAYOUTS = ("interleaved", "split")


def sinusoidal_positions(positions_BL, d_model, dtype=jnp.float32, layout="interleaved",
                         max_len=None):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...) (sec. 3.5).

    "interleaved": sines and cosines alternate as in the paper's formula, so each frequency
    occupies an adjacent (sin, cos) pair and PE(pos + k) is a rotation of PE(pos). "split":
    all sines, then all cosines (the layout of Marian / opus-mt checkpoints); the same values
    in another order. With `max_len` the table is computed once in float64 and looked up, so
    the values are the correctly rounded ones whatever the position (fp32 angles lose about
    1e-7 of the angle, i.e. ~1e-5 at position 100).
    """
    if layout not in POSITION_LAYOUTS:
        raise ValueError(f"unknown position layout {layout!r}; use one of {POSITION_LAYOUTS}")
    half = d_model // 2
    inv_freq = 1.0 / (10000.0 ** (2.0 * np.arange(half) / d_model))

    def arrange(xp, angles):
        sin, cos = xp.sin(angles), xp.cos(angles)
        if layout == "split":
            return xp.concatenate([sin, cos], -1)
        return xp.stack([sin, cos], -1).reshape(angles.shape[:-1] + (d_model,))

    if max_len is not None:
        table = arrange(np, np.arange(max_len, dtype=np.float64)[:, None] * inv_freq)
        return jnp.take(jnp.asarray(table, dtype), positions_BL, axis=0)
    angles_BLI = positions_BL.astype(jnp.float32)[..., None] * inv_freq.astype(np.float32)
    return arrange(jnp, angles_BLI).astype(dtype)


class SelfAttentionBlock(nn.Module):
    """One self-attention + feed-forward layer with residuals, pre- or post-LayerNorm.

    Post-LN (the paper, BERT): x = LN(x + Sublayer(x)). Pre-LN (GPT-2): x = x + Sublayer(LN(x)),
    which keeps an identity path through the residual stream and trains deep stacks without
    a long warmup. Sub-module names follow GPT-2's checkpoint (ln_1, attn, ln_2, mlp).
    """
    num_heads: int
    d_ff: int
    pre_ln: bool = True
    causal: bool = False
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    implementation: str = "fast"
    decode: bool = False
    query_blocks: int = 1  # MultiHeadAttention.query_blocks
    ln_epsilon: float = 1e-5  # BERT used 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0  # LoRA adapters on the lora_targets projections (Projection); 0: none
    lora_alpha: float = 16.0
    lora_targets: tuple = lora.TARGETS

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL=None, deterministic=True):
        d_model = x_BLD.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        adapters = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                        lora_targets=self.lora_targets)
        attn = MultiHeadAttention(self.num_heads, d_model // self.num_heads,
                                  dropout_rate=self.attention_dropout_rate,
                                  implementation=self.implementation, decode=self.decode,
                                  query_blocks=self.query_blocks, name="attn", **adapters, **kw)
        mlp = FeedForward(self.d_ff, self.activation, self.dropout_rate, name="mlp", **adapters,
                          **kw)
        drop = nn.Dropout(self.dropout_rate)
        ln_1 = layer_norm("ln_1", epsilon=self.ln_epsilon, **kw)
        ln_2 = layer_norm("ln_2", epsilon=self.ln_epsilon, **kw)

        def attend(h):
            return attn(h, segment_ids_BL=segment_ids_BL, causal=self.causal,
                        deterministic=deterministic)

        if self.pre_ln:
            x_BLD = x_BLD + drop(attend(ln_1(x_BLD)), deterministic=deterministic)
            x_BLD = x_BLD + drop(mlp(ln_2(x_BLD), deterministic), deterministic=deterministic)
        else:
            x_BLD = ln_1(x_BLD + drop(attend(x_BLD), deterministic=deterministic))
            x_BLD = ln_2(x_BLD + drop(mlp(x_BLD, deterministic), deterministic=deterministic))
        return nn.with_logical_constraint(x_BLD, (BATCH, LENGTH, EMBED))


# config.model.remat -> what the backward pass may keep from the forward pass of each block.
# "dots_saveable" keeps the outputs of the matmuls against weights (Q, K, V, output and
# feed-forward projections: dots with no batch dimensions) and recomputes the rest. Plain
# jax.checkpoint_policies.dots_saveable would also keep the batched Q K^T and P V products,
# i.e. the B,H,L,S attention matrices that dominate activation memory at long context.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def self_attention_stack(x_BLD, segment_ids_BL, deterministic, *, num_layers, name,
                         remat="none", scan_layers=False, **block_kwargs):
    """x through `num_layers` SelfAttentionBlocks, created in the calling module's scope.

    Unscanned, the blocks are `{name}_0`, `{name}_1`, ... Scanned, one block `name` runs under
    nn.scan with every parameter stacked on a leading LAYERS axis, so XLA compiles one layer
    instead of `num_layers` (compile time stops growing with depth). A KV cache is stacked the
    same way. `remat` wraps each block in jax.checkpoint with a REMAT_POLICIES policy; neither
    option changes the parameters' names or values, only their layout (scan) or what is
    recomputed (remat).
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown config.model.remat {remat!r}; use one of "
                         f"{sorted(REMAT_POLICIES)}")
    block_cls = SelfAttentionBlock
    if remat != "none":
        # deterministic (argument 3, counting self) is a Python bool choosing code paths, so
        # it must stay static. scan already keeps XLA from merging recomputation with the
        # forward pass, which is what prevent_cse guards against otherwise.
        block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], static_argnums=(3,),
                             prevent_cse=not scan_layers)
    if not scan_layers:
        for i in range(num_layers):
            x_BLD = block_cls(name=f"{name}_{i}", **block_kwargs)(x_BLD, segment_ids_BL,
                                                                   deterministic)
        return x_BLD

    def body(block, carry_BLD):
        return block(carry_BLD, segment_ids_BL, deterministic), None

    scanned = nn.scan(body, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True}, length=num_layers,
                      metadata_params={nn.PARTITION_NAME: LAYERS})
    x_BLD, _ = scanned(block_cls(name=name, **block_kwargs), x_BLD)
    return x_BLD
