"""The Llama family of decoders: Llama 2/3 (Touvron et al. 2023; Grattafiori et al. 2024),
Qwen2 / Qwen3, Mistral 7B (Jiang et al. 2023) and Gemma (Gemma Team 2024).

GPT-2's decoder with the changes these models share: pre-RMSNorm instead of LayerNorm, rotary
position embeddings instead of a learned table (Su et al. 2021), a gated SiLU/GELU feed-forward
(Shazeer 2020), grouped-query attention (Ainslie et al. 2023), no biases, and an output head
that may be untied from the input embedding. The members differ by a few switches, each a
field below: q/k/v biases (Qwen2), per-head q/k RMSNorm with a head_dim that need not be
d_model / heads (Qwen3), a sliding window (Mistral), sqrt(d) embedding scaling and (1 + w)
norms (Gemma), Llama 3.1's rope frequency scaling.

The blocks come from models/layers.py and models/attention.py; parameter names follow the
Hugging Face checkpoints (embed_tokens, input_layernorm, self_attn, mlp gate / up / down,
norm, lm_head) so models/hf.py's table is a rename.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import attention, blocks, layers, lora


# The projections LoRA can adapt: attention's and the gated feed-forward's.
PROJECTIONS = lora.ATTENTION_TARGETS + lora.GATED_TARGETS


@dataclasses.dataclass(frozen=True)
class LlamaConfig(layers.ModelConfig):
    """Model hyper-parameters, built from `config.model` (family "llama")."""
    vocab_size: int
    max_len: int  # context length, in tokens (the rotary angles have no table to outgrow)
    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    num_kv_heads: int = 0  # key/value heads (GQA); 0: num_heads
    head_dim: int = 0  # 0: d_model // num_heads
    rope_theta: float = 10000.0
    rope_type: str = "default"  # layers.ROPE_TYPES: "default", "linear", "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only
    activation: str = "silu"  # SwiGLU; "gelu" (tanh GELU) gives Gemma's GeGLU
    norm_epsilon: float = 1e-6
    norm_offset: float = 0.0  # 1.0: Gemma's (1 + w) RMSNorm
    embed_scale: bool = False  # Gemma multiplies the embeddings by sqrt(d_model)
    qkv_bias: bool = False  # Qwen2
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    sliding_window: int = 0  # Mistral; 0: full causal attention
    tie_embeddings: bool = True  # False: a separate lm_head table
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    attention: str = "fast"  # "fast" (jax.nn.dot_product_attention) or "reference"
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    decode: bool = False
    remat: str = "none"
    scan_layers: bool = False
    query_blocks: int = 1
    vocab_multiple: int = 1
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "query,key,value,out,gate,up,down"

    def __post_init__(self):
        self.adapters()  # a bad rank or target fails at construction
        if self.kv_heads <= 0 or self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_size % 2:
            raise ValueError(f"head_dim {self.head_size} must be even for rotary embeddings")
        self.inv_freq()  # an unknown rope_type fails here

    def adapters(self) -> dict:
        """The lora_* keyword arguments of the blocks (lora.layer_kwargs), checked."""
        return lora.layer_kwargs(self, PROJECTIONS, "the Llama family")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def inv_freq(self) -> np.ndarray:
        return layers.rope_frequencies(
            self.head_size, self.rope_theta, self.rope_type, self.rope_factor,
            self.rope_low_freq_factor, self.rope_high_freq_factor, self.rope_original_max_len)


class DecoderBlock(nn.Module):
    """x + Attention(RMSNorm(x)), then x + GatedFeedForward(RMSNorm(x)): pre-norm residuals."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, deterministic, rotary):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        adapters = cfg.adapters()
        norm = lambda name: layers.RMSNorm(cfg.norm_epsilon, cfg.norm_offset, name=name, **kw)
        attn = attention.MultiHeadAttention(
            cfg.num_heads, cfg.head_size, num_kv_heads=cfg.kv_heads, qkv_bias=cfg.qkv_bias,
            out_bias=cfg.out_bias, qk_norm=cfg.qk_norm, norm_epsilon=cfg.norm_epsilon,
            sliding_window=cfg.sliding_window, dropout_rate=cfg.attention_dropout_rate,
            implementation=cfg.attention, decode=cfg.decode, query_blocks=cfg.query_blocks,
            name="self_attn", **adapters, **kw)
        mlp = layers.GatedFeedForward(cfg.d_ff, activation=cfg.activation,
                                      use_bias=cfg.mlp_bias, name="mlp", **adapters, **kw)
        drop = nn.Dropout(cfg.dropout_rate)
        h_BLD = attn(norm("input_layernorm")(x_BLD), segment_ids_BL=segment_ids_BL,
                     causal=True, deterministic=deterministic, rotary=rotary)
        x_BLD = x_BLD + drop(h_BLD, deterministic=deterministic)
        h_BLD = mlp(norm("post_attention_layernorm")(x_BLD))
        x_BLD = x_BLD + drop(h_BLD, deterministic=deterministic)
        return nn.with_logical_constraint(x_BLD, (layers.BATCH, layers.LENGTH, layers.EMBED))


class Llama(nn.Module):
    """Maps token ids B,L to next-token logits B,L,V (the same interface as gpt.GPT)."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, deterministic=True,
                 hidden_only=False):
        """Logits B,L,V, or with `hidden_only` the final hidden states B,L,D (gpt.GPT's
        contract: the loss fuses the output layer, train/losses.py)."""
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        positions_BL = layers.decoder_positions(self, tokens_BL, positions_BL, segment_ids_BL,
                                                cfg.decode)
        embed = layers.token_embedding(cfg.table_size, cfg.d_model, "embed_tokens", **kw)
        x_BLD = embed(tokens_BL)
        if cfg.embed_scale:  # rounded to the compute dtype first, as Gemma's checkpoints expect
            x_BLD = x_BLD * jnp.asarray(np.sqrt(cfg.d_model), x_BLD.dtype)
        x_BLD = nn.Dropout(cfg.dropout_rate)(x_BLD, deterministic=deterministic)
        x_BLD = nn.with_logical_constraint(x_BLD, (layers.BATCH, layers.LENGTH, layers.EMBED))
        # One (cos, sin) for every layer; fp32 angles, cast to the compute dtype where applied.
        rotary = layers.rotary_angles(positions_BL, cfg.inv_freq())
        x_BLD = blocks.self_attention_stack(
            x_BLD, segment_ids_BL, deterministic, num_layers=cfg.num_layers, name="layer",
            remat=cfg.remat, scan_layers=cfg.scan_layers, block_cls=DecoderBlock,
            block_args=(rotary,), config=cfg)
        x_BLD = layers.RMSNorm(cfg.norm_epsilon, cfg.norm_offset, name="norm", **kw)(x_BLD)
        if hidden_only:
            return x_BLD
        head = embed if cfg.tie_embeddings else layers.token_embedding(
            cfg.table_size, cfg.d_model, "lm_head", **kw)
        return layers.mask_padded_logits(head.attend(x_BLD), cfg.vocab_size)


def output_table(params):
    """The V,D table the output logits are taken against: lm_head, or the tied embedding."""
    return (params["lm_head"] if "lm_head" in params else params["embed_tokens"])["embedding"]


def count_params(config: LlamaConfig) -> int:
    shapes = jax.eval_shape(
        lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """6 N (non-embedding) + 12 layers H K seq_len: gpt.flops_per_token's count with GQA's
    smaller K and V projections, three feed-forward matrices and heads of head_dim."""
    d, f, k = config.d_model, config.d_ff, config.head_size
    attn = d * k * (2 * config.num_heads + 2 * config.kv_heads)  # W_Q, W_O; W_K, W_V
    per_layer = attn + 3 * d * f
    return (6.0 * config.num_layers * per_layer
            + 12.0 * config.num_layers * config.num_heads * k * seq_len)
