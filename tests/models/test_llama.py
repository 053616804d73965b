"""The Llama family's pieces against independent references: grouped-query attention against
multi-head attention over repeated keys, the sliding window against an explicit mask, rotary
frequencies against transformers' own functions, causality, and LoRA on the gated
feed-forward. (Logits against transformers: tests/train/test_llama_hf.py.)"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, layers, llama, lora

SMALL = llama.LlamaConfig(vocab_size=61, max_len=32, num_layers=2, d_model=32, num_heads=4,
                          num_kv_heads=2, d_ff=48, sliding_window=5, qk_norm=True,
                          attention="reference")


def _qkv(heads, kv_heads, b=2, length=12, k=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, length, heads, k))
    kv = [jax.random.normal(key, (b, length, kv_heads, k)) for key in keys[1:]]
    return q, *kv


def test_grouped_query_attention_is_multi_head_attention_over_repeated_kv_heads():
    q, k, v = _qkv(heads=6, kv_heads=2)
    mask = attention.make_attention_mask(causal=True, q_len=12, kv_len=12)
    got = jax.jit(attention.reference_attention)(q, k, v, mask)
    # Query head h reads kv head h // 3, as transformers' repeat_kv lays them out.
    want = attention.reference_attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2),
                                         mask)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Heads-first keys and values (the KV cache's layout) give the same.
    heads_first = attention.reference_attention(q, k.transpose(0, 2, 1, 3),
                                                v.transpose(0, 2, 1, 3), mask,
                                                heads_first_kv=True)
    np.testing.assert_allclose(heads_first, want, atol=1e-6)


def test_sliding_window_mask_matches_its_definition():
    mask = np.asarray(attention.make_attention_mask(causal=True, q_len=7, kv_len=7, window=3))
    want = np.array([[0 <= i - j < 3 for j in range(7)] for i in range(7)])
    np.testing.assert_array_equal(mask[0, 0], want)


@pytest.mark.parametrize("segments", [False, True])
def test_fused_attention_equals_the_reference_with_gqa_and_a_window(segments):
    """jax.nn.dot_product_attention's GQA and local_window_size against our explicit path."""
    x = jax.random.normal(jax.random.key(1), (2, 12, 32))
    seg = jnp.array([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3]) if segments else None

    def run(implementation):
        mha = attention.MultiHeadAttention(4, 8, num_kv_heads=2, sliding_window=4,
                                           qkv_bias=False, implementation=implementation)
        params = mha.init(jax.random.key(0), x, segment_ids_BL=seg, causal=True)
        return jax.jit(lambda p: mha.apply(p, x, segment_ids_BL=seg, causal=True))(params)

    fast, reference = run("fast"), run("reference")
    real = np.ones((2, 12), bool) if seg is None else np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(fast)[real], np.asarray(reference)[real], atol=1e-5)


def test_rope_frequencies_match_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cases = {"linear": dict(factor=4.0),
             "llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=256)}
    for kind, extra in cases.items():
        config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4,
                                          rope_parameters=dict(rope_type=kind,
                                                               rope_theta=500000.0, **extra))
        want, _ = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))
        got = layers.rope_frequencies(128, 500000.0, kind, extra["factor"],
                                      extra.get("low_freq_factor", 1.0),
                                      extra.get("high_freq_factor", 4.0),
                                      extra.get("original_max_position_embeddings", 8192))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown rope type 'yarn'"):
        layers.rope_frequencies(8, 1e4, "yarn")


def _init(model, tokens):
    return nn.meta.unbox(jax.jit(lambda: model.init(jax.random.key(0), tokens)["params"])())


def test_a_change_at_position_t_moves_no_output_before_t():
    model = llama.Llama(SMALL)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (1, 16)), jnp.int32)
    params = _init(model, tokens)
    forward = jax.jit(lambda t: model.apply({"params": params}, t))
    base, changed = forward(tokens), forward(tokens.at[0, 9].set((tokens[0, 9] + 1) % 61))
    np.testing.assert_array_equal(base[:, :9], changed[:, :9])
    assert not np.allclose(base[:, 9:], changed[:, 9:])


def test_lora_on_the_gated_feed_forward_starts_at_the_base_model_and_merges():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, 10)), jnp.int32)
    base_model = llama.Llama(SMALL)
    adapted = llama.Llama(dataclasses.replace(SMALL, lora_rank=4, lora_targets="gate,up,down"))
    params = _init(adapted, tokens)
    mlp = params["layer_0"]["mlp"]
    assert set(mlp) == {"gate", "up", "down"} and "lora_a" in mlp["gate"]
    assert "lora_a" not in params["layer_0"]["self_attn"]["query"]
    base = lora.merge(params, 16.0, 4)  # B = 0: the merged kernels are the base ones
    forward = jax.jit(lambda m, p: m.apply({"params": p}, tokens), static_argnums=0)
    np.testing.assert_allclose(forward(adapted, params), forward(base_model, base), atol=1e-6)
    moved = jax.tree.map(lambda x: x, params)
    moved["layer_1"]["mlp"]["down"]["lora_b"] = 0.1 * jnp.ones_like(
        params["layer_1"]["mlp"]["down"]["lora_b"])
    np.testing.assert_allclose(forward(adapted, moved),
                               forward(base_model, lora.merge(moved, 16.0, 4)), atol=1e-5)


def test_configs_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="multiple of num_kv_heads=3"):
        dataclasses.replace(SMALL, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown rope type"):
        dataclasses.replace(SMALL, rope_type="dynamic")
    with pytest.raises(ValueError, match="'wi' name no projection of the Llama family"):
        dataclasses.replace(SMALL, lora_rank=2, lora_targets="query,wi")


def test_the_kv_cache_of_grouped_query_attention_holds_only_the_kv_heads():
    """Bytes per cached token, read from the cache the decode model allocates: with 2 of 4
    heads cached, half of full multi-head attention's, and 2 layers x (K, V) x 2 heads x 8
    dims x 4 bytes in fp32."""
    from models import gpt
    decoder = llama.Llama(dataclasses.replace(SMALL, decode=True))
    gqa = gpt.cache_bytes_per_token(decoder)
    assert gqa == 2 * 2 * 2 * 8 * 4
    full = llama.Llama(dataclasses.replace(SMALL, decode=True, num_kv_heads=4))
    assert gpt.cache_bytes_per_token(full) == 2 * gqa
