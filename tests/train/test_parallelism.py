"""Data, FSDP and tensor parallelism for all three families: same loss as one device, and
per-device memory ~ 1/N."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments import bert as bert_experiment
from experiments import gpt as gpt_experiment
from experiments import transformer as transformer_experiment
from train import memory, optim, sharding, tasks
from train import step as step_lib
from train.errors import ConfigError

FAMILIES = {"gpt": (gpt_experiment, tasks.get("lm")),
            "bert": (bert_experiment, tasks.get("mlm_nsp")),
            "transformer": (transformer_experiment, tasks.get("seq2seq"))}
STRATEGIES = {"fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
              "tensor": {"data": 4, "fsdp": 1, "tensor": 2}}


def _config(family, mesh):
    experiment, _ = FAMILIES[family]
    config = experiment.get_config("smoke")
    config.mesh.update(mesh)
    return config


def _first_loss(config, task, devices):
    """Loss of one real train step of the smoke model on a fixed batch."""
    mesh, rules = sharding.make_mesh(config.mesh, devices), sharding.rules_from_config(config)
    model = task.build_model(config)
    tx, schedule = optim.make_optimizer(config.opt, config.num_train_steps, config.model.d_model)
    _, state_sh, init_fn = step_lib.create_state_fns(task, config, model, tx, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh, rules)
    batch = task.bench_batch(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = init_fn(jax.random.key(0))
        step = step_lib.jit_train_step(task, config, model, tx, schedule, state_sh, batch_sh)
        state, sums = step(state, sharding.global_batch(batch, batch_sh), jax.random.key(1))
    return float(sums["loss_sum"] / sums["weight_sum"]), jax.device_get(state.params)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_strategy_gives_the_single_device_step(family):
    _, task = FAMILIES[family]
    loss_1, params_1 = _first_loss(_config(family, {"data": 1}), task, jax.devices()[:1])
    for name, mesh in STRATEGIES.items():
        loss_n, params_n = _first_loss(_config(family, mesh), task, jax.devices()[:8])
        assert loss_n == pytest.approx(loss_1, rel=1e-5), name
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-6), params_n,
                     params_1)


def _state_bytes(family, mesh):
    """Per-device parameters + optimizer state of a mid-sized model, from the compiled step."""
    config = _config(family, mesh)
    config.model.update(num_layers=2, d_model=256, num_heads=4, d_ff=1024, vocab_size=4096)
    config.batch_size = 8
    report = memory.memory_report(config, FAMILIES[family][1])
    assert report["argument"] >= report["params"] + report["optimizer"]
    return report["argument"], report["params"] + report["optimizer"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fsdp_and_tensor_parallelism_divide_the_state(family):
    replicated, state = _state_bytes(family, {"data": 8, "fsdp": 1, "tensor": 1})
    # XLA's compiled argument buffers (state + a small batch) per device:
    fsdp, _ = _state_bytes(family, {"data": 1, "fsdp": 8, "tensor": 1})
    tensor, _ = _state_bytes(family, {"data": 2, "fsdp": 1, "tensor": 4})
    assert replicated >= state  # the whole state on every device
    assert replicated / 8 <= fsdp < 1.15 * replicated / 8
    # Tensor parallelism leaves LayerNorms, biases of the output projections and position
    # embeddings whole, so it divides a little less than perfectly.
    assert replicated / 4 <= tensor < 1.35 * replicated / 4


def test_dry_run_prints_per_device_memory_and_writes_nothing(tmp_path):
    from tests.test_cli import run
    workdir = tmp_path / "never"
    out = run("train.main", "--config=experiments/bert.py:smoke", f"--workdir={workdir}",
              "--dry_run", "--config.mesh.data=1", "--config.mesh.fsdp=4",
              "--config.mesh.cpu_devices=4").stdout
    assert "per device:" in out and "optimizer state" in out and "activations" in out
    # cpu_devices replaces the 8 host devices the test session forces (tests/conftest.py).
    assert "'fsdp': 4" in out and "over 4 devices" in out and not workdir.exists()


def test_a_dimension_the_mesh_cannot_split_is_a_config_error():
    config = _config("gpt", {"data": 1, "fsdp": 1, "tensor": 8})
    config.model.vocab_size = 500  # not a multiple of 8 (nor are the 2 heads)
    with pytest.raises(ConfigError, match="cannot be split evenly.*config.mesh"):
        memory.memory_report(config, tasks.get("lm"))
