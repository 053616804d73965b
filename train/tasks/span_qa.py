"""Span question answering (SQuAD v1.1 / v2.0) fine-tuning of BERT (Devlin et al. 2018, 4.2-4.3).

Per token, a start and an end logit; the loss is the mean of the start and end cross-entropies
over the tokens of a window. An unanswerable question (or a window without the answer) points
both at [CLS]. Eval adds what needs whole predictions: n-best span search over all windows of
an example, exact match and F1, and the official predictions JSON in the workdir. For v2.0
data the no-answer threshold is chosen on training contexts held apart from training
(config.data.holdout_fraction), so the reported exact / f1 never see their own answers; the
official script's oracle best_exact / best_f1 (threshold tuned on the dev set) are logged
beside them.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from data import squad, squad_eval, sources
from data.errors import DataError
from train import multihost, pretrained
from train.tasks import lm, mlm_nsp

build_model = mlm_nsp.build_model
flops_per_token = mlm_nsp.flops_per_token
load_pretrained = mlm_nsp.load_pretrained
init_params = mlm_nsp.init_finetune_params
FRESH_HEADS = ("qa_outputs",)  # trained alongside LoRA adapters: the base run has no head
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
    # A run folder is checked before anything is read or written; an hf:DIR checkpoint's
    # tokenizer is copied by lm.load_or_train_tokenizer below.
    if config.init_from and pretrained.hf_folder(config.init_from) is None:
        mlm_nsp.copy_tokenizer(config, workdir)
    d = config.data
    train_ex, eval_ex = read_examples(config, workdir)
    v2 = any(e.is_impossible for e in train_ex + eval_ex)
    train_ex, holdout_ex = squad.holdout_split(train_ex, d.holdout_fraction if v2 else 0.0)
    tokenizer = lm.load_or_train_tokenizer(
        config, workdir, [e.context for e in train_ex[::4]] + [e.question for e in train_ex])
    kw = dict(max_len=d.max_len, doc_stride=d.doc_stride, max_query_len=d.max_query_len)
    train_rows, _ = squad.squad_features(train_ex, tokenizer, train=True, **kw)
    eval_rows, eval_meta = squad.squad_features(eval_ex, tokenizer, train=False, **kw)
    info = {"train_questions": len(train_ex), "train_windows": len(train_rows["inputs"]),
            "eval_questions": len(eval_ex), "eval_windows": len(eval_rows["inputs"]),
            "eval_unanswerable": sum(e.is_impossible for e in eval_ex)}
    data = {"train_rows": train_rows, "eval_rows": eval_rows, "tokenizer": tokenizer,
            "eval_examples": eval_ex, "eval_meta": eval_meta, "v2": v2, "info": info}
    if holdout_ex:
        data["holdout_rows"], data["holdout_meta"] = squad.squad_features(
            holdout_ex, tokenizer, train=False, **kw)
        data["holdout_examples"] = holdout_ex
        info["threshold_questions"] = len(holdout_ex)
    return data


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


def _answers(params, data, config, split):
    """(best span per qid, null minus span score per qid) of the `split` questions."""
    start, end = predict_logits(params, data[f"{split}_rows"], config, data["predict_fn"])
    return squad_eval.postprocess(data[f"{split}_examples"], data[f"{split}_meta"], start, end,
                                  n_best=config.data.n_best,
                                  max_answer_len=config.data.max_answer_len)


def choose_null_threshold(params, data, config) -> float:
    """The no-answer threshold with the best F1 on the held-apart training questions (0, the
    null score beating the best span, when none are held apart)."""
    if "holdout_examples" not in data:
        return 0.0
    answers, diffs = _answers(params, data, config, "holdout")
    return squad_eval.best_null_threshold(data["holdout_examples"], answers, diffs)[0]


def evaluate_predictions(params, data, config, workdir) -> dict:
    """EM / F1 on the dev questions; writes predictions.json (and the chosen null threshold)."""
    if "predict_fn" not in data:  # compiled once per run, not at every eval
        data["predict_fn"] = make_predict_fn(params, config)
    answers, score_diffs = _answers(params, data, config, "eval")
    examples = data["eval_examples"]
    threshold = None
    if data["v2"]:
        threshold = choose_null_threshold(params, data, config)
        scores = squad_eval.official_v2_scores(examples, answers, score_diffs, threshold)
        answers = squad_eval.apply_null_threshold(answers, score_diffs, threshold)
    else:
        scores = squad_eval.squad_evaluate(examples, answers)
    if jax.process_index() == 0:
        squad_eval.write_predictions(os.path.join(workdir, PREDICTIONS_FILE), answers)
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
    line = (f"final eval on {info['eval_questions']} questions: exact match "
            f"{final['exact']:.1f}, F1 {final['f1']:.1f}")
    if "best_f1" in final:
        line += (f" (no-answer threshold {final['null_threshold']:.3g} chosen on "
                 f"{info.get('threshold_questions', 0)} held-apart training questions; "
                 f"oracle threshold tuned on dev: best_exact {final['best_exact']:.1f}, "
                 f"best_f1 {final['best_f1']:.1f})")
    return line + f"; predictions in {PREDICTIONS_FILE}"


def init_batch(config, batch_size):
    return mlm_nsp.encoder_batch(config, batch_size,
                                 start_positions=jnp.zeros((batch_size,), jnp.int32),
                                 end_positions=jnp.zeros((batch_size,), jnp.int32))


def bench_batch(config):
    return mlm_nsp.random_inputs(config, init_batch(config, config.batch_size))
