"""Optimizer and schedules against their textbook formulas."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from train import optim


def _opt(**kw):
    base = dict(learning_rate=0.1, schedule="constant", warmup_steps=0, end_lr_fraction=0.0,
                weight_decay=0.01, b1=0.9, b2=0.98, eps=1e-9, clip_grad_norm=0.0,
                grad_accum_steps=1)
    return ml_collections.ConfigDict({**base, **kw})


def test_adamw_with_clipping_matches_the_textbook_update():
    tx, _ = optim.make_optimizer(_opt(clip_grad_norm=0.5), 10)
    params = {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5])}
    grads = [{"kernel": jnp.array([[3.0, -1.0]]), "bias": jnp.array([2.0])},  # norm 3.7: clipped
             {"kernel": jnp.array([[-0.2, 0.4]]), "bias": jnp.array([0.1])}]
    state = jax.jit(tx.init)(params)

    @jax.jit
    def apply_update(g, state, params):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads, 1):
        params, state = apply_update(g, state, params)
        norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in g.values()))
        g = {k: np.asarray(x) * min(1.0, 0.5 / norm) for k, x in g.items()}  # global-norm clip
        for k in p:
            m[k] = 0.9 * m[k] + 0.1 * np.asarray(g[k])
            v[k] = 0.98 * v[k] + 0.02 * np.asarray(g[k]) ** 2
            step = (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.98 ** t)) + 1e-9)
            decay = 0.01 * p[k] if k == "kernel" else 0.0  # no decay on biases
            p[k] = p[k] - 0.1 * (step + decay)
    for k in p:
        np.testing.assert_allclose(params[k], p[k], rtol=1e-5)


def test_noam_schedule_is_the_paper_formula():
    sched = jax.jit(optim.noam_schedule(512, 4000))
    for step in (1, 100, 4000, 20000):
        expected = 512 ** -0.5 * min(step ** -0.5, step * 4000 ** -1.5)
        assert float(sched(step - 1)) == pytest.approx(expected, rel=1e-6)


def test_warmup_cosine_and_linear_shapes():
    cos = jax.jit(optim.make_schedule(_opt(schedule="cosine", warmup_steps=10,
                                          end_lr_fraction=0.1), 110))
    lin = jax.jit(optim.make_schedule(_opt(schedule="linear", warmup_steps=10), 110))
    assert float(cos(5)) == pytest.approx(0.05) and float(cos(10)) == pytest.approx(0.1)
    assert float(cos(60)) == pytest.approx(0.01 + 0.09 * 0.5, rel=1e-4)
    assert float(cos(110)) == pytest.approx(0.01, rel=1e-4)
    assert float(lin(60)) == pytest.approx(0.05, rel=1e-4)


def _param_tree(family, scan_layers):
    """Abstract (shapes only) parameters of the smoke GPT or BERT, scanned or not."""
    import jax

    from experiments import bert, gpt
    from train import tasks
    config = (gpt if family == "gpt" else bert).get_config("smoke")
    config.model.scan_layers = scan_layers
    task = tasks.get(config.task)
    model = task.build_model(config)
    boxed = jax.eval_shape(lambda: task.init_params(model, config, jax.random.key(0)))
    return config, nn.meta.unbox(boxed)


def _decayed_size(mask, params):
    import jax
    return sum(leaf.size for leaf, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
               if m)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_reaches_exactly_the_weight_matrices_of_gpt(scan_layers):
    config, params = _param_tree("gpt", scan_layers)
    m = config.model
    d, f, n, v, p = m.d_model, m.d_ff, m.num_layers, m.vocab_size, m.max_len
    # By hand: wte and wpe, then per layer W_Q, W_K, W_V, W_O and the two feed-forward matrices.
    expected = v * d + p * d + n * (4 * d * d + 2 * d * f)
    mask = optim.decay_mask(params)
    assert _decayed_size(mask, params) == expected
    block = mask["h"] if scan_layers else mask["h_0"]
    assert not block["attn"]["query"]["bias"]  # H,K: two-dimensional, still a bias
    assert not block["ln_1"]["scale"] and not mask["ln_f"]["scale"]  # layers,D when scanned


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_reaches_exactly_the_weight_matrices_of_bert(scan_layers):
    config, params = _param_tree("bert", scan_layers)
    m = config.model
    d, f, n, v, p = m.d_model, m.d_ff, m.num_layers, m.vocab_size, m.max_len
    # Embeddings (word, position, 2 token types), the layers' six matrices, the pooler, the
    # MLM transform and the NSP classifier (D x 2); mlm_bias is a vector.
    expected = v * d + p * d + 2 * d + n * (4 * d * d + 2 * d * f) + d * d + d * d + 2 * d
    mask = optim.decay_mask(params)
    assert _decayed_size(mask, params) == expected
    assert not mask["mlm_bias"]
    block = mask["layer"] if scan_layers else mask["layer_0"]
    assert not block["attn"]["key"]["bias"] and not block["ln_2"]["scale"]
