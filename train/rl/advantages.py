"""Per-token quantities of a rollout batch: log-probabilities, KL to the reference, advantages.

The reference is the model the run starts from (config.init_from): with LoRA the same weights
with the adapters switched off (no second copy), else a frozen copy on the devices.

KL estimators (Schulman 2020, "Approximating KL divergence"), with log r = log pi - log ref of
the sampled token: k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r. Each is an
estimate of KL(pi || ref) when tokens are drawn from pi; k1 is unbiased but can be negative,
k3 is unbiased and never negative, k2 is biased and never negative.

PPO (Ziegler et al. 2019; Ouyang et al. 2022): per-token reward -kl_coef * KL_t plus the score
at the response's last token; a value head on the policy's hidden states (settings.VALUE_HEAD,
a D->1 linear layer); GAE (Schulman et al. 2016) with config.rl.gamma and lam, advantages
whitened over the batch.
GRPO (Shao et al. 2024, sec. 4.1): group_size samples per prompt, the advantage of each
response its score standardised within its group, no value head; each response's tokens
weigh 1 / its length, so they are averaged before responses are (eq. 3; update.loss_fn).

The "old" log-probs of the ratio are the training pass's own, so the ratio is exactly 1 at the
first update even in bf16, where the KV-cache path and the full pass round differently.
"""
import jax
import jax.numpy as jnp

from models import layers
from train import step as step_lib
from train.rl import settings
from train.tasks import lm, posttrain


def reference_params(params, reference, lora):
    """The reference model's weights: with LoRA the policy's with the adapters switched off."""
    return posttrain.switch_off_adapters(params) if lora else reference


def kl_terms(logp, ref_logp, estimator):
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (module docstring)."""
    log_r = logp - ref_logp
    if estimator == "k1":
        return log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    return jnp.exp(-log_r) - 1.0 + log_r


def sequences(prompt_BP, valid_BP, tokens_BN):
    """(inputs, positions, segment ids) of prompt + response, left padding masked out: the
    hidden state at column P - 1 + t predicts response token t."""
    inputs = jnp.concatenate([prompt_BP, tokens_BN[:, :-1]], axis=1)
    segment = jnp.concatenate([valid_BP, jnp.ones_like(tokens_BN[:, :-1])], axis=1)
    positions = jnp.maximum(jnp.cumsum(segment, axis=1) - 1, 0) * segment
    return inputs, positions.astype(jnp.int32), segment.astype(jnp.int32)


def token_outputs(net, params, rows, temperature, *, value=False):
    """(log pi of each response token B,N; entropy B,N; values B,N or None), fp32, with the
    policy softmax(logits / temperature) the sampler draws from."""
    inputs, positions, segment = sequences(rows["prompt"], rows["prompt_valid"], rows["tokens"])
    base = {k: v for k, v in params.items() if k != settings.VALUE_HEAD}
    x_BLD = net.apply({"params": base}, inputs, positions, segment, hidden_only=True)
    x_BND = x_BLD[:, rows["prompt"].shape[1] - 1:]
    embedding = lm.output_table(base)
    logits = layers.mask_padded_logits(x_BND @ embedding.T.astype(x_BND.dtype),
                                       net.config.vocab_size)
    logp_BNV = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    logp_BN = jnp.take_along_axis(logp_BNV, rows["tokens"][..., None], axis=-1)[..., 0]
    p_BNV = jnp.exp(logp_BNV)  # masked vocabulary rows: p = 0 and log p = -inf, counted as 0
    entropy_BN = -jnp.sum(jnp.where(p_BNV > 0, p_BNV * logp_BNV, 0.0), axis=-1)
    values = None
    if value:
        head = params[settings.VALUE_HEAD]
        values = (x_BND.astype(jnp.float32) @ head["kernel"].astype(jnp.float32))[..., 0]
        values = values + head["bias"][0].astype(jnp.float32)
    return logp_BN, entropy_BN, values


def response_mask(tokens_BN, end_id):
    """1 up to and including each row's first end_id (all ones for a row cut at the limit)."""
    is_end = (tokens_BN == end_id).astype(jnp.int32)
    before = jnp.cumsum(is_end, axis=1) - is_end  # ends strictly before t
    return (before == 0).astype(jnp.float32)


def gae(rewards_BN, values_BN, mask_BN, gamma, lam):
    """(advantages, returns) by generalised advantage estimation over the masked tokens."""
    next_values = jnp.concatenate([values_BN[:, 1:] * mask_BN[:, 1:],
                                   jnp.zeros_like(values_BN[:, :1])], axis=1)
    deltas = (rewards_BN + gamma * next_values - values_BN) * mask_BN
    next_mask = jnp.concatenate([mask_BN[:, 1:], jnp.zeros_like(mask_BN[:, :1])], axis=1)

    def back(carry, xs):
        delta, m = xs
        adv = delta + gamma * lam * m * carry
        return adv, adv

    _, adv_NB = jax.lax.scan(back, jnp.zeros(rewards_BN.shape[0]),
                             (deltas.T, next_mask.T), reverse=True)
    advantages = adv_NB.T * mask_BN
    return advantages, (advantages + values_BN) * mask_BN


def whiten(x, mask):
    """x standardised over the masked tokens of the whole batch (mean 0, variance 1)."""
    count = jnp.maximum(jnp.sum(mask), 1.0)
    mean = jnp.sum(x * mask) / count
    var = jnp.sum(((x - mean) * mask) ** 2) / count
    return (x - mean) * jax.lax.rsqrt(var + 1e-8) * mask


def group_advantages(scores_B, group_size):
    """Each score standardised within its group of group_size consecutive rows (GRPO)."""
    g = scores_B.reshape(-1, group_size)
    mean, std = jnp.mean(g, axis=1, keepdims=True), jnp.std(g, axis=1, keepdims=True)
    return ((g - mean) / (std + 1e-4)).reshape(-1)


def explained_variance(returns, values, mask):
    """1 - Var(returns - values) / Var(returns) over the masked tokens: how much of the
    returns the value head predicts (1 perfectly, 0 no better than their mean)."""
    resid = (returns - values) * mask
    count = jnp.maximum(jnp.sum(mask), 1.0)
    var_r = jnp.sum((returns * mask - jnp.sum(returns * mask) / count) ** 2 * mask)
    var_e = jnp.sum((resid - jnp.sum(resid) / count) ** 2 * mask)
    return 1.0 - var_e / jnp.maximum(var_r, 1e-8)


def rollout_batch(net, state, reference, rows, scores, *, config, end_id):
    """(the rollouts with advantages and the other per-token arrays the loss reads, step
    statistics): the policy, the reference and (PPO) the value head over the whole batch."""
    rl, value = config.rl, settings.has_value_head(config)
    params = step_lib.full_params(state.params, state.frozen)
    mask = response_mask(rows["tokens"], end_id)
    logp, _, values = token_outputs(net, params, rows, rl.temperature, value=value)
    ref_logp, _, _ = token_outputs(net, jax.lax.stop_gradient(reference_params(
        params, reference, step_lib.uses_lora(config))), rows, rl.temperature)
    # The trainer's own log-probs are the "old" ones: equal to the sampler's in fp32
    # (sampler_error, tested to 1e-5), and the ratio is exactly 1 at the first update even in
    # bf16, where the KV-cache path and the full pass round differently.
    old_logp = logp
    kl_coef = state.extra["kl_coef"] if rl.adaptive_kl else jnp.float32(rl.kl_coef)
    kl_seq = jnp.sum(kl_terms(old_logp, ref_logp, "k1") * mask, axis=1)
    length = jnp.sum(mask, axis=1)
    out = dict(rows, old_logp=old_logp, ref_logp=ref_logp,
               kl_coef=jnp.full(length.shape, kl_coef))
    if value:
        penalty = kl_terms(old_logp, ref_logp, rl.kl_estimator) * mask
        last = jax.nn.one_hot(length.astype(jnp.int32) - 1, mask.shape[1]) * mask
        rewards = -kl_coef * penalty + scores[:, None] * last
        adv, returns = gae(rewards, values, mask, rl.gamma, rl.lam)
        out.update(advantages=whiten(adv, mask) if rl.whiten else adv, returns=returns,
                   old_values=values, token_weight=mask)
        explained = explained_variance(returns, values, mask)
    else:
        adv = group_advantages(scores, rl.group_size)[:, None] * mask
        out.update(advantages=adv, token_weight=mask / jnp.maximum(length, 1.0)[:, None])
        explained = None  # no value head
    stats = {"sampler_error": jnp.max(jnp.abs(logp - rows["old_logp"]) * mask),
             "kl": jnp.mean(kl_seq), "explained_variance": explained, "kl_coef": kl_coef,
             "length": length}
    return out, stats
