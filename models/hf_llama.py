"""Hugging Face config.json and tensor names of the Llama family (models/llama.py) <-> ours:
LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, GemmaForCausalLM.

models/hf.py calls these for family "llama"; the Rule kinds are its. Each model_type is a
set of our switches (qkv biases, q/k norms, window, Gemma's norms and scaling); a field we
cannot represent, such as mixture-of-experts, a rope scaling we do not implement or
alternating local and global layers, is an UnsupportedCheckpoint naming it. Export picks the
model_type whose class has exactly the run's switches.
"""
MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
                 "gemma": "GemmaForCausalLM"}
# Each class's default when config.json leaves tie_word_embeddings out.
_TIED_BY_DEFAULT = {"gemma"}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu",
                "gelu_new": "gelu"}
# Fields that mean an architecture we do not build, when set to anything but these values.
_UNSUPPORTED = {"num_experts": (None, 0, 1), "num_local_experts": (None, 0, 1),
                "moe_intermediate_size": (None, 0), "partial_rotary_factor": (None, 1, 1.0),
                "attn_logit_softcapping": (None,), "final_logit_softcapping": (None,),
                "query_pre_attn_scalar": (None,), "pretraining_tp": (None, 1)}


def _unsupported(message):
    from models.hf import UnsupportedCheckpoint
    return UnsupportedCheckpoint(message)


def _rope(hf: dict) -> dict:
    """Our rope_* fields from rope_parameters (transformers 5) or rope_theta + rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    fields = dict(rope_theta=float(theta), rope_type=kind)
    if kind == "linear":
        fields["rope_factor"] = float(params["factor"])
    elif kind == "llama3":
        fields.update(rope_factor=float(params["factor"]),
                      rope_low_freq_factor=float(params["low_freq_factor"]),
                      rope_high_freq_factor=float(params["high_freq_factor"]),
                      rope_original_max_len=int(params["original_max_position_embeddings"]))
    elif kind != "default":
        raise _unsupported(f"config.json rope_scaling type {kind!r} is not supported; "
                           "supported: default, linear, llama3")
    return fields


def _window(hf: dict, model_type: str) -> int:
    """The sliding window every layer uses, 0 for none; mixed layers are refused."""
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        return 0
    window = hf.get("sliding_window") if model_type != "llama" else None
    types = set(hf.get("layer_types") or [])
    if types - {"full_attention", "sliding_attention"}:
        raise _unsupported(f"config.json layer_types {sorted(types)} are not supported")
    if len(types) > 1:
        raise _unsupported("config.json layer_types mixes sliding-window and full-attention "
                           "layers; our Llama family uses one kind for every layer")
    if types == {"full_attention"} and model_type != "mistral":
        return 0
    return int(window or 0)


def model_fields(hf: dict) -> dict:
    """Our config.model fields of a Llama-family config.json."""
    model_type = hf["model_type"]
    for field, allowed in _UNSUPPORTED.items():
        if hf.get(field) not in allowed:
            raise _unsupported(f"config.json {field}={hf[field]!r} is not supported (our Llama "
                               f"family has no such component); supported: {allowed}")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if model_type == "gemma" and act == "gelu":  # Gemma's legacy name for the tanh GELU
        act = "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise _unsupported(f"config.json hidden_act={act!r} is not supported; supported: "
                           f"{sorted(_ACTIVATIONS)}")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    fields = dict(vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"],
                  num_layers=hf["num_hidden_layers"], d_model=d, num_heads=heads,
                  num_kv_heads=hf.get("num_key_value_heads") or heads,
                  head_dim=hf.get("head_dim") or d // heads, d_ff=hf["intermediate_size"],
                  activation=_ACTIVATIONS[act], norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings",
                                             model_type in _TIED_BY_DEFAULT)),
                  qkv_bias=bias or model_type == "qwen2", out_bias=bias and model_type != "qwen2",
                  mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=model_type == "qwen3",
                  norm_offset=1.0 if model_type == "gemma" else 0.0,
                  embed_scale=model_type == "gemma", sliding_window=_window(hf, model_type),
                  **_rope(hf))
    return fields


def model_type_of(m: dict) -> str:
    """The transformers model_type whose class has exactly the run's switches."""
    def refuse(why):
        raise _unsupported(f"this Llama-family run {why}, a combination no transformers class "
                           "among " + ", ".join(ARCHITECTURES.values()) + " has")
    if m.get("norm_offset") or m.get("embed_scale"):
        if not (m.get("norm_offset") == 1.0 and m.get("embed_scale")):
            refuse("has only one of Gemma's (1 + w) norms and sqrt(d) embedding scale")
        if m.get("qk_norm") or m.get("sliding_window") or m.get("qkv_bias") != m.get("out_bias"):
            refuse("mixes Gemma's norms with q/k norms, a window or q/k/v-only biases")
        return "gemma"
    if m.get("qk_norm"):
        if m.get("qkv_bias") != m.get("out_bias") or m.get("sliding_window"):
            refuse("has q/k norms with q/k/v-only biases or a sliding window")
        return "qwen3"
    if m.get("qkv_bias") and not m.get("out_bias"):
        if m.get("sliding_window"):
            refuse("has q/k/v biases and a sliding window")
        return "qwen2"
    if m.get("sliding_window"):
        if m.get("qkv_bias") or m.get("mlp_bias"):
            refuse("has a sliding window and biases")
        return "mistral"
    if m.get("qkv_bias") != m.get("out_bias"):
        refuse("has an output bias without q/k/v biases")
    return "llama"


def hf_config(m: dict, common: dict) -> dict:
    """config.json of our Llama-family `model` fields, `common` holding the special ids."""
    model_type = model_type_of(m)
    rope = {"rope_type": m.get("rope_type", "default"), "rope_theta": m.get("rope_theta")}
    if rope["rope_type"] in ("linear", "llama3"):
        rope["factor"] = m["rope_factor"]
    if rope["rope_type"] == "llama3":
        rope.update(low_freq_factor=m["rope_low_freq_factor"],
                    high_freq_factor=m["rope_high_freq_factor"],
                    original_max_position_embeddings=m["rope_original_max_len"])
    heads = m["num_heads"]
    out = dict(common, model_type=model_type, architectures=[ARCHITECTURES[model_type]],
               vocab_size=m["vocab_size"], max_position_embeddings=m["max_len"],
               num_hidden_layers=m["num_layers"], hidden_size=m["d_model"],
               num_attention_heads=heads, num_key_value_heads=m.get("num_kv_heads") or heads,
               head_dim=m.get("head_dim") or m["d_model"] // heads,
               intermediate_size=m["d_ff"], rms_norm_eps=m["norm_epsilon"],
               hidden_act={"silu": "silu", "gelu": "gelu_pytorch_tanh"}[m["activation"]],
               tie_word_embeddings=bool(m["tie_embeddings"]), rope_parameters=rope,
               attention_dropout=m.get("attention_dropout_rate", 0.0))
    if model_type != "qwen2":
        out["attention_bias"] = bool(m.get("out_bias"))
    if model_type == "llama":
        out["mlp_bias"] = bool(m.get("mlp_bias"))
    if model_type == "mistral":
        out["sliding_window"] = m["sliding_window"]
    if model_type in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def rules(num_layers: int, prefix: str, rule) -> dict:
    """Our unscanned parameter path -> `rule(name, kind, in_dims)` (models/hf.Rule)."""
    out = {"embed_tokens/embedding": rule(prefix + "embed_tokens.weight", "vocab"),
           "lm_head/embedding": rule("lm_head.weight", "vocab"),
           "norm/scale": rule(prefix + "norm.weight")}
    for i in range(num_layers):
        base, ours = f"{prefix}layers.{i}.", f"layer_{i}/"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{ours}{norm}/scale"] = rule(f"{base}{norm}.weight")
        for proj, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                             ("out", "o_proj")):
            in_dims = 2 if proj == "out" else 1
            out[f"{ours}self_attn/{proj}/kernel"] = rule(f"{base}self_attn.{theirs}.weight",
                                                         "linear", in_dims)
            out[f"{ours}self_attn/{proj}/bias"] = rule(f"{base}self_attn.{theirs}.bias",
                                                       "copy" if proj == "out" else "flat")
        for norm in ("q_norm", "k_norm"):
            out[f"{ours}self_attn/{norm}/scale"] = rule(f"{base}self_attn.{norm}.weight")
        for proj in ("gate", "up", "down"):
            out[f"{ours}mlp/{proj}/kernel"] = rule(f"{base}mlp.{proj}_proj.weight", "linear")
            out[f"{ours}mlp/{proj}/bias"] = rule(f"{base}mlp.{proj}_proj.bias")
    return out

