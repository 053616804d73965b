"""Supervised fine-tuning of GPT (SFT): instructions, questions and answers, chat.

The third of GPT's stages, after data and pretraining: a pretrained run (config.init_from, a
run folder) is trained further on conversations rendered in the chat format of data/chat.py.
The loss is lm's next-token cross-entropy with weight 1 only on assistant tokens (their
content and closing <|end|>), so prompts are read but never learned; the step divides by the
loss tokens of the whole global batch. Several conversations share a row, kept apart by
segment ids. The chat tokens are added to the base run's tokenizer; their embedding rows start
at the mean embedding of plain text that means the same ("User:", "Assistant:", EOS) (both in
train/tasks/posttrain.py, shared with dpo, reward and ppo).

Eval adds generation: greedy answers to the dev prompts with the KV cache (left-padded
batches, compiled once), exact match and token F1 against the reference answers, and the file
workdir/eval_generations.jsonl of (prompt, reference, answer) of the last eval. With
config.model.lora_rank > 0 only low-rank adapters train (train/step.py, models/lora.py).
"""
import functools
import os
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data import chat, chat_template
from models import gpt
from train.tasks import lm, posttrain

build_model = lm.build_model
flops_per_token = lm.flops_per_token
loss_fn = lm.loss_fn  # weights = the loss mask
init_batch = lm.init_batch
bench_batch = lm.bench_batch
init_params = lm.init_params
FRESH_HEADS = ()  # LoRA trains the adapters alone: GPT has no task head
configure = posttrain.configure  # the base run's architecture, room for the chat tokens
load_pretrained = posttrain.load_pretrained  # the base run's weights, chat rows added
PREDICTIONS_FILE = "eval_generations.jsonl"


def conversations(config):
    """(train, dev) conversations: the Bible genealogy questions, or the user's files."""
    return posttrain.train_and_dev(config, chat.bible_qa, chat.read_conversations)


def render_all(convs, fmt):
    """(tokens, loss mask, where) of each conversation in the chat format `fmt`."""
    return [(*fmt.render(conv), conv.where) for conv in convs]


def prepare_data(config, workdir) -> dict:
    """Conversations -> packed train/eval rows with loss masks, and the dev prompts."""
    d = config.data
    posttrain.check_lengths(config)
    train, dev = conversations(config)
    tokenizer = posttrain.load_tokenizer(config, workdir, train)
    fmt = chat_template.chat_format(tokenizer)
    train_rows, train_stats = chat.pack(render_all(train, fmt), d.max_len, packing=d.packing)
    eval_rows, eval_stats = chat.pack(render_all(dev, fmt), d.max_len, packing=d.packing)
    if train_stats["truncated"]:
        print(f"note: {train_stats['truncated']} of {train_stats['examples']} training "
              f"conversations are longer than max_len={d.max_len} and were cut from the "
              "prompt side", file=sys.stderr)
    n_gen = len(dev) if not d.eval_generations else min(d.eval_generations, len(dev))
    dev_prompts = [(fmt.prompt(conv.turns[:-1]), conv.answers,
                    conv.turns[-2][1] if len(conv.turns) > 1 else "") for conv in dev[:n_gen]]
    info = {"train_conversations": train_stats["examples"], "train_rows": train_stats["rows"],
            "truncated_share": round(train_stats["truncated_share"], 4),
            "loss_token_share": round(train_stats["loss_token_share"], 4),
            "dev_conversations": eval_stats["examples"], "dev_generations": n_gen}
    return {"train_rows": train_rows, "eval_rows": eval_rows, "tokenizer": tokenizer,
            "chat": fmt, "dev_prompts": dev_prompts, "info": info}


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


def generate(params, prompts, generate_fn, *, width, batch_size, pad_id, end_id, seed=0):
    """The generated ids of each prompt (cut at end_id), in batches of `batch_size` prompts
    left-padded to `width`, so generate_fn compiles once."""
    fitted = [posttrain.fit_prompt(p, width) for p in prompts]
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
    d, end_id, tokenizer = config.data, data["chat"].end_id, data["tokenizer"]
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
        posttrain.write_jsonl(os.path.join(workdir, PREDICTIONS_FILE), [
            {"prompt": q, "reference": list(refs), "answer": a}
            for q, refs, a in zip(questions, references, answers)])
    return {"exact_match": float(100 * scores[:, 0].mean()),
            "f1": float(100 * scores[:, 1].mean())}


def final_report(final: dict, info: dict) -> str:
    line = f"final eval loss {final['loss']:.4f} on the assistant tokens"
    if "exact_match" in final:
        line += (f"; dev answers ({info['dev_generations']}): exact match "
                 f"{final['exact_match']:.1f}%, F1 {final['f1']:.1f}%")
    return line
