"""Attention heatmaps, the lecture's "distribution of attention", for any run folder.

  python -m experiments.attention --workdir=runs/transformer_tiny \
      --text="In the beginning God created the heavens and the earth." --out=attention
  python -m experiments.attention --workdir=runs/gpt_tiny --text="And God said"
  python -m experiments.attention --workdir=runs/bert_tiny --text="Let there be light."
  python -m experiments.attention --positions=positions.png   # sinusoidal encodings (sec. 3.5)

Translation runs: the text is translated (beam search), then one PNG per decoder layer shows
every head's encoder-decoder attention, generated target tokens (rows) against source tokens
(columns). GPT and BERT runs: one PNG per layer of self-attention (GPT's is causal, so its
upper triangle is empty). The weights come from the explicit einsum/softmax attention path,
which computes the same function as the fast path (tests/models/test_attention.py).
"""
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import flags, logging

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from data.errors import DataError  # noqa: E402
from models import layers  # noqa: E402
from train import cli, runs  # noqa: E402
from train.tasks import seq2seq  # noqa: E402
from train import errors

flags.DEFINE_string("workdir", "", "A trained run folder (GPT, BERT or Transformer).")
flags.DEFINE_string("text", "", "The sentence to attend over (translated for a Transformer).")
flags.DEFINE_string("out", "attention", "Folder for the PNG files.")
flags.DEFINE_string("positions", "", "Write a plot of the sinusoidal encodings to this PNG.")
FLAGS = flags.FLAGS


def attention_weights(config, params, task, tokenizer, text):
    """(rows' tokens, columns' tokens, {layer name: weights H,rows,cols}, kind)."""
    family = config.model.get("family", "gpt")
    # The einsum path records the weights; GPT's query blocks would record them per block.
    overrides = {"query_blocks": 1} if family == "gpt" else {}
    model = task.build_model(config, attention="reference", **overrides)
    ids = tokenizer.encode(text)
    if family == "transformer":
        target = seq2seq.translate(params, [text], tokenizer, config)[0]
        src = jnp.asarray([ids[:config.data.max_len - 1] + [tokenizer.eos_id]])
        tgt_ids = tokenizer.encode_target(target)[:config.data.max_len - 1]
        tgt_in = jnp.asarray([[tokenizer.bos_id] + tgt_ids])
        _, state = model.apply({"params": params}, src, tgt_in, mutable=["intermediates"])
        tree = state["intermediates"]["decoder"]
        maps = {name: np.asarray(block["cross_attn"]["attention_weights"][0][0])
                for name, block in tree.items() if "cross_attn" in block}
        rows = [tokenizer.id_to_piece(i) for i in tgt_ids + [tokenizer.eos_id]]
        return rows, [tokenizer.id_to_piece(i) for i in src[0]], maps, "encoder-decoder"
    if family == "bert":
        row = jnp.asarray([[tokenizer.cls_id, *ids[:config.data.max_len - 2],
                            tokenizer.sep_id]])
        _, state = model.apply({"params": params}, row, mutable=["intermediates"])
    else:
        row = jnp.asarray([[tokenizer.bos_id, *ids[:config.model.max_len - 1]]])
        _, state = model.apply({"params": params}, row, mutable=["intermediates"])
    maps = {name: np.asarray(block["attn"]["attention_weights"][0][0])
            for name, block in state["intermediates"].items()
            if isinstance(block, dict) and "attn" in block}
    pieces = [tokenizer.id_to_piece(int(i)) for i in row[0]]
    return pieces, pieces, maps, "self"


def plot_layer(path, title, weights_HRC, rows, cols):
    """One figure: a heatmap per head, rows attending over columns."""
    heads = weights_HRC.shape[0]
    fig, axes = plt.subplots(1, heads, figsize=(0.25 * len(cols) * heads + 2,
                                                0.25 * len(rows) + 2), squeeze=False)
    for h, ax in enumerate(axes[0]):
        ax.imshow(weights_HRC[h][:len(rows), :len(cols)], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}")
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), rows if h == 0 else [""] * len(rows), fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_positions(path, d_model=128, length=100):
    """PE(pos, i) as an image (sec. 3.5): fast sines on the left, slow on the right."""
    pe = np.asarray(layers.sinusoidal_positions(jnp.arange(length)[None], d_model)[0])
    fig, ax = plt.subplots(figsize=(8, 4))
    image = ax.imshow(pe, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xlabel("encoding dimension i (sin at even i, cos at odd i)")
    ax.set_ylabel("position")
    ax.set_title(f"sinusoidal position encodings, d_model={d_model}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only opens
    if FLAGS.positions:
        plot_positions(FLAGS.positions)
        print(f"wrote {FLAGS.positions}")
        if not FLAGS.workdir:
            return
    try:
        if not FLAGS.workdir or not FLAGS.text.strip():
            raise DataError("pass --workdir=<run folder> and --text=<a sentence>")
        config, tokenizer, params, task = runs.load_run(FLAGS.workdir)
        rows, cols, maps, kind = attention_weights(config, params, task, tokenizer, FLAGS.text)
    except (DataError, errors.CheckpointMismatchError) as e:
        cli.fail(str(e))
    os.makedirs(FLAGS.out, exist_ok=True)
    for name, weights in jax.tree_util.tree_leaves_with_path(maps):
        layer = jax.tree_util.keystr(name).strip("[]'")
        path = os.path.join(FLAGS.out, f"{kind}_{layer}.png")
        plot_layer(path, f"{kind} attention, {layer}", weights, rows, cols)
        print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
