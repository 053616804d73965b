"""The checks every experiment config passes before a run starts, and their one error type.

An experiment file (experiments/*.py) fixes the keys and their types; `--config.<key>=value`
overrides are type-checked by ml_collections. What types cannot say (a step count of -5, a
dropout rate of 2, a learning rate of nan, 7 heads for a width of 32) is checked here, so a
meaningless value is one line naming the key, the valid range and the fix, before any file is
read or written. Keys a config does not have are skipped: each family has its own.
"""
import math
import os

from data.tokenizer import MODEL_TYPES as TOKENIZERS
from models import llama, lora
from models.blocks import REMAT_POLICIES
from models.layers import ACTIVATIONS, POSITION_LAYOUTS, ROPE_TYPES
from train.errors import ConfigError
from train.profiling import parse_steps

ATTENTION = ("fast", "xla", "cudnn", "reference")  # models/attention.py MultiHeadAttention
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant", "noam")  # train/optim.py make_schedule


def _integer(low):
    def check(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low
    return check, f"an integer >= {low}"


def _number(low, high, low_open=False, high_open=False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if high == math.inf:
        return check, f"a finite number {'>' if low_open else '>='} {low:g}"
    if low == -math.inf:
        return check, "a finite number"
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return check, f"a finite number in {left}{low:g}, {high:g}{right}"


def _choice(*options):
    return (lambda v: v in options), f"one of {list(options)}"


def _lora_targets():
    from models.lora import TARGETS
    def check(v):
        names = [n.strip() for n in v.split(",") if n.strip()] if isinstance(v, str) else None
        return names is not None and all(name in TARGETS for name in names)
    return check, f"comma-separated names from {list(TARGETS)}"


def _mesh_axis():
    return (lambda v: isinstance(v, int) and (v >= 1 or v == -1)), \
        "a device count >= 1, or -1 for the devices left over"


POSITIVE, NON_NEGATIVE = _integer(1), _integer(0)
# key -> (check, what it must be[, hint]).
RULES = {
    "seed": NON_NEGATIVE,
    "batch_size": POSITIVE, "eval_batch_size": POSITIVE, "num_train_steps": POSITIVE,
    "eval_every_steps": POSITIVE, "log_every_steps": POSITIVE,
    "checkpoint_every_steps": POSITIVE, "keep_checkpoints": POSITIVE,
    "num_eval_steps": NON_NEGATIVE + ("(0: the whole eval split)",),
    "average_checkpoints": NON_NEGATIVE + ("(0 or 1: off)",),
    "stop_at_step": NON_NEGATIVE + ("(0: off)",),
    "skip_nonfinite_steps": NON_NEGATIVE + ("(0: stop at the first non-finite step)",),
    "model.vocab_size": POSITIVE, "model.max_len": POSITIVE, "model.num_layers": POSITIVE,
    "model.d_model": POSITIVE, "model.num_heads": POSITIVE, "model.d_ff": POSITIVE,
    "model.type_vocab_size": POSITIVE, "model.num_labels": POSITIVE,
    "model.query_blocks": POSITIVE,
    "model.dropout_rate": _number(0, 1, high_open=True),
    "model.attention_dropout_rate": _number(0, 1, high_open=True),
    "model.label_smoothing": _number(0, 1, high_open=True),
    "model.dtype": _choice(*DTYPES), "model.param_dtype": _choice(*DTYPES),
    "model.attention": _choice(*ATTENTION), "model.remat": _choice(*REMAT_POLICIES),
    "model.activation": _choice(*ACTIVATIONS),
    "model.ln_epsilon": _number(0, 1, low_open=True), "model.vocab_multiple": POSITIVE,
    "model.position_layout": _choice(*POSITION_LAYOUTS), "model.pad_id": NON_NEGATIVE,
    "model.num_kv_heads": NON_NEGATIVE + ("(0: num_heads)",),
    "model.head_dim": NON_NEGATIVE + ("(0: d_model / num_heads)",),
    "model.rope_theta": _number(0, math.inf, low_open=True),
    "model.rope_type": _choice(*ROPE_TYPES),
    "model.rope_factor": _number(0, math.inf, low_open=True),
    "model.rope_low_freq_factor": _number(0, math.inf, low_open=True),
    "model.rope_high_freq_factor": _number(0, math.inf, low_open=True),
    "model.rope_original_max_len": POSITIVE,
    "model.norm_epsilon": _number(0, 1, low_open=True), "model.norm_offset": _number(0, 1),
    "model.sliding_window": NON_NEGATIVE + ("(0: full causal attention)",),
    "model.lora_rank": NON_NEGATIVE + ("(0: off)",),
    "model.lora_alpha": _number(0, math.inf, low_open=True),
    "model.lora_targets": _lora_targets(),
    "data.max_len": POSITIVE, "data.max_predictions": POSITIVE, "data.dupe_factor": POSITIVE,
    "data.doc_stride": POSITIVE, "data.max_query_len": POSITIVE, "data.n_best": POSITIVE,
    "data.max_answer_len": POSITIVE, "data.eval_sentences": POSITIVE,
    "data.num_synthetic": POSITIVE,
    "data.eval_fraction": _number(0, 1, low_open=True, high_open=True),
    "data.mask_prob": _number(0, 1, low_open=True, high_open=True),
    "data.short_seq_prob": _number(0, 1),
    "data.holdout_fraction": _number(0, 1, high_open=True),
    "data.tokenizer_type": _choice(*TOKENIZERS),
    "data.tokenizer_max_sentences": POSITIVE,
    "data.eval_generations": NON_NEGATIVE + ("(0: every dev conversation)",),
    "data.max_new_tokens": POSITIVE, "data.eval_temperature": _number(0, math.inf),
    "decode.beam_size": POSITIVE, "decode.alpha": _number(-math.inf, math.inf),
    "opt.learning_rate": _number(0, math.inf) + ("(0 trains nothing: a frozen check)",),
    "opt.warmup_steps": NON_NEGATIVE, "opt.end_lr_fraction": _number(0, 1),
    "opt.weight_decay": _number(0, math.inf), "opt.b1": _number(0, 1, high_open=True),
    "opt.b2": _number(0, 1, high_open=True), "opt.eps": _number(0, math.inf, low_open=True),
    "opt.clip_grad_norm": _number(0, math.inf) + ("(0: off)",),
    "opt.grad_accum_steps": POSITIVE, "opt.schedule": _choice(*SCHEDULES),
    "mesh.data": _mesh_axis(), "mesh.fsdp": _mesh_axis(), "mesh.tensor": _mesh_axis(),
    "mesh.cpu_devices": NON_NEGATIVE + ("(0: one device per CPU)",),
}


def _lookup(config, dotted):
    section = config
    for part in dotted.split("."):
        if not hasattr(section, "keys") or part not in section.keys():
            return False, None
        section = section[part]
    return True, section


def _lora_projections(family: str) -> tuple:
    """The projections LoRA can adapt in a model of `family` (models/lora.py)."""
    if family == "llama":
        return llama.PROJECTIONS
    return lora.ATTENTION_TARGETS + lora.FEED_FORWARD_TARGETS


def _relations(config):
    """(message) for each pair of keys whose values cannot work together."""
    get = lambda key: _lookup(config, key)[1]  # noqa: E731
    m = config.get("model", {})
    kv_heads = m.get("num_kv_heads", 0)
    if m.get("num_heads") and kv_heads and m["num_heads"] % kv_heads:
        yield (f"config.model.num_heads={m['num_heads']} is not a multiple of config.model."
               f"num_kv_heads={kv_heads}: each key/value head serves an equal group of query "
               "heads; pick a kv head count that divides num_heads")
    low, high = m.get("rope_low_freq_factor", 1.0), m.get("rope_high_freq_factor", 4.0)
    if m.get("rope_type") == "llama3" and not high > low:
        yield (f"config.model.rope_high_freq_factor={high} must exceed config.model."
               f"rope_low_freq_factor={low} for rope_type=llama3: between the two the "
               "frequencies are blended, over a band of that width (Llama 3.1 uses 4 and 1)")
    if (m.get("d_model") and m.get("num_heads") and not m.get("head_dim")
            and m["d_model"] % m["num_heads"]):
        yield (f"config.model.d_model={m['d_model']} is not divisible by config.model."
               f"num_heads={m['num_heads']}: each head gets d_model / num_heads dimensions; "
               "pick a head count that divides the width")
    accum = get("opt.grad_accum_steps")
    if accum and config.get("batch_size") and config.batch_size % accum:
        yield (f"config.batch_size={config.batch_size} is not divisible by config.opt."
               f"grad_accum_steps={accum}; the batch is split into that many micro-batches")
    average, keep = config.get("average_checkpoints", 0), config.get("keep_checkpoints", 1)
    if average > keep:
        yield (f"config.average_checkpoints={average} needs config.keep_checkpoints >= "
               f"{average} (now {keep}): raise keep_checkpoints or average fewer")
    if m.get("lora_rank", 0) and not (m.get("lora_targets") or "").strip(", "):
        yield ("config.model.lora_rank > 0 needs config.model.lora_targets (e.g. "
               "query,key,value,out,wi,wo): the projections that get adapters")
    if m.get("lora_rank", 0) and isinstance(m.get("lora_targets"), str):
        family = m.get("family", "gpt")
        projections = _lora_projections(family)
        foreign = [t.strip() for t in m["lora_targets"].split(",")
                   if t.strip() and t.strip() not in projections]
        if foreign:
            yield (f"config.model.lora_targets names {','.join(foreign)}, which a {family} "
                   f"model does not have; use some of {','.join(projections)}")
    if m.get("lora_rank", 0) and average > 1:
        yield (f"config.average_checkpoints={average} with LoRA would average A and B "
               "separately, which is not the mean of the models; average after "
               "experiments.merge_lora, or set config.average_checkpoints=0")
    max_predictions, max_len = get("data.max_predictions"), get("data.max_len")
    if max_predictions and max_len and max_predictions > max_len:
        yield (f"config.data.max_predictions={max_predictions} exceeds config.data.max_len="
               f"{max_len}: a row cannot hold more masked tokens than tokens")
    query = get("data.max_query_len")
    if query and max_len and query > max_len - 4:
        yield (f"config.data.max_query_len={query} leaves no room for the context in rows of "
               f"config.data.max_len={max_len} ([CLS] question [SEP] context [SEP]); lower it")


def override(config, **dotted):
    """`config` with each dotted key ("opt.learning_rate") set to its value; returns it."""
    for key, value in dotted.items():
        section = config
        *parents, leaf = key.split(".")
        for name in parents:
            section = section[name]
        section[leaf] = value
    return config


def check_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file, not a folder; pass a new folder name "
                          "(or an existing run folder to resume it)")


def check_batch_split(config, mesh_shape: dict) -> None:
    """Every batch is split over the data-parallel devices (the mesh's data and fsdp axes)."""
    ways = mesh_shape["data"] * mesh_shape["fsdp"]
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % ways:
            raise ConfigError(f"config.{key}={config[key]} does not split evenly over the "
                              f"{ways} data-parallel devices of mesh {mesh_shape}; use a "
                              f"multiple of {ways}")


def validate(config) -> None:
    """Raises ConfigError for the first key out of its range, naming the range and the fix."""
    for key, (check, expected, *hint) in RULES.items():
        present, value = _lookup(config, key)
        if present and not check(value):
            note = f" {hint[0]}" if hint else ""
            raise ConfigError(f"config.{key}={value!r} is out of range: it must be "
                              f"{expected}{note}. Pass --config.{key}=<valid value>")
    for message in _relations(config):
        raise ConfigError(message)
    parse_steps(config.get("profile_steps", ""))  # "FIRST-LAST", its own one-line error
