"""The sft loss (prompt tokens carry no gradient, packing changes no example's loss) and the
LoRA train state (only adapters move; the optimizer holds only them)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import chat
from models import lora
from tests.conftest import smoke_config
from train import losses, step as step_lib, tasks

sft = tasks.get("sft")
MAX_LEN = 32


def _examples():
    """(tokens, loss mask, where) of conversations of 9..20 tokens, the loss on their ends."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(7):
        n = int(rng.integers(9, 21))
        tokens = [2] + rng.integers(7, 500, n - 1).tolist()
        answer = int(rng.integers(2, 5))
        out.append((tokens, [0] * (n - answer) + [1] * answer, f"x.jsonl:{i + 1}"))
    return out


@pytest.fixture(scope="module")
def setup():
    config = smoke_config("unused", **{"data.max_len": MAX_LEN, "model.max_len": MAX_LEN})
    model = sft.build_model(config)
    params = jax.jit(lambda r: sft.init_params(model, config, r))(jax.random.key(0))
    return config, model, jax.tree.map(jnp.asarray, nn.meta.unbox(params))


def _per_position_nll(model, params, rows):
    @jax.jit
    def nll_fn(params, inputs, positions, segment_ids, targets):
        hidden = model.apply({"params": params}, inputs, positions, segment_ids,
                             hidden_only=True)
        return losses.tied_cross_entropy(hidden, params["wte"]["embedding"], targets,
                                         vocab_size=model.config.vocab_size)[1]

    nll = nll_fn(params, rows["inputs"], rows["positions"], rows["segment_ids"],
                 rows["targets"])
    return np.asarray(nll) * rows["weights"]


def test_changing_a_prompt_tokens_target_moves_no_gradient(setup):
    config, model, params = setup
    rows, _ = chat.pack(_examples(), MAX_LEN)
    grad = jax.jit(jax.grad(lambda p, b: sft.loss_fn(p, b, None, model=model, train=False)[0]))
    before = grad(params, rows)
    changed = dict(rows, targets=rows["targets"].copy())
    prompt = (rows["weights"] == 0) & (rows["segment_ids"] > 0)
    assert prompt.sum() > 20
    changed["targets"][prompt] = (changed["targets"][prompt] + 1) % 500
    after = grad(params, changed)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... and changing a response token's target does move it.
    answer = rows["weights"] > 0
    changed["targets"][answer] = (changed["targets"][answer] + 1) % 500
    moved = grad(params, changed)
    assert not np.allclose(np.asarray(moved["wte"]["embedding"]),
                           np.asarray(before["wte"]["embedding"]))


def _losses_by_example(rows, nll):
    """Summed loss of each example, in order: rows left to right, segments in order."""
    out = []
    for r in range(len(rows["inputs"])):
        for seg in range(1, int(rows["segment_ids"][r].max()) + 1):
            out.append(nll[r][rows["segment_ids"][r] == seg].sum())
    return np.asarray(out)


def test_packed_and_unpacked_rows_give_the_same_per_example_losses(setup):
    _, model, params = setup
    packed, stats = chat.pack(_examples(), MAX_LEN)
    single, _ = chat.pack(_examples(), MAX_LEN, packing=False)
    assert stats["rows"] < len(_examples()) == len(single["inputs"])
    a = _losses_by_example(packed, _per_position_nll(model, params, packed))
    b = _losses_by_example(single, _per_position_nll(model, params, single))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_lora_step_moves_only_the_adapters_and_the_optimizer_holds_only_them():
    # No warmup: the first step's learning rate is not 0.
    config = smoke_config("unused", **{"model.lora_rank": 4, "opt.warmup_steps": 0})
    task = tasks.get("lm")
    s = step_lib.build(task, config)
    adapters = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(
        s.abstract.params)[0]}
    assert adapters == set(lora.ADAPTER_NAMES)
    n_adapter = sum(x.size for x in jax.tree.leaves(s.abstract.params))
    n_moments = sum(x.size for x in jax.tree.leaves(s.abstract.opt_state))
    assert n_moments <= 2 * n_adapter + 8  # AdamW's two moments (and counts) of the adapters
    with jax.set_mesh(s.mesh):
        state = s.init_fn(jax.random.key(0))
        # Non-zero B, so A gets gradients too.
        state = state.replace(params=jax.jit(lambda p: jax.tree.map(lambda x: x + 0.01, p))(
            state.params))
        # Copies: the step donates (reuses) the state's buffers.
        frozen_before = jax.tree.map(np.array, jax.device_get(state.frozen))
        params_before = jax.tree.map(np.array, jax.device_get(state.params))
        batch = task.bench_batch(config)
        new_state, metrics = s.jit_train_step(task, config)(state, batch, jax.random.key(1))
    assert float(metrics["nonfinite"]) == 0
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(new_state.frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree.leaves(params_before), jax.tree.leaves(new_state.params))]
    assert all(changed)


def test_lora_step_gradient_equals_the_full_models_gradient_on_the_adapters():
    """The split state computes the same adapter gradient as differentiating the whole tree."""
    config = smoke_config("unused", **{"model.lora_rank": 4})
    task = tasks.get("lm")
    model = task.build_model(config)
    params = jax.jit(lambda r: jax.tree.map(lambda x: x + 0.01, nn.meta.unbox(
        task.init_params(model, config, r))))(jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, task.bench_batch(config))
    trainable, frozen = lora.split(params)
    # The loss is one jitted program, differentiated from outside: both gradients run the same
    # compiled forward and backward (jitting each whole grad lets XLA fuse the two differently,
    # which moves their rounding apart by ~5e-7).
    loss = jax.jit(lambda p: task.loss_fn(p, batch, None, model=model, train=False)[0])
    full = jax.grad(loss)(params)
    split = jax.grad(lambda t: loss(step_lib.full_params(t, frozen)))(trainable)
    full_adapters, _ = lora.split(full)
    for a, b in zip(jax.tree.leaves(full_adapters), jax.tree.leaves(split)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("experiment, kind", [("gpt_sft", "conversation"),
                                              ("gpt_dpo", "preference")])
def test_a_missing_data_file_is_the_error_named(experiment, kind, tmp_path):
    """A data.source that is not there is named before the unset data.eval_source."""
    import importlib
    import json
    import re
    from data.errors import DataError
    config = importlib.import_module(f"experiments.{experiment}").get_config("smoke")
    task, workdir = tasks.get(config.task), tmp_path / "run"
    missing = tmp_path / "train.jsonl"
    config.data.source = str(missing)  # data.eval_source left unset
    with pytest.raises(DataError, match=rf"^{kind} file {re.escape(str(missing))} does not "
                                        "exist; check the path$"):
        task.prepare_data(config, str(workdir))
    line = ({"prompt": "a", "response": "b"} if kind == "conversation"
            else {"prompt": "a", "chosen": "b", "rejected": "c"})
    missing.write_text(json.dumps(line) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="^set --config.data.eval_source"):
        task.prepare_data(config, str(workdir))
    config.data.eval_source = str(tmp_path / "dev.jsonl")
    with pytest.raises(DataError, match=rf"^{kind} file .*dev.jsonl does not exist"):
        task.prepare_data(config, str(workdir))
    assert not workdir.exists()
