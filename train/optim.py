"""Optimizers and learning-rate schedules.

AdamW (Loshchilov & Hutter 2019) with global-norm clipping; schedules: linear warmup then cosine
or linear decay (GPT, BERT), constant, and the inverse-square-root "Noam" schedule of Vaswani et
al. 2017 sec. 5.3: lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).
"""
import jax
import jax.numpy as jnp
import optax

from train import sharding


def noam_schedule(d_model: int, warmup_steps: int, scale: float = 1.0):
    """The paper's schedule; `scale` multiplies it (1.0 reproduces the paper)."""
    def schedule(step):
        step = jnp.maximum(step + 1, 1).astype(jnp.float32)  # optax counts from 0
        return scale * d_model ** -0.5 * jnp.minimum(step ** -0.5, step * warmup_steps ** -1.5)
    return schedule


def make_schedule(opt, num_train_steps: int, d_model: int = 0):
    """learning-rate(step) from `config.opt`."""
    lr, warmup = opt.learning_rate, opt.warmup_steps
    end_lr = lr * opt.get("end_lr_fraction", 0.0)
    if opt.schedule == "noam":
        return noam_schedule(d_model, warmup, scale=lr)
    if opt.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    decay_steps = max(num_train_steps - warmup, 1)
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, warmup + decay_steps, end_lr)
    if opt.schedule == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup),
             optax.linear_schedule(lr, end_lr, decay_steps)], [warmup])
    raise sharding.ConfigError(f"unknown config.opt.schedule {opt.schedule!r}; "
                     "use cosine, linear, constant or noam")


def _decay_mask(params):
    """Weight decay on matrices only: biases, LayerNorm and 1-D params are not decayed."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(opt, num_train_steps: int, d_model: int = 0):
    """Returns (optax transformation, schedule)."""
    schedule = make_schedule(opt, num_train_steps, d_model)
    chain = []
    if opt.clip_grad_norm:
        chain.append(optax.clip_by_global_norm(opt.clip_grad_norm))
    chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay, mask=_decay_mask))
    return optax.chain(*chain), schedule
