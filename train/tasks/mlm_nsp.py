"""BERT pretraining: masked-LM + next-sentence prediction (Devlin et al. 2018, sec. 3.1).

loss = mean MLM cross-entropy over the masked positions + mean NSP cross-entropy over the
rows, as in the paper's reference code. The loop divides gradients by `weight_sum` (here the
number of masked tokens), so the NSP sum is scaled by masked tokens per row to give exactly the
sum of the two means. Also here: restoring a pretrained encoder for fine-tuning
(`load_pretrained`), used by the classification and span-QA tasks.
"""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data import bert_pretrain, prepared, sources, tokenizer_io
from data import tokenizer as tok
from data import lm as lm_data
from data.errors import DataError
from models import bert
from train import errors, multihost, runs, tasks
from train.tasks import lm

# The encoder's shape: a fine-tuning config must agree with its pretraining run on these.
ENCODER_KEYS = ("vocab_size", "max_len", "num_layers", "d_model", "num_heads", "d_ff",
                "type_vocab_size", "scan_layers", "activation", "ln_epsilon", "vocab_multiple")


def build_model(config, **overrides) -> bert.Bert:
    return bert.Bert(bert.BertConfig.from_config(config.model, **overrides))


def flops_per_token(config) -> float:
    return bert.flops_per_token(bert.BertConfig.from_config(config.model), config.data.max_len)


def check_lengths(config):
    if config.data.max_len > config.model.max_len:
        raise DataError(f"config.data.max_len={config.data.max_len} exceeds the model's "
                        f"{config.model.max_len} learned positions; lower one or raise the other")


def prepare_data(config, workdir) -> dict:
    """Sentence-pair rows with static masks, train and held-out eval, and the tokenizer."""
    d = config.data
    check_lengths(config)
    if prepared.prepared_dir(d.source) is not None:
        return _prepared_data(config, workdir)
    train_docs, eval_docs = sources.load_corpus(
        d.source, text_field=d.text_field, bible_version=d.bible_version,
        eval_fraction=d.eval_fraction, cache_dir=d.cache_dir or None,
        eval_source=d.get("eval_source", ""))
    tokenizer = lm.load_or_train_tokenizer(config, workdir, train_docs)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise DataError(f"tokenizer in {workdir} has {tokenizer.vocab_size} pieces but "
                        f"config.model.vocab_size={config.model.vocab_size}; use a new workdir")
    kw = dict(max_len=d.max_len, max_predictions=d.max_predictions, mask_prob=d.mask_prob,
              short_seq_prob=d.short_seq_prob, whole_word=d.whole_word)
    train_rows = bert_pretrain.build_pretraining_rows(
        train_docs, tokenizer, seed=config.seed, dupe_factor=d.dupe_factor, **kw)
    # Eval masks are fixed by their own seed, so every eval (and every run) scores the same
    # rows; dupe_factor masks the small held-out text several ways for a steadier estimate.
    eval_rows = bert_pretrain.build_pretraining_rows(eval_docs, tokenizer, seed=12345,
                                                     dupe_factor=d.dupe_factor, **kw)
    # The bar to beat for masked tokens: a unigram model of the training text.
    train_tokens, _ = lm_data.tokenize_documents(train_docs, tokenizer)
    unigram = lm_data.unigram_cross_entropy(train_tokens, eval_rows["mlm_targets"],
                                            eval_rows["mlm_weights"], config.model.vocab_size)
    return _data(train_rows, eval_rows, tokenizer, unigram,
                 float(np.mean(eval_rows["nsp_labels"])))


def _data(train_rows, eval_rows, tokenizer, unigram, not_next) -> dict:
    return {"train_rows": train_rows, "eval_rows": eval_rows, "tokenizer": tokenizer,
            "info": {"train_rows": lm_data.num_rows(train_rows),
                     "eval_rows": lm_data.num_rows(eval_rows), "unigram_eval_loss": unigram,
                     # Short documents give more NotNext pairs, so 0.5 is not the NSP floor.
                     "nsp_majority_eval": max(not_next, 1.0 - not_next)}}


def _prepared_data(config, workdir) -> dict:
    """prepare_data for data.source=prepared:DIR: the stored rows, read per batch."""
    directory, manifest, tokenizer = lm.open_prepared(config, workdir, "mlm_nsp")
    train_rows = prepared.split_rows(directory, manifest, "train", config.data.max_len)
    eval_rows = prepared.split_rows(directory, manifest, "eval", config.data.max_len)
    labels = []  # NSP labels of the eval rows read for the figures, a few thousand at a time

    def masked():
        for b in prepared.row_chunks(eval_rows, lm.EVAL_FIGURE_ROWS):
            labels.append(b["nsp_labels"])
            yield b["mlm_targets"], b["mlm_weights"]
    unigram = lm_data.unigram_loss_over_chunks(
        prepared.unigram_counts(directory, config.model.vocab_size), masked(),
        config.model.vocab_size)
    return _data(train_rows, eval_rows, tokenizer, unigram,
                 float(np.mean(np.concatenate(labels))))


def loss_fn(params, batch, rng, *, model, train):
    """MLM + NSP loss as a sum over masked tokens, plus metric sums."""
    out = model.apply({"params": params}, batch["inputs"], batch["token_types"],
                      batch["segment_ids"], batch["mlm_positions"], deterministic=not train,
                      rngs={"dropout": rng} if train else None)
    mlm_logits_BPV = out["mlm_logits_BPV"].astype(jnp.float32)
    mlm_nll_BP = optax.softmax_cross_entropy_with_integer_labels(mlm_logits_BPV,
                                                                 batch["mlm_targets"])
    mlm_w_BP = batch["mlm_weights"]
    mlm_count = jnp.sum(mlm_w_BP)
    mlm_sum = jnp.sum(mlm_nll_BP * mlm_w_BP)

    nsp_logits_B2 = out["nsp_logits_B2"].astype(jnp.float32)
    nsp_nll_B = optax.softmax_cross_entropy_with_integer_labels(nsp_logits_B2,
                                                                batch["nsp_labels"])
    row_w_B = batch["example_weights"]
    nsp_count = jnp.sum(row_w_B)
    nsp_sum = jnp.sum(nsp_nll_B * row_w_B)

    # (mlm_sum + nsp_sum * m / n) / m = mean MLM + mean NSP; m / n is a constant, not a path
    # for gradients.
    scale = jax.lax.stop_gradient(mlm_count / jnp.maximum(nsp_count, 1.0))
    loss_sum = mlm_sum + nsp_sum * scale
    mlm_correct = (jnp.argmax(mlm_logits_BPV, -1) == batch["mlm_targets"]) * mlm_w_BP
    nsp_correct = (jnp.argmax(nsp_logits_B2, -1) == batch["nsp_labels"]) * row_w_B
    return loss_sum, {"loss_sum": loss_sum, "weight_sum": mlm_count, "mlm_loss_sum": mlm_sum,
                      "mlm_correct_sum": jnp.sum(mlm_correct), "nsp_loss_sum": nsp_sum,
                      "nsp_correct_sum": jnp.sum(nsp_correct), "nsp_count_sum": nsp_count}


def summarize(sums: dict) -> dict:
    """loss, mlm_loss / perplexity / accuracy, nsp_loss / accuracy from summed metrics."""
    m = max(float(sums["weight_sum"]), 1e-9)
    n = max(float(sums["nsp_count_sum"]), 1e-9)
    out = {"loss": float(sums["loss_sum"]) / m, "mlm_loss": float(sums["mlm_loss_sum"]) / m,
           "mlm_accuracy": float(sums["mlm_correct_sum"]) / m,
           "nsp_loss": float(sums["nsp_loss_sum"]) / n,
           "nsp_accuracy": float(sums["nsp_correct_sum"]) / n}
    out["mlm_perplexity"] = float(np.exp(min(out["mlm_loss"], 50.0)))
    out.update({k: float(v) for k, v in sums.items() if not k.endswith("_sum")})
    return out


def final_report(final: dict, info: dict) -> str:
    return (f"final eval: MLM loss {final['mlm_loss']:.4f} (perplexity "
            f"{final['mlm_perplexity']:.1f}, accuracy {final['mlm_accuracy']:.3f}) vs unigram "
            f"{info['unigram_eval_loss']:.4f}; NSP accuracy {final['nsp_accuracy']:.3f} vs "
            f"{info['nsp_majority_eval']:.3f} for always the majority label")


def encoder_batch(config, batch_size, **task_arrays):
    """A dummy batch of the encoder's inputs plus a task's arrays, for initialisation."""
    shape = (batch_size, config.data.max_len)
    zeros = jnp.zeros(shape, jnp.int32)
    return {"inputs": zeros, "token_types": zeros, "segment_ids": jnp.ones(shape, jnp.int32),
            "example_weights": jnp.ones((batch_size,), jnp.float32), **task_arrays}


def init_batch(config, batch_size):
    p = config.data.max_predictions
    return encoder_batch(config, batch_size,
                         mlm_positions=jnp.zeros((batch_size, p), jnp.int32),
                         mlm_targets=jnp.zeros((batch_size, p), jnp.int32),
                         mlm_weights=jnp.ones((batch_size, p), jnp.float32),
                         nsp_labels=jnp.zeros((batch_size,), jnp.int32))


def init_params(model, config, rng):
    b = init_batch(config, 1)
    return model.init(rng, b["inputs"], b["token_types"], b["segment_ids"],
                      b["mlm_positions"])["params"]


def init_finetune_params(model, config, rng):
    """Parameters of a fine-tuning model (no masked positions to feed)."""
    b = encoder_batch(config, 1)
    return model.init(rng, b["inputs"], b["token_types"], b["segment_ids"])["params"]


def random_inputs(config, batch):
    """`batch` (numpy) with random ordinary token ids and two token-type halves, for benches."""
    rng = np.random.default_rng(0)
    batch = jax.tree.map(np.asarray, batch)
    b, length = batch["inputs"].shape
    batch["inputs"] = rng.integers(7, config.model.vocab_size, (b, length), dtype=np.int32)
    batch["token_types"] = np.broadcast_to(
        (np.arange(length) >= length // 2).astype(np.int32), (b, length)).copy()
    return batch


def bench_batch(config):
    """Random full-length rows with max_predictions masked positions each (experiments/bench)."""
    batch = random_inputs(config, init_batch(config, config.batch_size))
    rng = np.random.default_rng(1)
    b, length = batch["inputs"].shape
    p = config.data.max_predictions
    batch["mlm_positions"] = np.sort(rng.permuted(np.tile(np.arange(1, length), (b, 1)),
                                                  axis=1)[:, :p], axis=1).astype(np.int32)
    batch["mlm_targets"] = rng.integers(7, config.model.vocab_size, (b, p), dtype=np.int32)
    batch["nsp_labels"] = rng.integers(0, 2, (b,), dtype=np.int32)
    return batch


# ---- fine-tuning from a pretraining run -----------------------------------------------------

def pretraining_config(init_from: str) -> ml_collections.ConfigDict:
    """The config.json of a pretraining run folder."""
    return runs.read_run_config(
        init_from, "it is --config.init_from; pretrain first: python -m train.main "
                   f"--config=experiments/bert.py:tiny --workdir={init_from}")


def check_pretrained(config) -> ml_collections.ConfigDict:
    """The pretraining run's config, refused unless its encoder has this config's shape."""
    pre_config = pretraining_config(config.init_from)
    diffs = [f"model.{k}: pretrained {pre_config.model.get(k)!r} vs now {config.model.get(k)!r}"
             for k in ENCODER_KEYS if pre_config.model.get(k) != config.model.get(k)]
    if pre_config.model.get("family") != "bert" or diffs:
        raise errors.CheckpointMismatchError(
            f"{config.init_from} does not hold a BERT encoder of this shape "
            f"({'; '.join(diffs) or 'family ' + repr(pre_config.model.get('family'))}). Pass "
            "the pretraining run's values (e.g. --config.model.d_model=...) or use the "
            "fine-tuning preset with the same name as the pretraining one.")
    return pre_config


def copy_tokenizer(config, workdir):
    """A fine-tuning run uses its pretraining run's tokenizer: copied into the workdir once.

    Called first thing in a fine-tuning task's prepare_data, so an incompatible init_from
    is refused before anything is written.
    """
    check_pretrained(config)
    # Whichever kind the pretraining run holds: its tokenizer.model, or the hf_tokenizer/
    # folder of a run imported from Hugging Face.
    source = config.init_from
    name = tok.MODEL_FILE if os.path.exists(os.path.join(source, tok.MODEL_FILE)) else tok.HF_DIR
    target = os.path.join(workdir, name)
    if not os.path.exists(target) and not os.path.exists(os.path.join(source, name)):
        raise DataError(f"{source} has no tokenizer ({tok.MODEL_FILE} or {tok.HF_DIR}/); "
                        "pretrain into it first")
    os.makedirs(workdir, exist_ok=True)
    multihost.write_once(target, lambda: tokenizer_io.load_run_tokenizer(source).save(workdir))


def load_pretrained(config, shardings) -> dict:
    """The encoder parameters of the run in config.init_from, placed as `shardings` says.

    Everything but the pretraining heads is taken (embeddings, layers, pooler); the caller
    keeps its freshly initialised task heads.
    """
    pre_config = check_pretrained(config)
    # The pretraining run is restored read-only on its own terms (its heads included).
    pretrained, _ = runs.restore_params(pre_config, config.init_from, tasks.get("mlm_nsp"),
                                        merge_lora=True)
    encoder = {k: v for k, v in pretrained.items() if k not in bert.PRETRAINING_HEADS}
    return jax.device_put(encoder, {k: shardings[k] for k in encoder})
