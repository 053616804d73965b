"""Contextual embeddings from a BERT run: per-token vectors and a sentence vector.

  python -m experiments.embed --workdir=runs/bert_tiny --text="Let there be light."
  python -m experiments.embed --workdir=runs/bert_tiny --text="..." --output=vectors.npz
  python -m experiments.embed --workdir=runs/bert_tiny --word=light   # the demo below
  python -m experiments.hf --import_from=DIR --workdir=runs/minilm   # DIR: all-MiniLM-L6-v2
  python -m experiments.embed --workdir=runs/minilm --text="A man is eating food."

The sentence vector (--pooling) is BERT's pooler output (tanh of a dense layer on [CLS]), the
[CLS] output itself, or the mean of every token's output ([CLS] and [SEP] included). A run
imported from a sentence-transformers folder (all-MiniLM-L6-v2 and its kind) gets that
checkpoint's own by default: the pooling of its 1_Pooling/config.json and, when its
modules.json lists a Normalize module, L2 normalisation, so the vectors are the ones
SentenceTransformer(DIR).encode gives.

The demo shows what a contextual model adds over a static embedding table: the same word gets
a different vector in each sentence. It prints the cosine similarity of the word's vectors across
sentences (default: "light" as brightness and as "not heavy"), next to the same table for the
static token-embedding lookup, which is 1.0 everywhere because the lookup ignores context.
"""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from data.errors import DataError
from train import cli, errors, pretrained, runs, tasks

POOLINGS = ("mean", "cls", "pooler")
# sentence-transformers' names for the poolings above (1_Pooling/config.json); the legacy
# files set one pooling_mode_<name> flag, newer ones a pooling_mode string.
ST_POOLINGS = {"mean": "mean", "mean_tokens": "mean", "cls": "cls", "cls_token": "cls"}


def define_flags() -> None:
    """The command's flags, defined when it runs (tests import this module beside others that
    define --workdir)."""
    flags.DEFINE_string("workdir", None, "A BERT run folder (pretrained or fine-tuned).",
                        required=True)
    flags.DEFINE_multi_string("text", [], "Text to embed (repeat the flag for several).")
    flags.DEFINE_string("output", "", "Save tokens, per-token and sentence vectors to this "
                        ".npz.")
    flags.DEFINE_string("word", "", "Compare this word's vectors across the --text sentences.")
    flags.DEFINE_enum("pooling", None, POOLINGS, "The sentence vector: the mean over every "
                      "token, the [CLS] output, or BERT's pooler (default: the checkpoint's "
                      "own for a run imported from a sentence-transformers folder, else "
                      "pooler).")
    flags.DEFINE_bool("normalize", None, "L2-normalise the sentence vector (default: as the "
                      "checkpoint's modules.json says when --pooling is left to it, else no).")


FLAGS = flags.FLAGS

DEMO_SENTENCES = (
    "God said, let there be light, and there was light.",
    "The sun gives light by day and the moon by night.",
    "For my yoke is easy, and my burden is light.",
    "Is it a light thing that you should be my servant?",
)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); pass --pooling=mean|cls|pooler and "
                        "--[no]normalize instead") from None


def checkpoint_pooling(config):
    """(pooling, normalize, where) of the run's sentence vector as its checkpoint defines it:
    a sentence-transformers folder's modules.json and pooling config when config.init_from
    is hf:DIR of one; else ("pooler", False, None), BERT's own."""
    directory = pretrained.hf_folder(config.get("init_from", ""))
    if directory is None or not os.path.isfile(os.path.join(directory, "modules.json")):
        return "pooler", False, None
    where = os.path.join(directory, "modules.json")
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "")
             for m in _read_json(where)}
    extra = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if extra:
        raise DataError(f"{where} adds the modules {extra}, which this tool does not compute; "
                        "pass --pooling=mean|cls|pooler for a vector without them")
    if "Pooling" not in kinds:
        raise DataError(f"{where} lists no Pooling module; pass --pooling=mean|cls|pooler")
    settings = _read_json(os.path.join(directory, kinds["Pooling"], "config.json"))
    modes = settings.get("pooling_mode") or [
        key.removeprefix("pooling_mode_") for key, on in settings.items()
        if key.startswith("pooling_mode_") and on] or ["mean"]  # sentence-transformers' default
    modes = [modes] if isinstance(modes, str) else modes
    if len(modes) != 1 or modes[0] not in ST_POOLINGS:
        raise DataError(f"{directory}/{kinds['Pooling']}/config.json pools with {modes}; this "
                        "tool computes one of mean and cls: pass --pooling=mean|cls|pooler")
    return ST_POOLINGS[modes[0]], "Normalize" in kinds, where


def embed(config, params, tokenizer, text: str, pooling: str = "pooler",
          normalize: bool = False):
    """(ids, pieces, char spans, vectors L,D, sentence vector D) of [CLS] text [SEP]
    (truncated); the sentence vector pooled as `pooling` says, L2-normalised on request."""
    ids, starts, ends = tokenizer.encode_with_offsets(text)
    room = config.data.max_len - 2
    ids, spans = ids[:room], list(zip(starts, ends))[:room]
    model = tasks.get(config.task).build_model(config)
    row = jnp.asarray([[tokenizer.cls_id, *ids, tokenizer.sep_id]], jnp.int32)
    out = model.apply({"params": params}, row)
    sequence = np.asarray(out["sequence_BLD"][0])
    if pooling == "mean":
        # Every token of the row, [CLS] and [SEP] included: sentence-transformers averages
        # every position its attention mask keeps (one unpadded row here).
        sentence = sequence.mean(0)
    elif pooling == "cls":
        sentence = sequence[0]
    else:
        sentence = np.asarray(out["pooled_BD"][0])
    if normalize:  # torch's F.normalize: x / max(|x|, 1e-12)
        sentence = sentence / max(float(np.linalg.norm(sentence)), 1e-12)
    return (ids, [tokenizer.id_to_piece(i) for i in ids], spans, sequence[1:-1], sentence)


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
        config, tokenizer, params, _ = runs.load_run(FLAGS.workdir, families=("bert",))
        pooling, normalize, where = (checkpoint_pooling(config) if FLAGS.pooling is None
                                     else (FLAGS.pooling, False, None))
        if FLAGS.normalize is not None:
            normalize = FLAGS.normalize
        results = [embed(config, params, tokenizer, t, pooling, normalize) for t in texts]
    except (DataError, errors.CheckpointMismatchError) as e:
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
        print(f"sentence vector: {pooling}{', L2-normalised' if normalize else ''}"
              + (f" (the checkpoint's own: {where})" if where else ""))
        for text, (_, pieces, _, vectors, pooled) in zip(texts, results):
            print(f"{text!r}: {len(pieces)} tokens x {vectors.shape[1]} dims; sentence |v| = "
                  f"{np.linalg.norm(pooled):.3f}")
            for piece, v in zip(pieces, vectors):
                print(f"  {piece!r:<16} |v| {np.linalg.norm(v):7.3f}  "
                      + " ".join(f"{x:+.3f}" for x in v[:6]) + " ...")
    if FLAGS.output:
        np.savez(FLAGS.output, texts=np.asarray(texts), pooling=np.asarray(pooling),
                 normalized=np.asarray(normalize), pooled=np.stack([r[4] for r in results]),
                 **{f"tokens_{i}": np.asarray(r[0]) for i, r in enumerate(results)},
                 **{f"vectors_{i}": r[3] for i, r in enumerate(results)})
        print(f"saved {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
