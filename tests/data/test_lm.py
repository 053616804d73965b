"""Packing invariants; the grain iterator: determinism, sharding, resume, eval padding; baseline."""

import json
import math

import numpy as np
import pytest

from data import lm
from data import tokenizer as tok
from data.errors import DataError


class CharTokenizer:
    """One id per character (ord - 90), enough to test tokenize_documents without sentencepiece."""

    bos_id, eos_id = tok.BOS_ID, tok.EOS_ID

    def encode(self, text):
        return [ord(c) - 90 for c in text]


def random_stream(n_docs=60, seed=0):
    """A token stream of documents of random length, as tokenize_documents would build it."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(10, 100, size=rng.integers(1, 40)).tolist() for _ in range(n_docs)]
    tokens = np.concatenate([[tok.BOS_ID, *d, tok.EOS_ID] for d in docs]).astype(np.int32)
    doc_ids = np.concatenate([[i] * (len(d) + 2) for i, d in enumerate(docs)]).astype(np.int32)
    return tokens, doc_ids


def test_tokenize_documents_wraps_each_document():
    tokens, doc_ids = lm.tokenize_documents(["ab", "c"], CharTokenizer())
    assert tokens.tolist() == [tok.BOS_ID, 7, 8, tok.EOS_ID, tok.BOS_ID, 9, tok.EOS_ID]
    assert doc_ids.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert tokens.dtype == doc_ids.dtype == np.int32


def test_pack_rows_invariants():
    tokens, doc_ids = random_stream()
    max_len = 16
    rows = lm.pack_rows(tokens, doc_ids, max_len)
    n = len(tokens) // (max_len + 1)
    for name, dtype in [("inputs", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                        ("positions", np.int32), ("weights", np.float32)]:
        assert rows[name].shape == (n, max_len) and rows[name].dtype == dtype, name
    inputs, targets, seg, pos, w = (rows[k] for k in
                                    ("inputs", "targets", "segment_ids", "positions", "weights"))
    # Targets are the inputs shifted by one within a row.
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    # Rows are consecutive slices of the stream: inputs plus the last target give it back.
    stream = np.concatenate([inputs, targets[:, -1:]], axis=1).ravel()
    np.testing.assert_array_equal(stream, tokens[: n * (max_len + 1)])
    # Segments are numbered 1..k from the row start; positions restart at 0 with each segment.
    assert (seg[:, 0] == 1).all() and (np.diff(seg, axis=1) >= 0).all()
    new_segment = np.diff(seg, axis=1) == 1
    assert ((pos[:, 1:] == 0) == new_segment).all() and (pos[:, 0] == 0).all()
    np.testing.assert_array_equal(pos[:, 1:][~new_segment], pos[:, :-1][~new_segment] + 1)
    # No loss across documents: weight 0 exactly where the next position starts a new segment.
    np.testing.assert_array_equal(w[:, :-1] == 0, new_segment)
    # In the last column the target lies outside the row; its weight follows the document ids.
    last_docs = doc_ids[: n * (max_len + 1)].reshape(n, max_len + 1)[:, -2:]
    np.testing.assert_array_equal(w[:, -1] == 1, last_docs[:, 0] == last_docs[:, 1])
    # Every segment (bar a row's first) starts with BOS: documents only start at segment starts.
    assert (inputs[:, 1:][new_segment] == tok.BOS_ID).all()


def test_pack_rows_too_short_corpus():
    with pytest.raises(DataError, match=r"corpus has 5 tokens, fewer than one training sequence "
                                        r"of max_len\+1=9; add text or lower"):
        lm.pack_rows(np.arange(5, dtype=np.int32), np.zeros(5, np.int32), 8)


@pytest.fixture(scope="module")
def rows():
    """40 rows whose first input is the row number, so batches are easy to read."""
    inputs = np.repeat(np.arange(40, dtype=np.int32)[:, None], 4, axis=1)
    return {"inputs": inputs, "targets": inputs + 1, "segment_ids": np.ones_like(inputs),
            "positions": np.tile(np.arange(4, dtype=np.int32), (40, 1)),
            "weights": np.ones((40, 4), np.float32)}


def take(it, n):
    """The row numbers of the next n batches."""
    return [next(it)["inputs"][:, 0].tolist() for _ in range(n)]


def test_train_iterator_deterministic_and_reshuffled_each_epoch(rows):
    first = take(lm.make_iterator(rows, 8, seed=1), 10)  # 2 epochs of 5 batches
    assert first == take(lm.make_iterator(rows, 8, seed=1), 10)
    assert first != take(lm.make_iterator(rows, 8, seed=2), 10)
    epoch1, epoch2 = sum(first[:5], []), sum(first[5:], [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(40))
    assert epoch1 != epoch2


def test_train_iterator_shards_disjoint_rows(rows):
    batch = next(lm.make_iterator(rows, 8, seed=0, process_index=0, process_count=2))
    assert {k: v.shape for k, v in batch.items()} == {k: (4, 4) for k in rows}
    shards = [take(lm.make_iterator(rows, 8, seed=0, process_index=p, process_count=2), 5)
              for p in range(2)]
    assert not set(sum(shards[0], [])) & set(sum(shards[1], []))
    # The processes' slices, side by side, are the one-process batches: the run does not
    # depend on the process count.
    assert [a + b for a, b in zip(*shards)] == take(lm.make_iterator(rows, 8, seed=0), 5)
    with pytest.raises(DataError, match="batch_size 9 .* 2 processes"):
        lm.make_iterator(rows, 9, seed=0, process_count=2)


def test_iterator_resumes_from_json_state(rows):
    it = lm.make_iterator(rows, 8, seed=3)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    resumed = lm.make_iterator(rows, 8, seed=3)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for name in rows:
            np.testing.assert_array_equal(got[name], want[name])


def test_eval_iterator_pads_last_batch(rows):
    shards = []
    for p in range(2):
        batches = list(lm.make_iterator(rows, 12, seed=0, shuffle=False, repeat=False,
                                        process_index=p, process_count=2))
        assert len(batches) == 4 and all(b["inputs"].shape == (6, 4) for b in batches)
        shards.append(batches)
    # 40 real rows in 48 slots: the last global batch holds rows 36-39 and 8 padding rows
    # (all zero, weight 0), so process 1's last slice is padding only.
    assert shards[0][-1]["weights"].sum(axis=1).tolist() == [4, 4, 4, 4, 0, 0]
    assert shards[1][-1]["weights"].sum() == 0
    assert all((shards[0][-1][k][4:] == 0).all() and (shards[1][-1][k] == 0).all() for k in rows)
    real = [r for i in range(4) for p in range(2)
            for r, w in zip(shards[p][i]["inputs"][:, 0], shards[p][i]["weights"][:, 0]) if w]
    assert real == list(range(40))  # global batches in order, each split between the processes


def test_unigram_cross_entropy_by_hand():
    # Counts of ids 0, 1, 2 in train: 2, 1, 0 -> add-one probabilities 3/6, 2/6, 1/6.
    train = np.array([0, 0, 1])
    targets = np.array([[0, 2, 1]])
    weights = np.array([[1.0, 1.0, 0.0]])
    expected = -(math.log(3 / 6) + math.log(1 / 6)) / 2
    assert lm.unigram_cross_entropy(train, targets, weights, 3) == pytest.approx(expected)
