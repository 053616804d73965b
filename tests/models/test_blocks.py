"""The residual self-attention block: every parameter named for sharding, post- vs pre-LN."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from models import blocks


@pytest.mark.parametrize("pre_ln", [True, False])
def test_block_params_all_carry_logical_names(pre_ln):
    block = blocks.SelfAttentionBlock(num_heads=2, d_ff=32, pre_ln=pre_ln, activation="relu")
    variables = block.init(jax.random.key(0), jnp.ones((1, 4, 16)))
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(
        x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim


def test_post_ln_output_is_normalised_and_pre_ln_is_not():
    x = 5.0 + 3.0 * jax.random.normal(jax.random.key(0), (1, 4, 16))
    for pre_ln in (True, False):
        block = blocks.SelfAttentionBlock(num_heads=2, d_ff=32, pre_ln=pre_ln)
        y = block.apply(block.init(jax.random.key(1), x), x)
        std = float(jnp.std(y, axis=-1).mean())
        assert (abs(std - 1.0) < 1e-3) != pre_ln
