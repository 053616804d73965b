"""Translation data: parallel readers, Bible verse pairs, synthetic tasks, packing and BLEU."""

import math
import random

import numpy as np
import pytest


from tests.conftest import write_bible_db

from data import tokenizer as tok
from data import translation
from data.errors import DataError

# (version, book, chapter, verse, text): Genesis (train), Ruth (dev), Obadiah (test), Matthew
# (train); Genesis 1:3 exists only in English and Matthew 1:2 only in French.
VERSES = [
    ("l", 1, 1, 2, "La terre était informe et vide."),
    ("4", 1, 1, 1, "In the beginning, God created the heavens and the earth."),
    ("4", 1, 1, 2, "The earth was formless and empty."),
    ("4", 1, 1, 3, "God said, \"Let there be light,\" and there was light."),
    ("l", 1, 1, 1, "Au commencement, Dieu créa les cieux et la terre."),
    ("4", 8, 1, 2, "Elimelech, Naomi`s husband, died."),
    ("l", 8, 1, 2, "Élimélec, mari de Naomi, mourut."),
    ("4", 31, 1, 1, "The vision of Obadiah."),
    ("l", 31, 1, 1, "Prophétie d`Abdias."),
    ("4", 40, 1, 1, "The book of the genealogy of Jesus Christ."),
    ("l", 40, 1, 1, "Généalogie de Jésus-Christ."),
    ("l", 40, 1, 2, "Abraham engendra Isaac."),
    ("2", 1, 1, 1, "A copyrighted translation."),
]


@pytest.fixture
def bible_db(tmp_path):
    path = tmp_path / "bible.db"
    return write_bible_db(path, VERSES)


ENGLISH = "the king went to city and people said river was dark light came over land".split()
FRENCH = "le roi alla à la ville et les gens dirent que fleuve était sombre lumière".split()


@pytest.fixture(scope="module")
def joint_tokenizer(tmp_path_factory):
    """A ~400-piece BPE tokenizer trained on both sides of generated pairs (a shared vocab)."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "."
             for _ in range(300) for words in (ENGLISH, FRENCH)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return tok.train_tokenizer(texts, str(path), vocab_size=400, model_type="bpe")


class WordTokenizer:
    """One id per whitespace word, so token counts are known by construction."""

    bos_id, eos_id = tok.BOS_ID, tok.EOS_ID

    def encode(self, text):
        return [10 + len(word) for word in text.split()]

    encode_target = encode


def framed(src_ids, tgt_ids):
    """encode_pairs' framing: source ids + [EOS], [BOS] + target ids + [EOS]."""
    return ([[*s, tok.EOS_ID] for s in src_ids],
            [[tok.BOS_ID, *t, tok.EOS_ID] for t in tgt_ids])


def test_read_parallel_tsv(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_bytes("\ufeffHello.\tBonjour.\r\n\n  \nA cat\t  Un chat \nonly source\t\n"
                     .encode("utf-8"))
    assert translation.read_parallel(str(path)) == [("Hello.", "Bonjour."), ("A cat", "Un chat")]


def test_read_parallel_two_files(tmp_path):
    (tmp_path / "en.txt").write_text("Hello.\n\nThe cat\u2028sleeps.\nblank target\nlast\n\n",
                                           encoding="utf-8")
    (tmp_path / "fr.txt").write_text("Bonjour.\n\nLe chat dort.\n   \ndernier\n", encoding="utf-8")
    pairs = translation.read_parallel(str(tmp_path / "en.txt"), str(tmp_path / "fr.txt"))
    # The line separator inside a sentence does not break the alignment.
    assert pairs == [("Hello.", "Bonjour."), ("The cat\u2028sleeps.", "Le chat dort."),
                     ("last", "dernier")]


def test_read_parallel_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing.tsv does not exist"):
        translation.read_parallel(str(tmp_path / "missing.tsv"))
    (tmp_path / "en.txt").write_text("one\ntwo\nthree\n")
    with pytest.raises(DataError, match=r"fr.txt does not exist"):
        translation.read_parallel(str(tmp_path / "en.txt"), str(tmp_path / "fr.txt"))

    (tmp_path / "fr.txt").write_text("un\ndeux\n")
    with pytest.raises(DataError, match=r"en.txt has 3 lines but .*fr.txt has 2.*line-aligned"):
        translation.read_parallel(str(tmp_path / "en.txt"), str(tmp_path / "fr.txt"))

    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 \(byte 3 is 0xe9\).*iconv"):
        translation.read_parallel(str(tmp_path / "en.txt"), str(tmp_path / "latin1.txt"))

    tsv = tmp_path / "bad.tsv"
    tsv.write_text("a\tb\nno tab here\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: expected source<TAB>target, found 0 tabs"):
        translation.read_parallel(str(tsv))
    tsv.write_text("a\tb\n\nc\td\te\n")
    with pytest.raises(DataError, match=r"bad.tsv:3: .*found 2 tabs.*two line-aligned files"):
        translation.read_parallel(str(tsv))

    tsv.write_text("\n \t \n\n")
    with pytest.raises(DataError, match="empty corpus.*bad.tsv"):
        translation.read_parallel(str(tsv))


def test_bible_pairs_align_by_verse_and_split_by_book(bible_db):
    train, dev, test = translation.bible_pairs(bible_db)
    assert train == [
        ("In the beginning, God created the heavens and the earth.",
         "Au commencement, Dieu créa les cieux et la terre."),
        ("The earth was formless and empty.", "La terre était informe et vide."),
        ("The book of the genealogy of Jesus Christ.", "Généalogie de Jésus-Christ."),
    ]  # Genesis 1:3 (English only) and Matthew 1:2 (French only) are skipped
    assert dev == [("Elimelech, Naomi's husband, died.", "Élimélec, mari de Naomi, mourut.")]
    assert test == [("The vision of Obadiah.", "Prophétie d'Abdias.")]


def test_bible_pairs_either_direction_and_public_domain_only(bible_db):
    train, _, _ = translation.bible_pairs(bible_db, source_version="l", target_version="4")
    assert train[0] == ("Au commencement, Dieu créa les cieux et la terre.",
                        "In the beginning, God created the heavens and the earth.")
    with pytest.raises(DataError, match="not public domain"):
        translation.bible_pairs(bible_db, target_version="2")
    with pytest.raises(DataError, match="no verses of version 'k'"):
        translation.bible_pairs(bible_db, target_version="k")


@pytest.mark.parametrize("task", ["copy", "reverse"])
def test_synthetic_pairs(task):
    pairs = translation.synthetic_pairs(task, 200, num_symbols=5, min_len=2, max_len=6, seed=3)
    assert len(pairs) == 200
    for source, target in pairs:
        symbols = source.split()
        assert 2 <= len(symbols) <= 6
        assert set(symbols) <= {"sa", "sb", "sc", "sd", "se"}
        assert target.split() == (symbols if task == "copy" else symbols[::-1])
    lengths = {len(s.split()) for s, _ in pairs}
    assert lengths == {2, 3, 4, 5, 6}
    assert pairs == translation.synthetic_pairs(task, 200, num_symbols=5, min_len=2,
                                                max_len=6, seed=3)
    assert pairs != translation.synthetic_pairs(task, 200, num_symbols=5, min_len=2,
                                                max_len=6, seed=4)


def test_synthetic_pairs_errors():
    with pytest.raises(DataError, match=r"unknown synthetic task 'sort'.*'copy', 'reverse'"):
        translation.synthetic_pairs("sort", 10)
    with pytest.raises(DataError, match="min_len <= max_len"):
        translation.synthetic_pairs("copy", 10, min_len=5, max_len=4)


def test_encode_pairs_length_filtering():
    # max_len 4 leaves 3 tokens per side for text (EOS / BOS take the fourth).
    pairs = [("a b c", "x y z"),  # 3 / 3: kept (exactly at the limit)
             ("a b c d", "x"),  # source too long: dropped
             ("a", "w x y z"),  # target too long: dropped
             ("a b c d", "w x y z"),  # both too long: dropped once
             ("a", "x y")]
    src, tgt, dropped = translation.encode_pairs(pairs, WordTokenizer(), max_len=4)
    assert dropped == 3
    assert (src, tgt) == framed([[11, 11, 11], [11]], [[11, 11, 11], [11, 11]])


def test_encode_pairs_boundary_with_trained_tokenizer(joint_tokenizer):
    source, target = "the king went to the city.", "le roi alla à la ville."
    n = max(len(joint_tokenizer.encode(source)), len(joint_tokenizer.encode(target)))
    _, _, dropped = translation.encode_pairs([(source, target)], joint_tokenizer, max_len=n + 1)
    assert dropped == 0
    _, _, dropped = translation.encode_pairs([(source, target)], joint_tokenizer, max_len=n)
    assert dropped == 1


def _unpack(rows):
    """The (source ids, target ids) of every segment of every row, checking each one."""
    pairs = []
    for r in range(len(rows["inputs"])):
        src_seg, tgt_seg = rows["input_segment_ids"][r], rows["target_segment_ids"][r]
        assert src_seg.max() == tgt_seg.max()  # the same pairs on both sides
        for segment in range(1, src_seg.max() + 1):
            on_src, on_tgt = src_seg == segment, tgt_seg == segment
            src = rows["inputs"][r][on_src].tolist()
            target = rows["targets"][r][on_tgt].tolist()
            decoder_inputs = rows["decoder_inputs"][r][on_tgt].tolist()
            assert src[-1] == tok.EOS_ID and target[-1] == tok.EOS_ID
            assert decoder_inputs == [tok.BOS_ID] + target[:-1]  # shifted right, within the pair
            assert rows["input_positions"][r][on_src].tolist() == list(range(len(src)))
            assert rows["target_positions"][r][on_tgt].tolist() == list(range(len(target)))
            pairs.append((src[:-1], target[:-1]))
        # Padding is all zeros, and weights are 1 exactly on real target tokens.
        for name, segments in [("inputs", src_seg), ("input_positions", src_seg),
                               ("decoder_inputs", tgt_seg), ("targets", tgt_seg),
                               ("target_positions", tgt_seg)]:
            assert not rows[name][r][segments == 0].any()
        np.testing.assert_array_equal(rows["weights"][r], (tgt_seg > 0).astype(np.float32))
    return pairs


def _random_ids(n, max_len, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, size=(n, 2))  # 1 .. max_len - 1 tokens per side
    return ([rng.integers(7, 50, size=a).tolist() for a, _ in lengths],
            [rng.integers(7, 50, size=b).tolist() for _, b in lengths])


def test_make_rows_packing_invariants():
    src_ids, tgt_ids = _random_ids(300, max_len=16)
    rows = translation.make_rows(*framed(src_ids, tgt_ids), max_len=16)
    expected_dtypes = {"weights": np.float32}
    for name in ["inputs", "input_segment_ids", "input_positions", "decoder_inputs",
                 "targets", "target_segment_ids", "target_positions", "weights"]:
        assert rows[name].shape == (len(rows["inputs"]), 16)
        assert rows[name].dtype == expected_dtypes.get(name, np.int32)
    # Every pair exactly once, in order, and packing actually shared rows.
    assert _unpack(rows) == list(zip(src_ids, tgt_ids))
    assert len(rows["inputs"]) < 300
    assert rows["weights"].sum() == sum(len(t) + 1 for t in tgt_ids)


def test_make_rows_hand_packed_layout():
    # max_len 6; with EOS / BOS the pairs take (source, target) columns (3, 2), (2, 3), (4, 3),
    # (5, 6). Row 0 holds pairs 0 and 1 (5, 5); pair 2 would need (9, 8). Row 1 holds pair 2;
    # pair 3 would need (9, 9). Row 2 holds pair 3 alone.
    src_ids = [[10, 11], [12], [13, 14, 15], [16, 17, 18, 19]]
    tgt_ids = [[20], [21, 22], [23, 24], [25, 26, 27, 28, 29]]
    rows = translation.make_rows(*framed(src_ids, tgt_ids), max_len=6)
    assert rows["inputs"].tolist() == [[10, 11, 3, 12, 3, 0], [13, 14, 15, 3, 0, 0],
                                       [16, 17, 18, 19, 3, 0]]
    assert rows["input_segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 0]
    assert rows["input_positions"][0].tolist() == [0, 1, 2, 0, 1, 0]
    assert rows["decoder_inputs"][0].tolist() == [2, 20, 2, 21, 22, 0]
    assert rows["targets"][0].tolist() == [20, 3, 21, 22, 3, 0]
    assert rows["target_segment_ids"][0].tolist() == [1, 1, 2, 2, 2, 0]
    assert rows["target_positions"][0].tolist() == [0, 1, 0, 1, 2, 0]
    assert rows["weights"][0].tolist() == [1, 1, 1, 1, 1, 0]
    assert rows["targets"][2].tolist() == [25, 26, 27, 28, 29, 3]  # a full row, no padding


def test_make_rows_one_pair_per_row():
    src_ids, tgt_ids = _random_ids(50, max_len=8, seed=1)
    rows = translation.make_rows(*framed(src_ids, tgt_ids), max_len=8, pack=False)
    assert len(rows["inputs"]) == 50
    assert rows["input_segment_ids"].max() == 1 and rows["target_segment_ids"].max() == 1
    assert _unpack(rows) == list(zip(src_ids, tgt_ids))


def test_make_rows_errors():
    with pytest.raises(DataError, match="no sentence pairs"):
        translation.make_rows([], [], max_len=8)
    with pytest.raises(DataError, match=r"pair 1 has 4 source .*encode_pairs"):
        translation.make_rows(*framed([[7], [7, 8, 9, 10]], [[7], [7]]), max_len=4)


def test_tokenized_pairs_round_trip(joint_tokenizer):
    pairs = [("the king went to the city.", "le roi alla à la ville."),
             ("light came over the land.", "la lumière était sombre."),
             ("people said the river was dark.", "les gens dirent que le fleuve était sombre.")]
    src_ids, tgt_ids, dropped = translation.encode_pairs(pairs, joint_tokenizer, max_len=32)
    assert dropped == 0
    rows = translation.make_rows(src_ids, tgt_ids, max_len=32)
    decoded = [(joint_tokenizer.decode(s), joint_tokenizer.decode(t)) for s, t in _unpack(rows)]
    assert decoded == pairs


def test_sacrebleu_score_hand_computed():
    ref = "the quick brown fox jumps over the lazy dog"  # 9 tokens
    hyp = "the quick brown fox jumps over a dog"  # 8 tokens
    assert translation.sacrebleu_score([ref], [ref]) == pytest.approx(100.0)
    # Clipped matches / totals: 1-grams 7/8 (all but "a"; one "the"), 2-grams 5/7, 3-grams
    # 4/6, 4-grams 3/5. Product 420/1680 = 1/4, geometric mean (1/4)^(1/4); c=8 < r=9 gives
    # the brevity penalty exp(1 - 9/8).
    expected = 100 * math.exp(1 - 9 / 8) * 0.25 ** 0.25  # = 62.40...
    assert translation.sacrebleu_score([hyp], [ref]) == pytest.approx(expected, abs=1e-9)
    # Over a corpus the counts add up (precisions are ratios of corpus sums): with "on on the
    # mat" for "on the mat" (3/4, 2/3, 1/2, 0/1) they are 10/12, 7/10, 5/8, 3/6, c = r = 12.
    both = translation.sacrebleu_score([hyp, "on on the mat"], [ref, "on the mat"])
    assert both == pytest.approx(100 * (35 / 192) ** 0.25, abs=1e-9)  # = 65.34...
    with pytest.raises(DataError, match="2 hypotheses but 1 references"):
        translation.sacrebleu_score(["a", "b"], ["a"])


def test_sacrebleu_score_uses_13a_tokenization():
    hypotheses = ["Naomi's husband, Elimelech, died.", "The vision of Obadiah."]
    assert translation.sacrebleu_score(hypotheses, hypotheses) == pytest.approx(100.0)
    # 13a splits the comma and final period off the words, so this tokenized reference matches.
    assert translation.sacrebleu_score(["Hello, big world."],
                                       ["Hello , big world ."]) == pytest.approx(100.0)
    # Hypotheses first: a hypothesis that is a prefix of its reference has every precision 1
    # and only the brevity penalty, exp(1 - 7/6) (swapped, the score would be (3/7)^(1/4)).
    score = translation.sacrebleu_score(["the cat sat on the mat"],
                                        ["the cat sat on the mat today"])
    assert score == pytest.approx(100 * math.exp(1 - 7 / 6))


def test_tsv_pairs_stream_from_compressed_files(tmp_path):
    import gzip
    text = "\ufeffIn the beginning\tAu commencement\r\n\n  \t x\nGod said\tDieu dit\n"
    (tmp_path / "p.tsv").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "p.tsv.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    expected = [("In the beginning", "Au commencement"), ("God said", "Dieu dit")]
    for name in ("p.tsv", "p.tsv.gz"):
        pairs = translation.iter_tsv_pairs(str(tmp_path / name))
        assert next(pairs) == expected[0]  # lazy: one line read at a time
        assert [expected[0], *pairs] == expected
    (tmp_path / "bad.tsv").write_text("a\tb\nc\td\te\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: expected source<TAB>target, found 2 tabs"):
        list(translation.iter_tsv_pairs(str(tmp_path / "bad.tsv")))
