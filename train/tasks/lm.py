"""Next-token language modelling (GPT): the model, its data and its loss.

A task module gives the loop everything objective-specific: `build_model`, `prepare_data`,
`loss_fn` (returns a loss *sum* and metric sums) and `flops_per_token`. BERT's masked-LM and
the translation task plug in the same way.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np


from data import hf_tokenizer, lm as lm_data, tokenizer_io
from data import prepared, sources, tokenizer as tok
from data.errors import DataError
from models import gpt, llama
from train import losses, multihost, pretrained

# config.model.family -> the decoder's module, its config dataclass and its FLOP count.
DECODERS = {"gpt": (gpt.GPT, gpt.GPTConfig, gpt.flops_per_token),
            "llama": (llama.Llama, llama.LlamaConfig, llama.flops_per_token)}


def _decoder(config):
    family = config.model.get("family", "gpt")
    if family not in DECODERS:
        raise ValueError(f"config.model.family={family!r} is not a decoder; use one of "
                         f"{sorted(DECODERS)}")
    return DECODERS[family]


def model_config(config, **overrides):
    """The model dataclass (gpt.GPTConfig or llama.LlamaConfig) of `config.model`."""
    return _decoder(config)[1].from_config(config.model, **overrides)


def build_model(config, **overrides):
    """The decoder of `config.model` (GPT-2 or Llama family); overrides such as decode=True
    (the KV-cache variant)."""
    return _decoder(config)[0](model_config(config, **overrides))


def flops_per_token(config) -> float:
    return _decoder(config)[2](model_config(config), config.data.max_len)


def output_table(params):
    """The V,D table the decoder's logits are taken against (the tied embedding or an
    untied lm_head), for the fused output-layer losses."""
    if "wte" in params:
        return params["wte"]["embedding"]
    return llama.output_table(params)


def load_or_train_tokenizer(config, workdir, train_docs):
    """The run's tokenizer: reused from the workdir, copied from the Hugging Face folder of
    init_from=hf:DIR, or trained on the training documents."""
    path = os.path.join(workdir, tok.MODEL_FILE)
    hf_path = os.path.join(workdir, tok.HF_DIR)
    hf_dir = pretrained.hf_folder(config.get("init_from", ""))
    if hf_dir is not None:
        if os.path.exists(path):
            raise DataError(f"{workdir} already holds a tokenizer.model of its own, but "
                            f"init_from={config.init_from} brings that model's tokenizer; use a "
                            "new workdir")
        # Copied once into workdir/hf_tokenizer/ (atomically), so the run folder keeps it.
        multihost.write_once(hf_path, lambda: hf_tokenizer.load_hf_tokenizer(hf_dir).save(workdir))
    data_dir = prepared.prepared_dir(config.data.get("source", ""))
    if data_dir is not None and prepared.tokenizer_files(workdir) is None:
        # Prepared data brings its tokenizer: copied into the run folder once.
        name = prepared.tokenizer_files(data_dir)
        if name is None:
            raise DataError(f"{data_dir} holds no tokenizer; prepare the data again")
        multihost.write_once(os.path.join(workdir, name),
                             lambda: tokenizer_io.load_run_tokenizer(data_dir).save(workdir))
    if os.path.isdir(hf_path):
        return hf_tokenizer.load_hf_tokenizer(hf_path)
    # Trained by process 0 alone: the others would write the same file at the same time.
    multihost.write_once(path, lambda: tok.train_tokenizer(
        train_docs, path, config.model.vocab_size, config.data.tokenizer_type,
        max_sentences=config.data.get("tokenizer_max_sentences", 2_000_000), seed=config.seed))
    return tok.load_tokenizer(path)


def prepare_data(config, workdir) -> dict:
    """Reads the corpus, trains/loads the tokenizer and packs train and eval rows."""
    d = config.data
    if d.max_len > config.model.max_len:
        raise DataError(f"config.data.max_len={d.max_len} exceeds the model context "
                        f"config.model.max_len={config.model.max_len}; pass "
                        f"--config.data.max_len={config.model.max_len} (or, training from "
                        f"scratch, --config.model.max_len={d.max_len})")
    if prepared.prepared_dir(d.source) is not None:
        return _prepared_data(config, workdir)
    train_docs, eval_docs = sources.load_corpus(
        d.source, text_field=d.text_field, bible_version=d.bible_version,
        eval_fraction=d.eval_fraction, cache_dir=d.cache_dir or None,
        eval_source=d.get("eval_source", ""))
    tokenizer = load_or_train_tokenizer(config, workdir, train_docs)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise DataError(f"tokenizer in {workdir} has {tokenizer.vocab_size} pieces but "
                        f"config.model.vocab_size={config.model.vocab_size}; use a new workdir")
    train_tokens, train_doc_ids = lm_data.tokenize_documents(train_docs, tokenizer)
    eval_tokens, eval_doc_ids = lm_data.tokenize_documents(eval_docs, tokenizer)
    eval_rows = lm_data.pack_rows(eval_tokens, eval_doc_ids, d.max_len)
    baseline = lm_data.unigram_cross_entropy(train_tokens, eval_rows["targets"],
                                             eval_rows["weights"], config.model.vocab_size)
    return {
        "train_rows": lm_data.pack_rows(train_tokens, train_doc_ids, d.max_len),
        "eval_rows": eval_rows,
        "tokenizer": tokenizer,
        "info": {"train_tokens": int(train_tokens.size), "eval_tokens": int(eval_tokens.size),
                 "unigram_eval_loss": float(baseline)},
    }


def open_prepared(config, workdir, task: str):
    """(DIR, manifest, tokenizer) of prepared data, all checked against the run."""
    directory, manifest = prepared.open_for_run(config, task)
    tokenizer = load_or_train_tokenizer(config, workdir, None)
    prepared.check_tokenizer(manifest, tokenizer, workdir, directory)
    return directory, manifest, tokenizer


# Figures over the eval split (the unigram baseline) read at most this many prepared rows, a
# few thousand at a time: all of any eval split that fits in memory, a bounded read of a huge one.
EVAL_FIGURE_ROWS = 65_536


def _prepared_data(config, workdir) -> dict:
    """prepare_data for data.source=prepared:DIR: rows read from the shards per batch."""
    directory, manifest, tokenizer = open_prepared(config, workdir, "lm")
    max_len, vocab = config.data.max_len, config.model.vocab_size
    train_rows = prepared.split_rows(directory, manifest, "train", max_len)
    eval_rows = prepared.split_rows(directory, manifest, "eval", max_len)
    baseline = lm_data.unigram_loss_over_chunks(
        prepared.unigram_counts(directory, vocab), ((b["targets"], b["weights"]) for b in
                                                   prepared.row_chunks(eval_rows,
                                                                       EVAL_FIGURE_ROWS)), vocab)
    splits = manifest["splits"]
    return {"train_rows": train_rows, "eval_rows": eval_rows, "tokenizer": tokenizer,
            "info": {"train_tokens": splits["train"]["tokens"],
                     "eval_tokens": splits["eval"]["tokens"], "unigram_eval_loss": baseline,
                     "prepared": directory}}


def loss_fn(params, batch, rng, *, model, train):
    """Summed next-token cross-entropy over positions with weight 1, plus metric sums."""
    x_BLD = model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
        deterministic=not train, rngs={"dropout": rng} if train else None, hidden_only=True)
    # The tied output layer and the softmax cross-entropy as one op (fp32 logits and loss).
    _, nll_BL, correct_BL = losses.tied_cross_entropy(x_BLD, output_table(params),
                                                      batch["targets"],
                                                      vocab_size=model.config.vocab_size)
    weights_BL = batch["weights"]
    correct_BL = correct_BL * weights_BL
    loss_sum = jnp.sum(nll_BL * weights_BL)
    return loss_sum, {"loss_sum": loss_sum, "weight_sum": jnp.sum(weights_BL),
                      "correct_sum": jnp.sum(correct_BL)}


def final_report(final: dict, info: dict) -> str:
    """The closing line of a run: eval loss against the unigram bar."""
    return (f"final eval loss {final['loss']:.4f} (perplexity {final['perplexity']:.1f}) "
            f"vs unigram baseline {info['unigram_eval_loss']:.4f}")


def init_batch(config, batch_size):
    """A dummy batch with the shapes of a real one, for initialisation."""
    shape = (batch_size, config.data.max_len)
    zeros = jnp.zeros(shape, jnp.int32)
    return {"inputs": zeros, "targets": zeros, "positions": zeros,
            "segment_ids": jnp.ones(shape, jnp.int32), "weights": jnp.ones(shape, jnp.float32)}


def bench_batch(config):
    """Random full rows, one document each (experiments/bench)."""
    batch = jax.tree.map(np.asarray, init_batch(config, config.batch_size))
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size,
                                               batch["inputs"].shape, dtype=np.int32)
    batch.update(inputs=tokens, targets=tokens,
                 positions=np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32),
                                           tokens.shape))
    return batch


def init_params(model, config, rng):
    batch = init_batch(config, 1)
    return model.init(rng, batch["inputs"], batch["positions"], batch["segment_ids"])["params"]


