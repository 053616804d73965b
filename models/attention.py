"""Multi-head attention (Vaswani et al. 2017, sec. 3.2): masks, the scaled dot-product core, the
KV cache.

One module serves self-attention (BERT, GPT, the Transformer's encoder and decoder) and the
decoder's cross-attention; causal, padding and packed-document masks all come from segment
ids. The projections are models/layers.py's Projection, so the parameter names (query, key,
value, out; kernel, bias, lora_a, lora_b) match what checkpoints and models/hf.py expect.
Tensor names follow the shape-letter key at the top of models/layers.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, lora


def make_attention_mask(q_segment_BL=None, kv_segment_BS=None, *, causal=False, q_len=None,
                        kv_len=None, q_offset=0, window=0):
    """Boolean mask B,1,L,S: True where query l may attend to key s.

    Segment ids implement both padding (segment 0 is padding and is never attended to) and
    packing (several documents in one row attend only within their own segment). `causal`
    compares row indices, offset by `q_offset` when the queries continue a cached prefix;
    a `window` > 0 also drops keys `window` or more rows back (sliding-window attention,
    Mistral: each query sees itself and the window - 1 keys before it).
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
        if window:
            future = future & (q_idx[:, None] - jnp.arange(kv_len)[None, :] < window)
        mask = future[None] if mask is None else mask & future[None]
    return None if mask is None else mask[:, None, :, :]


def reference_attention(q_BLHK, k_BSHK, v_BSHK, mask_B1LS=None, dropout_fn=None,
                        heads_first_kv=False, weights_fn=None):
    """softmax(Q K^T / sqrt(d_k) + M) V per head, written out (sec. 3.2.1).

    The 1/sqrt(d_k) keeps the dot products' variance near 1 so the softmax does not saturate.
    The softmax runs in float32 whatever the compute dtype. With `heads_first_kv` the keys and
    values are laid out B,H,S,K (the KV cache's layout). `weights_fn` sees the attention
    weights B,H,L,S (experiments/attention.py records them for its heatmaps).

    Keys and values with G < H heads are grouped-query attention (Ainslie et al. 2023): query
    head h reads key/value head h // (H / G), so G = 1 is multi-query attention.
    """
    b, length, h, k = q_BLHK.shape
    g = k_BSHK.shape[1 if heads_first_kv else 2]
    if h % g:
        raise ValueError(f"{h} query heads do not divide into {g} key/value heads")
    # Grouped, the queries are viewed as B,L,G,R,K (R = H / G query heads per key/value head),
    # so the G keys and values are read in place, never copied R times.
    q, kv, scores = ("blhk", "bhsk" if heads_first_kv else "bshk", "bhls")
    if g != h:
        q, kv, scores = ("blgrk", "bgsk" if heads_first_kv else "bsgk", "bgrls")
        q_BLHK = q_BLHK.reshape(b, length, g, h // g, k)
    # Accumulated and returned in fp32, so bf16 inputs are not rounded before the softmax.
    logits = jnp.einsum(f"{q},{kv}->{scores}", q_BLHK, k_BSHK,
                        preferred_element_type=jnp.float32) * (1.0 / np.sqrt(k))
    logits_BHLS = logits.reshape(b, h, length, -1)
    if mask_B1LS is not None:
        # A large finite negative rather than -inf: a fully masked (padding) row stays finite.
        logits_BHLS = jnp.where(mask_B1LS, logits_BHLS, jnp.finfo(jnp.float32).min)
    weights_BHLS = jax.nn.softmax(logits_BHLS, axis=-1).astype(v_BSHK.dtype)
    if weights_fn is not None:
        weights_fn(weights_BHLS)
    if dropout_fn is not None:
        weights_BHLS = dropout_fn(weights_BHLS)
    out = jnp.einsum(f"{scores},{kv}->{q}", weights_BHLS.reshape(logits.shape), v_BSHK)
    return out.reshape(b, length, h, -1)


class MultiHeadAttention(nn.Module):
    """Z = W_O concat(Z_1..Z_H), Z_h = attention(x W_Q^h, m W_K^h, m W_V^h) (sec. 3.2.2).

    Self-attention when `kv_BSD` is None, cross-attention otherwise. With `decode=True` the
    keys/values of earlier calls are kept in the 'cache' collection, so incremental decoding
    feeds only the new tokens. The cache length is fixed by the first (initialising) call.

    The Llama-family options: `num_kv_heads` < num_heads shares each key/value head among
    num_heads / num_kv_heads query heads (GQA; the cache then holds only the kv heads), biases
    on none or some projections, q/k RMSNorm per head (Qwen3), rotary positions applied to q
    and k (`rotary` at call time, layers.rotary_angles) and a sliding window (Mistral).
    """
    num_heads: int
    head_dim: int
    num_kv_heads: int = 0  # 0: num_heads (plain multi-head attention)
    qkv_bias: bool = True
    out_bias: bool = True
    qk_norm: bool = False  # RMSNorm over each head's q and k before rotary (Qwen3)
    norm_epsilon: float = 1e-6
    sliding_window: int = 0  # keys at most this many rows back, the query's own included; 0: all
    dropout_rate: float = 0.0
    implementation: str = "fast"  # jax.nn.dot_product_attention ("xla"/"cudnn" forced), or
    # "reference": the einsum path
    decode: bool = False
    # Causal self-attention in `query_blocks` query blocks, block i attending to keys up to
    # its own end: the same result with (n + 1) / 2n of the score work (5/8 at n = 4), for
    # backends whose attention computes every masked score (XLA:CPU). 1 = off.
    query_blocks: int = 1
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    # LoRA adapters (layers.Projection) of rank lora_rank on the projections named in
    # lora_targets among query, key, value, out; 0: none.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple = lora.TARGETS

    def _projection_kw(self, name):
        rank = self.lora_rank if name in self.lora_targets else 0
        use_bias = self.out_bias if name == "out" else self.qkv_bias
        return dict(lora_rank=rank, lora_alpha=self.lora_alpha, dtype=self.dtype,
                    param_dtype=self.param_dtype, use_bias=use_bias, name=name)

    def _project(self, x, name):
        # Keys and values of grouped-query attention get their own logical axis, so tensor
        # parallelism splits them only when their count divides (train/sharding.py).
        grouped = name != "query" and self.num_kv_heads not in (0, self.num_heads)
        heads = self.num_kv_heads if grouped else self.num_heads
        return layers.Projection((heads, self.head_dim),
                                 (layers.EMBED, layers.KV_HEADS if grouped else layers.HEADS,
                                  layers.KV), **self._projection_kw(name))(x)

    def _position(self, x_BLHK, name, rotary):
        """q or k with its per-head RMSNorm (qk_norm) and then its rotary position."""
        if self.qk_norm:
            x_BLHK = layers.RMSNorm(self.norm_epsilon, names=(layers.KV,), dtype=self.dtype,
                                    param_dtype=self.param_dtype, name=name)(x_BLHK)
        return x_BLHK if rotary is None else layers.apply_rotary(x_BLHK, *rotary)

    @nn.compact
    def __call__(self, x_BLD, kv_BSD=None, *, segment_ids_BL=None, kv_segment_ids_BS=None,
                 causal=False, deterministic=True, projected_kv=None, only_project_kv=False,
                 rotary=None):
        """Attention output B,L,D; or, with only_project_kv, the keys and values of kv_BSD.

        Cross-attention in incremental decoding projects the encoder output once
        (only_project_kv) and passes the result back as projected_kv at every step.
        `rotary` is the (cos, sin) B,L,K of self-attention's positions (layers.rotary_angles).
        """
        if only_project_kv:
            return self._project(kv_BSD, "key"), self._project(kv_BSD, "value")
        q_BLHK = self._position(self._project(x_BLD, "query"), "q_norm", rotary)
        if projected_kv is not None:
            k_BSHK, v_BSHK = projected_kv
        else:
            m_BSD = x_BLD if kv_BSD is None else kv_BSD
            k_BSHK = self._position(self._project(m_BSD, "key"), "k_norm", rotary)
            v_BSHK = self._project(m_BSD, "value")

        if self.decode and kv_BSD is None and projected_kv is None:
            z_BLHK = self._cached_attention(q_BLHK, k_BSHK, v_BSHK, segment_ids_BL)
        else:
            z_BLHK = self._attention(q_BLHK, k_BSHK, v_BSHK, segment_ids_BL, kv_segment_ids_BS,
                                     causal, deterministic)
        return layers.Projection((x_BLD.shape[-1],), (layers.HEADS, layers.KV, layers.EMBED),
                                 in_dims=2, **self._projection_kw("out"))(z_BLHK)

    def _attention(self, q_BLHK, k_BSHK, v_BSHK, segment_ids_BL, kv_segment_ids_BS, causal,
                   deterministic):
        """Full-sequence attention with causal / padding / packed-segment masking."""
        length, n = q_BLHK.shape[1], self.query_blocks
        if (causal and n > 1 and kv_segment_ids_BS is None and length == k_BSHK.shape[1]
                and length % n == 0 and not self.sliding_window
                and not (self.dropout_rate > 0 and not deterministic)):
            return self._blocked_causal_attention(q_BLHK, k_BSHK, v_BSHK, segment_ids_BL,
                                                  deterministic)
        mask_B1LS = None
        if segment_ids_BL is not None or kv_segment_ids_BS is not None:
            q_seg = segment_ids_BL if segment_ids_BL is not None else jnp.ones(
                q_BLHK.shape[:2], jnp.int32)
            mask_B1LS = make_attention_mask(q_seg, kv_segment_ids_BS, causal=causal,
                                            window=self.sliding_window)
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
            # A window on a plain causal mask stays a band the fused kernels know (cuDNN
            # skips the blocks outside it); with segment ids it is already in mask_B1LS.
            window = (self.sliding_window - 1, 0) if causal_only and self.sliding_window else None
            return jax.nn.dot_product_attention(q_BLHK, k_BSHK, v_BSHK, mask=mask_B1LS,
                                                is_causal=causal_only, local_window_size=window,
                                                implementation=fused[self.implementation])
        if self.implementation not in (*fused, "reference"):
            raise ValueError(f"unknown attention implementation {self.implementation!r}; "
                             "use 'fast', 'xla', 'cudnn' or 'reference'")
        if causal_only:
            mask_B1LS = make_attention_mask(causal=True, q_len=q_BLHK.shape[1],
                                            kv_len=k_BSHK.shape[1], window=self.sliding_window)
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
                                            kv_len=end, q_offset=i * size)  # no window here
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
        step, while all rows share one write index. A row's real tokens fill consecutive slots,
        so the sliding window can compare slots instead of positions. With grouped-query
        attention the cache holds only the num_kv_heads heads.
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
            mask = make_attention_mask(causal=True, q_len=length, kv_len=length,
                                       window=self.sliding_window)
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
                                   q_offset=i, window=self.sliding_window
                                   ) & cached_valid.value[:, None, None, :]
        return reference_attention(q_BLHK, cached_k.value, cached_v.value, mask,
                                   heads_first_kv=True)
