"""Sequence classification / regression fine-tuning of BERT (Devlin et al. 2018, sec. 4.1).

A linear layer on the pooled [CLS] vector: softmax cross-entropy over N classes, or squared
error when num_labels == 1 (regression, e.g. STS-B). Eval sums a confusion matrix, so accuracy,
macro-F1 and Matthews correlation are exact over the whole split, not means over batches.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data import finetune, sources
from data.errors import DataError
from train import pretrained
from train.tasks import lm, mlm_nsp

build_model = mlm_nsp.build_model
flops_per_token = mlm_nsp.flops_per_token
load_pretrained = mlm_nsp.load_pretrained
init_params = mlm_nsp.init_finetune_params
FRESH_HEADS = ("classifier",)  # trained alongside LoRA adapters: the base run has no head


def read_examples(config):
    """(train, eval) examples: the Bible testament demo, or the user's TSV/JSONL files."""
    d = config.data
    db = sources.bible_db(d.source, d.cache_dir or None)
    if db is not None:
        return finetune.bible_classification(db, d.bible_version)
    if not d.eval_source:
        raise DataError("set --config.data.eval_source to a labelled TSV/JSONL dev file (the "
                        "train file is --config.data.source)")
    return finetune.read_classification(d.source), finetune.read_classification(d.eval_source)


def prepare_data(config, workdir) -> dict:
    """Tokenized train/eval rows, the label names and the majority-class baseline."""
    mlm_nsp.check_lengths(config)
    # A run folder is checked before anything is read or written; an hf:DIR checkpoint's
    # tokenizer is copied by lm.load_or_train_tokenizer below.
    if config.init_from and pretrained.hf_folder(config.init_from) is None:
        mlm_nsp.copy_tokenizer(config, workdir)
    train_ex, eval_ex = read_examples(config)
    tokenizer = lm.load_or_train_tokenizer(
        config, workdir, [e.text + "\n" + (e.text_pair or "") for e in train_ex])
    regression = config.model.num_labels == 1
    labels = None if regression else finetune.label_names(train_ex)
    if labels is not None and len(labels) != config.model.num_labels:
        raise DataError(f"the training data has {len(labels)} labels {labels[:10]} but "
                        f"config.model.num_labels={config.model.num_labels}; pass "
                        f"--config.model.num_labels={len(labels)}")
    kw = dict(max_len=config.data.max_len, labels=labels)
    train_rows = finetune.classification_rows(train_ex, tokenizer, **kw)
    eval_rows = finetune.classification_rows(eval_ex, tokenizer, **kw)
    info = {"train_examples": len(train_ex), "eval_examples": len(eval_ex),
            "labels": labels or "regression"}
    if not regression:
        info["majority_baseline"] = finetune.majority_baseline(
            train_rows["labels"], eval_rows["labels"], len(labels))
    return {"train_rows": train_rows, "eval_rows": eval_rows, "tokenizer": tokenizer,
            "info": info}


def loss_fn(params, batch, rng, *, model, train):
    """Cross-entropy (or squared error) summed over examples, plus a confusion matrix."""
    out = model.apply({"params": params}, batch["inputs"], batch["token_types"],
                      batch["segment_ids"], deterministic=not train,
                      rngs={"dropout": rng} if train else None)
    logits_BN = out["class_logits_BN"].astype(jnp.float32)
    w_B = batch["example_weights"]
    if logits_BN.shape[-1] == 1:
        loss_sum = jnp.sum(jnp.square(logits_BN[:, 0] - batch["labels"]) * w_B)
        return loss_sum, {"loss_sum": loss_sum, "weight_sum": jnp.sum(w_B)}
    labels_B = batch["labels"]
    loss_sum = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_BN, labels_B) * w_B)
    n = logits_BN.shape[-1]
    predicted_B = jnp.argmax(logits_BN, -1)
    confusion_NN = jnp.einsum("bi,bj,b->ij", jax.nn.one_hot(labels_B, n),
                              jax.nn.one_hot(predicted_B, n), w_B)
    return loss_sum, {"loss_sum": loss_sum, "weight_sum": jnp.sum(w_B),
                      "correct_sum": jnp.sum((predicted_B == labels_B) * w_B),
                      "confusion_sum": confusion_NN}


def summarize(sums: dict) -> dict:
    """loss, and accuracy / macro-F1 / MCC from the summed confusion matrix."""
    out = {"loss": float(sums["loss_sum"]) / max(float(sums["weight_sum"]), 1e-9)}
    if "confusion_sum" in sums:
        out.update(finetune.classification_metrics(np.asarray(sums["confusion_sum"])))
    out.update({k: float(v) for k, v in sums.items() if not k.endswith("_sum")})
    return out


def final_report(final: dict, info: dict) -> str:
    if "majority_baseline" not in info:
        return f"final eval mean squared error {final['loss']:.4f}"
    base = info["majority_baseline"]
    keys = [k for k in ("accuracy", "macro_f1", "mcc") if k in final]
    ours = ", ".join(f"{k} {final[k]:.3f}" for k in keys)
    theirs = ", ".join(f"{k} {base[k]:.3f}" for k in keys if k in base)
    return f"final eval: {ours} | majority-class baseline: {theirs}"


def init_batch(config, batch_size):
    label_dtype = jnp.float32 if config.model.num_labels == 1 else jnp.int32
    return mlm_nsp.encoder_batch(config, batch_size,
                                 labels=jnp.zeros((batch_size,), label_dtype))


def bench_batch(config):
    return mlm_nsp.random_inputs(config, init_batch(config, config.batch_size))
