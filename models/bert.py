"""BERT: a bidirectional Transformer encoder with task heads (Devlin et al. 2018).

Token + learned position + segment (token-type) embeddings, summed and layer-normalised
(sec. 3.2, figure 2); a stack of post-LN self-attention blocks with exact (erf) GELU; a pooler
(dense + tanh) on the [CLS] vector. Heads, chosen by `BertConfig.heads`:
  mlm      masked-LM: dense + GELU + LayerNorm, then logits from the transposed token
           embedding plus a per-token bias (tied input/output embeddings, sec. A.1 code);
           computed only at the gathered masked positions, so the V-wide matmul runs on ~15% of
           the tokens rather than all of them;
  nsp      next-sentence prediction: 2-way on the pooled [CLS] (sec. 3.1, task #2);
  classify N-way (regression when num_labels == 1) on the pooled [CLS] (sec. 4.1);
  span     start and end logits per token for SQuAD (sec. 4.2).

Parameter names are a flat rename of the published checkpoints (`published_names`), so loading
released weights is that rename plus transposing/reshaping the attention kernels.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import blocks, layers, lora

HEADS = ("mlm", "nsp", "classify", "span")
PRETRAINING_HEADS = ("mlm_transform", "mlm_ln", "mlm_bias", "nsp")
FINETUNING_HEADS = ("classifier", "qa_outputs")


@dataclasses.dataclass(frozen=True)
class BertConfig(layers.ModelConfig):
    """Model hyper-parameters, built from `config.model`."""
    vocab_size: int
    max_len: int  # learned positions, in tokens
    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    type_vocab_size: int = 2  # sentence A / sentence B
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    heads: tuple = ("mlm", "nsp")
    num_labels: int = 2  # classify: classes, or 1 for regression
    attention: str = "fast"
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat: str = "none"  # "none" | "full" | "dots_saveable" (blocks.REMAT_POLICIES)
    scan_layers: bool = False  # one scanned block "layer" with stacked params, not layer_0..
    activation: str = "gelu_exact"  # BERT's erf GELU (layers.ACTIVATIONS)
    ln_epsilon: float = 1e-12
    vocab_multiple: int = 1  # embedding rows padded to a multiple (layers.padded_vocab_size)
    # LoRA adapters in the encoder blocks (models/lora.py; as in models/gpt.py GPTConfig).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "query,key,value,out,wi,wo"

    def __post_init__(self):
        lora.layer_kwargs(self)  # fail at construction on a bad rank or target name

    @classmethod
    def from_config(cls, model_config, **overrides):
        """layers.ModelConfig.from_config, with the heads as a tuple of known names."""
        heads = tuple(overrides.get("heads", model_config.get("heads", cls.heads)))
        unknown = set(heads) - set(HEADS)
        if unknown:
            raise ValueError(f"unknown BERT heads {sorted(unknown)}; choose from {HEADS}")
        return super().from_config(model_config, **{**overrides, "heads": heads})


def _dense(features, names, name, kw):
    return layers.Projection((features,), names, name=name, **kw)


def _token_type_embedding(cfg, kw):
    """The 2-row segment table: never split over `tensor` like a vocabulary (2 rows)."""
    return nn.Embed(cfg.type_vocab_size, cfg.d_model, name="token_type_embeddings",
                    embedding_init=layers.partitioned(nn.initializers.normal(0.02),
                                                      (None, layers.EMBED)), **kw)


class Bert(nn.Module):
    """Maps token ids B,L (+ token types, padding segments) to the configured heads' outputs."""
    config: BertConfig

    @nn.compact
    def __call__(self, tokens_BL, token_types_BL=None, segment_ids_BL=None,
                 mlm_positions_BP=None, deterministic=True):
        """A dict: sequence_BLD, pooled_BD and one entry per head (see the module docstring).

        segment_ids_BL is 1 on real tokens and 0 on padding (the attention mask of
        models/attention.py); None means no padding.
        """
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        if token_types_BL is None:
            token_types_BL = jnp.zeros_like(tokens_BL)
        positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)

        wte = layers.token_embedding(cfg.table_size, cfg.d_model, "word_embeddings", **kw)
        x_BLD = (wte(tokens_BL)
                 + layers.LearnedPositionEmbedding(cfg.max_len, cfg.d_model,
                                                   name="position_embeddings", **kw)(positions_BL)
                 + _token_type_embedding(cfg, kw)(token_types_BL))
        x_BLD = layers.layer_norm("embeddings_ln", epsilon=cfg.ln_epsilon, **kw)(x_BLD)
        x_BLD = nn.Dropout(cfg.dropout_rate)(x_BLD, deterministic=deterministic)
        x_BLD = nn.with_logical_constraint(x_BLD, (layers.BATCH, layers.LENGTH, layers.EMBED))
        # Post-LN as in the paper: LN(x + Sublayer(x)); no final LayerNorm is needed.
        x_BLD = blocks.self_attention_stack(
            x_BLD, segment_ids_BL, deterministic, num_layers=cfg.num_layers, name="layer",
            remat=cfg.remat, scan_layers=cfg.scan_layers, num_heads=cfg.num_heads,
            d_ff=cfg.d_ff, pre_ln=False, causal=False, activation=cfg.activation,
            dropout_rate=cfg.dropout_rate, attention_dropout_rate=cfg.attention_dropout_rate,
            implementation=cfg.attention, ln_epsilon=cfg.ln_epsilon, **lora.layer_kwargs(cfg),
            **kw)

        # The pooler reads only [CLS] (position 0), whose vector attends to the whole input.
        pooled_BD = jnp.tanh(_dense(cfg.d_model, (layers.EMBED, layers.MLP), "pooler", kw)(
            x_BLD[:, 0]))
        out = {"sequence_BLD": x_BLD, "pooled_BD": pooled_BD}
        drop = nn.Dropout(cfg.dropout_rate)
        if "mlm" in cfg.heads and mlm_positions_BP is not None:
            out["mlm_logits_BPV"] = self._mlm_head(wte, x_BLD, mlm_positions_BP, kw)
        if "nsp" in cfg.heads:
            out["nsp_logits_B2"] = _dense(2, (layers.EMBED, None), "nsp", kw)(pooled_BD)
        if "classify" in cfg.heads:
            pooled = drop(pooled_BD, deterministic=deterministic)
            out["class_logits_BN"] = _dense(cfg.num_labels, (layers.EMBED, None), "classifier",
                                            kw)(pooled)
        if "span" in cfg.heads:
            span_BL2 = _dense(2, (layers.EMBED, None), "qa_outputs", kw)(x_BLD)
            out["start_logits_BL"], out["end_logits_BL"] = span_BL2[..., 0], span_BL2[..., 1]
        return out

    def _mlm_head(self, wte, x_BLD, positions_BP, kw):
        """Logits B,P,V at the masked positions only."""
        cfg = self.config
        h_BPD = jnp.take_along_axis(x_BLD, positions_BP[..., None], axis=1)
        h_BPD = layers.ACTIVATIONS[cfg.activation](
            _dense(cfg.d_model, (layers.EMBED, layers.MLP), "mlm_transform", kw)(h_BPD))
        h_BPD = layers.layer_norm("mlm_ln", epsilon=cfg.ln_epsilon, **kw)(h_BPD)
        bias = self.param("mlm_bias", layers.partitioned(nn.initializers.zeros, (layers.VOCAB,)),
                          (cfg.table_size,), jnp.dtype(cfg.param_dtype))
        return layers.mask_padded_logits(wte.attend(h_BPD) + bias.astype(h_BPD.dtype),
                                         cfg.vocab_size)


def count_params(config: BertConfig) -> int:
    """Number of parameters, from shapes only (nothing is allocated)."""
    shapes = jax.eval_shape(lambda: Bert(config).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32), mlm_positions_BP=jnp.zeros((1, 2),
                                                                                    jnp.int32)))
    return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def flops_per_token(config: BertConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (non-embedding matrices) + 12 n_layers d_model seq_len.

    As for GPT (PaLM's appendix B count); embeddings, pooler and heads are left out, matching
    how the baselines in docs/benchmarks.md are counted ("LM head excluded").
    """
    d, f = config.d_model, config.d_ff
    per_layer = 4 * d * d + 2 * d * f
    return 6.0 * config.num_layers * per_layer + 12.0 * config.num_layers * d * seq_len


def published_names(num_layers: int) -> dict[str, str]:
    """Our parameter path -> the Hugging Face BertForPreTraining / BertFor* name.

    Kernels are stored input-major here (D,H,K for queries) and output-major there (H*K,D), so
    a converter transposes and reshapes them; every name maps one to one.
    """
    names = {
        "word_embeddings/embedding": "bert.embeddings.word_embeddings.weight",
        "position_embeddings/embedding": "bert.embeddings.position_embeddings.weight",
        "token_type_embeddings/embedding": "bert.embeddings.token_type_embeddings.weight",
        "embeddings_ln/scale": "bert.embeddings.LayerNorm.weight",
        "embeddings_ln/bias": "bert.embeddings.LayerNorm.bias",
        "pooler/kernel": "bert.pooler.dense.weight", "pooler/bias": "bert.pooler.dense.bias",
        "mlm_transform/kernel": "cls.predictions.transform.dense.weight",
        "mlm_transform/bias": "cls.predictions.transform.dense.bias",
        "mlm_ln/scale": "cls.predictions.transform.LayerNorm.weight",
        "mlm_ln/bias": "cls.predictions.transform.LayerNorm.bias",
        "mlm_bias": "cls.predictions.bias",
        "nsp/kernel": "cls.seq_relationship.weight", "nsp/bias": "cls.seq_relationship.bias",
        "classifier/kernel": "classifier.weight", "classifier/bias": "classifier.bias",
        "qa_outputs/kernel": "qa_outputs.weight", "qa_outputs/bias": "qa_outputs.bias",
    }
    block = {"attn/query": "attention.self.query", "attn/key": "attention.self.key",
             "attn/value": "attention.self.value", "attn/out": "attention.output.dense",
             "ln_1": "attention.output.LayerNorm", "mlp/wi": "intermediate.dense",
             "mlp/wo": "output.dense", "ln_2": "output.LayerNorm"}
    for i in range(num_layers):
        for ours, theirs in block.items():
            ln = ours.startswith("ln")
            for leaf, torch_leaf in (("scale" if ln else "kernel", "weight"), ("bias", "bias")):
                names[f"layer_{i}/{ours}/{leaf}"] = f"bert.encoder.layer.{i}.{theirs}.{torch_leaf}"
    return names
