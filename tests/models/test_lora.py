"""LoRA adapters (models/lora.py, layers.Projection): an adapted model starts as its base model,
merged adapters reproduce the adapted model, split/combine and the axis names are exact."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import bert, gpt, layers, lora
from train import sharding

RANK, ALPHA = 4, 8.0
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
MLM_POSITIONS = jnp.array([[1, 5], [0, 7]])
GPT_BASE = gpt.GPTConfig(vocab_size=32, max_len=16, num_layers=2, d_model=16, num_heads=2,
                         d_ff=32, dropout_rate=0.0)
BERT_BASE = bert.BertConfig(vocab_size=32, max_len=16, num_layers=2, d_model=16, num_heads=2,
                            d_ff=32, dropout_rate=0.0, attention_dropout_rate=0.0,
                            heads=("mlm", "nsp"))


def _gpt(cfg):
    """(boxed params, jitted params -> logits) for a GPT config."""
    model = gpt.GPT(cfg)
    params = jax.jit(lambda r: model.init(r, TOKENS)["params"])(jax.random.key(0))
    return params, jax.jit(lambda p: model.apply({"params": p}, TOKENS))


def _bert(cfg):
    model = bert.Bert(cfg)
    params = jax.jit(lambda r: model.init(r, TOKENS, mlm_positions_BP=MLM_POSITIONS)["params"])(
        jax.random.key(0))
    return params, jax.jit(lambda p: model.apply({"params": p}, TOKENS,
                                                 mlm_positions_BP=MLM_POSITIONS))


def _paths(tree):
    """'h_0/attn/query/lora_a'-style paths of a (boxed) tree's leaves."""
    leaves = jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return {"/".join(k.key for k in path) for path, _ in leaves}


@jax.jit
def _randomize_b(params, key):
    """The adapters with lora_b drawn at random, so the update is no longer zero."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))
    keys = jax.random.split(key, len(leaves))
    new = [jax.random.normal(k, x.shape) * 0.1 if path[-1].key == "lora_b" else x
           for k, (path, x) in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module", params=["gpt", "gpt_scan", "bert"])
def models(request):
    """(base params, base apply, adapted params, adapted apply) of one family."""
    if request.param == "bert":
        build, cfg = _bert, BERT_BASE
    else:
        build, cfg = _gpt, dataclasses.replace(GPT_BASE, scan_layers=request.param == "gpt_scan")
    return (*build(cfg), *build(dataclasses.replace(cfg, lora_rank=RANK, lora_alpha=ALPHA)))


def test_adapted_model_starts_as_the_base_model(models):
    base_params, base_fn, params, fn = models
    _, frozen = lora.split(params)
    # B = 0: equal exactly, not approximately. Op by op, since under jit the extra products
    # may change XLA's fusion of the base ones, and with it their rounding (BERT: 3e-8).
    with jax.disable_jit():
        _assert_trees_equal(fn(params), base_fn(frozen))
    if "h" not in params:
        # Unscanned, the adapters leave the base init untouched. Scanned, flax traces the body
        # twice and its RNG counters carry over, so a layer's kernel init depends on how many
        # parameters its module has; adapters go on loaded weights, so that costs nothing.
        _assert_trees_equal(frozen, base_params)


def test_merged_adapters_reproduce_the_adapted_model(models):
    base_params, base_fn, params, fn = models
    params = _randomize_b(params, jax.random.key(2))
    merged = jax.jit(lambda p: lora.merge(p, ALPHA, RANK))(params)
    assert jax.tree.structure(merged) == jax.tree.structure(nn.meta.unbox(base_params))
    adapted, served = fn(params), base_fn(merged)
    for x, y, z in zip(jax.tree.leaves(adapted), jax.tree.leaves(served),
                       jax.tree.leaves(base_fn(base_params))):
        assert np.abs(x - z).max() > 1e-3  # the random update does change the output
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_merge_keeps_boxing_and_checks_the_rank(models):
    base_params, _, params, _ = models
    merged = jax.jit(lambda p: lora.merge(p, ALPHA, RANK))(params)
    assert nn.get_partition_spec(merged) == nn.get_partition_spec(base_params)
    with pytest.raises(ValueError, match="rank 4"):
        lora.merge(params, ALPHA, RANK + 1)


def test_split_combine_round_trip(models):
    _, _, params, _ = models
    top = "wte" if "wte" in params else "nsp"
    trainable, frozen = lora.split(params, extra_trainable=(top,))
    _assert_trees_equal(lora.combine(frozen, trainable), params)  # boxing included
    adapters = {p for p in _paths(params) if p.split("/")[-1] in lora.ADAPTER_NAMES}
    heads = {p for p in _paths(params) if p.split("/")[0] == top}
    assert adapters and _paths(trainable) == adapters | heads
    assert _paths(frozen) == _paths(params) - _paths(trainable)
    # Six adapted projections a layer, two adapter matrices each.
    assert len(adapters) == 2 * 6 * (1 if "h" in params else 2)
    with pytest.raises(ValueError, match="both"):
        lora.combine(frozen, frozen)


def test_split_works_on_abstract_trees():
    cfg = dataclasses.replace(GPT_BASE, lora_rank=RANK)
    shapes = jax.eval_shape(lambda: gpt.GPT(cfg).init(jax.random.key(0), TOKENS))["params"]
    trainable, frozen = lora.split(shapes)
    per_layer = sum(d * RANK + RANK * f for d, f in
                    [(16, 16)] * 4 + [(16, 32), (32, 16)])  # q, k, v, out, wi, wo
    assert lora.count(trainable) == 2 * per_layer
    assert lora.count(frozen) == gpt.count_params(GPT_BASE)
    assert all(isinstance(x, jax.ShapeDtypeStruct)
               for x in jax.tree.leaves(nn.meta.unbox(lora.combine(frozen, trainable))))


def test_targets_choose_the_adapted_projections():
    cfg = dataclasses.replace(GPT_BASE, lora_rank=RANK, lora_targets="query, value")
    shapes = jax.eval_shape(lambda: gpt.GPT(cfg).init(jax.random.key(0), TOKENS))["params"]
    trainable, _ = lora.split(shapes)
    assert _paths(trainable) == {f"h_{i}/attn/{p}/{a}" for i in range(2)
                                 for p in ("query", "value") for a in lora.ADAPTER_NAMES}


@pytest.mark.parametrize("scan", [False, True])
def test_adapter_axis_names(scan):
    cfg = dataclasses.replace(GPT_BASE, lora_rank=RANK, scan_layers=scan)
    shapes = jax.eval_shape(lambda: gpt.GPT(cfg).init(jax.random.key(0), TOKENS))["params"]
    block = shapes["h"] if scan else shapes["h_0"]
    lead = (layers.LAYERS,) if scan else ()
    E, H, K, M, R = layers.EMBED, layers.HEADS, layers.KV, layers.MLP, layers.LORA
    expected = {"attn/query": ((E, R), (R, H, K)), "attn/value": ((E, R), (R, H, K)),
                "attn/out": ((H, K, R), (R, E)), "mlp/wi": ((E, R), (R, M)),
                "mlp/wo": ((M, R), (R, E))}
    for path, (a_names, b_names) in expected.items():
        group = block[path.split("/")[0]][path.split("/")[1]]
        assert group["lora_a"].names == lead + a_names, path
        assert group["lora_b"].names == lead + b_names, path
        # Sharded like the base kernel's axes; the rank axis is in no rule, so never split.
        spec = nn.logical_to_mesh_axes(group["lora_a"].names, sharding.DEFAULT_RULES)
        assert spec[len(lead + a_names) - 1] is None
    assert block["attn"]["out"]["lora_a"].value.shape == (2,) * scan + (2, 8, RANK)
    assert block["attn"]["out"]["lora_b"].value.shape == (2,) * scan + (RANK, 16)


def test_bad_target_names_are_rejected():
    with pytest.raises(ValueError, match="query, key, value, out, wi, wo"):
        dataclasses.replace(GPT_BASE, lora_targets="query,ffn")
    with pytest.raises(ValueError, match="'qkv'"):
        dataclasses.replace(BERT_BASE, lora_targets="qkv")
    with pytest.raises(ValueError, match="lora_rank"):
        dataclasses.replace(GPT_BASE, lora_rank=-1)
    with pytest.raises(ValueError, match="no lora_targets"):
        dataclasses.replace(GPT_BASE, lora_rank=RANK, lora_targets=" , ")
    assert lora.parse_targets("wi,,query") == ("wi", "query")


def test_feed_forward_keeps_dense_params_and_numerics():
    """wi / wo became Projections: the same tree, init, axis names and outputs as the nn.Dense
    layers they replaced (so checkpoints and the Hugging Face import are unchanged)."""
    class DenseFeedForward(nn.Module):
        @nn.compact
        def __call__(self, x_BLD):
            def dense(features, names, name):
                return nn.Dense(features, name=name,
                                kernel_init=layers.partitioned(nn.initializers.normal(0.02),
                                                               names),
                                bias_init=layers.partitioned(nn.initializers.zeros, names[1:]))
            h_BLF = nn.gelu(dense(32, (layers.EMBED, layers.MLP), "wi")(x_BLD), approximate=True)
            return dense(16, (layers.MLP, layers.EMBED), "wo")(h_BLF)

    x_BLD = jax.random.normal(jax.random.key(3), (2, 8, 16))
    dense = jax.jit(DenseFeedForward().init)(jax.random.key(0), x_BLD)
    ours = jax.jit(layers.FeedForward(32).init)(jax.random.key(0), x_BLD)
    _assert_trees_equal(ours, dense)  # the treedefs hold the boxes' axis names
    np.testing.assert_array_equal(jax.jit(layers.FeedForward(32).apply)(ours, x_BLD),
                                  jax.jit(DenseFeedForward().apply)(dense, x_BLD))
