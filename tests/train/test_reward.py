"""The reward model (train/tasks/reward.py): Bradley-Terry loss and metrics against scores
computed independently, log 2 at step 0, a run through train.main that learns its pairs and
resumes exactly, bad settings one clear error."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import gpt_reward
from tests.train.conftest import pairs_smoke_config
from train import loop, tasks
from train.errors import ConfigError
from train.tasks import posttrain

reward = tasks.get("reward")


def reward_config(base, **overrides):
    c = pairs_smoke_config(gpt_reward.get_config("smoke"), base, **overrides)
    reward.configure(c)
    return c


def test_bradley_terry_loss_against_independent_scores(pair_base, tmp_path):
    config = reward_config(pair_base)
    data = reward.prepare_data(config, str(tmp_path))
    model = reward.build_model(config)
    params = jax.tree.map(jnp.asarray, posttrain.base_params(config))
    head = np.random.default_rng(0).normal(size=(config.model.d_model, 1)).astype(np.float32)
    params[reward.module.HEAD] = {"kernel": jnp.asarray(head), "bias": jnp.asarray([0.3])}
    batch = {k: v[:8] for k, v in data["train_rows"].items()}
    loss_fn = jax.jit(lambda p, b: reward.loss_fn(p, b, None, model=model, train=False))
    loss, sums = loss_fn(params, batch)
    hidden = jax.jit(lambda p, inputs, positions, segment_ids: model.apply(
        {"params": p}, inputs, positions, segment_ids, hidden_only=True))

    def independent(side):  # the hidden state at the last weighted target, by a Python loop
        base = {k: v for k, v in params.items() if k != reward.module.HEAD}
        x = np.asarray(hidden(base, batch[f"{side}_inputs"], batch[f"{side}_positions"],
                              batch[f"{side}_segment_ids"]), np.float64)
        last = [max(i for i, w in enumerate(row) if w > 0) for row in batch[f"{side}_weights"]]
        return np.asarray([x[b, i] @ head[:, 0] + 0.3 for b, i in enumerate(last)])

    chosen, rejected = independent("chosen"), independent("rejected")
    margin = chosen - rejected
    assert np.abs(margin).min() > 1e-3
    np.testing.assert_allclose(float(loss), np.logaddexp(0.0, -margin).sum(), rtol=1e-4)
    means = reward.summarize(jax.device_get(sums))
    assert means["accuracy"] == pytest.approx((margin > 0).mean())
    np.testing.assert_allclose(means["margin"], margin.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(means["reward_chosen"], chosen.mean(), rtol=1e-4, atol=1e-5)
    # The zero head of a fresh run scores every response 0: the loss is log 2.
    params[reward.module.HEAD] = jax.jit(lambda h: jax.tree.map(jnp.zeros_like, h))(
        params[reward.module.HEAD])
    loss0, sums0 = loss_fn(params, batch)
    assert float(loss0) / float(sums0["weight_sum"]) == pytest.approx(math.log(2), abs=1e-6)


def _curve(workdir):
    return [(m["step"], m["split"], m["loss"], m["margin"]) for m in map(
        json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "margin" in m]


def test_a_run_learns_its_pairs_and_resumes_exactly(pair_base, tmp_path):
    """Through train.main's command line: 8 steps learn the training pairs; 4 + stop + 4
    steps give the same curves."""
    from tests.test_cli import run
    workdir, files = pair_base
    flags = ["--config=experiments/gpt_reward.py:smoke", f"--config.init_from={workdir}",
             f"--config.data.source={files[0]}", f"--config.data.eval_source={files[1]}",
             "--config.num_train_steps=8", "--config.eval_every_steps=4",
             "--config.log_every_steps=2", "--config.batch_size=8", "--config.eval_batch_size=8",
             "--config.opt.learning_rate=3e-3", "--config.opt.warmup_steps=0"]
    full = tmp_path / "full"
    # 8 devices, as the in-process runs below have: the curves are compared exactly.
    out = run("train.main", *flags, f"--workdir={full}", devices=8).stdout
    assert "Bradley-Terry loss" in out and "held-out pairs: accuracy" in out
    trains = [m for m in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())
              if m.get("split") == "train"]
    assert trains[-1]["loss"] < math.log(2) - 0.01 and trains[-1]["margin"] > 0.01
    split = tmp_path / "split"
    loop.train_and_evaluate(reward_config(pair_base, stop_at_step=4), str(split), reward)
    loop.train_and_evaluate(reward_config(pair_base), str(split), reward)
    assert _curve(split) == _curve(full)


def test_a_reward_model_needs_a_base_run():
    with pytest.raises(ConfigError, match="set --config.init_from"):
        reward.configure(gpt_reward.get_config("smoke"))
