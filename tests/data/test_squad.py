"""Span QA data: tokenizer offsets, SQuAD files, windowed features, the held-apart split, the
Bible demo set (scoring: test_squad_eval.py)."""

import json
import random
import re

import numpy as np
import pytest

from tests.conftest import write_bible_db

from data import squad
from data import tokenizer as tok
from data.errors import DataError

WORDS = ("the king went to city and people said that river was dark light came over land "
         "water ran by stone of old gate kingdom kingdom kingdom").split()
NAMES = ("Abram", "Nahor", "Haran", "Terah", "Lot", "Boaz", "Obed", "Salem", "Melchizedek")


def sentence(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def train(tmp_path_factory, vocab_size):
    rng = random.Random(0)
    texts = [sentence(rng, rng.randint(5, 15)) + " " + rng.choice(NAMES) + "." for _ in range(400)]
    path = tmp_path_factory.mktemp("squad") / "tokenizer.model"
    return tok.train_tokenizer(texts, str(path), vocab_size=vocab_size)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """Whole words as pieces: "▁the", "▁kingdom", "▁Melchizedek"."""
    return train(tmp_path_factory, 600)


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    """Few merges: mostly single characters, and word starts as a lone "▁" (an empty span)."""
    return train(tmp_path_factory, 300)


@pytest.fixture(scope="module", params=["tokenizer", "char_tokenizer"])
def any_tokenizer(request):
    return request.getfixturevalue(request.param)


# Tokenizer offsets.

@pytest.mark.parametrize("text", [
    "the king went to the old gate",
    "  Le roi a dit: café à côté, déjà vu.",  # accents are byte-fallback pieces here
    "Emoji 😀 and snow☃man\tand\nlines",  # 4-byte and 3-byte characters, tab, newline
])
def test_encode_with_offsets_spans_are_the_pieces(any_tokenizer, text):
    tokenizer = any_tokenizer
    ids, starts, ends = tokenizer.encode_with_offsets(text)
    assert ids == tokenizer.encode(text)
    covered = set()
    for i, start, end in zip(ids, starts, ends):
        piece = tokenizer.id_to_piece(i)
        span = text[start:end]
        if piece.startswith("<0x"):
            # A byte piece spans the whole character that byte belongs to.
            assert len(span) == 1 and int(piece[3:5], 16) in span.encode("utf-8")
        else:
            # "▁" is the space before a word; the span starts after it.
            assert span == piece.replace("▁", " ").lstrip(" ")
        covered.update(range(start, end))
    assert covered == {i for i, ch in enumerate(text) if ch != " "}
    assert starts == sorted(starts)


# Reading SQuAD files.

CONTEXT = "The king went to the old gate. Water ran by the stone."


def squad_json(qas, context=CONTEXT):
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": qas}]}]}


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def test_read_squad_v1_and_v2(tmp_path):
    v1 = squad_json([{"id": "q1", "question": "Where did the king go?", "answers": [
        {"text": "the old gate", "answer_start": 17}, {"text": "old gate", "answer_start": 21}]}])
    v2 = squad_json([
        {"id": "q1", "question": "What ran?", "answers": [{"text": "Water", "answer_start": 31}],
         "is_impossible": False},
        {"id": "q2", "question": "Who slept?", "answers": [], "is_impossible": True}])
    (one,) = squad.read_squad(write_json(tmp_path / "v1.json", v1))
    assert one == squad.QAExample("q1", "Where did the king go?", CONTEXT,
                                  (("the old gate", 17), ("old gate", 21)), False)
    two = squad.read_squad(write_json(tmp_path / "v2.json", v2))
    assert [(e.qid, e.answers, e.is_impossible) for e in two] == [
        ("q1", (("Water", 31),), False), ("q2", (), True)]


def good_question(**changes):
    qa = {"id": "q1", "question": "What ran?", "answers": [{"text": "Water", "answer_start": 31}]}
    qa.update(changes)
    return qa


@pytest.mark.parametrize("data, message", [
    ([], "top level should be a JSON object"),
    ({"data": ["title"]}, r"data\[0\] should be a JSON object, got str"),
    ({"version": "1.1"}, "the top level has no 'data' key"),
    ({"data": [{"title": "t", "paragraphs": {}}]}, r"data\[0\].paragraphs should be list"),
    (squad_json([{"id": "q1", "answers": []}]), r"qas\[0\] has no 'question' key"),
    (squad_json([good_question(answers=[{"text": "Water", "answer_start": "31"}])]),
     "answer_start should be int"),
    (squad_json([good_question(answers=[{"text": "Water", "answer_start": 30}])]),
     "'Water' is not at answer_start=30 of its context"),
    (squad_json([good_question(answers=[{"text": " ", "answer_start": 3}])]),
     "empty answer text"),
    (squad_json([good_question(is_impossible=True)]), "marked is_impossible but has answers"),
    (squad_json([good_question(), good_question()]), "'q1' occurs twice"),
])
def test_read_squad_structure_errors_name_the_key(tmp_path, data, message):
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(DataError, match=message):
        squad.read_squad(path)


def test_read_squad_file_errors(tmp_path):
    with pytest.raises(DataError, match="nope.json does not exist"):
        squad.read_squad(str(tmp_path / "nope.json"))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json:1:\d+: not valid JSON"):
        squad.read_squad(str(bad_json))
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"data": [{"title": "Th\xe9", "paragraphs": []}]}')
    with pytest.raises(DataError, match="is not UTF-8 .*iconv"):
        squad.read_squad(str(latin1))


# Windowed features.

MAX_LEN, STRIDE, MAX_QUERY = 40, 8, 10


def long_examples():
    """Contexts of ~60-120 tokens (several windows at MAX_LEN 40), answers at varied places."""
    rng = random.Random(1)
    examples = []
    for i in range(12):
        before, after = sentence(rng, rng.randint(0, 60)), sentence(rng, rng.randint(5, 40))
        answer = rng.choice(["old gate", "Abram", "the dark river", "Melchizedek king"])
        # Spaces around the answer: sentencepiece never joins pieces across a space, so the
        # gold text is a whole number of tokens and must come back exactly.
        context = f"{before} {answer} {after}".strip()
        start = len(before) + 1 if before else 0
        if i % 3 == 2:  # an unanswerable question about the same kind of context
            examples.append(squad.QAExample(f"q{i}", "Who went to the city?", context, (), True))
        else:
            examples.append(squad.QAExample(f"q{i}", "What did the king say to the people?",
                                            context, ((answer, start),), False))
    return examples


@pytest.fixture(scope="module")
def features(any_tokenizer):
    tokenizer = any_tokenizer
    examples = long_examples()
    rows, meta = squad.squad_features(examples, tokenizer, max_len=MAX_LEN, doc_stride=STRIDE,
                                      max_query_len=MAX_QUERY, train=True)
    return tokenizer, examples, rows, meta


def test_feature_rows_layout(features):
    tokenizer, examples, rows, meta = features
    n = len(meta)
    assert n > len(examples)  # long contexts took several windows
    for name in ("inputs", "token_types", "segment_ids"):
        assert rows[name].shape == (n, MAX_LEN) and rows[name].dtype == np.int32
    assert rows["start_positions"].shape == rows["end_positions"].shape == (n,)
    assert rows["example_weights"].dtype == np.float32 and (rows["example_weights"] == 1).all()
    for f, feature in enumerate(meta):
        example = examples[feature["example_index"]]
        question = tokenizer.encode(example.question)[:MAX_QUERY]
        length = int(rows["segment_ids"][f].sum())
        inputs = rows["inputs"][f]
        assert list(inputs[:len(question) + 2]) == [tok.CLS_ID, *question, tok.SEP_ID]
        assert inputs[length - 1] == tok.SEP_ID and (inputs[length:] == tok.PAD_ID).all()
        expected_types = [0] * (len(question) + 2) + [1] * (length - len(question) - 2)
        assert list(rows["token_types"][f]) == expected_types + [0] * (MAX_LEN - length)
        context_rows = [i for i, span in enumerate(feature["token_to_char"]) if span]
        assert context_rows == list(range(len(question) + 2, length - 1))


def test_training_spans_recover_the_gold_text(features):
    _, examples, rows, meta = features
    answered = set()
    for f, feature in enumerate(meta):
        example = examples[feature["example_index"]]
        start, end = rows["start_positions"][f], rows["end_positions"][f]
        spans = [s for s in feature["token_to_char"] if s]
        window = (spans[0][0], spans[-1][1])  # characters this window covers
        if example.is_impossible:
            assert start == end == 0
            continue
        text, char_start = example.answers[0]
        inside = window[0] <= char_start and char_start + len(text) <= window[1]
        if not inside:
            assert start == end == 0
            continue
        token_to_char = feature["token_to_char"]
        assert example.context[token_to_char[start][0]:token_to_char[end][1]] == text
        answered.add(example.qid)
    assert answered == {e.qid for e in examples if not e.is_impossible}


def test_windows_step_by_stride_and_share_out_max_context(features):
    tokenizer, examples, rows, meta = features
    for index, example in enumerate(examples):
        ids, starts, ends = tokenizer.encode_with_offsets(example.context)
        spans = list(zip(starts, ends))
        windows = []  # (first context token, length, context rows) of each window
        owners = [[] for _ in ids]  # the windows in which each context token is max_context
        for w, feature in enumerate(f for f in meta if f["example_index"] == index):
            rows_w = [r for r, span in enumerate(feature["token_to_char"]) if span]
            first = w * STRIDE  # window w starts doc_stride tokens after window w-1
            assert [feature["token_to_char"][r] for r in rows_w] == spans[first:][:len(rows_w)]
            assert sum(feature["max_context"]) == sum(feature["max_context"][r] for r in rows_w)
            for r in rows_w:
                if feature["max_context"][r]:
                    owners[first + r - rows_w[0]].append(w)
            windows.append((first, len(rows_w)))
        assert windows[-1][0] + windows[-1][1] == len(ids)  # the last window reaches the end
        # The reference rule, recomputed: a token belongs to the window where the smaller of
        # its left and right context counts (+0.01 per window token) is largest, first on ties.
        for i in range(len(ids)):
            scores = [min(i - s, s + n - 1 - i) + 0.01 * n if s <= i < s + n else -1.0
                      for s, n in windows]
            assert owners[i] == [int(np.argmax(scores))]


def test_smallest_token_span_covers_a_split_answer(tokenizer):
    assert len(tokenizer.encode("kingdom")) == 1  # trained as one piece
    context = "the people of the kingdom went to the city"
    example = squad.QAExample("q", "Whose people?", context, (("king", 18),), False)
    rows, (feature,) = squad.squad_features([example], tokenizer, max_len=32, doc_stride=8,
                                            max_query_len=8, train=True)
    start, end = rows["start_positions"][0], rows["end_positions"][0]
    span = feature["token_to_char"]
    # "king" lies inside the single piece "▁kingdom": the smallest cover is that whole piece.
    assert context[span[start][0]:span[end][1]] == "kingdom"


def test_feature_errors(tokenizer):
    unlabeled = squad.QAExample("q", "Who?", CONTEXT, (), False)
    with pytest.raises(DataError, match="answerable but has no gold answer"):
        squad.squad_features([unlabeled], tokenizer, max_len=32, doc_stride=8, max_query_len=8,
                             train=True)
    rows, _ = squad.squad_features([unlabeled], tokenizer, max_len=32, doc_stride=8,
                                   max_query_len=8, train=False)
    assert rows["start_positions"][0] == 0
    with pytest.raises(DataError, match="leaves no room for context"):
        squad.squad_features([unlabeled], tokenizer, max_len=12, doc_stride=8, max_query_len=9,
                             train=False)


# Holding questions apart (where the no-answer threshold is chosen).

def test_holdout_split_keeps_whole_contexts_apart_the_same_way_every_time():
    contexts = [f"context number {i}." for i in range(400)]
    examples = [squad.QAExample(f"{i}-{k}", "?", c, (), True)
                for i, c in enumerate(contexts) for k in range(3)]
    kept, held = squad.holdout_split(examples, 0.1)
    assert (kept, held) == squad.holdout_split(list(examples), 0.1)
    assert len(kept) + len(held) == len(examples)
    assert not {e.context for e in kept} & {e.context for e in held}  # no context in both
    assert 20 <= len({e.context for e in held}) <= 60  # about 10% of 400 contexts
    assert squad.holdout_split(examples, 0.0) == (examples, [])



# The Bible demo set.

# (book, chapter, verse, text); books 1 and 40 train, 8 (Ruth) and 15 (Ezra) dev.
VERSES = [
    (1, 11, 1, "Terah became the father of Abram, Nahor, and Haran."),
    (1, 11, 2, "Lot the son of Haran went with Abram."),
    (1, 11, 3, "Melchizedek king of Salem brought out bread."),
    (1, 12, 1, "The water ran by the stone of the old gate."),
    (1, 12, 2, "Light came over the land."),
    (40, 1, 1, "Joseph, the son of Jacob, went to the city."),
    (40, 1, 2, "The river was dark."),
    (8, 4, 1, "Boaz became the father of Obed. Obed became the father of Jesse."),
    (8, 4, 2, "The people said that the river was dark."),
    (15, 7, 1, "Ezra the son of Seraiah went up from Babylon."),
    (15, 8, 1, "The king went to the old gate."),
]


@pytest.fixture
def bible_db(tmp_path):
    path = tmp_path / "bible.db"
    french = [(1, 11, 1, "Térah engendra Abram, Nachor et Haran."),
              (8, 4, 1, "Boaz engendra Obed.")]
    return write_bible_db(path, [("4", *row) for row in VERSES] +
                          [("l", *row) for row in french])


def test_bible_squad_questions_answers_and_splits(bible_db):
    train, dev = squad.bible_squad(bible_db)
    assert squad.bible_squad(bible_db) == (train, dev)  # deterministic
    train_examples = squad.parse_squad(train)  # checks every answer is at its offset
    dev_examples = squad.parse_squad(dev)
    answerable = {e.question: [text for text, _ in e.answers]
                  for e in train_examples + dev_examples if not e.is_impossible}
    assert answerable == {
        "Who did Terah become the father of?": ["Abram", "Nahor", "Haran"],
        "Whose son was Lot?": ["Haran"],
        "What was Melchizedek king of?": ["Salem"],
        "Whose son was Joseph?": ["Jacob"],
        "Who did Boaz become the father of?": ["Obed"],
        "Who did Obed become the father of?": ["Jesse"],
        "Whose son was Ezra?": ["Seraiah"],
    }
    train_books = {int(e.qid.split("-")[0]) for e in train_examples}
    dev_books = {int(e.qid.split("-")[0]) for e in dev_examples}
    assert train_books == {1, 40} and dev_books == {8, 15}
    assert not {e.context for e in train_examples} & {e.context for e in dev_examples}
    for examples in (train_examples, dev_examples):
        impossible = [e for e in examples if e.is_impossible]
        # Every second question gets a no-answer copy: 2 of 4 in train, 1 of 3 in dev, so
        # about a third of all questions are unanswerable.
        assert len(impossible) == (len(examples) - len(impossible)) // 2
        for e in impossible:
            (person,) = set(re.findall(r"[A-Z][a-z]+", e.question)) - {"Who", "Whose", "What"}
            assert person not in e.context


def test_bible_squad_needs_the_english_wording(bible_db):
    with pytest.raises(DataError, match="version 'l' gives no questions"):
        squad.bible_squad(bible_db, version="l")
