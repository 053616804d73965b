"""Our parameter trees <-> Hugging Face checkpoints of GPT-2, BERT, Marian (opus-mt) and the
Llama family (Llama, Qwen2, Qwen3, Mistral, Gemma: their tables are in models/hf_llama.py).

Pure functions of dicts and numpy arrays; no file IO here (train/pretrained.py reads and
writes the folders). Three things are mapped:
  - config.json <-> our `config.model` fields (`model_fields`, `hf_config`); a field our
    models cannot represent is an UnsupportedCheckpoint naming it;
  - tensor names <-> parameter paths (`tensor_rules`), each with a `Rule` saying how the
    array changes on the way: torch Linear weights are output-major (out, in) and ours
    input-major with heads split out (D,H,K); GPT-2's Conv1D weights are already input-major
    and its fused c_attn holds Q, K and V side by side; vocabulary tables are padded to
    `vocab_multiple` rows here;
  - scanned (stacked) layers, where our one parameter holds every layer's tensor.
Import turns each of our leaves into a numpy *view* of the checkpoint's tensor wherever
numpy allows (slices, transposes, reshapes), so placing it on devices reads each shard's
bytes once and never materialises a second full copy.
"""
import dataclasses
import math
import re

import numpy as np

from models import hf_llama

FAMILIES = {"gpt2": "gpt", "bert": "bert", "marian": "transformer",
            **{t: "llama" for t in hf_llama.MODEL_TYPES}}
# config.json activation_function / hidden_act -> ours (layers.ACTIVATIONS), and back.
ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact",
               "relu": "relu", "swish": "silu", "silu": "silu"}
HF_ACTIVATIONS = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "swish"}
ARCHITECTURES = {"gpt": "GPT2LMHeadModel", "transformer": "MarianMTModel"}


class UnsupportedCheckpoint(ValueError):
    """A checkpoint (or a run) whose layout our models (or theirs) cannot represent."""


# ---- configs -----------------------------------------------------------------------------

def _require(hf, field, allowed, why):
    value = hf.get(field, allowed[0])
    if value not in allowed:
        raise UnsupportedCheckpoint(f"config.json {field}={value!r} is not supported ({why}); "
                                    f"supported: {allowed}")
    return value


def _activation(hf, field):
    act = hf.get(field, "gelu")
    if act not in ACTIVATIONS:
        raise UnsupportedCheckpoint(f"config.json {field}={act!r} is not supported; "
                                    f"supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def family_of(hf: dict) -> str:
    """Our model family of a config.json, or UnsupportedCheckpoint naming model_type."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedCheckpoint(
            f"config.json model_type={model_type!r} is not supported; this codebase imports "
            f"{sorted(FAMILIES)} (GPT-2, BERT, Marian and Llama-family checkpoints)")
    return FAMILIES[model_type]


def model_fields(hf: dict, vocab_multiple: int = 128) -> tuple[str, dict]:
    """(family, our config.model fields) of a Hugging Face config.json dict.

    Only the architecture is taken; dropout rates, dtypes, remat and the like stay the run's.
    """
    family = family_of(hf)
    if family == "gpt":
        _require(hf, "tie_word_embeddings", [True], "GPT's output layer is the token embedding")
        _require(hf, "scale_attn_weights", [True], "attention is scaled by 1/sqrt(d_k)")
        _require(hf, "scale_attn_by_inverse_layer_idx", [False], "no per-layer scaling")
        _require(hf, "add_cross_attention", [False], "decoder-only")
        d = hf["n_embd"]
        fields = dict(vocab_size=hf["vocab_size"], max_len=hf["n_positions"],
                      num_layers=hf["n_layer"], d_model=d, num_heads=hf["n_head"],
                      d_ff=hf.get("n_inner") or 4 * d,
                      activation=_activation(hf, "activation_function"),
                      ln_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)))
    elif family == "llama":
        fields = hf_llama.model_fields(hf)
        if fields["num_heads"] % fields["num_kv_heads"]:
            raise UnsupportedCheckpoint(f"{fields['num_heads']} attention heads do not divide "
                                        f"into {fields['num_kv_heads']} key/value heads")
    elif family == "bert":
        _require(hf, "position_embedding_type", ["absolute"], "learned absolute positions")
        _require(hf, "tie_word_embeddings", [True], "the MLM output layer is the embedding")
        _require(hf, "is_decoder", [False], "a bidirectional encoder")
        _require(hf, "add_cross_attention", [False], "no cross-attention")
        fields = dict(vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"],
                      num_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
                      num_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
                      type_vocab_size=hf.get("type_vocab_size", 2),
                      activation=_activation(hf, "hidden_act"),
                      ln_epsilon=float(hf.get("layer_norm_eps", 1e-12)))
        if any("SequenceClassification" in a for a in hf.get("architectures") or []):
            fields["num_labels"] = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
    else:
        _require(hf, "share_encoder_decoder_embeddings", [True], "one joint embedding")
        _require(hf, "tie_word_embeddings", [True], "the output layer is the embedding")
        _require(hf, "normalize_before", [False], "post-LN Marian blocks")
        for ours, theirs in (("encoder_layers", "decoder_layers"),
                             ("encoder_attention_heads", "decoder_attention_heads"),
                             ("encoder_ffn_dim", "decoder_ffn_dim"),
                             ("vocab_size", "decoder_vocab_size")):
            if hf.get(theirs) not in (None, hf[ours]):
                raise UnsupportedCheckpoint(
                    f"config.json {theirs}={hf[theirs]!r} differs from {ours}={hf[ours]!r}; "
                    "our Transformer has one size for its encoder and decoder")
        fields = dict(vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"],
                      num_layers=hf["encoder_layers"], d_model=hf["d_model"],
                      num_heads=hf["encoder_attention_heads"], d_ff=hf["encoder_ffn_dim"],
                      activation=_activation(hf, "activation_function"), pre_ln=False,
                      embed_scale=bool(hf.get("scale_embedding", False)),
                      position_layout="split", final_logits_bias=True, ln_epsilon=1e-5,
                      pad_id=int(hf["pad_token_id"]))
    if family != "llama" and fields["d_model"] % fields["num_heads"]:
        raise UnsupportedCheckpoint(f"width {fields['d_model']} does not divide into "
                                    f"{fields['num_heads']} heads")
    fields["vocab_multiple"] = vocab_multiple
    return family, fields


def hf_config(family: str, model: dict, special: dict, heads=(), labels=None) -> dict:
    """The config.json of our `model` fields (a dict); `special` holds the tokenizer's
    pad/bos/eos ids (None where absent), `heads` BERT's, `labels` a classifier's names."""
    common = {"transformers_version": "5.0.0", "dtype": "float32",
              "pad_token_id": special.get("pad_id"), "bos_token_id": special.get("bos_id"),
              "eos_token_id": special.get("eos_id")}
    m = model
    if family == "llama":
        return hf_llama.hf_config(m, common)
    if family == "gpt":
        return dict(common, model_type="gpt2", architectures=[ARCHITECTURES["gpt"]],
                    vocab_size=m["vocab_size"], n_positions=m["max_len"],
                    n_layer=m["num_layers"], n_embd=m["d_model"], n_head=m["num_heads"],
                    n_inner=m["d_ff"], activation_function=HF_ACTIVATIONS[m["activation"]],
                    layer_norm_epsilon=m["ln_epsilon"], tie_word_embeddings=True,
                    resid_pdrop=m["dropout_rate"], embd_pdrop=m["dropout_rate"],
                    attn_pdrop=m["attention_dropout_rate"])
    if family == "bert":
        architecture = {("mlm", "nsp"): "BertForPreTraining", ("mlm",): "BertForMaskedLM",
                        ("classify",): "BertForSequenceClassification",
                        ("span",): "BertForQuestionAnswering", (): "BertModel"}.get(
                            tuple(h for h in ("mlm", "nsp", "classify", "span") if h in heads))
        if architecture is None:
            raise UnsupportedCheckpoint(f"BERT heads {list(heads)} match no single "
                                        "transformers class")
        out = dict(common, model_type="bert", architectures=[architecture],
                   vocab_size=m["vocab_size"], max_position_embeddings=m["max_len"],
                   num_hidden_layers=m["num_layers"], hidden_size=m["d_model"],
                   num_attention_heads=m["num_heads"], intermediate_size=m["d_ff"],
                   type_vocab_size=m["type_vocab_size"], hidden_act=HF_ACTIVATIONS[
                       m["activation"]], layer_norm_eps=m["ln_epsilon"],
                   hidden_dropout_prob=m["dropout_rate"],
                   attention_probs_dropout_prob=m["attention_dropout_rate"],
                   position_embedding_type="absolute", tie_word_embeddings=True)
        if "classify" in heads:
            names = labels or [f"LABEL_{i}" for i in range(m["num_labels"])]
            out.update(num_labels=m["num_labels"],
                       id2label={str(i): str(n) for i, n in enumerate(names)},
                       label2id={str(n): i for i, n in enumerate(names)})
            if m["num_labels"] == 1:
                out["problem_type"] = "regression"
        return out
    if m.get("pre_ln"):
        raise UnsupportedCheckpoint("this Transformer run is pre-LN (model.pre_ln=True); "
                                    "Marian blocks are post-LN, so it has no MarianMTModel form")
    return dict(common, model_type="marian", architectures=[ARCHITECTURES["transformer"]],
                vocab_size=m["vocab_size"], decoder_vocab_size=m["vocab_size"],
                max_position_embeddings=m["max_len"], d_model=m["d_model"],
                encoder_layers=m["num_layers"], decoder_layers=m["num_layers"],
                encoder_attention_heads=m["num_heads"], decoder_attention_heads=m["num_heads"],
                encoder_ffn_dim=m["d_ff"], decoder_ffn_dim=m["d_ff"],
                activation_function=HF_ACTIVATIONS[m["activation"]],
                scale_embedding=bool(m.get("embed_scale", True)),
                share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
                decoder_start_token_id=special.get("bos_id"),
                forced_eos_token_id=special.get("eos_id"), dropout=m["dropout_rate"],
                attention_dropout=m["attention_dropout_rate"], activation_dropout=0.0,
                is_encoder_decoder=True)


# ---- tensors -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    """How one HF tensor becomes (part of) one of our leaves.

    kind: "copy" (the same array); "flat" (HF's flat H*K bias, our H,K); "linear" (torch
    Linear, (out, in): transposed, then reshaped; `in_dims` of our leading axes are the
    input); "conv1d" (GPT-2's input-major Conv1D: reshaped only; in_dims 0 for its biases);
    "vocab" (a vocabulary-indexed table or vector, padded with zero rows to our row count);
    `part` j of `parts` takes the j-th equal slice of the last HF axis (GPT-2's fused
    c_attn: Q, K, V).
    """
    name: str
    kind: str = "copy"
    in_dims: int = 1
    part: int = 0
    parts: int = 1


def _gpt_rules(num_layers, prefix):
    rules = {"wte/embedding": Rule(prefix + "wte.weight", "vocab"),
             "wpe/embedding": Rule(prefix + "wpe.weight"),
             "ln_f/scale": Rule(prefix + "ln_f.weight"), "ln_f/bias": Rule(prefix + "ln_f.bias")}
    for i in range(num_layers):
        h, ours = f"{prefix}h.{i}.", f"h_{i}/"
        for ln in ("ln_1", "ln_2"):
            rules[f"{ours}{ln}/scale"] = Rule(f"{h}{ln}.weight")
            rules[f"{ours}{ln}/bias"] = Rule(f"{h}{ln}.bias")
        for j, proj in enumerate(("query", "key", "value")):
            for leaf in ("kernel", "bias"):
                kernel = leaf == "kernel"
                rules[f"{ours}attn/{proj}/{leaf}"] = Rule(
                    f"{h}attn.c_attn.{'weight' if kernel else 'bias'}", "conv1d",
                    in_dims=1 if kernel else 0, part=j, parts=3)
        for path, name, in_dims in (("attn/out", "attn.c_proj", 2), ("mlp/wi", "mlp.c_fc", 1),
                                    ("mlp/wo", "mlp.c_proj", 1)):
            rules[f"{ours}{path}/kernel"] = Rule(f"{h}{name}.weight", "conv1d", in_dims)
            rules[f"{ours}{path}/bias"] = Rule(f"{h}{name}.bias")
    return rules


def _bert_rules(num_layers, prefix):
    from models import bert
    rules = {}
    for ours, theirs in bert.published_names(num_layers).items():
        theirs = prefix + theirs[len("bert."):] if theirs.startswith("bert.") else theirs
        if ours in ("word_embeddings/embedding", "mlm_bias"):
            rules[ours] = Rule(theirs, "vocab")
        elif ours.endswith("/kernel"):
            rules[ours] = Rule(theirs, "linear", 2 if ours.endswith("attn/out/kernel") else 1)
        elif re.search(r"attn/(query|key|value)/bias$", ours):
            rules[ours] = Rule(theirs, "flat")
        else:
            rules[ours] = Rule(theirs)
    return rules


_MARIAN_ENCODER = {"attn": "self_attn", "ln_1": "self_attn_layer_norm", "mlp/wi": "fc1",
                   "mlp/wo": "fc2", "ln_2": "final_layer_norm"}
_MARIAN_DECODER = {"self_attn": "self_attn", "ln_1": "self_attn_layer_norm",
                   "cross_attn": "encoder_attn", "ln_2": "encoder_attn_layer_norm",
                   "mlp/wi": "fc1", "mlp/wo": "fc2", "ln_3": "final_layer_norm"}
_PROJECTIONS = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "out_proj"}


def _marian_rules(num_layers, prefix):
    rules = {"embed/embedding": Rule(prefix + "shared.weight", "vocab"),
             "final_logits_bias": Rule("final_logits_bias", "vocab")}
    for side, table in (("encoder", _MARIAN_ENCODER), ("decoder", _MARIAN_DECODER)):
        for i in range(num_layers):
            base, ours = f"{prefix}{side}.layers.{i}.", f"{side}/layer_{i}/"
            for path, name in table.items():
                if path.startswith("ln"):
                    rules[f"{ours}{path}/scale"] = Rule(f"{base}{name}.weight")
                    rules[f"{ours}{path}/bias"] = Rule(f"{base}{name}.bias")
                elif path.startswith("mlp"):
                    rules[f"{ours}{path}/kernel"] = Rule(f"{base}{name}.weight", "linear")
                    rules[f"{ours}{path}/bias"] = Rule(f"{base}{name}.bias")
                else:
                    for proj, hf_proj in _PROJECTIONS.items():
                        in_dims = 2 if proj == "out" else 1
                        rules[f"{ours}{path}/{proj}/kernel"] = Rule(
                            f"{base}{name}.{hf_proj}.weight", "linear", in_dims)
                        rules[f"{ours}{path}/{proj}/bias"] = Rule(
                            f"{base}{name}.{hf_proj}.bias", "copy" if proj == "out" else "flat")
    return rules


# Tensors a checkpoint may hold that have no parameter of ours: tied copies of the embedding,
# GPT-2's causal-mask buffers, BERT's position-id buffer, Marian's fixed sinusoid tables, the
# rotary frequencies some Llama ports save.
_DERIVED = re.compile(r"(^|\.)(lm_head\.weight|attn\.(masked_)?bias|position_ids|"
                      r"cls\.predictions\.decoder\.(weight|bias)|embed_tokens\.weight|"
                      r"embed_positions\.weight|rotary_emb\.inv_freq)$")


def _prefix(names, family):
    """The checkpoint's name prefix: task-head classes nest the base model under one."""
    probe = {"gpt": ("transformer.", "wte.weight"),
             "bert": ("bert.", "embeddings.word_embeddings.weight"),
             "transformer": ("model.", "shared.weight"),
             "llama": ("model.", "embed_tokens.weight")}[family]
    return probe[0] if probe[0] + probe[1] in names else ""


# The prefix each family's exported class (GPT2LMHeadModel, BertFor*, MarianMTModel) uses.
EXPORT_PREFIX = {"gpt": "transformer.", "bert": "bert.", "transformer": "model.",
                 "llama": "model."}


def tensor_rules(family: str, num_layers: int, names=(), prefix=None) -> dict[str, Rule]:
    """Our unscanned parameter path ('h_0/attn/query/kernel') -> Rule, for a checkpoint
    holding `names` (prefixes such as 'transformer.' or 'bert.' are detected) or, for
    writing one, with the given `prefix`."""
    prefix = _prefix(set(names), family) if prefix is None else prefix
    if family == "llama":
        return hf_llama.rules(num_layers, prefix, Rule)
    build = {"gpt": _gpt_rules, "bert": _bert_rules, "transformer": _marian_rules}[family]
    return build(num_layers, prefix)


def is_derived(name: str) -> bool:
    """A tensor name that is a buffer or tied copy, never an independent parameter."""
    return bool(_DERIVED.search(name))


def import_array(rule: Rule, hf_array, our_shape):
    """Our leaf (unscanned) from the checkpoint's array; a numpy view where possible."""
    a = hf_array
    if rule.parts > 1:
        width = a.shape[-1] // rule.parts
        a = a[..., rule.part * width:(rule.part + 1) * width]
    if rule.kind == "linear":
        a = a.T
    if rule.kind == "vocab":
        a = a.reshape((-1,) + tuple(our_shape[1:]))  # final_logits_bias is (1, V)
        if a.shape[0] != our_shape[0]:
            pad = [(0, our_shape[0] - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
            a = np.pad(a, pad)
        return a
    if math.prod(a.shape) != math.prod(our_shape):
        raise UnsupportedCheckpoint(f"{rule.name} has shape {tuple(hf_array.shape)}, which "
                                    f"does not fit our {tuple(our_shape)}")
    return a.reshape(our_shape)


def expected_hf_shape(rule: Rule, our_shape, vocab_size: int):
    """The checkpoint shape a Rule implies for our (unscanned) leaf shape."""
    if rule.kind == "vocab":
        shape = (vocab_size,) + tuple(our_shape[1:])
        return (1, vocab_size) if rule.name == "final_logits_bias" else shape
    if rule.kind == "linear":
        return (math.prod(our_shape[rule.in_dims:]), math.prod(our_shape[:rule.in_dims]))
    if rule.kind == "conv1d":
        if rule.in_dims == 0:  # a bias
            return (math.prod(our_shape) * rule.parts,)
        return (math.prod(our_shape[:rule.in_dims]),
                math.prod(our_shape[rule.in_dims:]) * rule.parts)
    if rule.kind == "flat":
        return (math.prod(our_shape),)
    return tuple(our_shape)


def export_arrays(rules: dict[str, Rule], leaves: dict, vocab_size: int) -> dict:
    """HF name -> array from our unscanned leaves (path -> numpy array): Rules run backwards,
    vocabulary padding stripped, GPT-2's Q, K and V concatenated back into c_attn."""
    out, parts = {}, {}
    for path, rule in rules.items():
        if path not in leaves:
            continue
        a = np.asarray(leaves[path])
        shape = expected_hf_shape(rule, a.shape, vocab_size)
        if rule.kind == "vocab":
            a = a[:vocab_size].reshape(shape)
        elif rule.kind == "linear":
            a = a.reshape(shape[::-1]).T
        elif rule.kind == "conv1d":
            a = a.reshape(shape[:-1] + (shape[-1] // rule.parts,))
        elif rule.kind == "flat":
            a = a.reshape(-1)
        if rule.parts > 1:
            parts.setdefault(rule.name, {})[rule.part] = a
        else:
            out[rule.name] = np.ascontiguousarray(a)
    for name, pieces in parts.items():
        out[name] = np.ascontiguousarray(np.concatenate([pieces[j] for j in sorted(pieces)], -1))
    return out


def stacked_name(path: str):
    """('h/attn/query/kernel', 3) for 'h_3/attn/query/kernel', else (path, None): scanned
    models hold layer i of every block parameter at index i of one stacked leaf."""
    m = re.match(r"^(.*?)(h|layer)_(\d+)/(.*)$", path)
    if not m:
        return path, None
    return f"{m.group(1)}{m.group(2)}/{m.group(4)}", int(m.group(3))


def embed_permutation(d_model: int) -> np.ndarray:
    """perm with split[:, j] = interleaved[:, perm[j]]: the model-width reordering that turns
    interleaved sinusoids (sin, cos pairs) into Marian's split ones (all sines, then cosines).

    Every other operation of the Transformer is equivariant to a reordering of the model
    width (LayerNorm's statistics ignore order; every product contracts or produces the
    width consistently), so reordering every `embed` axis of every parameter by `perm` gives
    the same network with split positions.
    """
    half = d_model // 2
    return np.concatenate([np.arange(half) * 2, np.arange(half) * 2 + 1])


def default_experiment(hf: dict) -> str:
    """The experiment file whose task fits a checkpoint's architecture."""
    family = family_of(hf)
    architectures = " ".join(hf.get("architectures") or [])
    if family == "bert" and "SequenceClassification" in architectures:
        return "experiments/bert_classify.py"
    if family == "bert" and "QuestionAnswering" in architectures:
        return "experiments/bert_squad.py"
    return {"gpt": "experiments/gpt.py", "bert": "experiments/bert.py",
            "transformer": "experiments/transformer.py", "llama": "experiments/llama.py"}[family]
