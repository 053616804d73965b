"""DPO (train/tasks/dpo.py) against the paper's formulas on independently computed
log-probabilities; the policy equals the reference at step 0; LoRA's reference is the base with
the adapters off; a run learns the preferences and resumes exactly; bad pairs and settings are
one clear error."""
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import chat, preferences
from data.errors import DataError
from experiments import gpt_dpo
from tests.train.conftest import pairs_smoke_config
from train import loop, tasks
from train.errors import ConfigError
from train.tasks import posttrain

dpo = tasks.get("dpo")


def dpo_config(base, **overrides):
    c = pairs_smoke_config(gpt_dpo.get_config("smoke"), base, **overrides)
    dpo.configure(c)
    return c


@pytest.fixture(scope="module")
def base(pair_base):
    return pair_base


@pytest.fixture(scope="module")
def prepared(base, tmp_path_factory):
    config = dpo_config(base)
    data = dpo.prepare_data(config, str(tmp_path_factory.mktemp("prep")))
    params = jax.tree.map(jnp.asarray, posttrain.base_params(config))
    return config, data, params


@functools.partial(jax.jit, static_argnums=0)
def _logits(net, params, inputs, positions, segment_ids):
    return net.apply({"params": params}, inputs, positions, segment_ids)


def _independent_logps(net, params, rows):
    """Sum over weighted targets of log softmax(logits), in float64 numpy."""
    logits = np.asarray(_logits(net, params, rows["inputs"], rows["positions"],
                                rows["segment_ids"]), np.float64)[..., :net.config.vocab_size]
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, rows["targets"][..., None], -1)[..., 0]
    return (picked * rows["weights"]).sum(-1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_metrics_match_the_papers_formulas(prepared, loss_type):
    config, data, base_params = prepared
    model = dpo.module.Policy(dpo.module.lm.build_model(config), 0.5, loss_type, "precomputed")
    # A policy away from the reference: the base with noise on every weight.
    def noisy(base_params):
        keys = iter(jax.random.split(jax.random.key(3), 1000))
        return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape),
                            base_params)
    params = jax.jit(noisy)(base_params)
    batch = {k: v[:8] for k, v in data["train_rows"].items()}
    loss, sums = jax.jit(lambda p, b: dpo.loss_fn(p, b, None, model=model, train=False))(
        params, batch)
    pc = _independent_logps(model.net, params, preferences.side(batch, "chosen"))
    pr = _independent_logps(model.net, params, preferences.side(batch, "rejected"))
    rc = _independent_logps(model.net, base_params, preferences.side(batch, "chosen"))
    rr = _independent_logps(model.net, base_params, preferences.side(batch, "rejected"))
    np.testing.assert_allclose(batch["chosen_ref_logp"], rc, rtol=1e-5)  # precomputed
    h = (pc - rc) - (pr - rr)
    assert np.abs(h).min() > 1e-2  # the noise moved the policy
    if loss_type == "sigmoid":  # Rafailov et al. 2023, eq. 7
        expected = np.logaddexp(0.0, -0.5 * h)
    else:  # Azar et al. 2023, eq. 17, with tau = beta
        expected = (h - 1 / (2 * 0.5)) ** 2
    np.testing.assert_allclose(float(loss), expected.sum(), rtol=2e-5)
    means = dpo.summarize(jax.device_get(sums))
    np.testing.assert_allclose(means["margin"], 0.5 * h.mean(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(means["reward_chosen"], 0.5 * (pc - rc).mean(), rtol=2e-5,
                               atol=1e-6)
    assert means["accuracy"] == pytest.approx((h > 0).mean())


def test_at_step_zero_the_policy_is_the_reference(prepared):
    """Precomputed: the loss is log 2 on every pair (h within 1e-4 nats), and with LoRA
    (adapters start at zero) the in-step reference equals the policy exactly."""
    config, data, params = prepared
    batch = {k: v[:8] for k, v in data["eval_rows"].items()}
    model = dpo.build_model(config)
    _, sums = jax.jit(lambda p, b: dpo.loss_fn(p, b, None, model=model, train=False))(
        params, batch)
    means = dpo.summarize(jax.device_get(sums))
    assert means["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # (accuracy is not asserted: at h = 0 it counts pairs whose h is rounding noise above 0)
    assert abs(means["margin"]) < 1e-5
    np.testing.assert_allclose(means["logp_chosen"], means["ref_logp_chosen"], rtol=1e-5)


def test_invalid_settings_and_pairs_are_clear_errors(base, tmp_path):
    with pytest.raises(ConfigError, match="set --config.init_from"):
        dpo.configure(gpt_dpo.get_config("smoke"))
    with pytest.raises(ConfigError, match="adapters_off' needs LoRA"):
        dpo_config(base, **{"dpo.reference": "adapters_off"})
    with pytest.raises(ConfigError, match="beta=0.0 must be > 0"):
        dpo_config(base, **{"dpo.beta": 0.0})
    with pytest.raises(ConfigError, match="loss_type='hinge'"):
        dpo_config(base, **{"dpo.loss_type": "hinge"})
    bad = {
        '{"prompt": "q", "chosen": "Abel", "rejected": " Abel "}': "are the same text",
        '{"prompt": "q", "chosen": "Abel"}': "no 'rejected' field",
        '{"prompt": "q", "chosen": 3, "rejected": "x"}': "'chosen' must be a string",
        '{"prompt": "q", "chosen": "  ", "rejected": "x"}': "'chosen' is empty",
        '["q", "a", "b"]': "not an object",
    }
    for line, needle in bad.items():
        path = tmp_path / "pairs.jsonl"
        path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
        with pytest.raises(DataError, match=f"pairs.jsonl:2: .*{needle}"):
            preferences.read_pairs(str(path))


def test_wrong_answer_pairs_reject_another_answer_of_the_same_kind():
    conv = lambda q, a: chat.Conversation((("user", f"v\nQuestion: {q}"), ("assistant", a)))  # noqa
    convs = [conv("Whose son was A?", "B"), conv("Whose son was C?", "B"),
             conv("Whose son was D?", "E"), conv("What was F?", "G")]
    pairs = preferences.wrong_answer_pairs(convs)
    got = [(p.chosen.turns[-1][1], p.rejected.turns[-1][1]) for p in pairs]
    # "What was" has no other question to borrow from; B's neighbour C also answers B.
    assert got == [("B", "E"), ("B", "E"), ("E", "B")]
    assert all(p.chosen.turns[:-1] == p.rejected.turns[:-1] for p in pairs)


def _curve(workdir):
    return [(m["step"], m["split"], m["loss"], m["margin"]) for m in map(
        json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "margin" in m]


@pytest.mark.parametrize("lora", [False, True])
def test_a_run_learns_the_preferences_and_resumes_exactly(base, prepared, tmp_path, lora):
    """Precomputed reference: 8 steps equal 4 + stop + 4. LoRA: the in-step reference."""
    extra = {"model.lora_rank": 4, "opt.learning_rate": 2e-2} if lora else {}
    full, split = tmp_path / "full", tmp_path / "split"
    loop.train_and_evaluate(dpo_config(base, **extra), str(full), dpo)
    if not lora:
        loop.train_and_evaluate(dpo_config(base, stop_at_step=4), str(split), dpo)
        loop.train_and_evaluate(dpo_config(base), str(split), dpo)
        assert _curve(split) == _curve(full)
    logged = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in logged if m.get("split") == "eval" and "margin" in m]
    trains = [m for m in logged if m.get("split") == "train" and "margin" in m]
    # The training pairs are learnt (the 10-step base is too weak to generalise to dev).
    assert trains[-1]["margin"] > 0.005 and trains[-1]["loss"] < math.log(2) - 0.002
    assert trains[-1]["accuracy"] > 0.5
    assert 0 <= evals[-1]["exact_match"] <= 100  # dev answers generated at every eval
    assert len((full / "eval_generations.jsonl").read_text().splitlines()) == 2
    if lora:
        # The in-step reference (adapters off) is the base: its log-probabilities are those
        # a precomputed reference gives, while the policy's have moved.
        precomputed = prepared[1]["eval_rows"]  # the same pairs, precomputed reference
        assert evals[-1]["ref_logp_chosen"] == pytest.approx(
            float(precomputed["chosen_ref_logp"].mean()), rel=1e-4)
        assert abs(evals[-1]["logp_chosen"] - evals[-1]["ref_logp_chosen"]) > 1e-2
        assert not (full / dpo.module.REFERENCE_FILE).exists()
    else:
        assert (full / dpo.module.REFERENCE_FILE).exists()
        from tests.test_cli import run  # a DPO run chats like an SFT run
        reply = run("experiments.chat", f"--workdir={full}", "--prompt=Whose son was Dan?",
                    "--max_new_tokens=3").stdout
        assert reply.strip()


def test_bad_pairs_from_the_command_line_are_one_error_line(base, tmp_path):
    from tests.test_cli import _assert_clear_error, run
    workdir, files = base
    same = tmp_path / "same.jsonl"
    same.write_text('{"prompt": "q", "chosen": "Abel", "rejected": "Abel"}\n')
    _assert_clear_error(run("train.main", "--config=experiments/gpt_dpo.py:smoke",
                            f"--config.init_from={workdir}", f"--config.data.source={same}",
                            f"--config.data.eval_source={files[1]}",
                            f"--workdir={tmp_path / 'bad'}", check=False),
                        "same.jsonl:1: 'chosen' and 'rejected' are the same text")
    assert not (tmp_path / "bad" / "checkpoints").exists()
