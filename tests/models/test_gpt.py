"""GPT: published sizes, causality, packed documents, KV-cache decoding."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import gpt as gpt_experiment
from models import gpt
from train.tasks import lm

SMALL = gpt.GPTConfig(vocab_size=61, max_len=24, num_layers=2, d_model=32, num_heads=4,
                      d_ff=64, dropout_rate=0.0)


@pytest.fixture(scope="module")
def params():
    model = gpt.GPT(SMALL)
    return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0),
                                             jnp.zeros((1, 8), jnp.int32))["params"])


@pytest.fixture(scope="module")
def forward():
    model = gpt.GPT(SMALL)
    return jax.jit(lambda p, t, s=None: model.apply({"params": p}, t, segment_ids_BL=s))


# Published sizes: GPT-2 paper table 2 rounds 124M/355M/774M/1558M (the 117M/345M it printed
# for the two smallest were later corrected); GPT-1 "117M". Exact values are from the
# released checkpoints (tied LM head, biases on every projection).
@pytest.mark.parametrize("preset,expected,rel", [
    ("gpt2", 124_439_808, 0), ("gpt2_medium", 354_823_168, 0),
    ("gpt2_large", 774_030_080, 0), ("gpt2_xl", 1_557_611_200, 0), ("gpt1", 117e6, 0.01)])
def test_parameter_counts_match_published_sizes(preset, expected, rel):
    config = gpt.GPTConfig.from_config(gpt_experiment.get_config(preset).model)
    assert gpt.count_params(config) == pytest.approx(expected, rel=rel)


def test_output_projection_is_the_tied_token_embedding(params):
    assert "lm_head" not in params and params["wte"]["embedding"].shape == (61, 32)


def test_change_at_t_never_moves_outputs_before_t(params, forward):
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 61)
    perturb = jax.jit(lambda tokens, t: tokens.at[0, t].set((tokens[0, t] + 7) % 61))
    base = np.asarray(forward(params, tokens))
    for t in (0, 5, 15):
        changed = np.asarray(forward(params, perturb(tokens, t)))
        np.testing.assert_allclose(changed[0, :t], base[0, :t], atol=1e-6)
        assert not np.allclose(changed[0, t:], base[0, t:], atol=1e-4)


def test_packed_documents_never_see_each_other(params, forward):
    tokens = jax.random.randint(jax.random.key(2), (1, 12), 0, 61)
    segments = jnp.array([[1] * 5 + [2] * 7])
    packed = forward(params, tokens, segments)
    # Document 2 alone, at its own positions, must give the same logits as inside the pack.
    apply = jax.jit(lambda p, *args: gpt.GPT(SMALL).apply({"params": p}, *args))
    alone = apply(params, tokens[:, 5:])
    positions = jnp.array([list(range(5)) + list(range(7))])
    packed_pos = apply(params, tokens, positions, segments)
    np.testing.assert_allclose(packed_pos[0, 5:], alone[0], atol=1e-5)
    # Changing document 1 leaves document 2's outputs unchanged.
    other = forward(params, tokens.at[0, :5].set(3), segments)
    np.testing.assert_allclose(other[0, 5:], packed[0, 5:], atol=1e-6)


@pytest.mark.parametrize("prefill,cache_len", [(1, 0), (6, 0), (6, 14)])
def test_kv_cache_decoding_equals_full_forward(params, forward, prefill, cache_len):
    tokens = jax.random.randint(jax.random.key(3), (2, 14), 0, 61)
    full = forward(params, tokens)
    decoder = gpt.GPT(dataclasses.replace(SMALL, decode=True))
    cache = gpt.init_cache(decoder, 2, cache_len)  # 0: the whole context (24)
    step = jax.jit(lambda p, c, t: decoder.apply({"params": p, "cache": c}, t, mutable=["cache"]))
    logits, variables = step(params, cache, tokens[:, :prefill])
    pieces = [logits]
    for t in range(prefill, 14):
        logits, variables = step(params, variables["cache"], tokens[:, t:t + 1])
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-5)


def test_flops_per_token_counts_non_embedding_and_attention():
    n_nonembed = gpt.count_params(SMALL) - 61 * 32 - 24 * 32
    n_matrices = SMALL.num_layers * (4 * 32 * 32 + 2 * 32 * 64)
    assert n_matrices < n_nonembed < n_matrices * 1.1  # the rest are biases and LayerNorms
    assert gpt.flops_per_token(SMALL, 24) == 6 * n_matrices + 12 * 2 * 32 * 24


def test_lm_loss_is_log_vocab_at_uniform_logits():
    config = gpt_experiment.get_config("smoke")
    config.model.vocab_size = 61

    class Uniform(nn.Module):  # zero hidden states: every logit x . e is 0
        config: gpt.GPTConfig

        @nn.compact
        def __call__(self, tokens, *args, hidden_only=False, **kwargs):
            assert hidden_only
            return jnp.zeros(tokens.shape + (4,))

    batch = lm.init_batch(config, 2)
    batch["weights"] = batch["weights"].at[0, :3].set(0.0)
    params = {"wte": {"embedding": jnp.ones((61, 4))}}
    model = Uniform(gpt.GPTConfig.from_config(config.model))
    loss_sum, sums = jax.jit(lambda p, b: lm.loss_fn(p, b, None, model=model, train=False))(
        params, batch)
    assert float(sums["weight_sum"]) == 2 * 32 - 3
    assert float(loss_sum) == pytest.approx(np.log(61) * (2 * 32 - 3), rel=1e-5)
