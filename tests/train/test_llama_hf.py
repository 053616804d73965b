"""Llama, Qwen2, Qwen3, Mistral and Gemma checkpoints in and out, against transformers.

One tiny random model per class, each exercising its options: Llama with grouped-query
attention, Llama 3.1 rope scaling (frequencies in all three of its bands) and an untied head;
Qwen2's q/k/v biases; Qwen3's q/k norms with a head_dim that is not d_model / heads;
Mistral's sliding window, shorter than the test sequences; Gemma with one kv head, (1 + w)
norms and sqrt(d) scaling. Norm weights and biases are randomised (a fresh model has ones and
zeros, which would hide a misplaced one). Loaded through --config.init_from=hf:DIR's code path
onto a 2x2x2 (data, fsdp, tensor) mesh: fp32 logits within 1e-5 of transformers' on padded
batches, 20 greedy tokens equal on left-padded prompts, import then export bit for bit.
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
from experiments import llama as llama_exp  # noqa: E402
from models import gpt, hf  # noqa: E402
from tests.train.test_pretrained import (  # noqa: E402
    _forward, _load, _logical, _padded_batch, _perturbed, _torch_model)
from train import pretrained, step, tasks  # noqa: E402

VOCAB = 300
KINDS = ("llama", "qwen2", "qwen3", "mistral", "gemma")
WINDOW = 5  # Mistral's window: the 16-token batches and 27-token generations cross it


def _hf_model(kind):
    tf = transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if kind == "llama":  # head_dim 16: wavelengths 6, 20, 63, 199... span the three bands
        rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=64)
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=2,
                                                  tie_word_embeddings=False,
                                                  rope_parameters=rope))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2,
                                                  tie_word_embeddings=True))
    if kind == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=24,
                                                  tie_word_embeddings=False))
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common, num_key_value_heads=2,
                                                      sliding_window=WINDOW))
    return tf.GemmaForCausalLM(tf.GemmaConfig(**common, num_key_value_heads=1, head_dim=16))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("llama_family")
    out = {}
    for kind in KINDS:
        model = _hf_model(kind).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(0.3 * torch.randn_like(p))
                elif "o_proj" in name or "down_proj" in name:
                    # Blocks that outweigh the embedding in the residual stream: a tied head
                    # would otherwise predict the input token again, every step.
                    p.mul_(30.0)
                elif "embed_tokens" in name or "lm_head" in name:
                    p.mul_(5.0)  # logits of a few units, not 0.02 x 0.02 small
        model.save_pretrained(root / kind)
        out[kind] = str(root / kind)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_on_a_padded_batch(folders, kind):
    config, model, params = _load(llama_exp, folders[kind])
    assert config.model.family == "llama" and config.model.vocab_size == VOCAB
    key = params["layer_0"]["self_attn"]["key"]["kernel"]
    # Key/value heads split over tensor=2 when they divide, else replicated (Gemma's one).
    assert tuple(key.sharding.spec)[:2] == ("fsdp", None if kind == "gemma" else "tensor")
    ids, mask = _padded_batch(np.random.default_rng(0))
    with torch.no_grad():
        ref = _torch_model("AutoModelForCausalLM", folders[kind])(
            torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(_forward(model, params, jnp.asarray(ids, jnp.int32), None,
                               jnp.asarray(mask, jnp.int32)))
    real = mask.astype(bool)
    assert np.abs(ref).max() > 1.0  # logits that would show a wrong rotation or scale
    assert np.abs(ours[..., :VOCAB] - ref)[real].max() <= 1e-5
    assert (ours[..., VOCAB:] == np.finfo(np.float32).min).all()  # padded vocabulary rows


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_and_import_export_round_trip(folders, kind):
    """20 greedy tokens on left-padded prompts as transformers gives them, with each step's
    log-probability; and the imported tensors exported again bit for bit."""
    config, _, params = _load(llama_exp, folders[kind], mesh={"data": -1})
    decode_model = tasks.get("lm").build_model(config, decode=True)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, VOCAB, n)) for n in (7, 3)]
    tokens, valid = gpt.left_pad(prompts, 7, 0)
    fn = jax.jit(functools.partial(gpt.generate, decode_model, max_new_tokens=20,
                                   temperature=0.0, return_logprobs=True))
    ours, logprobs = map(np.asarray, fn(params, tokens, jax.random.key(0),
                                        prompt_valid_BP=valid))
    reference = _torch_model("AutoModelForCausalLM", folders[kind])
    with torch.no_grad():
        ref = reference.generate(
            torch.tensor(tokens.astype(np.int64)), attention_mask=torch.tensor(
                valid.astype(np.int64)), do_sample=False, max_new_tokens=20, min_new_tokens=20,
            eos_token_id=None, pad_token_id=0).numpy()[:, tokens.shape[1]:]
    np.testing.assert_array_equal(ours, ref)
    # Each step's cached logits, not only their argmax: the log-probabilities of the chosen
    # tokens against transformers' full forward pass over prompt + continuation.
    full = np.concatenate([tokens, ours], axis=1).astype(np.int64)
    mask = np.concatenate([valid, np.ones_like(ours)], axis=1).astype(np.int64)
    with torch.no_grad():
        logits = reference(torch.tensor(full), attention_mask=torch.tensor(mask),
                           position_ids=torch.tensor(np.maximum(mask.cumsum(1) - 1, 0))).logits
    steps = torch.log_softmax(logits[:, tokens.shape[1] - 1:-1], -1).numpy()
    expected = np.take_along_axis(steps, ours[..., None].astype(np.int64), -1)[..., 0]
    np.testing.assert_allclose(logprobs, expected, atol=1e-5)

    from safetensors.numpy import load_file
    exported = pretrained.export_tensors(config, params, _logical(config))
    original = load_file(os.path.join(folders[kind], "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        assert exported[key].tobytes() == value.tobytes(), key
    with open(os.path.join(folders[kind], "config.json")) as f:
        theirs = json.load(f)
    written = hf.hf_config("llama", config.model.to_dict(), {})
    assert written["model_type"] == theirs["model_type"]
    assert written["architectures"] == theirs["architectures"]


# Our runs with each combination of switches a transformers class has.
VARIANTS = {
    "llama": dict(tie_embeddings=False, rope_type="llama3", rope_factor=8.0,
                  rope_original_max_len=16, mlp_bias=True, qkv_bias=True, out_bias=True),
    "qwen2": dict(qkv_bias=True, rope_theta=1e6),
    "qwen3": dict(qk_norm=True, head_dim=12, tie_embeddings=False),
    "mistral": dict(sliding_window=3, rope_type="linear", rope_factor=2.0),
    "gemma": dict(norm_offset=1.0, embed_scale=True, activation="gelu", num_kv_heads=1),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_of_our_runs_loads_in_transformers_with_the_same_logits(tmp_path, variant):
    from safetensors.numpy import save_file
    config = llama_exp.get_config("smoke")
    for k, v in VARIANTS[variant].items():
        config.model[k] = v
    task = tasks.get(config.task)
    s = step.build(task, config, mesh_config={"data": -1})
    params = _perturbed(s.init_fn(jax.random.key(1)).params, 2)
    folder = tmp_path / variant
    folder.mkdir()
    save_file(pretrained.export_tensors(config, params, _logical(config)),
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_cfg = hf.hf_config("llama", config.model.to_dict(), {"pad_id": 0, "bos_id": 1,
                                                           "eos_id": 2})
    assert hf_cfg["model_type"] == variant
    with open(folder / "config.json", "w") as f:
        json.dump(hf_cfg, f)
    ids, mask = _padded_batch(np.random.default_rng(3), high=config.model.vocab_size)
    with torch.no_grad():
        ref = _torch_model("AutoModelForCausalLM", str(folder))(
            torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(_forward(task.build_model(config), params, jnp.asarray(ids), None,
                               jnp.asarray(mask)))
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-5


def _refusal(folder, tmp_path, **changes):
    """The DataError of importing `folder` with config.json fields changed (None: removed)."""
    import shutil
    from train import hf_runs  # experiments.hf's import, without the tool's flags
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    with open(bad / "config.json") as f:
        cfg = json.load(f)
    for k, v in changes.items():
        cfg.pop(k) if v is None else cfg.__setitem__(k, v)
    with open(bad / "config.json", "w") as f:
        json.dump(cfg, f)
    workdir = tmp_path / "run"
    with pytest.raises(DataError) as e:
        hf_runs.import_run(str(bad), str(workdir), llama_exp.get_config("smoke"))
    assert not workdir.exists() and not list(tmp_path.glob("run.tmp*"))  # nothing written
    shutil.rmtree(bad)
    return str(e.value)


def test_fields_we_cannot_represent_are_one_error_naming_them(folders, tmp_path):
    moe = _refusal(folders["qwen3"], tmp_path, num_experts=8)
    assert "num_experts=8 is not supported" in moe
    yarn = _refusal(folders["llama"], tmp_path, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    assert "rope_scaling type 'yarn' is not supported" in yarn
    mixed = _refusal(folders["qwen2"], tmp_path, use_sliding_window=True, sliding_window=4,
                     layer_types=["full_attention", "sliding_attention"])
    assert "layer_types mixes" in mixed
    assert "model_type='mixtral' is not supported" in _refusal(folders["mistral"], tmp_path,
                                                               model_type="mixtral")
    assert "softcapping" in _refusal(folders["gemma"], tmp_path, final_logit_softcapping=30.0)


@pytest.mark.parametrize("kind", ["qwen3", "gemma"])
def test_bf16_compute_with_fp32_params_stays_close(folders, kind):
    """bf16 compute over fp32 parameters tracks transformers' fp32 logits (q/k norms, Gemma's
    (1 + w) norms and scaling in bf16)."""
    config, model, params = _load(llama_exp, folders[kind], mesh={"data": -1},
                                  dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    ids, mask = _padded_batch(np.random.default_rng(7))
    with torch.no_grad():
        ref = _torch_model("AutoModelForCausalLM", folders[kind])(
            torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = _forward(model, params, jnp.asarray(ids), None, jnp.asarray(mask))[..., :VOCAB]
    assert ours.dtype == jnp.bfloat16
    error = np.abs(np.asarray(ours, np.float32) - ref)[mask.astype(bool)].max()
    assert error <= 0.05 * np.abs(ref).max() + 0.02, error
