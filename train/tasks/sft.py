"""Supervised fine-tuning of GPT (SFT): instructions, questions and answers, chat.

The third of GPT's stages, after data and pretraining: a pretrained run (config.init_from, a
run folder) is trained further on conversations rendered in the chat format of data/chat.py.
The loss is lm's next-token cross-entropy with weight 1 only on assistant tokens (their
content and closing <|end|>), so prompts are read but never learned; the step divides by the
loss tokens of the whole global batch. Several conversations share a row, kept apart by
segment ids. The chat tokens are added to the base run's tokenizer; their embedding rows start
at the mean embedding of plain text that means the same ("User:", "Assistant:", EOS).

Eval adds generation: greedy answers to the dev prompts with the KV cache (left-padded
batches, compiled once), exact match and token F1 against the reference answers, and the file
workdir/eval_generations.jsonl of (prompt, reference, answer) of the last eval. With
config.model.lora_rank > 0 only low-rank adapters train (train/step.py, models/lora.py).
"""
import functools
import json
import os
import sys
import tempfile

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data import chat, sources, tokenizer as tok
from data.errors import DataError
from models import gpt
from train import checkpoint, multihost, pretrained
from train.config import ConfigError
from train.tasks import lm

build_model = lm.build_model
flops_per_token = lm.flops_per_token
loss_fn = lm.loss_fn  # weights = the loss mask
init_batch = lm.init_batch
bench_batch = lm.bench_batch
init_params = lm.init_params
FRESH_HEADS = ()  # LoRA trains the adapters alone: GPT has no task head

# The base run's architecture, taken over by configure(): the parameter tree must match.
SHAPE_KEYS = ("max_len", "num_layers", "d_model", "num_heads", "d_ff", "activation",
              "ln_epsilon", "vocab_multiple", "scan_layers")
PREDICTIONS_FILE = "eval_generations.jsonl"


def _base(config):
    """(base run config, base tokenizer) of config.init_from, a GPT run folder."""
    from train import tasks
    base = tasks.read_run_config(config.init_from, "it is --config.init_from; pretrain first: "
                                 "python -m train.main --config=experiments/gpt.py:tiny "
                                 f"--workdir={config.init_from}")
    if base.model.get("family", "gpt") != "gpt":
        raise DataError(f"{config.init_from} holds a {base.model.family} run; supervised "
                        "fine-tuning needs a GPT run folder")
    return base, tok.load_run_tokenizer(config.init_from)


def _has_chat_tokens(tokenizer) -> bool:
    try:
        chat.chat_token_ids(tokenizer)
        return True
    except DataError:
        return False


def configure(config):
    """The base run's architecture, and a vocabulary with room for the chat tokens."""
    init_from = config.get("init_from", "")
    if pretrained.hf_folder(init_from) is not None:
        raise ConfigError(f"sft starts from a run folder, not init_from={init_from}: import the "
                          "checkpoint first with python -m experiments.hf --import_from=DIR "
                          "--workdir=RUN, then pass --config.init_from=RUN")
    if not init_from:
        return  # from scratch (tests, toy data): the tokenizer is trained on the conversations
    if not os.path.isdir(init_from):
        raise DataError(f"config.init_from={init_from} is not a folder; pretrain a GPT into it "
                        "first (python -m train.main --config=experiments/gpt.py:tiny "
                        f"--workdir={init_from})")
    config.init_from = os.path.abspath(init_from)  # LoRA runs point at their base for good
    base, base_tokenizer = _base(config)
    for key in SHAPE_KEYS:
        if key in base.model:
            config.model[key] = base.model[key]
    added = 0 if _has_chat_tokens(base_tokenizer) else len(chat.CHAT_TOKENS)
    config.model.vocab_size = max(base.model.vocab_size, base_tokenizer.vocab_size + added)


def train_and_dev(config, from_bible, read):
    """(train, dev): from_bible(db, version) for the Bible corpus, else read(path) of the user's
    data.source and data.eval_source."""
    d = config.data
    db = sources.bible_db(d.source, d.cache_dir or None)
    if db is not None:
        return from_bible(db, d.bible_version)
    if not d.eval_source:
        raise DataError("set --config.data.eval_source to a dev file of the same format (the "
                        "train file is --config.data.source)")
    return read(d.source), read(d.eval_source)


def _conversations(config):
    """(train, dev) conversations: the Bible genealogy questions, or the user's files."""
    return train_and_dev(config, chat.bible_qa, chat.read_conversations)


def load_tokenizer(config, workdir, train):
    """The run's tokenizer with the chat tokens: the base run's, extended once and saved in
    the workdir (or one trained on the conversations when there is no base run)."""
    own = [name for name in (tok.MODEL_FILE, tok.HF_DIR)
           if os.path.exists(os.path.join(workdir, name))]
    if own:  # resuming, or a run folder made by experiments.merge_lora: already extended
        pass
    elif config.init_from:
        base_tokenizer = tok.load_run_tokenizer(config.init_from)
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
    tokenizer = tok.load_run_tokenizer(workdir)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise DataError(f"the tokenizer in {workdir} has {tokenizer.vocab_size} tokens but "
                        f"config.model.vocab_size={config.model.vocab_size}; use a new workdir")
    return tokenizer


def render_all(conversations, tokenizer, ids):
    return [(*chat.render(conv, tokenizer, ids), conv.where) for conv in conversations]


def check_lengths(config) -> None:
    """data.max_len within the model's context, with room for a prompt and the answers."""
    d = config.data
    if d.max_len > config.model.max_len:
        raise DataError(f"config.data.max_len={d.max_len} exceeds the model context "
                        f"config.model.max_len={config.model.max_len}; lower it")
    if d.max_new_tokens >= d.max_len:
        raise DataError(f"config.data.max_new_tokens={d.max_new_tokens} leaves no room for a "
                        f"prompt in config.data.max_len={d.max_len}; lower it")


def prepare_data(config, workdir) -> dict:
    """Conversations -> packed train/eval rows with loss masks, and the dev prompts."""
    d = config.data
    check_lengths(config)
    train, dev = _conversations(config)
    tokenizer = load_tokenizer(config, workdir, train)
    ids = chat.chat_token_ids(tokenizer)
    train_rows, train_stats = chat.pack(render_all(train, tokenizer, ids), d.max_len,
                                        packing=d.packing)
    eval_rows, eval_stats = chat.pack(render_all(dev, tokenizer, ids), d.max_len,
                                      packing=d.packing)
    if train_stats["truncated"]:
        print(f"note: {train_stats['truncated']} of {train_stats['examples']} training "
              f"conversations are longer than max_len={d.max_len} and were cut from the "
              "prompt side", file=sys.stderr)
    n_gen = len(dev) if not d.eval_generations else min(d.eval_generations, len(dev))
    dev_prompts = [(chat.prompt_tokens(conv.turns[:-1], tokenizer, ids), conv.answers,
                    conv.turns[-2][1] if len(conv.turns) > 1 else "") for conv in dev[:n_gen]]
    info = {"train_conversations": train_stats["examples"], "train_rows": train_stats["rows"],
            "truncated_share": round(train_stats["truncated_share"], 4),
            "loss_token_share": round(train_stats["loss_token_share"], 4),
            "dev_conversations": eval_stats["examples"], "dev_generations": n_gen}
    return {"train_rows": train_rows, "eval_rows": eval_rows, "tokenizer": tokenizer,
            "chat_ids": ids, "dev_prompts": dev_prompts, "info": info}


def new_token_rows(base_tokenizer) -> dict:
    """{chat token id: ids whose mean embedding starts its row} for the chat tokens the base
    tokenizer lacks ({} when it has them), with the ids the extended tokenizer gives them."""
    if _has_chat_tokens(base_tokenizer):
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
    from train import loop, tasks
    base, base_tokenizer = _base(config)
    params, _ = loop.restore_params(base, config.init_from, tasks.get(base.task),
                                    merge_lora=True)
    params = jax.device_get(params)
    table = np.asarray(params["wte"]["embedding"])
    rows = gpt.GPTConfig.from_config(config.model).table_size
    if rows < table.shape[0]:
        raise checkpoint.CheckpointMismatchError(
            f"{config.init_from} has {table.shape[0]} token rows, more than this run's {rows}")
    grown = np.zeros((rows, table.shape[1]), table.dtype)
    grown[:table.shape[0]] = table
    for new_id, source_ids in new_token_rows(base_tokenizer).items():
        grown[new_id] = table[source_ids].mean(axis=0)
    params["wte"] = dict(params["wte"], embedding=grown)
    # In this run's param_dtype (a bf16 base for an fp32 run, or the other way round).
    dtype = jax.numpy.dtype(config.model.param_dtype)
    return jax.tree.map(lambda x: np.asarray(x, dtype), params)


# ---- evaluation by generation -----------------------------------------------------------------

def make_generate_fn(params, config, end_id, max_new_tokens, temperature=0.0):
    """jitted (params, prompt_BP, valid_BP, rng) -> B,max_new_tokens ids: greedy at
    temperature 0, each row continued until `end_id`; replicated, so every process (of a
    multi-host run) can read them."""
    fn = functools.partial(gpt.generate, build_model(config, decode=True),
                           max_new_tokens=max_new_tokens, temperature=temperature,
                           eos_id=end_id)
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    return jax.jit(lambda params, prompt, valid, rng: fn(params, prompt, rng,
                                                          prompt_valid_BP=valid),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))


def fit_prompt(prompt, width):
    """A prompt too long for `width` keeps BOS and its end (the question sits last)."""
    return prompt if len(prompt) <= width else prompt[:1] + prompt[len(prompt) - width + 1:]


def generate(params, prompts, generate_fn, *, width, batch_size, pad_id, end_id, seed=0):
    """The generated ids of each prompt (cut at end_id), in batches of `batch_size` prompts
    left-padded to `width`, so generate_fn compiles once."""
    fitted = [fit_prompt(p, width) for p in prompts]
    outputs, rng = [], jax.random.key(seed)
    for start in range(0, len(fitted), batch_size):
        chunk = fitted[start:start + batch_size]
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # a full batch: one shape
        tokens, valid = gpt.left_pad(rows, width, pad_id)
        out = jax.device_get(generate_fn(params, tokens, valid, jax.random.fold_in(rng, start)))
        for row in out[:len(chunk)].tolist():
            outputs.append(row[:row.index(end_id)] if end_id in row else row)
    return outputs


def evaluate_predictions(params, data, config, workdir) -> dict:
    """Exact match and token F1 (%) of generated dev answers; writes PREDICTIONS_FILE."""
    if not data["dev_prompts"]:
        return {}
    d, end_id, tokenizer = config.data, data["chat_ids"]["end"], data["tokenizer"]
    if "generate_fn" not in data:
        data["generate_fn"] = make_generate_fn(params, config, end_id, d.max_new_tokens,
                                               d.eval_temperature)
    prompts, references, questions = zip(*data["dev_prompts"])
    outputs = generate(params, list(prompts), data["generate_fn"],
                       width=d.max_len - d.max_new_tokens, batch_size=config.eval_batch_size,
                       pad_id=tokenizer.pad_id or 0, end_id=end_id)
    answers = [tokenizer.decode(ids).strip() for ids in outputs]
    scores = np.asarray([chat.answer_scores(a, refs) for a, refs in zip(answers, references)])
    if jax.process_index() == 0:
        _write_jsonl(os.path.join(workdir, PREDICTIONS_FILE), [
            {"prompt": q, "reference": list(refs), "answer": a}
            for q, refs, a in zip(questions, references, answers)])
    return {"exact_match": float(100 * scores[:, 0].mean()),
            "f1": float(100 * scores[:, 1].mean())}


def _write_jsonl(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def final_report(final: dict, info: dict) -> str:
    line = f"final eval loss {final['loss']:.4f} on the assistant tokens"
    if "exact_match" in final:
        line += (f"; dev answers ({info['dev_generations']}): exact match "
                 f"{final['exact_match']:.1f}%, F1 {final['f1']:.1f}%")
    return line
