"""Translation with the encoder-decoder Transformer (Vaswani et al. 2017, sec. 5-6).

Label-smoothed cross-entropy (eps = 0.1, sec. 5.4): the target distribution puts 1 - eps on
the reference token and spreads eps uniformly over the vocabulary, which "hurts perplexity, as
the model learns to be more unsure, but improves accuracy and BLEU". Logged beside it: the
plain cross-entropy (and its perplexity) and token accuracy. Each eval also translates the
first `data.eval_sentences` dev sentences with beam search and reports sacrebleu's BLEU on the
detokenised text (and exact match, the measure of the copy / reverse sanity tasks).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from data import prepared, sources, translation
from data.errors import DataError
from models import transformer as tf
from train import losses
from train.tasks import lm


def build_model(config, **overrides) -> tf.Transformer:
    return tf.Transformer(tf.TransformerConfig.from_config(config.model, **overrides))


def flops_per_token(config) -> float:
    cfg = tf.TransformerConfig.from_config(config.model)
    return tf.flops_per_token(cfg, config.data.max_len, config.data.max_len)


def read_pairs(config, train: bool = True):
    """(train, dev, test) sentence pairs: the Bible, a synthetic task, or the user's files
    (test only when config.data.test_source names one; train None when not train: the user's
    training file is then left unread, for a streaming reader)."""
    d = config.data
    if d.source in ("copy", "reverse"):
        make = functools.partial(translation.synthetic_pairs, d.source)
        held_out = max(d.eval_sentences, 64)
        return (make(d.num_synthetic, seed=config.seed), make(held_out, seed=config.seed + 1),
                make(held_out, seed=config.seed + 2))
    db = sources.bible_db(d.source, d.cache_dir or None)
    if db is not None:
        return translation.bible_pairs(db, d.source_version, d.target_version)
    if not d.eval_source:
        raise DataError("set --config.data.eval_source to a dev TSV (source<TAB>target); the "
                        "training file is --config.data.source")
    test = translation.read_parallel(d.test_source) if d.get("test_source") else []
    return (translation.read_parallel(d.source) if train else None,
            translation.read_parallel(d.eval_source), test)


def prepare_data(config, workdir) -> dict:
    """A joint tokenizer, packed train rows, padded dev rows and the dev sentences for BLEU."""
    d = config.data
    if d.max_len > config.model.max_len:
        raise DataError(f"config.data.max_len={d.max_len} exceeds config.model.max_len="
                        f"{config.model.max_len}; lower one or raise the other")
    if prepared.prepared_dir(d.source) is not None:
        return _prepared_data(config, workdir)
    train_pairs, dev_pairs, test_pairs = read_pairs(config)
    tokenizer = lm.load_or_train_tokenizer(
        config, workdir, [s for pair in train_pairs for s in pair])
    src, tgt, dropped = translation.encode_pairs(train_pairs, tokenizer, max_len=d.max_len)
    dev_src, dev_tgt, _ = translation.encode_pairs(dev_pairs, tokenizer, max_len=d.max_len)
    return {
        "train_rows": translation.make_rows(src, tgt, max_len=d.max_len, pack=d.pack),
        "eval_rows": translation.make_rows(dev_src, dev_tgt, max_len=d.max_len, pack=False),
        "tokenizer": tokenizer,
        "bleu_pairs": dev_pairs[:d.eval_sentences],
        "test_pairs": test_pairs,
        "info": {"train_pairs": len(src), "dropped_as_too_long": dropped,
                 "dev_pairs": len(dev_src), "test_pairs": len(test_pairs)},
    }


def _prepared_data(config, workdir) -> dict:
    """prepare_data for data.source=prepared:DIR: stored rows; dev and test pairs for BLEU."""
    directory, manifest, tokenizer = lm.open_prepared(config, workdir, "seq2seq")
    pairs = prepared.read_pairs(directory)
    splits = manifest["splits"]
    return {
        "train_rows": prepared.split_rows(directory, manifest, "train", config.data.max_len),
        "eval_rows": prepared.split_rows(directory, manifest, "eval", config.data.max_len),
        "tokenizer": tokenizer,
        "bleu_pairs": pairs["dev"][:config.data.eval_sentences],
        "test_pairs": pairs["test"],
        "info": {"train_pairs": splits["train"]["docs"] - splits["train"]["dropped_as_too_long"],
                 "dropped_as_too_long": splits["train"]["dropped_as_too_long"],
                 "dev_pairs": splits["eval"]["docs"] - splits["eval"]["dropped_as_too_long"],
                 "test_pairs": len(pairs["test"]), "prepared": directory},
    }


def loss_fn(params, batch, rng, *, model, train):
    """Label-smoothed cross-entropy summed over target tokens, plus metric sums."""
    y_BLD = model.apply(
        {"params": params}, batch["inputs"], batch["decoder_inputs"],
        batch["input_segment_ids"], batch["target_segment_ids"], batch["input_positions"],
        batch["target_positions"], deterministic=not train,
        rngs={"dropout": rng} if train else None, hidden_only=True)
    # -sum_v q(v) log p(v) with q = (1 - eps) one_hot + eps / V, fused with the tied output
    # layer (train/losses.py).
    smoothed_BL, nll_BL, correct_BL = losses.tied_cross_entropy(
        y_BLD, params["embed"]["embedding"], batch["targets"], model.config.label_smoothing,
        bias_V=params.get("final_logits_bias"), vocab_size=model.config.vocab_size)
    w_BL = batch["weights"]
    loss_sum = jnp.sum(smoothed_BL * w_BL)
    correct = correct_BL * w_BL
    return loss_sum, {"loss_sum": loss_sum, "weight_sum": jnp.sum(w_BL),
                      "nll_sum": jnp.sum(nll_BL * w_BL), "correct_sum": jnp.sum(correct)}


def summarize(sums: dict) -> dict:
    """Smoothed loss, plain cross-entropy and its perplexity, token accuracy."""
    count = max(float(sums["weight_sum"]), 1e-9)
    out = {"loss": float(sums["loss_sum"]) / count, "nll": float(sums["nll_sum"]) / count,
           "accuracy": float(sums["correct_sum"]) / count}
    out["perplexity"] = float(np.exp(min(out["nll"], 50.0)))
    out.update({k: float(v) for k, v in sums.items() if not k.endswith("_sum")})
    return out


def translate(params, sentences, tokenizer, config, *, beam_size=None, alpha=None,
              translate_fn=None):
    """Detokenised translations of `sentences`, in batches of eval_batch_size."""
    d, size = config.data, config.eval_batch_size
    translate_fn = translate_fn or make_translate_fn(config, beam_size, alpha,
                                                     tokenizer=tokenizer)
    eos = tokenizer.eos_id
    # The model tells source padding by its id (config.model.pad_id, the tokenizer's pad id);
    # a vocabulary without a pad token (GPT-2's) pads with EOS.
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else eos
    outputs = []
    for i in range(0, len(sentences), size):
        chunk = sentences[i:i + size]
        rows = np.full((size, d.max_len), pad, np.int32)  # a static shape: one compilation
        for r, sentence in enumerate(chunk):
            ids = tokenizer.encode(sentence)[:d.max_len - 1] + [eos]
            rows[r, :len(ids)] = ids
        tokens, _ = jax.device_get(translate_fn(params, rows))
        for row in tokens[:len(chunk), 0].tolist():
            outputs.append(tokenizer.decode(row[:row.index(eos)] if eos in row else row))
    return outputs


def make_translate_fn(config, beam_size=None, alpha=None, *, tokenizer):
    """Jitted (params, source ids B,S) -> beam search output, settings and the tokenizer's
    bos / eos ids bound."""
    return jax.jit(functools.partial(
        tf.translate_ids, build_model(config, decode=True),
        beam_size=beam_size or config.decode.beam_size,
        alpha=config.decode.alpha if alpha is None else alpha,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id))


def score_translations(params, pairs, data, config) -> dict:
    """BLEU (sacrebleu, detokenised) and exact match of beam-search translations of `pairs`."""
    if "translate_fn" not in data:
        data["translate_fn"] = make_translate_fn(config, tokenizer=data["tokenizer"])
    sources_, references = zip(*pairs)
    hypotheses = translate(params, list(sources_), data["tokenizer"], config,
                           translate_fn=data["translate_fn"])
    exact = np.mean([h.strip() == r.strip() for h, r in zip(hypotheses, references)])
    return {"bleu": translation.sacrebleu_score(hypotheses, list(references)),
            "exact_match": float(100.0 * exact)}


def evaluate_predictions(params, data, config, workdir) -> dict:
    """BLEU and exact match on the first config.data.eval_sentences dev pairs."""
    return score_translations(params, data["bleu_pairs"], data, config)


def evaluate_test(params, data, config) -> dict:
    """BLEU and exact match on the whole test split, once at the end of training."""
    if not data["test_pairs"]:
        return {}
    return dict(score_translations(params, data["test_pairs"], data, config),
                sentences=len(data["test_pairs"]))


def test_report(test: dict, averaged: bool) -> str:
    model = "the averaged checkpoints" if averaged else "the last checkpoint"
    return (f"test ({test['sentences']} sentences, {model}): BLEU {test['bleu']:.2f}, "
            f"exact match {test['exact_match']:.1f}%")


def final_report(final: dict, info: dict) -> str:
    return (f"final eval: BLEU {final['bleu']:.2f}, exact match {final['exact_match']:.1f}%, "
            f"cross-entropy {final['nll']:.3f} (perplexity {final['perplexity']:.1f})")


def init_batch(config, batch_size):
    shape = (batch_size, config.data.max_len)
    zeros, ones = jnp.zeros(shape, jnp.int32), jnp.ones(shape, jnp.int32)
    return {"inputs": zeros, "input_segment_ids": ones, "input_positions": zeros,
            "decoder_inputs": zeros, "targets": zeros, "target_segment_ids": ones,
            "target_positions": zeros, "weights": jnp.ones(shape, jnp.float32)}


def init_params(model, config, rng):
    b = init_batch(config, 1)
    return model.init(rng, b["inputs"], b["decoder_inputs"])["params"]


def bench_batch(config):
    """Random full-length source and target rows, one pair each (experiments/bench)."""
    rng = np.random.default_rng(0)
    batch = jax.tree.map(np.asarray, init_batch(config, config.batch_size))
    shape = batch["inputs"].shape
    positions = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)
    batch.update(inputs=rng.integers(7, config.model.vocab_size, shape, dtype=np.int32),
                 targets=rng.integers(7, config.model.vocab_size, shape, dtype=np.int32),
                 input_positions=positions, target_positions=positions)
    # The targets shifted right; a benchmark has no tokenizer, so the last target stands in
    # for BOS in column 0 (any id does).
    batch["decoder_inputs"] = np.roll(batch["targets"], 1, axis=1)
    return batch
