"""The PPO / GRPO update: the clipped objective over rollout minibatches, as one pure function.

make_update returns update(state, reference, rows, scores, rng) -> (state, metrics): the
per-token arrays of the whole rollout batch (advantages.rollout_batch), then config.rl.epochs
passes of config.rl.minibatches optimizer steps on shuffled minibatches (one lax.scan), each
through train/step.py's non-finite guard (apply_if_finite). A step with any non-finite
minibatch leaves the whole state as it was (params, optimizer state and KL coefficient); its
metrics say nonfinite = 1 and the loop stops, or skips it with config.skip_nonfinite_steps.

The loss (loss_fn): the clipped policy loss of Schulman et al. 2017 (eq. 7),
max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)), plus for PPO vf_coef times the clipped
value loss; for GRPO (Shao et al. 2024, eq. 3) the KL to the reference as a loss term
(estimator config.rl.kl_estimator, k3 by default) instead of a per-token reward.
The KL coefficient is fixed or adaptive (Ziegler et al. 2019, sec. 2.2: moved towards
config.rl.kl_target over config.rl.kl_horizon rollouts; kept in TrainState.extra, so resume
is exact).
"""
import jax
import jax.numpy as jnp
import optax

from train import optim, step as step_lib
from train.rl import advantages, settings


class Learner:
    """The GPT and the RL settings loss_fn reads (static: bound into the jitted update)."""

    def __init__(self, net, config):
        self.net, self.value = net, settings.has_value_head(config)
        self.rl = config.rl

    def init(self, *args, **kwargs):
        return self.net.init(*args, **kwargs)

    def apply(self, *args, **kwargs):
        return self.net.apply(*args, **kwargs)

    @property
    def config(self):
        return self.net.config


def loss_fn(params, batch, rng, *, model, train):
    """The clipped policy loss (plus the value loss for PPO, the KL term for GRPO) summed over
    the weighted tokens of a rollout minibatch, plus metric sums. `model` is a Learner."""
    rl = model.rl
    logp, entropy, values = advantages.token_outputs(model.net, params, batch, rl.temperature,
                                                     value=model.value)
    w = batch["token_weight"]
    log_ratio = logp - batch["old_logp"]
    ratio = jnp.exp(log_ratio)
    adv = batch["advantages"]
    clipped = jnp.clip(ratio, 1.0 - rl.clip, 1.0 + rl.clip)
    pg = jnp.maximum(-adv * ratio, -adv * clipped)
    total = lambda x: jnp.sum(x * w)  # noqa: E731
    sums = {"policy_loss_sum": total(pg), "entropy_sum": total(entropy),
            "clipfrac_sum": total((jnp.abs(ratio - 1.0) > rl.clip).astype(jnp.float32)),
            "approx_kl_sum": total(ratio - 1.0 - log_ratio), "weight_sum": jnp.sum(w)}
    loss = pg
    if model.value:
        old_v, ret = batch["old_values"], batch["returns"]
        v_clipped = old_v + jnp.clip(values - old_v, -rl.vf_clip, rl.vf_clip)
        v_loss = 0.5 * jnp.maximum((values - ret) ** 2, (v_clipped - ret) ** 2)
        loss = loss + rl.vf_coef * v_loss
        sums["value_loss_sum"] = total(v_loss)
    else:  # GRPO: the KL to the reference as a loss term
        kl = advantages.kl_terms(logp, batch["ref_logp"], rl.kl_estimator)
        loss = loss + batch["kl_coef"][:, None] * kl
        sums["kl_loss_sum"] = total(kl)
    sums["loss_sum"] = total(loss)
    return sums["loss_sum"], sums


def make_optimizer(config):
    """(tx, schedule) over every minibatch update, epochs x minibatches per train step: the
    same optimizer as the loop's setup.tx (so the state's layout is the same), its warmup and
    schedule counted in those updates."""
    per_step = config.rl.epochs * config.rl.minibatches
    opt = config.opt.copy_and_resolve_references()
    opt.warmup_steps = config.opt.warmup_steps * per_step  # warmup_steps counts train steps
    return optim.make_optimizer(opt, config.num_train_steps * per_step, config.model.d_model)


def make_update(learner, tx, schedule, config, end_id):
    """update(state, reference, rows, scores, rng) -> (state, metrics), pure (jit it): one
    train step's optimisation on sampled rollouts `rows` and their B float `scores`."""
    rl = config.rl
    per_step = rl.epochs * rl.minibatches
    grad_fn = jax.value_and_grad(
        lambda p, frozen, mb: loss_fn(step_lib.full_params(p, frozen), mb, None,
                                      model=learner, train=True), has_aux=True)

    def update(state, reference, rows, scores, rng):
        batch, stats = advantages.rollout_batch(learner.net, state, reference, rows, scores,
                                                config=config, end_id=end_id)
        n = rows["tokens"].shape[0]
        size = n // rl.minibatches
        orders = jnp.stack([jax.random.permutation(jax.random.fold_in(rng, e), n)
                            for e in range(rl.epochs)]).reshape(-1, size)

        def one(carry, index):
            params, opt_state, _ = carry
            mb = {k: v[index] for k, v in batch.items()}
            (_, sums), grads = grad_fn(params, state.frozen, mb)
            count = jnp.maximum(sums["weight_sum"], 1e-9)
            grads = jax.tree.map(lambda g: g / count, grads)
            params, opt_state, guard = step_lib.apply_if_finite(tx, params, opt_state, grads,
                                                                sums["loss_sum"])
            return (params, opt_state, guard["grad_norm"]), dict(sums, **guard)

        (params, opt_state, grad_norm), per = jax.lax.scan(
            one, (state.params, state.opt_state, jnp.float32(0.0)), orders)
        extra = state.extra
        if rl.adaptive_kl:  # Ziegler et al. 2019, sec. 2.2
            error = jnp.clip(stats["kl"] / rl.kl_target - 1.0, -0.2, 0.2)
            extra = {"kl_coef": extra["kl_coef"] * (1.0 + error * n / rl.kl_horizon)}
        # A step with any non-finite minibatch leaves the whole state as it was (the loop then
        # stops, or skips the step with config.skip_nonfinite_steps).
        bad = jnp.max(per["nonfinite"]) > 0
        params, opt_state, extra = jax.lax.cond(
            bad, lambda: (state.params, state.opt_state, state.extra),
            lambda: (params, opt_state, extra))
        metrics = step_metrics(per, stats, scores, rows["tokens"], end_id, rl)
        metrics.update(grad_norm=grad_norm, param_norm=optax.tree.norm(params),
                       learning_rate=schedule(state.step * per_step))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  extra=extra)
        return new_state, metrics

    return update


def step_metrics(per, stats, scores, tokens, end_id, rl):
    """The step's metrics as step.make_train_step's (sums over weight_sum = 1): means over
    the minibatch updates (each a per-token mean), and the rollouts' statistics."""
    out = {k[:-4]: jnp.mean(per[k] / jnp.maximum(per["weight_sum"], 1e-9))
           for k in per if k.endswith("_sum") and k != "weight_sum"}
    first_clip = per["clipfrac_sum"][0] / jnp.maximum(per["weight_sum"][0], 1e-9)
    metrics = {
        **{f"{k}_sum": v for k, v in out.items()},
        "weight_sum": jnp.float32(1.0),
        "score_sum": jnp.mean(scores), "score_std_sum": jnp.std(scores),
        "kl_sum": stats["kl"], "kl_coef_sum": stats["kl_coef"],
        "first_clipfrac_sum": first_clip,
        "sampler_error_sum": stats["sampler_error"],
        "response_length_sum": jnp.mean(stats["length"]),
        "truncated_sum": jnp.mean((jnp.sum((tokens == end_id), 1) == 0).astype(jnp.float32)),
        "nonfinite": jnp.max(per["nonfinite"]),
        "updates_sum": jnp.float32(rl.epochs * rl.minibatches)}
    if stats["explained_variance"] is not None:
        metrics["explained_variance_sum"] = stats["explained_variance"]
    return metrics
