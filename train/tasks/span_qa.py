"""Span question answering (SQuAD v1.1 / v2.0) fine-tuning of BERT (Devlin et al. 2018, 4.2-4.3).

Per token, a start and an end logit; the loss is the mean of the start and end cross-entropies
over the tokens of a window. An unanswerable question (or a window without the answer) points
both at [CLS]. Eval adds what needs whole predictions: n-best span search over all windows of
an example, the no-answer threshold tuned on the dev set (v2.0), exact match and F1, and the
official predictions JSON in the workdir.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from data import squad, sources
from data.errors import DataError
from train import multihost
from train.tasks import lm, mlm_nsp

build_model = mlm_nsp.build_model
flops_per_token = mlm_nsp.flops_per_token
load_pretrained = mlm_nsp.load_pretrained
init_params = mlm_nsp.init_finetune_params
PREDICTIONS_FILE = "predictions.json"
THRESHOLD_FILE = "null_threshold.json"


def read_examples(config, workdir):
    """(train, eval) QAExamples: the Bible demo set (written to the workdir) or SQuAD files."""
    d = config.data
    db = sources.bible_db(d.source, d.cache_dir or None)
    if db is not None:
        paths = [os.path.join(workdir, f"bible_squad_{split}.json") for split in ("train", "dev")]

        def write_splits():
            for path, split in zip(paths, squad.bible_squad(db, d.bible_version)):
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(split, f)

        multihost.write_once(paths[-1], write_splits)  # dev is written last
        return squad.read_squad(paths[0]), squad.read_squad(paths[1])
    if not d.eval_source:
        raise DataError("set --config.data.eval_source to the SQuAD dev JSON (the train JSON "
                        "is --config.data.source)")
    return squad.read_squad(d.source), squad.read_squad(d.eval_source)


def prepare_data(config, workdir) -> dict:
    """Windowed features of the train and dev questions (dev keeps its offset metadata)."""
    mlm_nsp.check_lengths(config)
    if config.init_from:  # checks the pretraining run before anything is read or written
        mlm_nsp.copy_tokenizer(config, workdir)
    d = config.data
    train_ex, eval_ex = read_examples(config, workdir)
    tokenizer = lm.load_or_train_tokenizer(
        config, workdir, [e.context for e in train_ex[::4]] + [e.question for e in train_ex])
    kw = dict(max_len=d.max_len, doc_stride=d.doc_stride, max_query_len=d.max_query_len)
    train_rows, _ = squad.squad_features(train_ex, tokenizer, train=True, **kw)
    eval_rows, eval_meta = squad.squad_features(eval_ex, tokenizer, train=False, **kw)
    info = {"train_questions": len(train_ex), "train_windows": len(train_rows["inputs"]),
            "eval_questions": len(eval_ex), "eval_windows": len(eval_rows["inputs"]),
            "eval_unanswerable": sum(e.is_impossible for e in eval_ex)}
    return {"train_rows": train_rows, "eval_rows": eval_rows, "tokenizer": tokenizer,
            "eval_examples": eval_ex, "eval_meta": eval_meta, "info": info}


def _span_logits(params, batch, *, model, train=False, rng=None):
    out = model.apply({"params": params}, batch["inputs"], batch["token_types"],
                      batch["segment_ids"], deterministic=not train,
                      rngs={"dropout": rng} if train else None)
    # Padding can never be a start or end.
    neg = jnp.finfo(jnp.float32).min
    real = batch["segment_ids"] > 0
    return (jnp.where(real, out["start_logits_BL"].astype(jnp.float32), neg),
            jnp.where(real, out["end_logits_BL"].astype(jnp.float32), neg))


def loss_fn(params, batch, rng, *, model, train):
    """(start CE + end CE) / 2 summed over windows; correct = both ends right."""
    start_BL, end_BL = _span_logits(params, batch, model=model, train=train, rng=rng)
    w_B = batch["example_weights"]
    ce = optax.softmax_cross_entropy_with_integer_labels
    nll_B = 0.5 * (ce(start_BL, batch["start_positions"]) + ce(end_BL, batch["end_positions"]))
    correct_B = ((jnp.argmax(start_BL, -1) == batch["start_positions"])
                 & (jnp.argmax(end_BL, -1) == batch["end_positions"]))
    loss_sum = jnp.sum(nll_B * w_B)
    return loss_sum, {"loss_sum": loss_sum, "weight_sum": jnp.sum(w_B),
                      "correct_sum": jnp.sum(correct_B * w_B)}


def make_predict_fn(params, config):
    """Jitted (params, batch) -> (start, end) logits, replicated so every process can read them."""
    model = build_model(config)
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    return jax.jit(lambda p, b: _span_logits(p, b, model=model),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))


def predict_logits(params, rows, config, predict_fn=None):
    """(start, end) logits F,L for every row, in order, in batches of eval_batch_size."""
    predict_fn = predict_fn or make_predict_fn(params, config)
    n, size = len(rows["inputs"]), config.eval_batch_size
    starts, ends = [], []
    for i in range(0, n, size):
        batch = {k: v[i:i + size] for k, v in rows.items()}
        pad = size - len(batch["inputs"])  # a static shape: one compilation
        batch = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
        s, e = jax.device_get(predict_fn(params, batch))
        starts.append(s[:size - pad])
        ends.append(e[:size - pad])
    return np.concatenate(starts), np.concatenate(ends)


def evaluate_predictions(params, data, config, workdir) -> dict:
    """EM / F1 on the dev questions; writes predictions.json (and the tuned null threshold)."""
    if "predict_fn" not in data:  # compiled once per run, not at every eval
        data["predict_fn"] = make_predict_fn(params, config)
    start, end = predict_logits(params, data["eval_rows"], config, data["predict_fn"])
    examples = data["eval_examples"]
    answers, score_diffs = squad.postprocess(examples, data["eval_meta"], start, end,
                                             n_best=config.data.n_best,
                                             max_answer_len=config.data.max_answer_len)
    if any(e.is_impossible for e in examples):  # v2.0: tune the no-answer threshold here
        threshold, scores = squad.best_null_threshold(examples, answers, score_diffs)
        answers = squad.apply_null_threshold(answers, score_diffs, threshold)
        scores["null_threshold"] = float(threshold)
    else:
        threshold, scores = None, squad.squad_evaluate(examples, answers)
    if jax.process_index() == 0:
        squad.write_predictions(os.path.join(workdir, PREDICTIONS_FILE), answers)
        with open(os.path.join(workdir, THRESHOLD_FILE), "w", encoding="utf-8") as f:
            json.dump({"null_threshold": threshold}, f)
    return {k: float(v) for k, v in scores.items()}


def summarize(sums: dict) -> dict:
    """loss and span_accuracy (start and end both right, per window) from summed metrics."""
    count = max(float(sums["weight_sum"]), 1e-9)
    out = {"loss": float(sums["loss_sum"]) / count,
           "span_accuracy": float(sums["correct_sum"]) / count}
    out.update({k: float(v) for k, v in sums.items() if not k.endswith("_sum")})
    return out


def final_report(final: dict, info: dict) -> str:
    return (f"final eval on {info['eval_questions']} questions: exact match "
            f"{final['exact']:.1f}, F1 {final['f1']:.1f}; predictions in {PREDICTIONS_FILE}")


def init_batch(config, batch_size):
    return mlm_nsp.encoder_batch(config, batch_size,
                                 start_positions=jnp.zeros((batch_size,), jnp.int32),
                                 end_positions=jnp.zeros((batch_size,), jnp.int32))


def bench_batch(config):
    return mlm_nsp.random_inputs(config, init_batch(config, config.batch_size))
