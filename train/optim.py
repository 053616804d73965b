"""Optimizers and learning-rate schedules.

AdamW (Loshchilov & Hutter 2019) with global-norm clipping; schedules: linear warmup then cosine
or linear decay (GPT, BERT), constant, and the inverse-square-root "Noam" schedule of Vaswani et
al. 2017 sec. 5.3: lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).
"""
import jax
import jax.numpy as jnp
import optax

from train.errors import ConfigError


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
    raise ConfigError(f"unknown config.opt.schedule {opt.schedule!r}; "
                     "use cosine, linear, constant or noam")


# Weight decay applies to the weight matrices by their role, named by Flax: the kernels of
# every projection (attention q/k/v/out, feed-forward, pooler, heads) and the embedding tables.
# Biases, LayerNorm scales and other vector parameters (BERT's mlm_bias) are not decayed, as in
# the GPT-2 and BERT recipes. The rank cannot decide it: a q/k/v bias is H,K (2-D), and with
# model.scan_layers every LayerNorm scale is stacked to layers,D.
DECAYED_NAMES = ("kernel", "embedding")


def _leaf_name(path) -> str:
    """The parameter's own name: the last dict key of its tree path (boxed or not)."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(keys[-1]) if keys else ""


def decay_mask(params):
    """True for the parameters weight decay applies to (DECAYED_NAMES), False elsewhere."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) in DECAYED_NAMES,
                                            params)


def make_optimizer(opt, num_train_steps: int, d_model: int = 0):
    """Returns (optax transformation, schedule)."""
    schedule = make_schedule(opt, num_train_steps, d_model)
    chain = []
    if opt.clip_grad_norm:
        chain.append(optax.clip_by_global_norm(opt.clip_grad_norm))
    chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay, mask=decay_mask))
    return optax.chain(*chain), schedule
