"""Classification readers, row layout and truncation, metrics by hand, the Bible testament split."""

import json
import math

import numpy as np
import pytest

from tests.conftest import write_bible_db

from data import finetune
from data import lm
from data import tokenizer as tok
from data.errors import DataError

Example = finetune.Example


class WordTokenizer:
    """Each space-separated word "k" (an integer) is the id 10 + k: lengths are known by hand."""

    cls_id, sep_id = tok.CLS_ID, tok.SEP_ID

    def encode(self, text):
        return [10 + int(word) for word in text.split()]


@pytest.fixture(scope="module")
def trained(corpus_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("finetune") / "tokenizer.model"
    return tok.train_tokenizer([corpus_file.read_text()], str(path), 400, "bpe")


# Readers.

def test_read_tsv_single_and_pair_any_column_order(tmp_path):
    single = tmp_path / "single.tsv"
    single.write_text("label\tid\ttext\npos\t1\tthe king went\n\nneg \t2\tdark river\n")
    assert finetune.read_classification(str(single)) == [
        Example("the king went", None, "pos"), Example("dark river", None, "neg")]
    pair = tmp_path / "pair.tsv"
    # A byte-order mark and Windows line ends, as spreadsheet exports write them.
    pair.write_bytes(b"\xef\xbb\xbftext_pair\ttext\tlabel\r\n"
                     b"b one\ta one\t1.5\r\nb two\ta two\t0\r\n")
    assert finetune.read_classification(str(pair)) == [
        Example("a one", "b one", "1.5"), Example("a two", "b two", "0")]


def test_read_jsonl_with_and_without_pair(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"label": "yes", "text": "t1", "extra": 3},
             {"text": "t2", "text_pair": "p2", "label": 2},
             {"text": "t3", "text_pair": None, "label": 0.5}]
    path.write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    assert finetune.read_classification(str(path)) == [
        Example("t1", None, "yes"), Example("t2", "p2", "2"), Example("t3", None, "0.5")]
    same = tmp_path / "d.json"
    same.write_text(path.read_text())
    assert finetune.read_classification(str(same)) == finetune.read_classification(str(path))


@pytest.mark.parametrize("name, content, message", [
    ("no_label.tsv", "text\tcategory\nhi\tx\n", r"no_label.tsv:1: the header has no column 'lab"),
    ("no_text.tsv", "label\ttxt\nx\thi\n", r"no_text.tsv:1: the header has no column 'text'"),
    ("fields.tsv", "text\tlabel\nok\tx\ntab\tinside\tx\n",
     r"fields.tsv:3: 3 tab-separated fields but the header has 2; replace tabs"),
    ("short.tsv", "text\tlabel\nok\tx\nonly text\n", r"short.tsv:3: 1 tab-separated fields"),
    ("empty.tsv", " \n\n", r"empty.tsv is empty; it needs one example per line"),
    ("header.tsv", "text\tlabel\n", r"header.tsv has a header but no examples"),
    ("blank_label.tsv", "text\tlabel\na\tx\nb\t \n", r"blank_label.tsv: example 2 has an empty"),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
    ("nolabel.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b"}\n',
     r"nolabel.jsonl:3: no string or number field 'label'"),
    ("notext.jsonl", '{"body": "a", "label": "x"}\n', r"notext.jsonl:1: 'text' .* must be strings"),
    ("pair.jsonl", '{"text": "a", "text_pair": 3, "label": "x"}\n', r"pair.jsonl:1: 'text'"),
    ("list.jsonl", '["a", "x"]\n', r"list.jsonl:1: 'text'"),
    ("empty.jsonl", "", r"empty.jsonl is empty"),
])
def test_read_errors_name_file_line_and_fix(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        finetune.read_classification(str(tmp_path / name))


def test_read_missing_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match=r"nope.tsv does not exist; check the path"):
        finetune.read_classification(str(tmp_path / "nope.tsv"))
    path = tmp_path / "latin.tsv"
    path.write_bytes("text\tlabel\ncaf\u00e9\tx\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.tsv is not UTF-8 \(byte 14 is 0xe9\).*iconv -f"):
        finetune.read_classification(str(path))


def test_label_names_sorted_unique():
    examples = [Example("a", None, "b"), Example("b", None, "a"), Example("c", None, "b")]
    assert finetune.label_names(examples) == ["a", "b"]


# Rows.

def test_rows_layout_single_and_pair(trained):
    a, b = "the king went to the city", "the river was dark"
    ids_a, ids_b = trained.encode(a), trained.encode(b)
    assert len(ids_a) + len(ids_b) + 3 < 32  # no truncation in this test
    rows = finetune.classification_rows(
        [Example(a, None, "x"), Example(a, b, "y")], trained, max_len=32, labels=["x", "y"])
    single = [tok.CLS_ID, *ids_a, tok.SEP_ID]
    pair = [tok.CLS_ID, *ids_a, tok.SEP_ID, *ids_b, tok.SEP_ID]
    assert rows["inputs"][0].tolist() == single + [tok.PAD_ID] * (32 - len(single))
    assert rows["inputs"][1].tolist() == pair + [tok.PAD_ID] * (32 - len(pair))
    assert rows["token_types"][0].tolist() == [0] * 32
    assert rows["token_types"][1].tolist() == ([0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)
                                               + [0] * (32 - len(pair)))
    assert rows["segment_ids"][0].tolist() == [1] * len(single) + [0] * (32 - len(single))
    assert rows["segment_ids"][1].tolist() == [1] * len(pair) + [0] * (32 - len(pair))
    assert rows["labels"].tolist() == [0, 1]
    assert rows["example_weights"].tolist() == [1.0, 1.0]
    assert {k: v.dtype for k, v in rows.items()} == {
        "inputs": np.int32, "token_types": np.int32, "segment_ids": np.int32,
        "labels": np.int32, "example_weights": np.float32}
    # decode drops [CLS] and [SEP]; b keeps SentencePiece's dummy-prefix space.
    assert trained.decode(rows["inputs"][1]) == f"{a} {b}"


def words(first, count):
    """count consecutive integers from first, as WordTokenizer text."""
    return " ".join(str(k) for k in range(first, first + count))


@pytest.mark.parametrize("len_a, len_b, keep_a, keep_b", [
    (3, 2, 3, 2),  # fits: max_len 8 minus 3 specials leaves 5 tokens
    (10, 2, 3, 2),  # only the longer side is trimmed
    (2, 10, 2, 3),
    (10, 10, 3, 2),  # both long: trimmed alternately, b first on a tie, ends at 3 + 2
    (4, 4, 3, 2),
])
def test_pair_truncation_trims_longer_side(len_a, len_b, keep_a, keep_b):
    example = Example(words(0, len_a), words(50, len_b), "x")
    rows = finetune.classification_rows([example], WordTokenizer(), max_len=8, labels=["x"])
    expected = ([tok.CLS_ID, *range(10, 10 + keep_a), tok.SEP_ID,
                 *range(60, 60 + keep_b), tok.SEP_ID])
    assert rows["inputs"][0].tolist() == expected + [tok.PAD_ID] * (8 - len(expected))
    types = [0] * (keep_a + 2) + [1] * (keep_b + 1)
    assert rows["token_types"][0].tolist() == types + [0] * (8 - len(types))


def test_single_truncation_keeps_the_start():
    rows = finetune.classification_rows(
        [Example(words(0, 20), None, "x")], WordTokenizer(), max_len=6, labels=["x"])
    assert rows["inputs"].tolist() == [[tok.CLS_ID, 10, 11, 12, 13, tok.SEP_ID]]
    assert rows["segment_ids"].tolist() == [[1] * 6]


def test_truncated_rows_fit_max_len(trained, corpus_file):
    texts = corpus_file.read_text().split("\n\n")[:20]
    examples = [Example(t, texts[-1 - i] if i % 2 else None, "x") for i, t in enumerate(texts)]
    rows = finetune.classification_rows(examples, trained, max_len=16, labels=["x"])
    assert rows["inputs"].shape == (20, 16)
    lengths = rows["segment_ids"].sum(axis=1)
    last = rows["inputs"][np.arange(20), lengths - 1]
    assert (rows["inputs"][:, 0] == tok.CLS_ID).all() and (last == tok.SEP_ID).all()
    # Pairs have two [SEP]s, singles one; every text here is longer than 16 tokens.
    assert (rows["inputs"] == tok.SEP_ID).sum(axis=1).tolist() == [1, 2] * 10
    assert (lengths == 16).all()


def test_regression_labels_are_floats():
    examples = [Example("1", None, "0.25"), Example("2", None, "-3"), Example("3", None, "4e1")]
    rows = finetune.classification_rows(examples, WordTokenizer(), max_len=4, labels=None)
    assert rows["labels"].dtype == np.float32
    assert rows["labels"].tolist() == [0.25, -3.0, 40.0]
    for bad in ("high", "nan", "inf"):
        with pytest.raises(DataError, match=rf"example 1 \('2'\) has label '{bad}', not a finite"):
            finetune.classification_rows([examples[0], Example("2", None, bad)],
                                         WordTokenizer(), max_len=4, labels=None)


def test_unknown_label_names_it_and_the_known_ones():
    examples = [Example("1", None, "neg"), Example("2", None, "neutral")]
    with pytest.raises(DataError, match=r"label 'neutral'.*known labels: 'neg', 'pos'"):
        finetune.classification_rows(examples, WordTokenizer(), max_len=4, labels=["neg", "pos"])


def test_eval_iterator_pads_with_zero_weight():
    examples = [Example(str(i), None, "ab"[i % 2]) for i in range(5)]
    rows = finetune.classification_rows(examples, WordTokenizer(), max_len=4, labels=["a", "b"])
    batches = list(lm.make_iterator(rows, 4, seed=0, shuffle=False, repeat=False))
    assert [b["example_weights"].tolist() for b in batches] == [[1.0] * 4, [1.0, 0, 0, 0]]
    assert batches[1]["labels"].tolist() == [0, 0, 0, 0]


# Metrics.

def test_metrics_three_classes_by_hand():
    confusion = np.array([[5, 1, 0],
                          [2, 3, 1],
                          [0, 0, 4]])
    # accuracy = (5 + 3 + 4) / 16 = 0.75
    # class 0: tp 5, fp 2 + 0 = 2, fn 1 + 0 = 1 -> F1 = 10 / (10 + 2 + 1) = 10/13
    # class 1: tp 3, fp 1 + 0 = 1, fn 2 + 1 = 3 -> F1 = 6 / (6 + 1 + 3) = 0.6
    # class 2: tp 4, fp 0 + 1 = 1, fn 0 + 0 = 0 -> F1 = 8 / (8 + 1 + 0) = 8/9
    metrics = finetune.classification_metrics(confusion)
    assert metrics.keys() == {"accuracy", "macro_f1"}
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["macro_f1"] == pytest.approx((10 / 13 + 0.6 + 8 / 9) / 3)


def test_macro_f1_leaves_out_absent_class_but_not_unpredicted_one():
    # Class 2: no true and no predicted examples -> left out.
    # class 0: tp 3, fp 1, fn 1 -> 6/8; class 1: tp 2, fp 1, fn 1 -> 4/6.
    absent = np.array([[3, 1, 0], [1, 2, 0], [0, 0, 0]], np.float32)
    assert finetune.classification_metrics(absent)["macro_f1"] == pytest.approx((6 / 8 + 4 / 6) / 2)
    # Class 2 has true examples but is never predicted: F1 0 counts in the mean.
    # class 0: tp 3, fp 2, fn 1 -> 6/9; class 1: tp 2, fp 1, fn 1 -> 4/6; class 2: 0.
    unpredicted = np.array([[3, 1, 0], [1, 2, 0], [1, 0, 0]])
    assert finetune.classification_metrics(unpredicted)["macro_f1"] == pytest.approx(
        (6 / 9 + 4 / 6 + 0) / 3)


def test_mcc_perfect_inverted_asymmetric_undefined():
    assert finetune.classification_metrics(np.array([[3, 0], [0, 5]]))["mcc"] == pytest.approx(1)
    assert finetune.classification_metrics(np.array([[0, 3], [5, 0]]))["mcc"] == pytest.approx(-1)
    # Class 1 as positive: tn 6, fp 2, fn 1, tp 3.
    # MCC = (3*6 - 2*1) / sqrt((3+2)(3+1)(6+2)(6+1)) = 16 / sqrt(1120)
    confusion = np.array([[6, 2], [1, 3]])
    metrics = finetune.classification_metrics(confusion)
    assert metrics["mcc"] == pytest.approx(16 / math.sqrt(1120))
    # The same from Gorodkin's multiclass form, (c s - p.t) / sqrt((s^2 - p.p)(s^2 - t.t)) with
    # c correct, s total, p predicted and t true counts per class:
    # (9*12 - (7*8 + 5*4)) / sqrt((144 - 74)(144 - 80)) = 32 / sqrt(4480) = 16 / sqrt(1120).
    c, s, p, t = 9, 12, np.array([7, 5]), np.array([8, 4])
    gorodkin = (c * s - p @ t) / math.sqrt((s**2 - p @ p) * (s**2 - t @ t))
    assert metrics["mcc"] == pytest.approx(gorodkin)
    # Only one class ever predicted: undefined, reported as 0.
    assert finetune.classification_metrics(np.array([[4, 0], [2, 0]]))["mcc"] == 0.0


def test_majority_baseline_by_hand():
    # Training majority is class 1 (3 of 5). Eval [0, 1, 2, 1] all predicted 1:
    # accuracy 2/4; class 1: tp 2, fp 2, fn 0 -> 4/6; classes 0 and 2: F1 0.
    metrics = finetune.majority_baseline(np.array([0, 1, 1, 2, 1]), np.array([0, 1, 2, 1]), 3)
    assert metrics == pytest.approx({"accuracy": 0.5, "macro_f1": (4 / 6) / 3})
    # Binary, majority 0: accuracy 1/4; class 0: tp 1, fp 3 -> 2/5; class 1: 0; mcc undefined -> 0.
    metrics = finetune.majority_baseline(np.array([0, 0, 1]), np.array([0, 1, 1, 1]), 2)
    assert metrics == pytest.approx({"accuracy": 0.25, "macro_f1": 0.2, "mcc": 0.0})


# The Bible testament task.

# Two verses per book: training books on both sides of 39/40, dev books of both testaments, the
# test books (Obadiah 31, 2 John 63), and a copyrighted version that must not be read.
BOOKS = (1, 8, 25, 31, 39, 40, 57, 59, 63, 66)


@pytest.fixture
def bible_db(tmp_path):
    path = tmp_path / "bible.db"
    rows = [("4", b, 1, v, f"Book {b} verse {v}.") for b in BOOKS for v in (1, 2)]
    rows.append(("2", 1, 1, 3, "Book 1 verse 3."))
    return write_bible_db(path, rows)


def test_bible_classification_holds_out_whole_books(bible_db):
    train, dev = finetune.bible_classification(bible_db)

    def book_of(example):
        return int(example.text.split()[1])

    assert sorted({book_of(e) for e in train}) == [1, 39, 40, 66]
    assert sorted({book_of(e) for e in dev}) == [8, 25, 57, 59]
    assert len(train) == len(dev) == 8  # two verses each; version "2" is not read
    for example in train + dev:
        assert example.text_pair is None
        assert example.label == ("old" if book_of(example) <= 39 else "new")
    assert finetune.label_names(train) == finetune.label_names(dev) == ["new", "old"]


def test_bible_classification_needs_dev_books(tmp_path):
    path = write_bible_db(tmp_path / "bible.db", [("4", 1, 1, 1, "In the beginning.")])
    with pytest.raises(DataError, match="lacks the training books or the dev books"):
        finetune.bible_classification(path)
