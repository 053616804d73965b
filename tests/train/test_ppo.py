"""PPO and GRPO (train/tasks/ppo.py, its parts in train/rl/): KL estimators against the exact
KL, GAE and group advantages against loops written here, sampler and trainer log-probs equal
(padded or not), the update's non-finite guard called on its own, runs through train.main with
the first-update ratio 1 and exact resume, LoRA GRPO, and bad or failing rewards and stalled
runs each one clear error."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.errors import DataError
from experiments import gpt_grpo, gpt_ppo
from tests.conftest import override
from tests.train.conftest import write_prompts
from train import errors, loop, runs, step as step_lib, tasks
from train.errors import ConfigError
from train.rl import advantages, rewards, rollout, settings, update

ppo = tasks.get("ppo")


def word_reward(questions, responses, references):
    """A reward that varies between responses of an untrained model: words "the", over 4."""
    return [r.split().count("the") / 4 + len(r) / 400 for r in responses]


def constant_reward(questions, responses, references):
    return [1.0] * len(responses)


def wrong_shape_reward(questions, responses, references):
    return [[1.0, 2.0]] * len(responses)


FAILING_CALLS = []  # the calls failing_reward has had


def failing_reward(questions, responses, references):
    """Scores the first two batches, then fails as a broken scorer would."""
    FAILING_CALLS.append(len(responses))
    if len(FAILING_CALLS) > 2:
        raise RuntimeError("the scorer is down")
    return [float(i) for i in range(len(responses))]


@pytest.fixture(scope="module")
def rl_base(pair_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    return pair_base[0], (write_prompts(root / "train.jsonl", 32, 0),
                          write_prompts(root / "dev.jsonl", 8, 1))


def rl_config(base, module=gpt_ppo, **overrides):
    workdir, files = base
    c = module.get_config("smoke")
    c.init_from, c.data.source, c.data.eval_source = str(workdir), str(files[0]), str(files[1])
    c.rl.reward = "fn:tests.train.test_ppo:word_reward"
    c.num_train_steps, c.eval_every_steps, c.log_every_steps = 4, 4, 1
    c.checkpoint_every_steps, c.opt.learning_rate = 100, 1e-3
    return override(c, **overrides)


def _records(workdir, split):
    return [m for m in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if m["split"] == split]


# ---- pieces ------------------------------------------------------------------------------------

def test_kl_estimators_against_the_exact_kl():
    """Over tokens drawn from pi, k1 and k3 average to KL(pi || ref) exactly, k2 to a value
    close to it for close distributions; k2 and k3 are never negative, k1 can be."""
    kl_terms = jax.jit(advantages.kl_terms, static_argnums=2)
    rng = np.random.default_rng(0)
    for scale in (0.1, 1.0):
        logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=7)))
        ref = jax.nn.log_softmax(logp + scale * jnp.asarray(rng.normal(size=7)))
        p = np.exp(np.asarray(logp, np.float64))
        exact = float(np.sum(p * (np.asarray(logp, np.float64) - np.asarray(ref, np.float64))))
        expect = {k: float(np.sum(p * np.asarray(kl_terms(logp, ref, k), np.float64)))
                  for k in settings.ESTIMATORS}
        assert expect["k1"] == pytest.approx(exact, rel=1e-5, abs=1e-7)
        assert expect["k3"] == pytest.approx(exact, rel=1e-5, abs=1e-7)
        for k in ("k2", "k3"):
            assert float(jnp.min(kl_terms(logp, ref, k))) >= 0.0
        assert float(jnp.min(kl_terms(logp, ref, "k1"))) < 0.0
    # k2 is the second-order expansion: within 20% of the exact KL for close distributions.
    logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=7)))
    ref = jax.nn.log_softmax(logp + 0.05 * jnp.asarray(rng.normal(size=7)))
    p = np.exp(np.asarray(logp))
    exact = float(np.sum(p * (logp - ref)))
    assert float(np.sum(p * kl_terms(logp, ref, "k2"))) == pytest.approx(exact, rel=0.2)


def test_gae_and_group_advantages_by_hand():
    rng = np.random.default_rng(1)
    rewards, values = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    lengths = [5, 3, 1]
    mask = np.asarray([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    gamma, lam = 0.9, 0.8
    adv, ret = jax.jit(advantages.gae, static_argnums=(3, 4))(
        jnp.asarray(rewards * mask), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            assert float(adv[b, t]) == pytest.approx(running, abs=1e-5)
            assert float(ret[b, t]) == pytest.approx(running + values[b, t], abs=1e-5)
        assert np.all(np.asarray(adv[b, n:]) == 0)
    scores = np.asarray([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    got = np.asarray(jax.jit(advantages.group_advantages, static_argnums=1)(
        jnp.asarray(scores), 4))
    for g in range(2):
        part = scores[4 * g:4 * g + 4]
        np.testing.assert_allclose(got[4 * g:4 * g + 4],
                                   (part - part.mean()) / (part.std() + 1e-4), rtol=1e-5)
    whitened = np.asarray(jax.jit(advantages.whiten)(jnp.asarray(rewards), jnp.asarray(mask)))
    real = whitened[mask > 0]
    assert real.mean() == pytest.approx(0.0, abs=1e-5) and real.std() == pytest.approx(1.0, 1e-3)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(advantages.response_mask, static_argnums=1)(
            jnp.asarray([[4, 9, 1, 9], [4, 4, 4, 4]]), 9)),
        [[1, 1, 0, 0], [1, 1, 1, 1]])


def test_sampler_and_trainer_log_probs_agree_padded_or_alone(rl_base, tmp_path):
    """The sampler's log-prob of each token it drew equals the training forward pass's (fp32,
    1e-5), for prompts of different lengths left-padded in one batch; and a padded row's
    log-probs equal those of the same row alone."""
    from jax.sharding import NamedSharding, PartitionSpec
    config = rl_config(rl_base, **{"rl.temperature": 0.7, "rl.max_new_tokens": 8})
    ppo.configure(config)
    data = ppo.prepare_data(config, str(tmp_path))
    params = jax.tree.map(jnp.asarray, data["reference_weights"])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sample = rollout.make_rollout_fn(config, data["chat"].end_id,
                                NamedSharding(mesh, PartitionSpec()))
    rows = {k: v[:8] for k, v in data["train_rows"].items()}
    lengths = rows["prompt_valid"].sum(1)
    assert len(set(lengths.tolist())) > 1  # really of different lengths
    out = jax.device_get(sample(params, rows["prompt"], rows["prompt_valid"], rows["index"],
                                 jax.random.key(3)))
    net = ppo.build_model(config)
    token_outputs = jax.jit(lambda p, prompt, prompt_valid, tokens: advantages.token_outputs(
        net, p, {"prompt": prompt, "prompt_valid": prompt_valid, "tokens": tokens}, 0.7))
    logp, entropy, _ = token_outputs(params, out["prompt"], out["prompt_valid"], out["tokens"])
    mask = np.asarray(jax.jit(advantages.response_mask, static_argnums=1)(
        jnp.asarray(out["tokens"]), data["chat"].end_id))
    error = np.abs(np.asarray(logp) - out["old_logp"]) * mask
    assert error.max() < 1e-5
    assert np.all(np.asarray(entropy) > 0)
    b = int(np.argmin(lengths))  # the most padded row, then the same row with no padding
    alone = {"prompt": out["prompt"][b:b + 1, -lengths[b]:],
             "prompt_valid": out["prompt_valid"][b:b + 1, -lengths[b]:],
             "tokens": out["tokens"][b:b + 1]}
    alone_logp, _, _ = token_outputs(params, alone["prompt"], alone["prompt_valid"],
                                     alone["tokens"])
    np.testing.assert_allclose(np.asarray(alone_logp)[0], np.asarray(logp)[b], atol=1e-5)


def test_the_update_alone_moves_the_policy_and_reverts_a_non_finite_step(rl_base, tmp_path):
    """update.make_update called on its own: finite scores move the parameters and the
    adaptive KL coefficient; one nan score makes every minibatch non-finite (train/step.py's
    guard), and the whole state (parameters, optimizer state, KL coefficient) comes back as
    it was, only the step count moved."""
    from jax.sharding import NamedSharding, PartitionSpec
    config = rl_config(rl_base, **{"rl.adaptive_kl": True, "rl.kl_target": 0.01,
                                   "rl.kl_horizon": 100})
    ppo.configure(config)
    data = ppo.prepare_data(config, str(tmp_path))
    end_id = data["chat"].end_id
    reference = jax.tree.map(jnp.asarray, data["reference_weights"])
    d = config.model.d_model
    params = dict(reference, **{settings.VALUE_HEAD: {"kernel": jnp.zeros((d, 1)),
                                                      "bias": jnp.zeros((1,))}})
    tx, schedule = update.make_optimizer(config)
    state = step_lib.TrainState(jnp.asarray(0, jnp.int32), params, jax.jit(tx.init)(params), None,
                                ppo.init_extra(config))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sample = rollout.make_rollout_fn(config, end_id, NamedSharding(mesh, PartitionSpec()))
    rows = {k: v[:config.batch_size] for k, v in data["train_rows"].items()}
    rollouts = sample(reference, rows["prompt"], rows["prompt_valid"], rows["index"],
                      jax.random.key(0))
    fn = jax.jit(update.make_update(ppo.build_model(config), tx, schedule, config, end_id))
    scores = jnp.linspace(0.0, 1.0, config.batch_size)
    moved, metrics = fn(state, reference, rollouts, scores, jax.random.key(1))
    assert float(metrics["nonfinite"]) == 0.0 and int(moved.step) == 1
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(moved.params), jax.tree.leaves(params)))
    assert float(moved.extra["kl_coef"]) != float(state.extra["kl_coef"])
    kept, metrics = fn(state, reference, rollouts, scores.at[0].set(jnp.nan), jax.random.key(1))
    assert float(metrics["nonfinite"]) == 1.0 and int(kept.step) == 1
    for got, before in zip(jax.tree.leaves((kept.params, kept.opt_state, kept.extra)),
                           jax.tree.leaves((state.params, state.opt_state, state.extra))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(before))


# ---- runs --------------------------------------------------------------------------------------

def test_ppo_run_ratio_one_at_first_update_and_exact_resume(rl_base, tmp_path):
    """4 PPO steps through train.main: at the first update the trainer's log-probs are the
    sampler's (ratio 1, nothing clipped), every metric the issue names is logged, the eval
    samples are written; 2 steps + stop + 2 more give the same curves and KL coefficient."""
    from tests.test_cli import run
    workdir, files = rl_base
    full = tmp_path / "full"
    flags = ["--config=experiments/gpt_ppo.py:smoke", f"--config.init_from={workdir}",
             f"--config.data.source={files[0]}", f"--config.data.eval_source={files[1]}",
             "--config.rl.reward=fn:tests.train.test_ppo:word_reward",
             "--config.num_train_steps=4", "--config.eval_every_steps=4",
             "--config.log_every_steps=1", "--config.checkpoint_every_steps=100",
             "--config.opt.learning_rate=1e-3", "--config.rl.adaptive_kl=True",
             "--config.rl.kl_target=0.01", "--config.rl.kl_horizon=100"]
    # 8 devices, as the in-process runs below have: the curves are compared exactly.
    out = run("train.main", *flags, f"--workdir={full}", devices=8).stdout
    assert "final eval (8 dev prompts, sampled): reward" in out
    train = _records(full, "train")
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    first = train[0]
    assert first["sampler_error"] < 1e-5 and first["first_clipfrac"] == 0.0
    for name in ("score", "score_std", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl",
                 "value_loss", "explained_variance", "response_length", "truncated",
                 "policy_loss", "time_rollout", "time_reward", "time_update"):
        assert all(np.isfinite(m[name]) for m in train), name
    assert all(m["time_rollout"] > 0 and m["time_update"] > 0 for m in train)
    assert first["score_std"] > 0
    # The policy moved (lr 1e-3), so later first-minibatch ratios are not all 1 any more.
    assert train[-1]["approx_kl"] > 0
    # Adaptive KL: the coefficient moves by at most 0.2 * n / horizon a step, up when KL > target.
    coefs = [m["kl_coef"] for m in train]
    assert coefs[0] == pytest.approx(0.05)
    for before, after, m in zip(coefs, coefs[1:], train):
        step = 0.2 * 8 / 100
        assert abs(after / before - 1) <= step + 1e-6
        assert (after > before) == (m["kl"] > 0.01)
    final = _records(full, "eval")[-1]
    assert {"score", "kl", "response_length", "truncated"} <= set(final)
    samples = [json.loads(x) for x in (full / "eval_generations.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {"prompt", "reference", "answer", "score"} <= set(samples[0])
    # A PPO run talks in the chat format (the value head is not part of the language model).
    answer = run("experiments.chat", f"--workdir={full}", "--prompt=Whose son was Boaz?",
                 "--max_new_tokens=4").stdout
    assert "error" not in answer
    split = tmp_path / "split"
    config = rl_config(rl_base, **{"rl.adaptive_kl": True, "rl.kl_target": 0.01,
                                   "rl.kl_horizon": 100})
    loop.train_and_evaluate(override(config, stop_at_step=2), str(split), ppo)
    loop.train_and_evaluate(rl_config(rl_base, **{"rl.adaptive_kl": True, "rl.kl_target": 0.01,
                                                  "rl.kl_horizon": 100}), str(split), ppo)
    keys = ("step", "score", "kl", "kl_coef", "loss", "value_loss")
    assert ([[m[k] for k in keys] for m in _records(split, "train")]
            == [[m[k] for k in keys] for m in train])


def test_grpo_with_lora_trains_adapters_against_the_base(rl_base, tmp_path):
    """GRPO with LoRA through train.main: groups of 4, the reference is the base (adapters
    off), so at step 1 KL is 0; no value head."""
    from tests.test_cli import run
    workdir, files = rl_base
    out = run("train.main", "--config=experiments/gpt_grpo.py:smoke",
              f"--config.init_from={workdir}", f"--config.data.source={files[0]}",
              f"--config.data.eval_source={files[1]}", "--config.model.lora_rank=4",
              "--config.rl.reward=fn:tests.train.test_ppo:word_reward",
              "--config.num_train_steps=2", "--config.eval_every_steps=2",
              "--config.log_every_steps=1", "--config.opt.learning_rate=1e-3",
              f"--workdir={tmp_path / 'run'}").stdout
    assert "final eval (8 dev prompts, sampled): reward" in out
    assert "trained: LoRA" in out
    train = _records(tmp_path / "run", "train")
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert train[0]["sampler_error"] < 1e-5 and train[0]["first_clipfrac"] == 0.0
    assert "value_loss" not in train[0] and "explained_variance" not in train[0]
    assert "kl_loss" in train[0]
    final = _records(tmp_path / "run", "eval")[-1]
    assert np.isfinite(final["score"]) and final["kl"] != 0.0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["task"] == "grpo" and saved["rl"]["group_size"] == 4


def test_ppo_raises_a_dense_reward(rl_base, tmp_path):
    """12 steps at a high learning rate against "shorter is better": the mean score of the last
    4 steps beats the first 4's (a sign error in the advantages or the ratio would lower it)."""
    config = rl_config(rl_base, **{"rl.reward": "fn:tests.train.test_ppo:short_reward",
                                   "rl.stall_steps": 0, "opt.learning_rate": 1e-2,
                                   "num_train_steps": 12, "eval_every_steps": 12})
    loop.train_and_evaluate(config, str(tmp_path / "run"), ppo)
    scores = [m["score"] for m in _records(tmp_path / "run", "train")]
    assert np.mean(scores[-4:]) > np.mean(scores[:4]) + 0.05, scores


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_rewards_and_settings_are_one_clear_error():
    with pytest.raises(DataError, match=r"returned shape \(3, 2\) for 3 responses"):
        rewards.call_reward_fn(wrong_shape_reward, "fn:x:y", ["q"] * 3, ["r"] * 3,
                               [("a",)] * 3)
    with pytest.raises(DataError, match="non-finite"):
        rewards.call_reward_fn(lambda q, r, a: [float("nan")] * 2, "fn:x:y", ["q"] * 2,
                               ["r"] * 2, [("a",)] * 2)
    with pytest.raises(DataError, match="not numbers"):
        rewards.call_reward_fn(lambda q, r, a: ["high", "low"], "fn:x:y", ["q"] * 2,
                               ["r"] * 2, [("a",)] * 2)
    for spec in ("f1", "fn:only_module", "model:"):
        with pytest.raises(ConfigError, match="names no reward"):
            settings.parse_reward(spec)
    config = gpt_grpo.get_config("smoke")
    config.init_from = "somewhere"
    config.rl.group_size = 1
    with pytest.raises(ConfigError, match="at least 2"):
        tasks.get("grpo").configure(override(config))
    with pytest.raises(ConfigError, match="set --config.init_from"):
        ppo.configure(gpt_ppo.get_config("smoke"))
    for key, value, message in (("rl.lam", 1.5, "must be >= 0 and <= 1"),
                                ("rl.clip", 0.0, "must be > 0"),
                                ("rl.stall_steps", -1, "must be >= 0")):
        bad = override(gpt_ppo.get_config("smoke"), init_from="somewhere", **{key: value})
        with pytest.raises(ConfigError, match=f"config.{key}={value} {message}"):
            ppo.configure(bad)


def test_stall_rules():
    end = 9
    stall = {"cut": 0, "flat": 0}
    cut = np.zeros((4, 3), np.int32)  # no response reaches <|end|>
    rollout.check_stall(stall, cut, np.arange(4.0), end, 3, 1, 1)
    rollout.check_stall(stall, cut, np.arange(4.0), end, 3, 2, 1)
    with pytest.raises(errors.StalledError, match="every response ran to the length limit"):
        rollout.check_stall(stall, cut, np.arange(4.0), end, 3, 3, 1)
    stall = {"cut": 0, "flat": 0}
    ended = cut.copy()
    ended[0, 1] = end
    rollout.check_stall(stall, cut, np.arange(4.0), end, 3, 1, 1)
    rollout.check_stall(stall, ended, np.arange(4.0), end, 3, 2, 1)  # one ended: count restarts
    assert stall["cut"] == 0
    # GRPO: equal within each group is nothing to learn from, even if the groups differ.
    stall = {"cut": 0, "flat": 0}
    groups = np.repeat([1.0, 2.0], 4)
    rollout.check_stall(stall, ended, groups, end, 2, 1, 4)
    with pytest.raises(errors.StalledError, match="the responses to each prompt all got the same"):
        rollout.check_stall(stall, ended, groups, end, 2, 2, 4)
    assert stall["cut"] == 0
    stall = {"cut": 0, "flat": 0}
    rollout.check_stall(stall, ended, groups, end, 2, 1, 1)  # PPO: the batch is not flat
    assert stall["flat"] == 0


def test_a_run_with_nothing_to_learn_stops_with_a_clear_message(rl_base, tmp_path):
    config = rl_config(rl_base, **{"rl.reward": "fn:tests.train.test_ppo:constant_reward",
                                   "rl.stall_steps": 2})
    with pytest.raises(errors.StalledError, match="step 2: for 2 steps in a row .*every response "
                                             "in the batch got the same score"):
        loop.train_and_evaluate(config, str(tmp_path / "run"), ppo)
    bad = rl_config(rl_base, **{"rl.reward": "fn:tests.train.test_ppo:wrong_shape_reward"})
    with pytest.raises(DataError, match="must return one float per response"):
        loop.train_and_evaluate(bad, str(tmp_path / "bad"), ppo)


def test_a_failing_reward_function_is_one_error_naming_it_and_the_step(rl_base, tmp_path):
    """A reward function that raises at step 3 stops the run with one DataError naming the
    function, its exception and the step; the newest checkpoint is still step 2's and nothing
    of step 3 is written."""
    FAILING_CALLS.clear()
    run = tmp_path / "run"
    config = rl_config(rl_base, **{"rl.reward": "fn:tests.train.test_ppo:failing_reward",
                                   "checkpoint_every_steps": 2})
    with pytest.raises(DataError, match=r"step 3: the reward function "
                                        r"fn:tests\.train\.test_ppo:failing_reward raised "
                                        r"RuntimeError: the scorer is down"):
        loop.train_and_evaluate(config, str(run), ppo)
    assert len(FAILING_CALLS) == 3
    assert sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit()) == [2]
    assert [m["step"] for m in _records(run, "train")] == [1, 2]


def test_a_reward_model_run_scores_rollouts_as_it_scores_its_pairs(pair_base, rl_base,
                                                                   tmp_path):
    """rl.reward=model:RUN scores (prompt ids, response ids) exactly as the reward task scores
    the same sequences rendered as its own pair rows; a run of another task is refused."""
    from experiments import gpt_reward
    from tests.train.conftest import pairs_smoke_config
    reward_task = tasks.get("reward")
    rm = tmp_path / "rm"
    rc = pairs_smoke_config(gpt_reward.get_config("smoke"), pair_base, num_train_steps=2,
                            eval_every_steps=2)
    loop.train_and_evaluate(rc, str(rm), reward_task)
    config = rl_config(rl_base, **{"rl.reward": f"model:{rm}"})
    ppo.configure(config)
    score = rewards.load_reward(config, runs.load_run(str(rm))[1])
    rc_loaded, _, params, _ = runs.load_run(str(rm))
    rows = reward_task.prepare_data(rc_loaded, str(rm))["eval_rows"]
    side = {k[len("chosen_"):]: v[:6] for k, v in rows.items() if k.startswith("chosen_")}
    reward_net = reward_task.build_model(rc_loaded)
    expected = np.asarray(jax.jit(lambda p, s: reward_task.module.scores(reward_net, p, s))(
        params, side))
    prompts, responses = [], []
    for inputs, targets, weights in zip(side["inputs"], side["targets"], side["weights"]):
        first, last = np.flatnonzero(weights)[[0, -1]]
        full = inputs[:last + 1].tolist() + [int(targets[last])]
        prompts.append(full[:first + 1])
        responses.append(full[first + 1:-1])  # the <|end|> is the scorer's to add
    got = score(None, None, None, prompts, responses)
    assert np.abs(expected).max() > 0  # the head has trained away from zero
    np.testing.assert_allclose(got, expected, atol=1e-5)
    bad = rl_config(rl_base, **{"rl.reward": f"model:{pair_base[0]}"})
    ppo.configure(bad)
    with pytest.raises(DataError, match="is a lm run; it must be a reward-model run"):
        rewards.load_reward(bad, runs.load_run(str(rm))[1])


def short_reward(questions, responses, references):
    """Shorter answers score higher: a dense signal even for a near-uniform policy."""
    return [-len(r) / 20 for r in responses]


def test_a_non_finite_step_leaves_the_whole_state_as_it_was(rl_base, tmp_path):
    """At lr 1e30 the first minibatch's update is finite but the second's loss is not: the
    step is skipped whole (skip_nonfinite_steps), so the policy is still the reference."""
    config = rl_config(rl_base, **{"opt.learning_rate": 1e30, "skip_nonfinite_steps": 2,
                                   "num_train_steps": 2, "eval_every_steps": 2})
    final = loop.train_and_evaluate(config, str(tmp_path / "run"), ppo)
    assert abs(final["kl"]) < 1e-4  # sampled from the reference itself (a moved policy: > 1)
    assert _records(tmp_path / "run", "train") == []  # both steps skipped, none logged as good
