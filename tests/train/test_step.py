"""The train step: a non-finite loss or gradient changes nothing but the step count."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import step as step_lib


def _quadratic_step(scale):
    """A train step of loss = scale * sum((w - 1)^2) on one weight matrix."""
    def loss_fn(params, batch, rng):
        loss = scale * jnp.sum((params["kernel"] - batch["target"]) ** 2)
        return loss, {"loss_sum": loss, "weight_sum": jnp.float32(1.0)}
    tx = optax.adam(0.1)
    return jax.jit(step_lib.make_train_step(loss_fn, tx, lambda s: 0.1, 1)), tx


@pytest.mark.parametrize("scale", [jnp.nan, jnp.inf])
def test_nonfinite_step_changes_nothing_but_the_step_count(scale):
    params = {"kernel": jnp.zeros((2, 3))}
    batch = {"target": jnp.ones((2, 3))}
    good, tx = _quadratic_step(1.0)
    bad, _ = _quadratic_step(scale)
    state = step_lib.TrainState(jnp.array(0), params, tx.init(params))
    state, metrics = good(state, batch, jax.random.key(0))
    assert float(metrics["nonfinite"]) == 0.0
    before = jax.device_get(state)
    after, metrics = bad(state, batch, jax.random.key(0))
    assert float(metrics["nonfinite"]) == 1.0
    assert int(after.step) == int(before.step) + 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.params), before.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.opt_state),
                 before.opt_state)
    # And the next finite step proceeds from the kept state as if the bad one never happened.
    resumed, _ = good(after, batch, jax.random.key(0))
    direct, _ = good(step_lib.TrainState(jnp.array(1), before.params, before.opt_state), batch,
                     jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params),
                 jax.device_get(direct.params))
