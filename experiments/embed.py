"""Contextual embeddings from a BERT run: per-token vectors and a pooled sentence vector.

  python -m experiments.embed --workdir=runs/bert_tiny --text="Let there be light."
  python -m experiments.embed --workdir=runs/bert_tiny --text="..." --output=vectors.npz
  python -m experiments.embed --workdir=runs/bert_tiny --word=light   # the demo below

The demo shows what a contextual model adds over a static embedding table: the same word gets
a different vector in each sentence. It prints the cosine similarity of the word's vectors across
sentences (default: "light" as brightness and as "not heavy"), next to the same table for the
static token-embedding lookup, which is 1.0 everywhere because the lookup ignores context.
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from data.errors import DataError
from train import checkpoint, cli, tasks

flags.DEFINE_string("workdir", None, "A BERT run folder (pretrained or fine-tuned).",
                    required=True)
flags.DEFINE_multi_string("text", [], "Text to embed (repeat the flag for several).")
flags.DEFINE_string("output", "", "Save tokens, per-token and pooled vectors to this .npz.")
flags.DEFINE_string("word", "", "Compare this word's vectors across the --text sentences.")
FLAGS = flags.FLAGS

DEMO_SENTENCES = (
    "God said, let there be light, and there was light.",
    "The sun gives light by day and the moon by night.",
    "For my yoke is easy, and my burden is light.",
    "Is it a light thing that you should be my servant?",
)


def embed(config, params, tokenizer, text: str):
    """(ids, pieces, char spans, vectors L,D, pooled D) of [CLS] text [SEP] (truncated)."""
    ids, starts, ends = tokenizer.encode_with_offsets(text)
    room = config.data.max_len - 2
    ids, spans = ids[:room], list(zip(starts, ends))[:room]
    model = tasks.get(config.task).build_model(config)
    row = jnp.asarray([[tokenizer.cls_id, *ids, tokenizer.sep_id]], jnp.int32)
    out = model.apply({"params": params}, row)
    return (ids, [tokenizer.id_to_piece(i) for i in ids], spans,
            np.asarray(out["sequence_BLD"][0, 1:-1]), np.asarray(out["pooled_BD"][0]))


def word_vectors(word, text, spans, vectors, table, ids):
    """(contextual, static) vector of the first occurrence of `word` in text: the mean over
    the pieces that overlap it, or None when the word does not occur."""
    match = re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE)
    if match is None:
        return None
    pieces = [i for i, (s, e) in enumerate(spans) if s < match.end() and e > match.start()]
    if not pieces:  # the word lies past the model's max_len and was truncated away
        return None
    return vectors[pieces].mean(0), table[[ids[i] for i in pieces]].mean(0)


def cosine_table(vectors):
    v = np.stack(vectors)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v @ v.T


def print_table(title, matrix):
    print(title)
    n = len(matrix)
    print("      " + "".join(f"  s{j + 1:<4}" for j in range(n)))
    for i in range(n):
        print(f"  s{i + 1:<3}" + "".join(f"{matrix[i, j]:7.3f}" for j in range(n)))


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only opens
    texts = FLAGS.text or (list(DEMO_SENTENCES) if FLAGS.word else [])
    try:
        if not texts:
            raise DataError("pass --text=... (repeatable), or --word=... for the demo")
        if FLAGS.output and os.path.exists(FLAGS.output):
            raise DataError(f"--output={FLAGS.output} exists; pick a new file name (nothing "
                            "already saved is overwritten)")
        config, tokenizer, params, _ = tasks.load_run(FLAGS.workdir, families=("bert",))
        results = [embed(config, params, tokenizer, t) for t in texts]
    except (DataError, checkpoint.CheckpointMismatchError) as e:
        cli.fail(str(e))
    if FLAGS.word:
        table = np.asarray(jax.device_get(params["word_embeddings"]["embedding"]))
        found = [(i, word_vectors(FLAGS.word, t, r[2], r[3], table, r[0]))
                 for i, (t, r) in enumerate(zip(texts, results))]
        found = [(i, v) for i, v in found if v is not None]
        if len(found) < 2:
            cli.fail(f"--word={FLAGS.word!r} occurs in fewer than two --text sentences")
        for i, _ in found:
            print(f"  s{i + 1}: {texts[i]}")
        print_table(f"contextual ({config.model.num_layers}-layer output) cosine similarity "
                    f"of {FLAGS.word!r}:", cosine_table([v[0] for _, v in found]))
        print_table("static token-embedding lookup, same word:",
                    cosine_table([v[1] for _, v in found]))
    else:
        for text, (_, pieces, _, vectors, pooled) in zip(texts, results):
            print(f"{text!r}: {len(pieces)} tokens x {vectors.shape[1]} dims; pooled |v| = "
                  f"{np.linalg.norm(pooled):.3f}")
            for piece, v in zip(pieces, vectors):
                print(f"  {piece!r:<16} |v| {np.linalg.norm(v):7.3f}  "
                      + " ".join(f"{x:+.3f}" for x in v[:6]) + " ...")
    if FLAGS.output:
        np.savez(FLAGS.output, texts=np.asarray(texts),
                 pooled=np.stack([r[4] for r in results]),
                 **{f"tokens_{i}": np.asarray(r[0]) for i, r in enumerate(results)},
                 **{f"vectors_{i}": r[3] for i, r in enumerate(results)})
        print(f"saved {FLAGS.output}")


if __name__ == "__main__":
    cli.run(main)
