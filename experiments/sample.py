"""Samples text from a trained GPT run, with the KV cache.

  python -m experiments.sample --workdir=runs/gpt_tiny --prompt="In the beginning" \
      --temperature=0.8 --top_k=40 --num_samples=3
  python -m experiments.sample --workdir=runs/gpt_tiny --prompt="And God said" --show_probs=10

Temperature 0 is greedy decoding. --show_probs=N prints the N most likely next tokens after the
prompt with their probabilities, p(token | prompt), before sampling.
"""
import functools
import sys

import jax
import jax.numpy as jnp
from absl import flags, logging

from data import tokenizer as tok
from data.errors import DataError
from models import gpt
from train import cli, errors, runs
from train.tasks import lm

flags.DEFINE_string("workdir", None, "A trained run folder.", required=True)
flags.DEFINE_string("prompt", "", "Text to continue (empty: start of a document).")
cli.define_sampling_flags(temperature=1.0, max_new_tokens=100, what="sample")
flags.DEFINE_integer("num_samples", 1, "Samples drawn in parallel.")
flags.DEFINE_integer("show_probs", 0, "Print the N most likely next tokens after the prompt.")
FLAGS = flags.FLAGS
cli.at_least("num_samples", 1)
cli.at_least("show_probs", 0, " (0 = off)")


def encode_prompt(prompt: str, tokenizer, max_len: int) -> list[int]:
    """[BOS] + prompt ids (no BOS for a tokenizer without one, as Qwen's); a prompt filling
    the whole context, or an empty one with nothing to continue from, is an error."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"--prompt holds bytes that are not valid UTF-8 (at character "
                        f"{e.start}); pass the prompt as UTF-8 text") from None
    ids = tok.bos_prefix(tokenizer) + tokenizer.encode(prompt)
    if not ids:
        raise DataError("the prompt is empty and this tokenizer has no BOS token to start "
                        "from; pass --prompt=TEXT")
    if len(ids) >= max_len:
        raise DataError(f"the prompt is {len(ids)} tokens (with BOS) but the model's context is "
                        f"{max_len}; shorten the prompt to leave room for new tokens")
    return ids


def next_token_table(model, params, ids, tokenizer, n):
    """Rows (piece, probability) of the n most likely next tokens after `ids`."""
    logits = model.apply({"params": params}, jnp.asarray([ids], jnp.int32))[0, -1]
    probs = jax.nn.softmax(logits.astype(jnp.float32))
    top_p, top_i = jax.lax.top_k(probs, n)
    return [(tokenizer.id_to_piece(int(i)), float(p)) for p, i in zip(top_p, top_i)]


def generate(config, params, ids, *, eos_id, num_samples, max_new_tokens, temperature, top_k,
             top_p, seed):
    """num_samples continuations of the prompt ids, each cut at EOS."""
    run = jax.jit(functools.partial(
        gpt.generate, lm.build_model(config, decode=True), max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id))
    prompt = jnp.asarray([ids] * num_samples, jnp.int32)
    out = jax.device_get(run(params, prompt, jax.random.key(seed)))
    return [row[:row.index(eos_id)] if eos_id in row else row for row in out.tolist()]


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only opens
    try:
        config, tokenizer, params, _ = runs.load_run(FLAGS.workdir,
                                                     families=tuple(lm.DECODERS))
        ids = encode_prompt(FLAGS.prompt, tokenizer, config.model.max_len)
        if FLAGS.show_probs > tokenizer.vocab_size:
            raise DataError(f"--show_probs={FLAGS.show_probs} exceeds the vocabulary of "
                            f"{tokenizer.vocab_size} tokens; ask for fewer")
    except (DataError, errors.CheckpointMismatchError) as e:
        cli.fail(str(e))
    room = config.model.max_len - len(ids)
    if FLAGS.max_new_tokens > room:
        print(f"note: --max_new_tokens={FLAGS.max_new_tokens} cut to {room} to fit the "
              f"{config.model.max_len}-token context", file=sys.stderr)
    if FLAGS.show_probs:
        print(f'p(next token | "{FLAGS.prompt}"):')
        for rank, (piece, p) in enumerate(next_token_table(
                lm.build_model(config), params, ids, tokenizer, FLAGS.show_probs), 1):
            print(f"  {rank:3d}  {piece!r:<20} {p:.3f}")
    samples = generate(config, params, ids, eos_id=tokenizer.eos_id,
                       num_samples=FLAGS.num_samples,
                       max_new_tokens=min(FLAGS.max_new_tokens, room),
                       temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                       seed=FLAGS.seed)
    for i, new_ids in enumerate(samples):
        print(f"--- sample {i + 1} (temperature {FLAGS.temperature}) ---")
        print(tokenizer.decode(ids + new_ids))  # special ids (BOS) are skipped


if __name__ == "__main__":
    cli.run(main)
