"""BERT: published sizes, padding invariance, tied MLM head, heads' shapes, checkpoint names."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bert as bert_experiment
from models import bert

SMALL = bert.BertConfig(vocab_size=67, max_len=24, num_layers=2, d_model=32, num_heads=4,
                        d_ff=64, dropout_rate=0.0, attention_dropout_rate=0.0,
                        heads=("mlm", "nsp", "classify", "span"), num_labels=3)


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def params():
    init = jax.jit(lambda rng: nn.meta.unbox(bert.Bert(SMALL).init(
        rng, jnp.zeros((1, 8), jnp.int32), mlm_positions_BP=jnp.zeros((1, 2), jnp.int32))))
    return init(jax.random.key(0))["params"]


@pytest.fixture(scope="module")
def forward():
    model = bert.Bert(SMALL)
    return jax.jit(lambda p, t, tt, s, m: model.apply({"params": p}, t, tt, s, m))


# Published sizes (Devlin et al. 2018: "110M" and "340M"). The exact figures are the released
# bert-base / bert-large encoders with pooler (109,482,240 / 335,141,888); the pretraining heads
# add the MLM transform + LayerNorm + output bias and the 2-way NSP layer.
@pytest.mark.parametrize("preset,encoder,d", [("base", 109_482_240, 768),
                                              ("large", 335_141_888, 1024)])
def test_parameter_counts_match_published_sizes(preset, encoder, d):
    config = bert.BertConfig.from_config(bert_experiment.get_config(preset).model)
    heads = (d * d + d) + 2 * d + 30522 + (2 * d + 2)
    assert bert.count_params(config) == encoder + heads


def test_adding_padding_leaves_real_token_outputs_unchanged(params, forward):
    tokens = jax.random.randint(jax.random.key(1), (1, 10), 7, 67)
    types = jnp.array([[0] * 5 + [1] * 5])
    positions = jnp.array([[1, 3]])
    short = forward(params, tokens, types, jnp.ones((1, 10), jnp.int32), positions)
    padded_tokens = jnp.concatenate([tokens, jnp.full((1, 6), 9)], 1)  # arbitrary pad ids
    padded = forward(params, padded_tokens, jnp.pad(types, ((0, 0), (0, 6))),
                     jnp.array([[1] * 10 + [0] * 6]), positions)
    np.testing.assert_allclose(padded["sequence_BLD"][:, :10], short["sequence_BLD"], atol=2e-5)
    for key in ("pooled_BD", "mlm_logits_BPV", "nsp_logits_B2", "class_logits_BN"):
        np.testing.assert_allclose(padded[key], short[key], atol=2e-5)


def test_every_token_sees_the_whole_input(params, forward):
    """Bidirectional: changing the last token moves the first token's output (unlike GPT)."""
    tokens = jax.random.randint(jax.random.key(2), (1, 10), 7, 67)
    ones = jnp.ones((1, 10), jnp.int32)
    base = forward(params, tokens, None, ones, jnp.zeros((1, 1), jnp.int32))
    changed = forward(params, tokens.at[0, 9].set(8 if tokens[0, 9] != 8 else 9), None, ones,
                      jnp.zeros((1, 1), jnp.int32))
    assert not np.allclose(base["sequence_BLD"][0, 0], changed["sequence_BLD"][0, 0], atol=1e-5)


def test_mlm_head_is_tied_to_the_token_embedding(params, forward):
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 7, 67)
    positions = jnp.array([[0, 4, 11], [2, 2, 5]])
    out = forward(params, tokens, None, jnp.ones((2, 12), jnp.int32), positions)
    # Recompute the head by hand: gather, dense, exact GELU, LayerNorm (eps 1e-12), E^T + b.
    h = np.take_along_axis(np.asarray(out["sequence_BLD"]), np.asarray(positions)[..., None], 1)
    t = h @ np.asarray(params["mlm_transform"]["kernel"]) + params["mlm_transform"]["bias"]
    t = np.asarray(jax.jit(jax.nn.gelu, static_argnames="approximate")(t, approximate=False))
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-12)
    t = t * params["mlm_ln"]["scale"] + params["mlm_ln"]["bias"]
    expected = t @ np.asarray(params["word_embeddings"]["embedding"]).T + params["mlm_bias"]
    np.testing.assert_allclose(out["mlm_logits_BPV"], expected, atol=1e-4)
    assert not any("decoder" in k or "lm_head" in k for k in _flat(params))


def test_head_output_shapes(params, forward):
    out = forward(params, jnp.ones((2, 12), jnp.int32), None, jnp.ones((2, 12), jnp.int32),
                  jnp.zeros((2, 3), jnp.int32))
    assert out["mlm_logits_BPV"].shape == (2, 3, 67)
    assert out["nsp_logits_B2"].shape == (2, 2) and out["class_logits_BN"].shape == (2, 3)
    assert out["start_logits_BL"].shape == out["end_logits_BL"].shape == (2, 12)


def test_published_names_cover_every_parameter_once(params):
    names = bert.published_names(SMALL.num_layers)
    ours = set(_flat(params))
    assert ours == set(names)
    assert len(set(names.values())) == len(names)


def test_every_parameter_has_logical_axis_names():
    boxed = jax.eval_shape(lambda: bert.Bert(SMALL).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
        mlm_positions_BP=jnp.zeros((1, 2), jnp.int32)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
