"""BERT task losses against hand-computed values, and overfitting a tiny classification set."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bert_classify
from experiments import bert as bert_experiment
from train import optim
from train import step as step_lib
from train.tasks import classify, mlm_nsp, span_qa


class Fixed(nn.Module):
    """A stand-in model that returns given outputs whatever the input."""
    outputs: dict

    @nn.compact
    def __call__(self, *args, **kwargs):
        return {k: jnp.asarray(v) for k, v in self.outputs.items()}


def test_pretraining_loss_is_mean_mlm_plus_mean_nsp():
    config = bert_experiment.get_config("smoke")
    batch = mlm_nsp.init_batch(config, 3)
    batch["mlm_weights"] = batch["mlm_weights"].at[0, 2:].set(0.0)  # 2 + 5 + 5 = 12 predictions
    vocab = config.model.vocab_size
    # Uniform MLM logits: -log(1/V) per prediction. NSP logits (0, log 3): p(IsNext) = 1/4.
    outputs = {"mlm_logits_BPV": np.zeros((3, 5, vocab)),
               "nsp_logits_B2": np.tile([0.0, np.log(3.0)], (3, 1))}
    batch["nsp_labels"] = jnp.array([0, 1, 1])  # -log(1/4), -log(3/4), -log(3/4)
    model = Fixed(outputs)
    loss_sum, sums = jax.jit(lambda b: mlm_nsp.loss_fn({}, b, None, model=model, train=False))(
        batch)
    nsp_mean = (np.log(4) + 2 * np.log(4 / 3)) / 3
    assert float(sums["weight_sum"]) == 12
    assert float(loss_sum) / 12 == pytest.approx(np.log(vocab) + nsp_mean, rel=1e-5)
    summary = mlm_nsp.summarize(jax.device_get(sums))
    assert summary["mlm_loss"] == pytest.approx(np.log(vocab), rel=1e-5)
    assert summary["nsp_accuracy"] == pytest.approx(2 / 3)  # argmax is NotNext for every row


def test_classification_confusion_and_loss():
    config = bert_classify.get_config("smoke")
    config.model.num_labels = 3
    batch = classify.init_batch(config, 4)
    batch["labels"] = jnp.array([0, 1, 2, 2])
    batch["example_weights"] = jnp.array([1.0, 1.0, 1.0, 0.0])  # the last row is padding
    logits = np.array([[2.0, 0, 0], [0, 0, 2.0], [0, 0, 2.0], [2.0, 0, 0]])
    model = Fixed({"class_logits_BN": logits})
    loss_sum, sums = jax.jit(lambda b: classify.loss_fn({}, b, None, model=model, train=False))(
        batch)
    expected = np.zeros((3, 3))
    expected[0, 0] = expected[1, 2] = expected[2, 2] = 1  # true row, predicted column
    np.testing.assert_array_equal(sums["confusion_sum"], expected)
    p_right = np.exp(2) / (np.exp(2) + 2)  # softmax of (2, 0, 0) at the 2
    assert float(loss_sum) == pytest.approx(-2 * np.log(p_right) - np.log(1 / (np.exp(2) + 2)),
                                            rel=1e-5)
    assert classify.summarize(jax.device_get(sums))["accuracy"] == pytest.approx(2 / 3)


def test_regression_is_squared_error():
    config = bert_classify.get_config("smoke")
    config.model.num_labels = 1
    batch = classify.init_batch(config, 2)
    batch["labels"] = jnp.array([0.5, -1.0])
    model = Fixed({"class_logits_BN": np.array([[1.5], [1.0]])})
    loss_sum, _ = jax.jit(lambda b: classify.loss_fn({}, b, None, model=model, train=False))(
        batch)
    assert float(loss_sum) == pytest.approx(1.0 + 4.0)


def test_span_loss_ignores_padding_positions():
    config = bert_experiment.get_config("smoke")
    batch = span_qa.init_batch(config, 1)
    batch["segment_ids"] = batch["segment_ids"].at[0, 10:].set(0)  # 10 real tokens
    batch["start_positions"], batch["end_positions"] = jnp.array([3]), jnp.array([5])
    zeros = np.zeros((1, config.data.max_len))
    model = Fixed({"start_logits_BL": zeros, "end_logits_BL": zeros})
    loss_sum, _ = jax.jit(lambda b: span_qa.loss_fn({}, b, None, model=model, train=False))(
        batch)
    assert float(loss_sum) == pytest.approx(np.log(10), rel=1e-5)  # uniform over real tokens


def test_overfits_a_tiny_classification_set():
    config = bert_classify.get_config("smoke")
    config.opt.learning_rate, config.opt.warmup_steps = 3e-3, 1
    config.data.max_len = 8
    rng = np.random.default_rng(0)
    batch = jax.tree.map(np.asarray, classify.init_batch(config, 8))
    batch["inputs"] = rng.integers(7, config.model.vocab_size, (8, 8)).astype(np.int32)
    batch["labels"] = np.array([0, 1] * 4, np.int32)
    model = classify.build_model(config)
    params = nn.meta.unbox(jax.jit(lambda k: classify.init_params(model, config, k))(
        jax.random.key(0)))
    tx, schedule = optim.make_optimizer(config.opt, 200)
    step = jax.jit(step_lib.make_train_step(functools.partial(classify.loss_fn, model=model,
                                                          train=True), tx, schedule, 1))
    state = step_lib.TrainState(jnp.array(0), params, jax.jit(tx.init)(params))
    for _ in range(60):
        state, sums = step(state, batch, jax.random.key(1))
    final = classify.summarize(jax.device_get(sums))
    assert final["accuracy"] == 1.0 and final["loss"] < 0.05
