"""Direct preference optimisation of GPT (task "dpo"), with the IPO loss as an option.

DPO (Rafailov et al. 2023, eq. 7) trains the policy pi on pairs (x, y_w, y_l) so that
    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
grows: loss = -log sigmoid(beta h). IPO (Azar et al. 2023, eq. 17) regresses h onto 1/(2 beta)
instead: loss = (h - 1 / (2 beta))^2, which stays bounded when the pairs are deterministic.
log pi(y|x) is the sum of the response tokens' log-probabilities (their <|end|> included), in
the chat format of data/chat.py; the prompt carries no weight.

The reference is the model the run starts from (config.init_from, usually an SFT run):
  precomputed: its log-probabilities of every train and eval pair, computed once before step
      1 (workdir/reference_logps.npz, reused on resume) and read with the batch;
  adapters_off (LoRA runs, the default there): the same weights with the adapters switched off,
      in the step itself, so no second copy of the model is held.
At step 0 the policy is the reference, so h = 0 and the loss is log 2 on every pair.
Logged: loss, accuracy (share of pairs with h > 0), reward_chosen / reward_rejected (beta times
the log-ratio of each response), margin (their difference), the policy's log-probabilities and
the reference's; at each eval also greedy answers to the dev prompts, exact match and F1
against the chosen response (as sft, workdir/eval_generations.jsonl).
"""
import dataclasses
import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data import chat_template, preferences
from train import losses, metrics
from train.errors import ConfigError
from train.tasks import lm, posttrain, sft

LOSS_TYPES = ("sigmoid", "ipo")
REFERENCES = ("auto", "precomputed", "adapters_off")
REFERENCE_FILE = "reference_logps.npz"
FRESH_HEADS = ()
init_params = lm.init_params
load_pretrained = posttrain.load_pretrained
evaluate_predictions = sft.evaluate_predictions  # greedy dev answers: exact match and F1
SIDES = posttrain.SIDES


@dataclasses.dataclass(frozen=True)
class Policy:
    """The GPT with the settings loss_fn reads: beta, the loss, where the reference is from."""
    net: Any  # the decoder module, gpt.GPT or llama.Llama
    beta: float
    loss_type: str
    reference: str  # "precomputed" or "adapters_off"

    @property
    def config(self):
        return self.net.config

    def init(self, *args, **kwargs):
        return self.net.init(*args, **kwargs)

    def apply(self, *args, **kwargs):
        return self.net.apply(*args, **kwargs)


def reference_mode(config) -> str:
    mode = config.dpo.reference
    if mode == "auto":
        return "adapters_off" if config.model.get("lora_rank", 0) > 0 else "precomputed"
    return mode


def build_model(config, **overrides):
    """The Policy; with overrides (decode=True for sampling) the plain GPT."""
    net = lm.build_model(config, **overrides)
    if overrides:
        return net
    return Policy(net, float(config.dpo.beta), config.dpo.loss_type, reference_mode(config))


def configure(config):
    """The init_from run's architecture (as SFT), and the DPO settings checked."""
    if not config.get("init_from"):
        raise ConfigError("dpo fine-tunes a GPT run (usually an SFT run): set "
                          "--config.init_from=RUN, e.g. runs/gpt_sft")
    posttrain.configure(config)
    d = config.dpo
    if not d.beta > 0:
        raise ConfigError(f"config.dpo.beta={d.beta} must be > 0 (0.1 is the usual value)")
    if d.loss_type not in LOSS_TYPES:
        raise ConfigError(f"config.dpo.loss_type={d.loss_type!r} is not one of {LOSS_TYPES}")
    if d.reference not in REFERENCES:
        raise ConfigError(f"config.dpo.reference={d.reference!r} is not one of {REFERENCES}")
    if d.reference == "adapters_off" and not config.model.get("lora_rank", 0):
        raise ConfigError("config.dpo.reference='adapters_off' needs LoRA adapters to switch "
                          "off: set --config.model.lora_rank=8, or use 'precomputed'")


def flops_per_token(config) -> float:
    """Per token of a pair row: both responses forward and backward, plus the reference's
    forward pass when it runs in the step (a third of a training pass)."""
    both = 2 * lm.flops_per_token(config)
    return both * (4 / 3 if reference_mode(config) == "adapters_off" else 1)


def prepare_data(config, workdir) -> dict:
    """Pairs -> chosen / rejected rows (with the reference log-probabilities when they are
    precomputed)."""
    d = config.data
    posttrain.check_lengths(config)
    train, dev = posttrain.train_and_dev(config, preferences.bible_pairs,
                                         preferences.read_pairs)
    tokenizer = posttrain.load_tokenizer(config, workdir, [])
    fmt = chat_template.chat_format(tokenizer)
    train_rows, train_info = preferences.render_pairs(train, fmt, d.max_len)
    eval_rows, eval_info = preferences.render_pairs(dev, fmt, d.max_len)
    n_gen = len(dev) if not d.eval_generations else min(d.eval_generations, len(dev))
    # Generated answers to the dev prompts, scored against the chosen response (sft's eval).
    dev_prompts = [(fmt.prompt(p.chosen.turns[:-1]),
                    (p.chosen.turns[-1][1],), p.chosen.turns[-2][1]) for p in dev[:n_gen]]
    info = {"train_pairs": train_info["pairs"], "dev_pairs": eval_info["pairs"],
            "truncated_responses": train_info["truncated"], "reference": reference_mode(config),
            "dev_generations": n_gen}
    if reference_mode(config) == "precomputed":
        train_rows, eval_rows = reference_logps(config, workdir, train_rows, eval_rows)
    return {"train_rows": train_rows, "eval_rows": eval_rows, "tokenizer": tokenizer,
            "chat": fmt, "dev_prompts": dev_prompts, "info": info}


# ---- log-probabilities -------------------------------------------------------------------------

def sequence_logps(net, params, rows, *, train=False, rng=None):
    """Summed log-probabilities of each row's weighted targets (its response), fp32, B."""
    x_BLD = net.apply({"params": params}, rows["inputs"], rows["positions"], rows["segment_ids"],
                      deterministic=not train, rngs={"dropout": rng} if train else None,
                      hidden_only=True)
    _, nll_BL, _ = losses.tied_cross_entropy(x_BLD, lm.output_table(params), rows["targets"],
                                             vocab_size=net.config.vocab_size)
    return -jnp.sum(nll_BL * rows["weights"], axis=1)


def _rows_digest(config, rows_by_split) -> str:
    h = hashlib.sha256(f"{config.init_from}|{config.model.param_dtype}".encode())
    for rows in rows_by_split:
        for key in sorted(rows):
            h.update(key.encode() + np.ascontiguousarray(rows[key]).tobytes())
    return h.hexdigest()


def reference_logps(config, workdir, train_rows, eval_rows):
    """Both splits' rows with chosen_ref_logp and rejected_ref_logp of the init_from model,
    computed once (in batches of eval_batch_size) and kept in workdir/REFERENCE_FILE."""
    path = os.path.join(workdir, REFERENCE_FILE)
    digest = _rows_digest(config, (train_rows, eval_rows))
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["digest"]) == digest:
                return ({**train_rows, **{k[6:]: saved[k] for k in saved if k[:6] == "train_"}},
                        {**eval_rows, **{k[5:]: saved[k] for k in saved if k[:5] == "eval_"}})
    net = lm.build_model(config, lora_rank=0)  # the reference never has adapters
    params = jax.device_put(posttrain.base_params(config))
    logps = jax.jit(lambda p, rows: sequence_logps(net, p, rows))
    out, arrays = [], {"digest": np.asarray(digest)}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        n, size = len(rows["chosen_inputs"]), config.eval_batch_size
        values = {side: np.zeros(n, np.float32) for side in SIDES}
        for start in range(0, n, size):
            for side_name in SIDES:
                part = {k: v[start:start + size] for k, v in
                        preferences.side(rows, side_name).items()}
                real = len(part["inputs"])  # the last batch is padded to one shape
                part = {k: np.concatenate([v, np.zeros((size - real, *v.shape[1:]), v.dtype)])
                        for k, v in part.items()}
                values[side_name][start:start + real] = np.asarray(logps(params, part))[:real]
        extra = {f"{side_name}_ref_logp": values[side_name] for side_name in SIDES}
        out.append({**rows, **extra})
        arrays.update({f"{split}_{k}": v for k, v in extra.items()})
    if jax.process_index() == 0:
        partial = path + ".partial.npz"
        np.savez(partial, **arrays)
        os.replace(partial, path)
    return out[0], out[1]


# ---- the loss ----------------------------------------------------------------------------------

def loss_fn(params, batch, rng, *, model, train):
    """The DPO (or IPO) loss summed over the pairs of the batch, plus metric sums."""
    n = batch["chosen_inputs"].shape[0]
    both = posttrain.both_sides(batch)
    policy = sequence_logps(model.net, params, both, train=train, rng=rng)
    if model.reference == "adapters_off":
        base = jax.lax.stop_gradient(posttrain.switch_off_adapters(params))
        ref = sequence_logps(model.net, base, both)
        ref_chosen, ref_rejected = ref[:n], ref[n:]
    else:
        ref_chosen, ref_rejected = batch["chosen_ref_logp"], batch["rejected_ref_logp"]
    chosen, rejected = policy[:n], policy[n:]
    # Padding pairs (the eval split's last batch) have no weighted token: they count nothing.
    valid = (jnp.sum(batch["chosen_weights"], axis=1) > 0).astype(jnp.float32)
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if model.loss_type == "ipo":
        per_pair = (h - 1.0 / (2.0 * model.beta)) ** 2
    else:
        per_pair = -jax.nn.log_sigmoid(model.beta * h)
    loss_sum = jnp.sum(per_pair * valid)
    total = lambda x: jnp.sum(x * valid)  # noqa: E731
    return loss_sum, {
        "loss_sum": loss_sum, "weight_sum": jnp.sum(valid),
        "correct_sum": total((h > 0).astype(jnp.float32)),
        "reward_chosen_sum": total(model.beta * (chosen - ref_chosen)),
        "reward_rejected_sum": total(model.beta * (rejected - ref_rejected)),
        "margin_sum": total(model.beta * h),
        "logp_chosen_sum": total(chosen), "logp_rejected_sum": total(rejected),
        "ref_logp_chosen_sum": total(ref_chosen), "ref_logp_rejected_sum": total(ref_rejected)}


MEANS = ("reward_chosen", "reward_rejected", "margin", "logp_chosen", "logp_rejected",
         "ref_logp_chosen", "ref_logp_rejected")


def summarize(sums: dict) -> dict:
    """Means per pair: loss, accuracy, rewards, margin and log-probabilities."""
    return metrics.pair_means(sums, MEANS)


def final_report(final: dict, info: dict) -> str:
    line = (f"final eval {info.get('reference', '')} DPO loss {final['loss']:.4f} (log 2 = "
            f"0.6931 before training), preference accuracy {final['accuracy']:.3f}, reward "
            f"margin {final['margin']:.3f}")
    if "exact_match" in final:
        line += (f"; dev answers ({info['dev_generations']}): exact match "
                 f"{final['exact_match']:.1f}%, F1 {final['f1']:.1f}%")
    return line


def _with_reference(config, batch):
    if reference_mode(config) == "precomputed":
        n = len(batch["chosen_inputs"])
        batch.update({f"{side_name}_ref_logp": np.zeros(n, np.float32) for side_name in SIDES})
    return batch


def init_batch(config, batch_size):
    """A pair batch of the real shapes and dtypes."""
    return _with_reference(config, posttrain.pair_batch(lm.init_batch(config, batch_size)))


def bench_batch(config):
    """Random full rows on both sides (experiments/bench)."""
    return _with_reference(config, posttrain.pair_batch(lm.bench_batch(config)))
