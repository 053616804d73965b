"""A reward model: a GPT with a scalar head, trained on preference pairs (task "reward").

The score r(x, y) of a prompt x and response y, rendered in the chat format (data/chat.py), is a
linear head on the final hidden state at the response's last weighted position (the one that
predicts its <|end|>: it has read the prompt and the whole response). Trained with the
Bradley-Terry loss of Ouyang et al. 2022 (eq. 1) on pairs (x, y_w, y_l):
    loss = -log sigmoid(r(x, y_w) - r(x, y_l)).
The pairs and their rows are DPO's (data/preferences.py): JSONL {"prompt", "chosen",
"rejected"}, or the offline genealogy pairs. Logged on held-out pairs: loss, accuracy (share with
r_w > r_l), margin (mean r_w - r_l), and the mean score of each side. PPO (train/tasks/ppo.py)
scores its rollouts with a trained run of this task (config.rl.reward=model:RUN,
train/rl/rewards.py).
"""
import jax
import jax.numpy as jnp

from data import chat_template, preferences
from train import metrics
from train.errors import ConfigError
from train.tasks import lm, posttrain

HEAD = "reward_head"
FRESH_HEADS = (HEAD,)  # with LoRA the head trains alongside the adapters
build_model = lm.build_model
load_pretrained = posttrain.load_pretrained  # the head is not in the base run: it starts at zero


def configure(config):
    """The init_from run's architecture (as SFT); a reward model starts from a GPT run."""
    if not config.get("init_from"):
        raise ConfigError("reward trains a head on a GPT run (usually an SFT run): set "
                          "--config.init_from=RUN, e.g. runs/gpt_sft")
    posttrain.configure(config)


def init_params(model, config, rng):
    return {**lm.init_params(model, config, rng),
            HEAD: posttrain.scalar_head(config.model.d_model)}


def last_weighted(weights_BL):
    """Index of each row's last position with weight > 0 (0 for a row without any)."""
    length = weights_BL.shape[1]
    return length - 1 - jnp.argmax((weights_BL > 0)[:, ::-1], axis=1)


def scores(net, params, rows, *, train=False, rng=None, head=HEAD):
    """r(x, y) of each row, fp32, B: the head on the hidden state at its last weighted position."""
    x_BLD = net.apply({"params": {k: v for k, v in params.items() if k != head}},
                      rows["inputs"], rows["positions"], rows["segment_ids"],
                      deterministic=not train, rngs={"dropout": rng} if train else None,
                      hidden_only=True)
    index_B = last_weighted(rows["weights"])
    last_BD = jnp.take_along_axis(x_BLD, index_B[:, None, None], axis=1)[:, 0]
    out_B1 = last_BD.astype(jnp.float32) @ params[head]["kernel"].astype(jnp.float32)
    return out_B1[:, 0] + params[head]["bias"][0].astype(jnp.float32)


def prepare_data(config, workdir) -> dict:
    """Pairs -> chosen / rejected rows, as DPO's (no reference log-probabilities)."""
    posttrain.check_lengths(config)
    train, dev = posttrain.train_and_dev(config, preferences.bible_pairs,
                                         preferences.read_pairs)
    tokenizer = posttrain.load_tokenizer(config, workdir, [])
    fmt = chat_template.chat_format(tokenizer)
    train_rows, train_info = preferences.render_pairs(train, fmt, config.data.max_len)
    eval_rows, eval_info = preferences.render_pairs(dev, fmt, config.data.max_len)
    info = {"train_pairs": train_info["pairs"], "dev_pairs": eval_info["pairs"],
            "truncated_responses": train_info["truncated"]}
    return {"train_rows": train_rows, "eval_rows": eval_rows, "tokenizer": tokenizer,
            "chat": fmt, "info": info}


def loss_fn(params, batch, rng, *, model, train):
    """The Bradley-Terry loss summed over the pairs of the batch, plus metric sums."""
    n = batch["chosen_inputs"].shape[0]
    r = scores(model, params, posttrain.both_sides(batch), train=train, rng=rng)
    chosen, rejected = r[:n], r[n:]
    valid = (jnp.sum(batch["chosen_weights"], axis=1) > 0).astype(jnp.float32)
    margin = chosen - rejected
    loss_sum = jnp.sum(-jax.nn.log_sigmoid(margin) * valid)
    total = lambda x: jnp.sum(x * valid)  # noqa: E731
    return loss_sum, {"loss_sum": loss_sum, "weight_sum": jnp.sum(valid),
                      "correct_sum": total((margin > 0).astype(jnp.float32)),
                      "margin_sum": total(margin), "reward_chosen_sum": total(chosen),
                      "reward_rejected_sum": total(rejected)}


MEANS = ("margin", "reward_chosen", "reward_rejected")


def summarize(sums: dict) -> dict:
    """Means per pair: loss, accuracy, margin and each side's score."""
    return metrics.pair_means(sums, MEANS)


def final_report(final: dict, info: dict) -> str:
    return (f"final eval Bradley-Terry loss {final['loss']:.4f} (log 2 = 0.6931 before "
            f"training) on {info['dev_pairs']} held-out pairs: accuracy {final['accuracy']:.3f}, "
            f"mean margin {final['margin']:.3f}")


def flops_per_token(config) -> float:
    """Per token of a pair row: both responses forward and backward."""
    return 2 * lm.flops_per_token(config)


def init_batch(config, batch_size):
    """A pair batch of the real shapes and dtypes."""
    return posttrain.pair_batch(lm.init_batch(config, batch_size))


def bench_batch(config):
    """Random full rows on both sides (experiments/bench)."""
    return posttrain.pair_batch(lm.bench_batch(config))
