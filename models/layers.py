"""Shared Transformer layers: projections, feed-forward, embeddings, norms (Vaswani et al. 2017,
sec. 3.3-3.5).

BERT, GPT and the encoder-decoder Transformer are all built from these pieces, with attention
in models/attention.py and the residual block and its stack in models/blocks.py. Every
parameter carries logical axis names (the constants below); `train/sharding.py` maps them onto
mesh axes.

Shape-letter key used for tensor names across `models/`:
  B batch, L query/target length, S key/source length, D model width, H heads,
  K head dim (d_k), F feed-forward width, V vocabulary.
"""
import dataclasses
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
KV_HEADS = "kv_heads"  # the key/value heads of grouped-query attention (fewer than HEADS)
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
    use_bias: bool = True  # Llama-style projections have none

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[-self.in_dims:]
        kernel = self.param("kernel", partitioned(nn.initializers.normal(0.02), self.names),
                            in_shape + tuple(self.features), self.param_dtype)
        x = x.astype(self.dtype)
        y = _contract(x, kernel.astype(self.dtype), self.in_dims)
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros,
                                                  self.names[self.in_dims:]),
                              tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
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


class ModelConfig:
    """What every model config dataclass (GPTConfig, LlamaConfig, BertConfig, ...) shares:
    built from its `config.model` section, and a vocabulary padded to `vocab_multiple`."""

    @property
    def table_size(self) -> int:
        """Rows of the token embedding (and width of the logits)."""
        return padded_vocab_size(self.vocab_size, self.vocab_multiple)

    @classmethod
    def from_config(cls, model_config, **overrides):
        """Builds the dataclass from an ml_collections section, ignoring non-model keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in model_config.items() if k in names}
        return cls(**{**values, **overrides})


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
    use_bias: bool = True

    def _dense(self, features, names, name):
        rank = self.lora_rank if name in self.lora_targets else 0
        return Projection((features,), names, lora_rank=rank, lora_alpha=self.lora_alpha,
                          use_bias=self.use_bias, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)

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


def decoder_positions(module, tokens_BL, positions_BL, segment_ids_BL, decode: bool):
    """A decoder's (GPT's, Llama's) token positions B,L: the given ones, else 0..L-1 in each
    row, or in decode mode counted in `module`'s "cache" collection (cache_positions)."""
    if decode:
        return cache_positions(module, tokens_BL, segment_ids_BL)
    if positions_BL is None:
        return jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    return positions_BL


def cache_positions(module, tokens_BL, segment_ids_BL=None):
    """Decode-mode positions B,L, kept in `module`'s "cache" collection: per row they continue
    from the number of real tokens already in the KV cache.

    A real token's position counts only the real tokens before it, so a left-padded prompt
    is positioned as if it were alone; padding (segment id 0) gets position 0, its outputs
    are never used. The cache's write index is shared by all rows, positions are not.
    """
    b, length = tokens_BL.shape
    initialized = module.has_variable("cache", "position")
    position = module.variable("cache", "position", lambda: jnp.zeros(b, jnp.int32))
    start_B = position.value if initialized else jnp.zeros(b, jnp.int32)
    if segment_ids_BL is None:
        positions_BL = start_B[:, None] + jnp.arange(length)
        count_B = length
    else:
        real_BL = segment_ids_BL != 0
        before_BL = jnp.cumsum(real_BL, axis=1, dtype=jnp.int32) - 1
        positions_BL = jnp.where(real_BL, start_B[:, None] + before_BL, 0)
        count_B = jnp.sum(real_BL, axis=1, dtype=jnp.int32)
    if initialized:
        position.value = start_B + count_B
    return positions_BL


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


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w over the last axis (Zhang & Sennrich 2019, eq. 4).

    No mean subtraction and no bias: cheaper than LayerNorm and as good in Llama-style
    decoders. The statistics run in fp32 whatever the compute dtype. `offset` 1 is Gemma's
    (1 + w) parameterisation, whose w starts at 0; there the product is taken in fp32 before the
    cast back, Llama casts first and then scales (the order each family's checkpoint expects).
    """
    epsilon: float = 1e-6
    offset: float = 0.0
    names: tuple = (EMBED,)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", partitioned(init, self.names), (x.shape[-1],),
                           self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        if self.offset:
            return (normed * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class GatedFeedForward(FeedForward):
    """FFN(x) = (act(x W_gate) * (x W_up)) W_down: the gated linear unit of Shazeer 2020
    (SwiGLU with SiLU: Llama, Qwen, Mistral; GeGLU with tanh GELU: Gemma).

    Three matrices of width F instead of two; the published models shrink F to about 8/3 D so
    the parameter count matches a 4 D plain feed-forward. FeedForward's fields, without biases
    by default; LoRA adapters go on those of gate, up, down named in lora_targets.
    """
    activation: str = "silu"
    use_bias: bool = False

    @nn.compact
    def __call__(self, x_BLD, deterministic=True):
        act = ACTIVATIONS[self.activation]
        gate_BLF = act(self._dense(self.d_ff, (EMBED, MLP), "gate")(x_BLD))
        h_BLF = gate_BLF * self._dense(self.d_ff, (EMBED, MLP), "up")(x_BLD)
        h_BLF = nn.with_logical_constraint(h_BLF, (BATCH, LENGTH, MLP))
        h_BLF = nn.Dropout(self.dropout_rate)(h_BLF, deterministic=deterministic)
        return self._dense(x_BLD.shape[-1], (MLP, EMBED), "down")(h_BLF)


ROPE_TYPES = ("default", "linear", "llama3")


def rope_frequencies(head_dim: int, theta: float, rope_type: str = "default",
                     factor: float = 1.0, low_freq_factor: float = 1.0,
                     high_freq_factor: float = 4.0, original_max_len: int = 8192) -> np.ndarray:
    """The K/2 inverse frequencies theta^(-2i/K) of rotary embeddings (Su et al. 2021, eq. 15),
    float32, with a context-extension rule applied.

    "linear" divides every frequency by `factor` (position interpolation, Chen et al. 2023).
    "llama3" (Llama 3.1) divides only the low frequencies, those whose wavelength exceeds
    original_max_len / low_freq_factor, keeps those below original_max_len / high_freq_factor,
    and blends linearly in wavelength-inverse between the two.
    """
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unknown rope type {rope_type!r}; use one of {ROPE_TYPES}")
    # float32 throughout, as the published checkpoints' reference code computes them.
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
    if rope_type == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32)
    if rope_type == "llama3":
        wavelen = np.float32(2 * np.pi) / inv_freq
        low_wavelen = original_max_len / low_freq_factor
        high_wavelen = original_max_len / high_freq_factor
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
        smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor
                                                                    - low_freq_factor)
        blended = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, blended, scaled).astype(np.float32)
    return inv_freq


def rotary_angles(positions_BL, inv_freq, dtype=jnp.float32):
    """(cos, sin) B,L,K of positions times the frequencies, each frequency used twice (the
    two halves of a head are the pairs that rotate together; see apply_rotary)."""
    freqs_BLI = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles_BLK = jnp.concatenate([freqs_BLI, freqs_BLI], axis=-1)
    return jnp.cos(angles_BLK).astype(dtype), jnp.sin(angles_BLK).astype(dtype)


def apply_rotary(x_BLHK, cos_BLK, sin_BLK):
    """x rotated by its position: feature i pairs with feature i + K/2 ("half" layout, the one
    the Llama-family checkpoints use), so q.k depends only on the positions' difference."""
    half = x_BLHK.shape[-1] // 2
    rotated = jnp.concatenate([-x_BLHK[..., half:], x_BLHK[..., :half]], axis=-1)
    cos, sin = cos_BLK[:, :, None, :].astype(x_BLHK.dtype), sin_BLK[:, :, None, :].astype(
        x_BLHK.dtype)
    return x_BLHK * cos + rotated * sin
