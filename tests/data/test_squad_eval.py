"""SQuAD evaluation: logits back to answers, exact match and F1 by hand, the v2.0 threshold,
the predictions file."""

import json
import os

import numpy as np
import pytest

from tests.data.test_squad import (  # noqa: F401 (fixtures, used as test arguments)
    CONTEXT, MAX_LEN, any_tokenizer, char_tokenizer, features, tokenizer)

from data import squad, squad_eval
from data.errors import DataError


def test_postprocess_and_evaluate_on_logits_at_the_gold_spans(features):
    _, examples, rows, meta = features
    start_logits = np.zeros((len(meta), MAX_LEN), np.float32)
    end_logits = np.zeros((len(meta), MAX_LEN), np.float32)
    start_logits[:, 0] = end_logits[:, 0] = 1.0  # null score 2 everywhere
    for f in range(len(meta)):
        if rows["start_positions"][f]:
            start_logits[f, rows["start_positions"][f]] = 5.0
            end_logits[f, rows["end_positions"][f]] = 5.0
    predictions, diffs = squad_eval.postprocess(examples, meta, start_logits, end_logits)
    for example in examples:
        # Answerable: span 5 + 5 beats null 1 + 1 by 8. Unanswerable: the best span scores 0.
        assert diffs[example.qid] == (2.0 if example.is_impossible else -8.0)
        if not example.is_impossible:
            assert predictions[example.qid] == example.answers[0][0]
    metrics = squad_eval.squad_evaluate(examples,
                                        squad_eval.apply_null_threshold(predictions, diffs, 0.0))
    assert metrics["exact"] == metrics["f1"] == 100.0
    assert metrics["HasAns_total"] == 8 and metrics["NoAns_total"] == 4


def test_postprocess_at_a_wrong_span_gives_partial_f1(tokenizer):
    context = "the king went to the old gate and the river was dark"
    example = squad.QAExample("q", "Where?", context, (("the old gate", 17),), False)
    _, meta = squad.squad_features([example], tokenizer, max_len=40, doc_stride=8,
                                   max_query_len=8, train=False)
    spans = meta[0]["token_to_char"]
    start = spans.index((21, 24))  # "old"
    end = spans.index((38, 43))  # "river"
    start_logits, end_logits = np.zeros((1, 40)), np.zeros((1, 40))
    start_logits[0, start] = end_logits[0, end] = 3.0
    predictions, _ = squad_eval.postprocess([example], meta, start_logits, end_logits)
    assert predictions == {"q": "old gate and the river"}
    # Normalized: "old gate and river" (4 tokens) vs "old gate" (2); 2 shared tokens, so
    # precision 2/4, recall 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3; no exact match.
    metrics = squad_eval.squad_evaluate([example], predictions)
    assert metrics["exact"] == 0.0 and metrics["f1"] == pytest.approx(200 / 3)
    assert "HasAns_f1" not in metrics  # only one kind of question


def test_postprocess_respects_max_answer_len_and_context(tokenizer):
    example = squad.QAExample("q", "Where?", CONTEXT, (("Water", 31),), False)
    _, meta = squad.squad_features([example], tokenizer, max_len=40, doc_stride=8,
                                   max_query_len=8, train=False)
    spans = meta[0]["token_to_char"]
    context_rows = [i for i, span in enumerate(spans) if span]
    start_logits, end_logits = np.zeros((1, 40)), np.zeros((1, 40))
    start_logits[0, 1] = end_logits[0, 1] = 9.0  # a question token: never an answer
    start_logits[0, context_rows[0]] = end_logits[0, context_rows[-1]] = 4.0  # too long
    start_logits[0, context_rows[2]] = end_logits[0, context_rows[3]] = 3.0
    # Valid pairs: rows 2..3 score 3 + 3; row 0 with an end of logit 0 within 3 tokens scores 4.
    predictions, _ = squad_eval.postprocess([example], meta, start_logits, end_logits,
                                            max_answer_len=3)
    assert predictions["q"] == CONTEXT[spans[context_rows[2]][0]:spans[context_rows[3]][1]]


def test_postprocess_takes_max_context_spans_and_the_lowest_null(tokenizer):
    example = squad.QAExample("q", "Where?", CONTEXT, (("Water", 31),), False)
    rows, meta = squad.squad_features([example], tokenizer, max_len=16, doc_stride=3,
                                      max_query_len=4, train=False)
    assert len(meta) >= 2
    first, second = meta[0], meta[1]
    start_logits, end_logits = np.zeros((len(meta), 16)), np.zeros((len(meta), 16))
    # A span at a token that the first window shares with the second but that the second sees
    # with more context: the highest logits, yet not allowed from the first window.
    shared = max(r for r, owned in enumerate(first["max_context"])
                 if first["token_to_char"][r] and not owned)
    start_logits[0, shared] = end_logits[0, shared] = 10.0
    owned = next(r for r, mine in enumerate(second["max_context"])
                 if mine and second["token_to_char"][r] != first["token_to_char"][shared])
    start_logits[1, owned] = end_logits[1, owned] = 4.0
    start_logits[:, 0] = end_logits[:, 0] = 1.0
    start_logits[1, 0] = end_logits[1, 0] = 0.5  # the null score is the lowest: 0.5 + 0.5
    # n_best=1: each window offers only its top start and end, so the first window's one
    # candidate is the shared token (invalid there), not some other start paired with it.
    predictions, diffs = squad_eval.postprocess([example], meta, start_logits, end_logits, n_best=1)
    char_start, char_end = second["token_to_char"][owned]
    assert predictions == {"q": CONTEXT[char_start:char_end]}
    assert diffs == {"q": 1.0 - 8.0}


def test_normalize_exact_match_and_f1_by_hand():
    # lower -> "the  old-gate, of a city!"; no punctuation -> "the  oldgate of a city";
    # no articles, single spaces -> "oldgate of city".
    assert squad_eval.normalize_answer("The  Old-Gate, of a City!") == "oldgate of city"
    assert squad_eval.exact_match("the Old Gate.", "old gate") == 1.0
    assert squad_eval.exact_match("old gates", "old gate") == 0.0
    # [old, gate, of, city] vs [old, gate]: 2 shared; P = 2/4, R = 2/2; F1 = 1 / 1.5 = 2/3.
    assert squad_eval.f1_score("old gate of the city", "the old gate") == pytest.approx(2 / 3)
    # [dark, dark, water] vs [dark, water, water]: shared min(2,1) + min(1,2) = 2; P = R = 2/3.
    assert squad_eval.f1_score("dark dark water", "dark water water") == pytest.approx(2 / 3)
    assert squad_eval.f1_score("", "") == 1.0
    assert squad_eval.f1_score("The", "") == 1.0  # "the" normalizes to nothing
    assert squad_eval.f1_score("", "gate") == squad_eval.f1_score("gate", "") == 0.0
    assert squad_eval.f1_score("river", "gate") == 0.0


def test_evaluate_takes_the_best_gold_and_splits_has_and_no_answer():
    examples = [
        squad.QAExample("a", "?", CONTEXT, (("old gate", 21), ("the old gate", 17)), False),
        squad.QAExample("b", "?", CONTEXT, (("old gate", 21), ("the stone", 44)), False),
        squad.QAExample("c", "?", CONTEXT, (), True),
    ]
    predictions = {"a": "The old gate", "b": "gate of the stone", "c": ""}
    # b: [gate, of, stone] vs [old, gate]: 1 shared, P 1/3, R 1/2, F1 = (1/3) / (5/6) = 0.4;
    #    vs [stone]: 1 shared, P 1/3, R 1, F1 = (2/3) / (4/3) = 0.5. The max, 0.5, counts.
    metrics = squad_eval.squad_evaluate(examples, predictions)
    assert metrics["exact"] == pytest.approx(200 / 3)
    assert metrics["f1"] == pytest.approx(100 * 2.5 / 3)
    assert metrics["HasAns_exact"] == 50.0 and metrics["HasAns_f1"] == pytest.approx(75.0)
    assert metrics["NoAns_exact"] == metrics["NoAns_f1"] == 100.0
    assert (metrics["total"], metrics["HasAns_total"], metrics["NoAns_total"]) == (3, 2, 1)
    with pytest.raises(DataError, match="no prediction for 1 of 3"):
        squad_eval.squad_evaluate(examples, {"a": "", "b": ""})


def _threshold_case():
    """Two answerable and two unanswerable questions, their best spans and null-minus-span
    scores."""
    examples = [
        squad.QAExample("a", "?", CONTEXT, (("Water", 31),), False),
        squad.QAExample("b", "?", CONTEXT, (("Water", 31),), False),
        squad.QAExample("c", "?", CONTEXT, (), True),
        squad.QAExample("d", "?", CONTEXT, (), True),
    ]
    predictions = {"a": "Water", "b": "stone", "c": "king", "d": "gate"}
    diffs = {"a": -3.0, "b": 1.0, "c": 2.0, "d": -1.0}
    return examples, predictions, diffs


def test_best_null_threshold_by_hand():
    examples, predictions, diffs = _threshold_case()
    # Null iff diff > t. F1 summed over a, b, c, d:
    #   t=-inf: 0+0+1+1 = 2;  t=-3: 1+0+1+1 = 3;  t=-1: 1+0+1+0 = 2;  t=1: 1+0+1+0 = 2;
    #   t=2 or +inf: 1+0+0+0 = 1. Best: t = -3 with 3/4.
    threshold, metrics = squad_eval.best_null_threshold(examples, predictions, diffs)
    assert threshold == -3.0
    assert metrics["f1"] == metrics["exact"] == 75.0
    assert squad_eval.apply_null_threshold(predictions, diffs, threshold) == {
        "a": "Water", "b": "", "c": "", "d": ""}


def test_official_v2_scores_at_a_given_threshold_and_the_oracle_beside_them():
    examples, predictions, diffs = _threshold_case()
    # At t = 0 (chosen elsewhere): b and c are null, so a and c are right: 2 of 4.
    scores = squad_eval.official_v2_scores(examples, predictions, diffs, threshold=0.0)
    assert scores["exact"] == scores["f1"] == 50.0 and scores["null_threshold"] == 0.0
    assert scores["HasAns_exact"] == 50.0 and scores["NoAns_exact"] == 50.0
    # The official script's oracle: the best threshold on these very examples (-3, 3 of 4).
    assert scores["best_exact"] == scores["best_f1"] == 75.0


def test_write_predictions_is_official_json_and_atomic(tmp_path):
    path = tmp_path / "out" / "predictions.json"
    squad_eval.write_predictions(str(path), {"q1": "old gate"})
    squad_eval.write_predictions(str(path), {"q1": "côté", "q2": ""})  # replaces the first file
    assert json.loads(path.read_text(encoding="utf-8")) == {"q1": "côté", "q2": ""}
    assert os.listdir(path.parent) == ["predictions.json"]
