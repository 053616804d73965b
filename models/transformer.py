"""The encoder-decoder Transformer of Vaswani et al. 2017 ("Attention Is All You Need").

Token embeddings scaled by sqrt(d_model) plus sinusoidal positions, dropout on the sums (sec.
3.4, 3.5, 5.4); an encoder of self-attention + feed-forward blocks and a decoder of masked
self-attention + encoder-decoder attention + feed-forward blocks (sec. 3.1), post-LN as in the
paper or pre-LN as an option. With a joint vocabulary one embedding matrix serves the source,
the target and the pre-softmax projection (sec. 3.4).

`encode()` and `decode()` are separate so decoding runs the encoder once; with decode=True the
decoder keeps its self-attention keys/values in a cache, and `project_cross()` computes every
layer's encoder-decoder keys/values once per sentence, passed back at each step.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import attention, blocks, decoding, layers


@dataclasses.dataclass(frozen=True)
class TransformerConfig(layers.ModelConfig):
    """Model hyper-parameters, built from `config.model`."""
    vocab_size: int  # joint source/target vocabulary
    max_len: int
    num_layers: int  # encoder and decoder each
    d_model: int
    num_heads: int
    d_ff: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    pre_ln: bool = False
    activation: str = "relu"
    attention: str = "fast"
    remat: str = "none"
    label_smoothing: float = 0.1  # read by the loss (train/tasks/seq2seq.py), sec. 5.4
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    decode: bool = False
    # What Marian (opus-mt) checkpoints vary, with the paper's choices as defaults:
    embed_scale: bool = True  # token embeddings times sqrt(d_model) (sec. 3.4)
    position_layout: str = "interleaved"  # or "split" (layers.sinusoidal_positions)
    final_logits_bias: bool = False  # a per-token bias on the output logits
    ln_epsilon: float = 1e-5
    pad_id: int = 0  # the source padding id when no segment ids are given
    vocab_multiple: int = 1  # embedding rows padded to a multiple (layers.padded_vocab_size)

    @property
    def kw(self):
        return dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))


class Encoder(nn.Module):
    """Embedded source B,S,D -> encoded B,S,D (padding and packed pairs masked by segment)."""
    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BSD, segment_ids_BS, deterministic=True):
        cfg = self.config
        x_BSD = blocks.self_attention_stack(
            x_BSD, segment_ids_BS, deterministic, num_layers=cfg.num_layers, name="layer",
            remat=cfg.remat, num_heads=cfg.num_heads, d_ff=cfg.d_ff, pre_ln=cfg.pre_ln,
            causal=False, activation=cfg.activation, dropout_rate=cfg.dropout_rate,
            attention_dropout_rate=cfg.attention_dropout_rate, implementation=cfg.attention,
            ln_epsilon=cfg.ln_epsilon, **cfg.kw)
        # Pre-LN leaves the residual stream unnormalised; post-LN blocks end with a LayerNorm.
        return (layers.layer_norm("ln_f", epsilon=cfg.ln_epsilon, **cfg.kw)(x_BSD)
                if cfg.pre_ln else x_BSD)


class DecoderBlock(nn.Module):
    """Masked self-attention, encoder-decoder attention, feed-forward; residual + LN each."""
    config: TransformerConfig

    @nn.compact
    def __call__(self, y_BLD, encoded_BSD, src_segment_BS, tgt_segment_BL, deterministic=True,
                 cross_kv=None, project_only=False):
        cfg = self.config
        mha = dict(num_heads=cfg.num_heads, head_dim=cfg.d_model // cfg.num_heads,
                   dropout_rate=cfg.attention_dropout_rate, implementation=cfg.attention,
                   **cfg.kw)
        cross = attention.MultiHeadAttention(name="cross_attn", **mha)
        if project_only:
            return cross(None, encoded_BSD, only_project_kv=True)
        self_attn = attention.MultiHeadAttention(decode=cfg.decode, name="self_attn", **mha)
        mlp = layers.FeedForward(cfg.d_ff, cfg.activation, cfg.dropout_rate, name="mlp",
                                 **cfg.kw)
        drop = nn.Dropout(cfg.dropout_rate)

        def residual(h, sublayer, ln_name):
            ln = layers.layer_norm(ln_name, epsilon=cfg.ln_epsilon, **cfg.kw)
            if cfg.pre_ln:
                return h + drop(sublayer(ln(h)), deterministic=deterministic)
            return ln(h + drop(sublayer(h), deterministic=deterministic))

        # In decoding the cache holds one sentence per row, so segments matter only for
        # the source padding; in training packed pairs see only their own pair.
        y_BLD = residual(y_BLD, lambda h: self_attn(
            h, segment_ids_BL=None if cfg.decode else tgt_segment_BL, causal=True,
            deterministic=deterministic), "ln_1")
        y_BLD = residual(y_BLD, lambda h: cross(
            h, encoded_BSD, segment_ids_BL=tgt_segment_BL, kv_segment_ids_BS=src_segment_BS,
            deterministic=deterministic, projected_kv=cross_kv), "ln_2")
        y_BLD = residual(y_BLD, lambda h: mlp(h, deterministic), "ln_3")
        return nn.with_logical_constraint(y_BLD, (layers.BATCH, layers.LENGTH, layers.EMBED))


class Decoder(nn.Module):
    """Embedded target B,L,D + encoded source -> decoder states B,L,D."""
    config: TransformerConfig

    @nn.compact
    def __call__(self, y_BLD, encoded_BSD, src_segment_BS, tgt_segment_BL, deterministic=True,
                 cross_kv=None, project_only=False):
        cfg = self.config
        block_cls = DecoderBlock
        if cfg.remat != "none" and not project_only:
            # As in blocks.self_attention_stack: deterministic (argument 5, counting self)
            # picks code paths, so it stays static; parameter names are unchanged.
            block_cls = nn.remat(DecoderBlock, policy=blocks.REMAT_POLICIES[cfg.remat],
                                 static_argnums=(5,))
        decoder_blocks = [block_cls(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
        if project_only:
            return [b(None, encoded_BSD, None, None, project_only=True) for b in decoder_blocks]
        for i, block in enumerate(decoder_blocks):
            y_BLD = block(y_BLD, encoded_BSD, src_segment_BS, tgt_segment_BL, deterministic,
                          cross_kv=None if cross_kv is None else cross_kv[i])
        return (layers.layer_norm("ln_f", epsilon=cfg.ln_epsilon, **cfg.kw)(y_BLD)
                if cfg.pre_ln else y_BLD)


class Transformer(nn.Module):
    """Source ids B,S and shifted target ids B,L -> next-token logits B,L,V."""
    config: TransformerConfig

    def setup(self):
        cfg = self.config
        # Initialised with std d_model^-0.5, so that after the sqrt(d_model) scaling the token
        # signal has unit variance, like the sinusoids it is added to.
        self.embed = layers.token_embedding(cfg.table_size, cfg.d_model, "embed",
                                            stddev=cfg.d_model ** -0.5, **cfg.kw)
        if cfg.final_logits_bias:
            self.logits_bias = self.param(
                "final_logits_bias", layers.partitioned(nn.initializers.zeros, (layers.VOCAB,)),
                (cfg.table_size,), jnp.dtype(cfg.param_dtype))
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _embed(self, ids_BL, positions_BL, deterministic):
        """E[x] * sqrt(d_model) + PE(pos): the scaling keeps the shared embedding (whose
        values are small, as the output layer needs) from being drowned by the +-1 sines."""
        cfg = self.config
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(ids_BL.shape[1]), ids_BL.shape)
        x = self.embed(ids_BL)
        if cfg.embed_scale:
            x = x * np.sqrt(cfg.d_model)
        x = x + layers.sinusoidal_positions(positions_BL, cfg.d_model, jnp.dtype(cfg.dtype),
                                            cfg.position_layout, cfg.max_len)
        return self.dropout(x, deterministic=deterministic)

    def encode(self, src_BS, src_segment_BS=None, src_positions_BS=None, deterministic=True):
        if src_segment_BS is None:
            src_segment_BS = (src_BS != self.config.pad_id).astype(jnp.int32)
        return self.encoder(self._embed(src_BS, src_positions_BS, deterministic),
                            src_segment_BS, deterministic)

    def decode(self, tgt_in_BL, encoded_BSD, src_segment_BS, tgt_segment_BL=None,
               tgt_positions_BL=None, deterministic=True, cross_kv=None, hidden_only=False):
        """Logits B,L,V of the next target token at each position (tied output layer); with
        `hidden_only`, the decoder's output B,L,D before that layer (train/losses.py fuses
        the layer with the loss)."""
        y_BLD = self.decoder(self._embed(tgt_in_BL, tgt_positions_BL, deterministic),
                             encoded_BSD, src_segment_BS, tgt_segment_BL, deterministic,
                             cross_kv=cross_kv)
        return y_BLD if hidden_only else self.output_logits(y_BLD)

    def output_logits(self, y_BLD):
        """The tied output layer (plus final_logits_bias), padded vocabulary rows masked."""
        logits_BLV = self.embed.attend(y_BLD)
        if self.config.final_logits_bias:
            logits_BLV = logits_BLV + self.logits_bias.astype(logits_BLV.dtype)
        return layers.mask_padded_logits(logits_BLV, self.config.vocab_size)

    def project_cross(self, encoded_BSD):
        """Per decoder layer, the encoder-decoder attention keys and values (computed once)."""
        return self.decoder(None, encoded_BSD, None, None, project_only=True)

    def __call__(self, src_BS, tgt_in_BL, src_segment_BS=None, tgt_segment_BL=None,
                 src_positions_BS=None, tgt_positions_BL=None, deterministic=True,
                 hidden_only=False):
        if src_segment_BS is None:
            src_segment_BS = (src_BS != self.config.pad_id).astype(jnp.int32)
        encoded_BSD = self.encode(src_BS, src_segment_BS, src_positions_BS, deterministic)
        return self.decode(tgt_in_BL, encoded_BSD, src_segment_BS, tgt_segment_BL,
                           tgt_positions_BL, deterministic, hidden_only=hidden_only)


def count_params(config: TransformerConfig) -> int:
    shapes = jax.eval_shape(lambda: Transformer(config).init(
        jax.random.key(0), jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)))
    return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def flops_per_token(config: TransformerConfig, src_len: int, tgt_len: int) -> float:
    """Training FLOPs per target token: 6 N (encoder + decoder matrices) + attention.

    Encoder work is spread over the target tokens (equal lengths in the benchmarks); the
    attention terms follow PaLM's appendix B (self-attention over S or L, cross over S).
    """
    d, f, n = config.d_model, config.d_ff, config.num_layers
    encoder = n * (4 * d * d + 2 * d * f) * src_len / tgt_len
    decoder = n * (8 * d * d + 2 * d * f)
    attn = 12 * n * d * (src_len * src_len / tgt_len + tgt_len + src_len)
    return 6.0 * (encoder + decoder) + attn


def init_decode_cache(model: "Transformer", params, src_BS, max_len: int, copies: int = 1):
    """(self-attention KV cache for max_len target tokens, encoded source, cross K/V).

    The encoder and the cross-attention projections run once per sentence; with `copies` > 1
    (beam search) their outputs are then repeated, row b * copies + k for hypothesis k of
    sentence b, and the cache is sized for all B * copies rows.
    """
    src_segment_BS = (src_BS != model.config.pad_id).astype(jnp.int32)
    encoded = model.apply({"params": params}, src_BS, src_segment_BS, method=Transformer.encode)
    cross_kv = model.apply({"params": params}, encoded, method=Transformer.project_cross)
    if copies > 1:
        encoded, src_segment_BS, cross_kv = jax.tree.map(
            lambda x: jnp.repeat(x, copies, axis=0), (encoded, src_segment_BS, cross_kv))
    rows = src_BS.shape[0] * copies
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.ones((rows, 1), jnp.int32), jnp.ones((rows, max_len), jnp.int32)))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
    return cache, encoded, src_segment_BS, cross_kv


def translate_ids(decode_model: "Transformer", params, src_BS, *, beam_size=4, alpha=0.6,
                  max_len=0, bos_id=2, eos_id=3):
    """(tokens B,K,T, scores B,K) of beam search from source ids (0 = padding).

    The paper decodes with beam 4, alpha 0.6 and at most source length + 50 tokens (sec. 6.1);
    `max_len` (0: that rule, capped by the model's max_len) bounds the output. Meant to run
    under jax.jit with the settings bound.
    """
    b, s = src_BS.shape
    max_len = max_len or min(s + 50, decode_model.config.max_len)
    # Every beam of a sentence reads the same encoder output and cross keys/values, computed
    # once per sentence. They stay outside the beam state: re-selecting beams only ever moves
    # rows within a sentence, where these rows are identical, so they need no reordering.
    cache, encoded, src_segment, cross_kv = init_decode_cache(decode_model, params, src_BS,
                                                               max_len, copies=beam_size)
    state = {"cache": cache, "step": jnp.array(0, jnp.int32)}

    def logits_fn(tokens_N1, state):
        positions = jnp.full(tokens_N1.shape, state["step"])
        logits, variables = decode_model.apply(
            {"params": params, "cache": state["cache"]}, tokens_N1, encoded, src_segment, None,
            positions, True, cross_kv, method=Transformer.decode, mutable=["cache"])
        return logits, dict(state, cache=variables["cache"], step=state["step"] + 1)

    return decoding.beam_search(logits_fn, state, b, beam_size=beam_size, max_len=max_len,
                                bos_id=bos_id, eos_id=eos_id, alpha=alpha)
