"""The residual self-attention block: every parameter named for sharding, post- vs pre-LN."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from models import blocks


@pytest.mark.parametrize("pre_ln", [True, False])
def test_block_params_all_carry_logical_names(pre_ln):
    block = blocks.SelfAttentionBlock(num_heads=2, d_ff=32, pre_ln=pre_ln, activation="relu")
    variables = jax.jit(block.init)(jax.random.key(0), jnp.ones((1, 4, 16)))
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(
        x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim


def test_post_ln_output_is_normalised_and_pre_ln_is_not():
    x = jax.jit(lambda k: 5.0 + 3.0 * jax.random.normal(k, (1, 4, 16)))(jax.random.key(0))
    for pre_ln in (True, False):
        block = blocks.SelfAttentionBlock(num_heads=2, d_ff=32, pre_ln=pre_ln)
        std = float(jax.jit(lambda x: jnp.std(
            block.apply(block.init(jax.random.key(1), x), x), axis=-1).mean())(x))
        assert (abs(std - 1.0) < 1e-3) != pre_ln
