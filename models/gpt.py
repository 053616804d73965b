"""GPT: a decoder-only Transformer language model (Radford et al. 2018; 2019).

Token + learned position embeddings, a stack of pre-LN causal self-attention blocks with GELU
feed-forwards, a final LayerNorm, and output logits from the transposed token embedding (tied
input/output embeddings, Press & Wolf 2017). Parameter names follow the GPT-2 checkpoint
(wte, wpe, h_0.., ln_f), so converting published weights is a rename plus splitting c_attn.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import blocks, decoding, layers, lora


@dataclasses.dataclass(frozen=True)
class GPTConfig(layers.ModelConfig):
    """Model hyper-parameters, built from `config.model`."""
    vocab_size: int
    max_len: int  # context length, in tokens
    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    attention: str = "fast"  # "fast" (jax.nn.dot_product_attention) or "reference"
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    decode: bool = False  # incremental decoding with a KV cache
    remat: str = "none"  # "none" | "full" | "dots_saveable" (blocks.REMAT_POLICIES)
    scan_layers: bool = False  # one scanned block "h" with stacked params, instead of h_0..
    query_blocks: int = 1  # causal attention in query blocks (attention.MultiHeadAttention)
    activation: str = "gelu"  # GPT-2's tanh GELU (layers.ACTIVATIONS)
    ln_epsilon: float = 1e-5
    # Embedding rows = vocab_size rounded up to this multiple (layers.padded_vocab_size);
    # the padded rows' logits are masked. Imported GPT-2 checkpoints use 128.
    vocab_multiple: int = 1
    # LoRA (models/lora.py): rank-r adapters scaled by alpha / r on the comma-separated
    # projections of lora.TARGETS; rank 0 is the plain model.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "query,key,value,out,wi,wo"

    def __post_init__(self):
        lora.layer_kwargs(self)  # fail at construction on a bad rank or target name


class GPT(nn.Module):
    """Maps token ids B,L to next-token logits B,L,V."""
    config: GPTConfig

    @nn.compact
    def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, deterministic=True,
                 hidden_only=False):
        """Logits B,L,V; with `hidden_only`, the final hidden states B,L,D before the tied output
        layer (training fuses that layer with its loss: train/losses.py).

        In decode mode `segment_ids_BL` 0 marks the left padding of prompts of different lengths
        (`generate`); positions then come from the cache, not from `positions_BL`.
        """
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        positions_BL = layers.decoder_positions(self, tokens_BL, positions_BL, segment_ids_BL,
                                                cfg.decode)

        wte = layers.token_embedding(cfg.table_size, cfg.d_model, "wte", **kw)
        x_BLD = wte(tokens_BL) + layers.LearnedPositionEmbedding(
            cfg.max_len, cfg.d_model, name="wpe", **kw)(positions_BL)
        x_BLD = nn.Dropout(cfg.dropout_rate)(x_BLD, deterministic=deterministic)
        x_BLD = nn.with_logical_constraint(x_BLD, (layers.BATCH, layers.LENGTH, layers.EMBED))
        x_BLD = blocks.self_attention_stack(
            x_BLD, segment_ids_BL, deterministic, num_layers=cfg.num_layers, name="h",
            remat=cfg.remat, scan_layers=cfg.scan_layers, num_heads=cfg.num_heads,
            d_ff=cfg.d_ff, pre_ln=True, causal=True, activation=cfg.activation,
            dropout_rate=cfg.dropout_rate, attention_dropout_rate=cfg.attention_dropout_rate,
            implementation=cfg.attention, decode=cfg.decode, query_blocks=cfg.query_blocks,
            ln_epsilon=cfg.ln_epsilon, **lora.layer_kwargs(cfg), **kw)
        x_BLD = layers.layer_norm("ln_f", epsilon=cfg.ln_epsilon, **kw)(x_BLD)
        if hidden_only:
            return x_BLD
        # Tied output projection, logits_BLV (table_size wide) in the compute dtype.
        return layers.mask_padded_logits(wte.attend(x_BLD), cfg.vocab_size)


def count_params(config: GPTConfig) -> int:
    """Number of parameters, from shapes only (nothing is allocated)."""
    shapes = jax.eval_shape(
        lambda: GPT(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (non-embedding) + 12 n_layers d_model seq_len attention.

    The attention term is PaLM's (Chowdhery et al. 2022, appendix B); embeddings and the tied
    LM head are excluded, matching how the baselines in docs/benchmarks.md are counted.
    """
    d, f = config.d_model, config.d_ff
    per_layer = 4 * d * d + 2 * d * f  # W_Q, W_K, W_V, W_O and the two feed-forward matrices
    return 6.0 * config.num_layers * per_layer + 12.0 * config.num_layers * d * seq_len


def init_cache(model: GPT, batch_size: int, length: int = 0):
    """Zeroed KV cache for `batch_size` sequences of up to `length` tokens (0: the context).

    Each decoding step attends over the whole cache (masked past the write head), so a cache
    no longer than prompt + new tokens saves memory traffic on every step.
    """
    length = length or model.config.max_len
    if length > model.config.max_len:
        raise ValueError(f"a cache of {length} tokens exceeds the context {model.config.max_len}")
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((batch_size, length), jnp.int32)))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def cache_bytes_per_token(decode_model) -> float:
    """Bytes the KV cache of `decode_model` (GPT or Llama family) takes per cached token: keys
    and values of every layer, from the shapes init_cache allocates (grouped-query attention
    caches only its kv heads)."""
    length = min(256, decode_model.config.max_len)
    shapes = jax.eval_shape(lambda: init_cache(decode_model, 1, length))
    kv = [x for path, x in jax.tree_util.tree_leaves_with_path(shapes)
          if any(name in jax.tree_util.keystr(path) for name in ("cached_key", "cached_value"))]
    return sum(x.size * x.dtype.itemsize for x in kv) / length


def left_pad(rows: list[list[int]], width: int, pad_id: int):
    """(tokens_BP, valid_BP) int32 numpy: each row right-aligned behind `pad_id`s, valid 1 at
    its tokens and 0 at the padding (generate's prompt_BP and prompt_valid_BP)."""
    tokens_BP = np.full((len(rows), width), pad_id, np.int32)
    valid_BP = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        if not 0 < len(row) <= width:  # an empty prompt has no last token to continue from
            raise ValueError(f"prompt {b} has {len(row)} tokens; need 1 to {width}")
        tokens_BP[b, width - len(row):] = row
        valid_BP[b, width - len(row):] = 1
    return tokens_BP, valid_BP


def generate(decode_model: GPT, params, prompt_BP, rng, *, max_new_tokens, temperature=1.0,
             top_k=0, top_p=1.0, eos_id=-1, prompt_valid_BP=None, return_logprobs=False):
    """B,max_new_tokens continuation ids of each prompt row, sampled with the KV cache.

    Prompts of different lengths share one batch (and one compilation) left-padded, with
    `prompt_valid_BP` 1 at real tokens and 0 at the padding (`left_pad`): the padding is never
    attended to and positions skip it, so each row gets the logits it would get alone. Left,
    because every row's last column must be its last real token. None: all tokens are real.
    Meant to run under jax.jit with the sampling settings bound (functools.partial).
    `return_logprobs` also returns each token's log-probability (decoding.sample).
    """
    def logits_fn(tokens_BL, cache, segment_ids_BL=None):
        logits_BLV, variables = decode_model.apply({"params": params, "cache": cache},
                                                   tokens_BL, segment_ids_BL=segment_ids_BL,
                                                   mutable=["cache"])
        return logits_BLV, variables["cache"]

    prefill_fn = None
    if prompt_valid_BP is not None:
        prefill_fn = lambda tokens_BP, cache: logits_fn(tokens_BP, cache, prompt_valid_BP)
    cache = init_cache(decode_model, prompt_BP.shape[0], prompt_BP.shape[1] + max_new_tokens)
    return decoding.sample(logits_fn, cache, prompt_BP, rng, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                           prefill_fn=prefill_fn, return_logprobs=return_logprobs)
