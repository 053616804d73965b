"""What the post-training tasks share: sft, dpo, reward, ppo and grpo each start from a GPT run.

Every one of them fine-tunes config.init_from, a GPT run folder: the model takes that run's
architecture (configure), its weights with the token table grown for the chat tokens
(base_params, load_pretrained), and its tokenizer extended once with the chat tokens of
data/chat.py (load_tokenizer). Their data is the user's files or the offline Bible genealogy
questions (train_and_dev). The preference tasks (dpo, reward) feed both sides of a pair
through one forward pass (pair_batch, both_sides), and reward's score and ppo's value are
the same zero-initialised head (scalar_head); dpo and ppo take the reference model as
the LoRA policy with its adapters switched off (switch_off_adapters). Not a task itself.
"""
import json
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data import chat, preferences, sources, tokenizer as tok, tokenizer_io
from data.errors import DataError
from models import lora
from train import errors, multihost, pretrained, runs, tasks
from train.errors import ConfigError
from train.tasks import lm

# The base run's architecture, taken over by configure(): the parameter tree must match.
SHAPE_KEYS = ("max_len", "num_layers", "d_model", "num_heads", "d_ff", "activation",
              "ln_epsilon", "vocab_multiple", "scan_layers")
# What a post-training run keeps of its own config.model when its base is of another decoder
# family (a GPT-shaped experiment file over a Llama-family base): how it trains, not the shape.
RUN_KEYS = ("dropout_rate", "attention_dropout_rate", "attention", "dtype", "param_dtype",
            "remat", "query_blocks", "lora_rank", "lora_alpha", "lora_targets")
# GPT's feed-forward adapter targets and the Llama family's gated equivalents.
_GATED_TARGETS = {"wi": ("gate", "up"), "wo": ("down",)}
SIDES = ("chosen", "rejected")


# ---- the base run ------------------------------------------------------------------------------

def base_run(config):
    """(base run config, base tokenizer) of config.init_from, a decoder (GPT or Llama-family)
    run folder."""
    base = runs.read_run_config(config.init_from, "it is --config.init_from; pretrain first: "
                                 "python -m train.main --config=experiments/gpt.py:tiny "
                                 f"--workdir={config.init_from}")
    if base.model.get("family", "gpt") not in lm.DECODERS:
        raise DataError(f"{config.init_from} holds a {base.model.family} run; post-training "
                        f"needs a decoder run folder ({', '.join(lm.DECODERS)})")
    return base, tokenizer_io.load_run_tokenizer(config.init_from)


def has_chat_tokens(tokenizer) -> bool:
    """Whether the tokenizer needs no chat tokens added: it has them, or a chat template."""
    if chat.uses_template(tokenizer):
        return True
    try:
        chat.chat_token_ids(tokenizer)
        return True
    except DataError:
        return False


def configure(config):
    """The base run's architecture, and a vocabulary with room for the chat tokens."""
    init_from = config.get("init_from", "")
    if pretrained.hf_folder(init_from) is not None:
        raise ConfigError(f"{config.task} starts from a run folder, not init_from={init_from}: "
                          "import the checkpoint first with python -m experiments.hf "
                          "--import_from=DIR --workdir=RUN, then pass --config.init_from=RUN")
    if not init_from:
        return  # from scratch (tests, toy data): the tokenizer is trained on the conversations
    if not os.path.isdir(init_from):
        raise DataError(f"config.init_from={init_from} is not a folder; pretrain a GPT into it "
                        "first (python -m train.main --config=experiments/gpt.py:tiny "
                        f"--workdir={init_from})")
    config.init_from = os.path.abspath(init_from)  # LoRA runs point at their base for good
    base, base_tokenizer = base_run(config)
    if base.model.get("family", "gpt") != config.model.get("family", "gpt"):
        _adopt_family(config, base)
    for key in SHAPE_KEYS:
        if key in base.model:
            config.model[key] = base.model[key]
    added = 0 if has_chat_tokens(base_tokenizer) else len(chat.CHAT_TOKENS)
    config.model.vocab_size = max(base.model.vocab_size, base_tokenizer.vocab_size + added)


def _adopt_family(config, base):
    """config.model becomes the base's whole model section (its family's fields), keeping
    this run's RUN_KEYS; GPT's wi / wo adapter targets become gate, up / down."""
    model = base.model.to_dict()
    for key in RUN_KEYS:
        if key in config.model:
            model[key] = config.model[key]
    if model.get("family") == "llama":
        targets = lora.parse_targets(model.get("lora_targets", ""))
        targets = [g for t in targets for g in _GATED_TARGETS.get(t, (t,))]
        model["lora_targets"] = ",".join(dict.fromkeys(targets))
    with config.unlocked():
        config.model = type(config.model)(model)


def new_token_rows(base_tokenizer) -> dict:
    """{chat token id: ids whose mean embedding starts its row} for the chat tokens the base
    tokenizer lacks ({} when it has them), with the ids the extended tokenizer gives them."""
    if has_chat_tokens(base_tokenizer):
        return {}
    with tempfile.TemporaryDirectory() as tmp:  # the same extension the run folder holds
        return chat.new_token_inits(chat.add_chat_tokens(base_tokenizer, tmp))


def load_pretrained(config, shardings) -> dict:
    """The base run's weights (a LoRA base merged), the token table grown for the chat tokens,
    placed as `shardings` says."""
    params = {k: v for k, v in base_params(config).items() if k in shardings}
    return jax.device_put(params, {k: shardings[k] for k in params})


def base_params(config) -> dict:
    """The base run's weights as numpy arrays in this run's param_dtype (a LoRA base merged),
    the token table grown for the chat tokens: the model this run starts from."""
    base, base_tokenizer = base_run(config)
    params, _ = runs.restore_params(base, config.init_from, tasks.get(base.task),
                                    merge_lora=True)
    params = jax.device_get(params)
    rows = lm.model_config(config).table_size
    new_rows = new_token_rows(base_tokenizer)
    # GPT's tied wte; a Llama-family model's embed_tokens and, untied, its lm_head.
    for name in [n for n in ("wte", "embed_tokens", "lm_head") if n in params]:
        table = np.asarray(params[name]["embedding"])
        if rows < table.shape[0]:
            raise errors.CheckpointMismatchError(f"{config.init_from} has {table.shape[0]} "
                                                 f"token rows, more than this run's {rows}")
        grown = np.zeros((rows, table.shape[1]), table.dtype)
        grown[:table.shape[0]] = table
        for new_id, source_ids in new_rows.items():
            grown[new_id] = table[source_ids].mean(axis=0)
        params[name] = dict(params[name], embedding=grown)
    # In this run's param_dtype (a bf16 base for an fp32 run, or the other way round).
    dtype = jax.numpy.dtype(config.model.param_dtype)
    return jax.tree.map(lambda x: np.asarray(x, dtype), params)


def switch_off_adapters(params):
    """params with every LoRA B set to zero: x W + (x A) 0 is the base model exactly."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if getattr(path[-1], "key", None) == "lora_b" else x,
        params)


# ---- data --------------------------------------------------------------------------------------

def train_and_dev(config, from_bible, read):
    """(train, dev): from_bible(db, version) for the Bible corpus, else read(path) of the user's
    data.source and data.eval_source."""
    d = config.data
    db = sources.bible_db(d.source, d.cache_dir or None)
    if db is not None:
        return from_bible(db, d.bible_version)
    train = read(d.source)  # first: a missing or broken train file is the problem to name
    if not d.eval_source:
        raise DataError("set --config.data.eval_source to a dev file of the same format (the "
                        "train file is --config.data.source)")
    return train, read(d.eval_source)


def load_tokenizer(config, workdir, train):
    """The run's tokenizer with the chat tokens: the base run's, extended once and saved in
    the workdir (or one trained on the conversations `train` when there is no base run)."""
    own = [name for name in (tok.MODEL_FILE, tok.HF_DIR)
           if os.path.exists(os.path.join(workdir, name))]
    if own:  # resuming, or a run folder made by experiments.merge_lora: already extended
        pass
    elif config.init_from:
        base_tokenizer = tokenizer_io.load_run_tokenizer(config.init_from)
        name = tok.MODEL_FILE if isinstance(base_tokenizer, tok.Tokenizer) else tok.HF_DIR
        os.makedirs(workdir, exist_ok=True)
        multihost.write_once(os.path.join(workdir, name),
                             lambda: chat.add_chat_tokens(base_tokenizer, workdir))
    else:
        path = os.path.join(workdir, tok.MODEL_FILE)
        texts = [content for conv in train for _, content in conv.turns]

        def train_and_extend():  # tokenizer.model appears only once it has the chat tokens
            plain = path + ".plain"
            tok.train_tokenizer(texts, plain, config.model.vocab_size - len(chat.CHAT_TOKENS),
                                config.data.tokenizer_type)
            chat.add_chat_tokens(tok.load_tokenizer(plain), workdir)
            os.remove(plain)

        os.makedirs(workdir, exist_ok=True)
        multihost.write_once(path, train_and_extend)
    tokenizer = tokenizer_io.load_run_tokenizer(workdir)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise DataError(f"the tokenizer in {workdir} has {tokenizer.vocab_size} tokens but "
                        f"config.model.vocab_size={config.model.vocab_size}; use a new workdir")
    return tokenizer


def check_lengths(config) -> None:
    """data.max_len within the model's context, with room for a prompt and the answers."""
    d = config.data
    if d.max_len > config.model.max_len:
        # With a base run the context is its own (configure): only the rows can shrink.
        base = config.get("init_from", "")
        raise DataError(f"config.data.max_len={d.max_len} exceeds the model context "
                        f"config.model.max_len={config.model.max_len}"
                        + (f" of the base run {base}" if base else "")
                        + f"; pass --config.data.max_len={config.model.max_len}")
    if d.max_new_tokens >= d.max_len:
        raise DataError(f"config.data.max_new_tokens={d.max_new_tokens} leaves no room for a "
                        f"prompt in config.data.max_len={d.max_len}; lower it")


def fit_prompt(prompt, width):
    """A prompt too long for `width` keeps BOS and its end (the question sits last)."""
    return prompt if len(prompt) <= width else prompt[:1] + prompt[len(prompt) - width + 1:]


def write_jsonl(path, records):
    """One JSON object per line, written to a temporary file first (a reader never sees half)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---- preference pairs --------------------------------------------------------------------------

def pair_batch(plain: dict) -> dict:
    """The rows of `plain` (lm's keys) on both sides of a pair batch."""
    return {f"{side_name}_{k}": v for side_name in SIDES for k, v in plain.items()}


def both_sides(batch):
    """The chosen rows then the rejected rows, as one batch (one forward pass)."""
    return {key: jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
            for key in preferences.ROW_KEYS}


def scalar_head(d_model: int):
    """A zero D->1 linear head, boxed with logical names (embed on the kernel's rows): the
    reward model's score and PPO's value."""
    return {"kernel": nn.LogicallyPartitioned(jnp.zeros((d_model, 1), jnp.float32),
                                              ("embed", None)),
            "bias": nn.LogicallyPartitioned(jnp.zeros((1,), jnp.float32), (None,))}
