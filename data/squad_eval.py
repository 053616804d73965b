"""SQuAD evaluation: span logits back to answer text, the v2.0 no-answer threshold, and the
official metrics (Devlin et al. 2018, sections 4.2 and 4.3; Rajpurkar et al. 2016 and 2018).

At eval time the best span over all of a question's windows wins, each token judged in the
window that gives it the most context (the meta of data/squad.py's squad_features). A SQuAD 2.0
question is answered "" when its [CLS] score beats the best span by more than a threshold.
Metrics are the official script's exact match and token F1, and for v2.0 also its oracle
best_exact / best_f1 (the threshold tuned on the dev set itself).
"""

import collections
import json
import re
import string

import numpy as np

from data import sources, squad
from data.errors import DataError

_PUNCTUATION = frozenset(string.punctuation)  # ASCII only, as in the official script


def _best_span(meta, start_logits, end_logits, n_best, max_answer_len):
    """(score, start token, end token) of the best valid span in one feature, or None."""
    token_to_char = meta["token_to_char"]
    best = None
    # Only the n_best top starts and ends are paired: the best valid span is almost always
    # among them, and it bounds the work at n_best**2 per window.
    top_ends = np.argsort(-end_logits)[:n_best]
    for s in np.argsort(-start_logits)[:n_best]:
        for e in top_ends:
            if token_to_char[s] is None or token_to_char[e] is None:
                continue  # [CLS], the question, [SEP] or padding
            if e < s or e - s + 1 > max_answer_len or not meta["max_context"][s]:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[0]:
                best = (score, int(s), int(e))
    return best


def postprocess(
    examples, meta, start_logits: np.ndarray, end_logits: np.ndarray, *,
    n_best: int = 20, max_answer_len: int = 30,
) -> tuple[dict[str, str], dict[str, float]]:
    """(best non-null answer per qid, null score minus best span score per qid)."""
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    if len(start_logits) != len(meta) or len(end_logits) != len(meta):
        raise ValueError(f"{len(meta)} features but {len(start_logits)} / {len(end_logits)} "
                         "rows of start / end logits; pass the logits of every feature, in order")
    by_example = collections.defaultdict(list)
    for f, feature in enumerate(meta):
        by_example[feature["example_index"]].append(f)
    predictions, score_diffs = {}, {}
    for index, example in enumerate(examples):
        features = by_example.get(index)
        if not features:
            raise ValueError(f"question {example.qid!r} has no features; pass the meta that "
                             "squad_features returned for these examples")
        # The null ([CLS]) score is taken in the window that is most sure of an answer, as in
        # the reference implementation.
        null_score = min(float(start_logits[f, 0] + end_logits[f, 0]) for f in features)
        best, best_feature = None, None
        for f in features:
            span = _best_span(meta[f], start_logits[f], end_logits[f], n_best, max_answer_len)
            if span and (best is None or span[0] > best[0]):
                best, best_feature = span, f
        if best is None:
            predictions[example.qid], score_diffs[example.qid] = "", float("inf")
            continue
        token_to_char = meta[best_feature]["token_to_char"]
        start_char, end_char = token_to_char[best[1]][0], token_to_char[best[2]][1]
        predictions[example.qid] = example.context[start_char:end_char]
        score_diffs[example.qid] = null_score - best[0]
    return predictions, score_diffs


def apply_null_threshold(predictions, score_diffs, threshold: float) -> dict[str, str]:
    """Predictions with "" (no answer) wherever the null score beats the span by > threshold."""
    return {qid: "" if score_diffs[qid] > threshold else text
            for qid, text in predictions.items()}


def normalize_answer(s: str) -> str:
    """The official SQuAD normalization: lower case, no punctuation, no a/an/the, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalized strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 between the normalized strings (the official SQuAD 2.0 definition)."""
    predicted, golden = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not golden:
        # "No answer" is all or nothing: right only when both are empty.
        return float(predicted == golden)
    overlap = sum((collections.Counter(predicted) & collections.Counter(golden)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(golden)
    return 2 * precision * recall / (precision + recall)


def _gold_texts(example: squad.QAExample) -> list[str]:
    """Gold answer texts, [""] for an unanswerable question."""
    # As the official script does, answers that normalize to nothing are dropped first.
    texts = [text for text, _ in example.answers if normalize_answer(text)]
    return texts or [""]


def _scores(examples, predictions) -> tuple[np.ndarray, np.ndarray]:
    """Per-example exact match and F1 (each the max over the gold answers), in [0, 1]."""
    missing = [e.qid for e in examples if e.qid not in predictions]
    if missing:
        raise DataError(f"no prediction for {len(missing)} of {len(examples)} questions (e.g. "
                        f"{missing[0]!r}); predict every question, \"\" for no answer")
    exact = [max(exact_match(predictions[e.qid], g) for g in _gold_texts(e)) for e in examples]
    f1 = [max(f1_score(predictions[e.qid], g) for g in _gold_texts(e)) for e in examples]
    return np.asarray(exact, np.float64), np.asarray(f1, np.float64)


def squad_evaluate(examples, predictions: dict[str, str]) -> dict[str, float]:
    """Official SQuAD metrics in percent: exact, f1, and HasAns_/NoAns_ splits for v2.0."""
    if not examples:
        raise DataError("cannot evaluate on zero questions; check the dev file")
    exact, f1 = _scores(examples, predictions)
    metrics = {"exact": float(100 * exact.mean()), "f1": float(100 * f1.mean()),
               "total": len(examples)}
    has_answer = np.asarray([not e.is_impossible for e in examples])
    if has_answer.any() and not has_answer.all():
        for name, mask in (("HasAns", has_answer), ("NoAns", ~has_answer)):
            metrics[f"{name}_exact"] = float(100 * exact[mask].mean())
            metrics[f"{name}_f1"] = float(100 * f1[mask].mean())
            metrics[f"{name}_total"] = int(mask.sum())
    return metrics


def best_null_threshold(examples, predictions, score_diffs,
                        metric: str = "f1") -> tuple[float, dict[str, float]]:
    """The null threshold with the best total `metric` ("f1" or "exact") on these examples,
    and the official metrics at it."""
    exact_span, f1_span = _scores(examples, predictions)
    exact_null, f1_null = _scores(examples, {e.qid: "" for e in examples})
    span, null = (f1_span, f1_null) if metric == "f1" else (exact_span, exact_null)
    diffs = np.asarray([score_diffs[e.qid] for e in examples], np.float64)
    # At threshold t an example is answered "" iff its diff > t, so the total is a step function
    # of t that only changes at the diffs: trying t = each distinct diff, plus -inf (always
    # null) and +inf (never null), finds the maximum. Sorting by diff makes each total a
    # prefix sum: the first k examples keep their span, the rest get "".
    order = np.argsort(diffs, kind="stable")
    diffs, span, null = diffs[order], span[order], null[order]
    kept = np.concatenate([[0.0], np.cumsum(span)])
    nulled = np.concatenate([[0.0], np.cumsum(null[::-1])])[::-1]
    candidates = np.unique(np.concatenate([[-np.inf, np.inf], diffs]))
    best_threshold, best_total = None, -1.0
    for threshold in candidates:
        k = int(np.searchsorted(diffs, threshold, side="right"))  # examples with diff <= t
        total = kept[k] + nulled[k]
        if total > best_total + 1e-9:  # ties keep the lower threshold
            best_threshold, best_total = float(threshold), total
    answered = apply_null_threshold(predictions, score_diffs, best_threshold)
    return best_threshold, squad_evaluate(examples, answered)


def official_v2_scores(examples, predictions, score_diffs, threshold: float) -> dict:
    """SQuAD v2.0 metrics named as the official script names them.

    exact / f1 (and the HasAns_ / NoAns_ splits) score the answers at `threshold`, which must
    be chosen without these examples; best_exact / best_f1 are the script's oracle figures, the
    best totals over every threshold tuned on these same examples, with the threshold that
    gives each (best_exact_thresh / best_f1_thresh, on our null-minus-span score scale).
    """
    scores = squad_evaluate(examples, apply_null_threshold(predictions, score_diffs, threshold))
    for metric in ("exact", "f1"):
        best, at_best = best_null_threshold(examples, predictions, score_diffs, metric)
        scores[f"best_{metric}"], scores[f"best_{metric}_thresh"] = at_best[metric], best
    scores["null_threshold"] = float(threshold)
    return scores


def write_predictions(path: str, predictions: dict[str, str]) -> None:
    """Writes {qid: answer} in the official format, atomically."""
    sources.write_atomic(path, json.dumps(predictions, ensure_ascii=False, indent=1).encode())
