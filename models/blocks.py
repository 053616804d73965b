"""The residual self-attention block and the stack of them (Vaswani et al. 2017, sec. 3.1).

BERT, GPT and the Transformer's encoder are `self_attention_stack`s of SelfAttentionBlocks:
models/attention.py's MultiHeadAttention and models/layers.py's FeedForward, each sub-layer
wrapped in a residual connection and LayerNorm (post-LN as in the paper and BERT, pre-LN as in
GPT-2). The stack optionally scans the blocks (one compiled layer) and rematerialises them
(activation memory); neither changes a parameter's name or value.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention, layers, lora


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
    query_blocks: int = 1  # attention.MultiHeadAttention.query_blocks
    ln_epsilon: float = 1e-5  # BERT used 1e-12
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    lora_rank: int = 0  # LoRA adapters on the lora_targets projections (Projection); 0: none
    lora_alpha: float = 16.0
    lora_targets: tuple = lora.TARGETS

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL=None, deterministic=True):
        d_model = x_BLD.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        adapters = dict(lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                        lora_targets=self.lora_targets)
        attn = attention.MultiHeadAttention(self.num_heads, d_model // self.num_heads,
                                            dropout_rate=self.attention_dropout_rate,
                                            implementation=self.implementation,
                                            decode=self.decode, query_blocks=self.query_blocks,
                                            name="attn", **adapters, **kw)
        mlp = layers.FeedForward(self.d_ff, self.activation, self.dropout_rate, name="mlp",
                                 **adapters, **kw)
        drop = nn.Dropout(self.dropout_rate)
        ln_1 = layers.layer_norm("ln_1", epsilon=self.ln_epsilon, **kw)
        ln_2 = layers.layer_norm("ln_2", epsilon=self.ln_epsilon, **kw)

        def attend(h):
            return attn(h, segment_ids_BL=segment_ids_BL, causal=self.causal,
                        deterministic=deterministic)

        if self.pre_ln:
            x_BLD = x_BLD + drop(attend(ln_1(x_BLD)), deterministic=deterministic)
            x_BLD = x_BLD + drop(mlp(ln_2(x_BLD), deterministic), deterministic=deterministic)
        else:
            x_BLD = ln_1(x_BLD + drop(attend(x_BLD), deterministic=deterministic))
            x_BLD = ln_2(x_BLD + drop(mlp(x_BLD, deterministic), deterministic=deterministic))
        return nn.with_logical_constraint(x_BLD, (layers.BATCH, layers.LENGTH, layers.EMBED))


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
                         remat="none", scan_layers=False, block_cls=None, block_args=(),
                         **block_kwargs):
    """x through `num_layers` SelfAttentionBlocks, created in the calling module's scope.

    Unscanned, the blocks are `{name}_0`, `{name}_1`, ... Scanned, one block `name` runs under
    nn.scan with every parameter stacked on a leading layers.LAYERS axis, so XLA compiles one
    layer instead of `num_layers` (compile time stops growing with depth). A KV cache is stacked
    the same way. `remat` wraps each block in jax.checkpoint with a REMAT_POLICIES policy; neither
    option changes the parameters' names or values, only their layout (scan) or what is
    recomputed (remat). `block_cls` (default SelfAttentionBlock) is called as
    block(x, segment_ids, deterministic, *block_args); block_args are the same for every layer
    (the Llama family's rotary angles).
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown config.model.remat {remat!r}; use one of "
                         f"{sorted(REMAT_POLICIES)}")
    block_cls = block_cls or SelfAttentionBlock
    if remat != "none":
        # deterministic (argument 3, counting self) is a Python bool choosing code paths, so
        # it must stay static. scan already keeps XLA from merging recomputation with the
        # forward pass, which is what prevent_cse guards against otherwise.
        block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], static_argnums=(3,),
                             prevent_cse=not scan_layers)
    if not scan_layers:
        for i in range(num_layers):
            x_BLD = block_cls(name=f"{name}_{i}", **block_kwargs)(x_BLD, segment_ids_BL,
                                                                   deterministic, *block_args)
        return x_BLD

    def body(block, carry_BLD):
        return block(carry_BLD, segment_ids_BL, deterministic, *block_args), None

    scanned = nn.scan(body, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True}, length=num_layers,
                      metadata_params={nn.PARTITION_NAME: layers.LAYERS})
    x_BLD, _ = scanned(block_cls(name=name, **block_kwargs), x_BLD)
    return x_BLD
