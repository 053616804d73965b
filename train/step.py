"""The training step and the sharded train state: everything between a batch and new weights.

`train_step(state, batch, rng) -> (state, metrics)` is a pure function of a task's loss_fn,
jitted once with in/out shardings and a donated state; apply_if_finite is its non-finite
guard, shared with PPO's update. `build(task, config)` makes what every user of the step needs
(mesh, model, optimizer, abstract sharded state, init function), so the loop, the dry run and
the benchmark construct it the same way.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from models import lora
from train import optim, sharding


@flax.struct.dataclass
class TrainState:
    """`params` are what the optimizer updates. With LoRA (config.model.lora_rank > 0) they are
    the adapters (and any fresh task head) alone, `frozen` holds the base weights: the optimizer
    state covers only the adapters, and checkpoints leave `frozen` out (it is loaded again from
    config.init_from). Without LoRA `frozen` is None, an empty subtree. `extra` is a task's
    own training state that is not a parameter (PPO's adaptive KL coefficient), saved with the
    checkpoints; None for tasks that have none (the Task's init_extra(config) makes it)."""
    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any = None
    extra: Any = None


def uses_lora(config) -> bool:
    return config.model.get("lora_rank", 0) > 0


def full_params(params, frozen):
    """The model's whole parameter tree: the trained params over the frozen base (if any)."""
    return params if frozen is None else lora.combine(frozen, params)


def apply_if_finite(tx, params, opt_state, grads, loss_sum):
    """(params, opt_state, {"grad_norm", "nonfinite"}): the optimizer's update of params, or
    params and opt_state unchanged (nonfinite = 1) when loss_sum or the gradient norm is not
    finite, since that update would turn every parameter into nan.

    The non-finite guard of every train step (make_train_step, and each minibatch of PPO's
    update, train/rl/update.py)."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)

    def update(_):
        updates, new_opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    # A branch, not an elementwise select: only one side runs, and the donated state is
    # updated in place (a select over every parameter cost 15% of a 124M step on CPU).
    params, opt_state = jax.lax.cond(finite, update, lambda _: (params, opt_state), None)
    return params, opt_state, {"grad_norm": grad_norm,
                               "nonfinite": 1.0 - finite.astype(jnp.float32)}


def make_train_step(loss_fn, tx, schedule, grad_accum_steps: int):
    """Returns train_step(state, batch, rng) -> (state, metrics) for a task's loss_fn.

    With accumulation the batch is split into `grad_accum_steps` micro-batches scanned in
    sequence; gradients of the summed loss are added and divided once by the total token
    count, so the update equals the one of a single large batch.

    A step whose summed loss or gradient norm is not finite leaves the parameters and the
    optimizer state as they were (only the step count moves) and reports nonfinite = 1: its
    update would have turned every parameter into nan (apply_if_finite). The loop then stops
    or skips it.
    """
    # Gradients are taken of the trained params only; frozen base weights enter as constants.
    grad_fn = jax.value_and_grad(
        lambda params, frozen, batch, rng: loss_fn(full_params(params, frozen), batch, rng),
        has_aux=True)

    def train_step(state, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        if grad_accum_steps == 1:
            (_, sums), grads = grad_fn(state.params, state.frozen, batch, rng)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)

            def accumulate(carry, xs):
                i, mb = xs
                (_, s), g = grad_fn(state.params, state.frozen, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                lambda: grad_fn(state.params, state.frozen, jax.tree.map(lambda x: x[0], micro),
                                rng)))
            (grads, sums), _ = jax.lax.scan(
                accumulate, (zeros[1], zeros[0][1]), (jnp.arange(grad_accum_steps), micro))
        count = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        params, opt_state, guard = apply_if_finite(tx, state.params, state.opt_state, grads,
                                                   sums["loss_sum"])
        sums = dict(sums, **guard, param_norm=optax.tree.norm(params),
                    learning_rate=schedule(state.step))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), sums

    return train_step


def jit_train_step(task, config, model, tx, schedule, state_shardings, batch_shard):
    """The task's train_step, jitted once with shardings and a donated state."""
    step_fn = make_train_step(functools.partial(task.loss_fn, model=model, train=True), tx,
                              schedule, config.opt.grad_accum_steps)
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_shard, None),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def create_state_fns(task, config, model, tx, mesh, rules):
    """(abstract sharded state, its shardings, jitted init_fn(rng) -> state on the mesh)."""
    def init_boxed(rng):
        params, frozen = task.init_params(model, config, rng), None
        if uses_lora(config):  # train the adapters (and fresh heads); freeze the rest
            params, frozen = lora.split(params, task.fresh_heads)
        extra = task.init_extra(config) if task.init_extra is not None else None
        return TrainState(jnp.array(0, jnp.int32), params, tx.init(params), frozen, extra)

    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            nn.meta.unbox(boxed), shardings)
    init_fn = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=shardings)
    return abstract, shardings, init_fn


@dataclasses.dataclass(frozen=True)
class Setup:
    """A task's model, optimizer and sharded state layout on one mesh."""
    mesh: Any
    rules: tuple
    model: Any
    tx: Any
    schedule: Callable
    abstract: TrainState  # jax.ShapeDtypeStruct leaves carrying their shardings
    state_shardings: TrainState
    init_fn: Callable  # rng -> TrainState placed on the mesh
    batch_shard: Any

    @property
    def param_shardings(self):
        """Shardings of the model's whole parameter tree (full_params)."""
        return full_params(self.state_shardings.params, self.state_shardings.frozen)

    @property
    def base_params(self):
        """Abstract params a pretrained checkpoint fills: the frozen base with LoRA, else all."""
        return self.abstract.params if self.abstract.frozen is None else self.abstract.frozen

    def jit_train_step(self, task, config):
        return jit_train_step(task, config, self.model, self.tx, self.schedule,
                              self.state_shardings, self.batch_shard)


def build(task, config, mesh_config=None, devices=None) -> Setup:
    """The Setup of `task` under `config` (mesh: config.mesh unless `mesh_config` is given)."""
    mesh = sharding.make_mesh(config.mesh if mesh_config is None else mesh_config, devices)
    rules = sharding.rules_from_config(config)
    model = task.build_model(config)
    tx, schedule = optim.make_optimizer(config.opt, config.num_train_steps, config.model.d_model)
    abstract, shardings, init_fn = create_state_fns(task, config, model, tx, mesh, rules)
    return Setup(mesh, rules, model, tx, schedule, abstract, shardings, init_fn,
                 sharding.batch_sharding(mesh, rules))
