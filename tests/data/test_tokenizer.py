"""Tokenizer round trips and special ids, with tokenizers trained inside the test."""

import io
import os
import random

import pytest
import sentencepiece as spm

from data import tokenizer as tok
from data.errors import DataError

WORDS = ("the quick brown fox jumps over lazy dog light water earth heaven said "
         "and was there were king people land city house day night").split()


def make_texts(n=300, seed=0):
    """Random sentences over a small word list; enough text for a few hundred pieces."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "."
            for _ in range(n)]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.model"
    return tok.train_tokenizer(make_texts(), str(path), vocab_size=400, model_type=request.param)


def test_special_ids(trained):
    pieces = [trained.id_to_piece(i) for i in range(7)]
    assert pieces == ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]"]
    assert [tok.PAD_ID, tok.UNK_ID, tok.BOS_ID, tok.EOS_ID] == [0, 1, 2, 3]
    assert [tok.CLS_ID, tok.SEP_ID, tok.MASK_ID] == [4, 5, 6]


@pytest.mark.parametrize("text", [
    "the quick brown fox said light.",
    "Unseen words: naïve café ☃ 東京 and tabs\tin\tthem.",  # byte fallback, no <unk>
    "king\nand newline\n\n",  # identity normalization keeps line breaks
    "  leading and  double  spaces ",
])
def test_round_trip(trained, text):
    ids = trained.encode(text)
    assert tok.UNK_ID not in ids
    assert tok.BOS_ID not in ids and tok.EOS_ID not in ids
    assert trained.decode(ids) == text


def test_decode_drops_pad_bos_eos_and_out_of_vocab(trained):
    ids = trained.encode("the dog")
    noisy = [tok.BOS_ID, *ids, tok.EOS_ID, tok.PAD_ID, tok.PAD_ID, trained.vocab_size + 3]
    assert trained.decode(noisy) == "the dog"


def test_load_gives_same_encoding_and_leaves_no_temp_files(trained):
    loaded = tok.load_tokenizer(trained.path)
    text = "the lazy dog was there"
    assert loaded.encode(text) == trained.encode(text)
    assert loaded.vocab_size == trained.vocab_size
    assert os.listdir(os.path.dirname(trained.path)) == ["tokenizer.model"]


def test_load_missing_file_says_train_first(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(DataError, match="tokenizer.model does not exist; train"):
        tok.load_tokenizer(str(missing))


def test_load_rejects_a_non_model_file(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        tok.load_tokenizer(str(bad))


def test_bad_model_type_and_empty_input(tmp_path):
    with pytest.raises(DataError, match="model_type 'wordpiece'"):
        tok.train_tokenizer(["a b"], str(tmp_path / "t.model"), 300, model_type="wordpiece")
    with pytest.raises(DataError, match="empty corpus"):
        tok.train_tokenizer(["", "  \n "], str(tmp_path / "t.model"), 300)
    assert not os.listdir(tmp_path)


def test_vocab_too_small_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="vocab_size=50"):
        tok.train_tokenizer(make_texts(20), str(tmp_path / "t.model"), 50)
    assert not os.listdir(tmp_path)


def test_load_rejects_a_model_with_other_special_ids(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(make_texts(50)), model_writer=model,
                                   vocab_size=60, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path / "foreign.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(DataError, match="not trained by this codebase"):
        tok.load_tokenizer(str(path))


def test_sentence_sample_is_seeded_bounded_uniform_and_in_corpus_order():
    texts = [f"line {i}" for i in range(1000)]
    small, seen = tok.sample_sentences(texts, 2000, seed=0)
    assert small == texts and seen == 1000  # below the cap: everything, in order
    a, seen = tok.sample_sentences(iter(texts), 100, seed=0)  # a stream, read once
    assert seen == 1000 and len(a) == 100 == len(set(a))
    assert a == sorted(a, key=lambda s: int(s.split()[1]))  # corpus order kept
    assert tok.sample_sentences(texts, 100, seed=0)[0] == a
    assert tok.sample_sentences(texts, 100, seed=1)[0] != a
    # Uniform: over many seeds every line is kept with probability 100 / 1000.
    hits = [0] * 1000
    for seed in range(200):
        for s in tok.sample_sentences(texts, 100, seed=seed)[0]:
            hits[int(s.split()[1])] += 1
    first, last = sum(hits[:500]) / 200, sum(hits[500:]) / 200
    assert abs(first - 50) < 3 and abs(last - 50) < 3
    with pytest.raises(DataError, match="tokenizer_max_sentences must be >= 1"):
        tok.sample_sentences(texts, 0, seed=0)


def test_tokenizer_trained_on_a_sample_reports_its_time(tmp_path, capsys):
    texts = make_texts(n=3000)
    model = tok.train_tokenizer(texts, str(tmp_path / "t.model"), vocab_size=400,
                                max_sentences=500, seed=3)
    again = tok.train_tokenizer(texts, str(tmp_path / "u.model"), vocab_size=400,
                                max_sentences=500, seed=3)
    assert [model.id_to_piece(i) for i in range(400)] == [again.id_to_piece(i)
                                                            for i in range(400)]
    assert "500 of 3,000 lines" in capsys.readouterr().out
