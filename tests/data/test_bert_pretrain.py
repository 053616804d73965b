"""BERT pretraining data: sentence splitting, pairing and NSP balance, truncation, masking
statistics, whole-word masking, row invariants with a tokenizer trained here, DataErrors."""

import numpy as np
import pytest

from data import bert_pretrain as bp
from data import lm, sources
from data import tokenizer as tok
from data.errors import DataError


def test_split_sentences():
    doc = ("In the beginning, God created the heavens and the earth. The earth was formless!  "
           "Was it? He said, “Let there be light.” And there was light (it was good.) Then\n"
           "a new line. 3.5 cubits. The end.")
    assert bp.split_sentences(doc) == [
        "In the beginning, God created the heavens and the earth.", "The earth was formless!",
        "Was it?", "He said, “Let there be light.”", "And there was light (it was good.)",
        "Then", "a new line.", "3.5 cubits.", "The end."]
    assert bp.split_sentences(" \n\n ") == []


def labelled_docs(n_docs=40, seed=0, min_sentences=2, max_sentences=12, max_sentence_len=6):
    """Documents whose every token says where it comes from: 7 + 100_000 d + 100 s + k."""
    rng = np.random.default_rng(seed)
    return [[[7 + 100_000 * d + 100 * s + k for k in range(rng.integers(1, max_sentence_len + 1))]
             for s in range(rng.integers(min_sentences, max_sentences + 1))]
            for d in range(n_docs)]


def origin(tokens):
    """(doc, sentence, index) of each labelled token."""
    t = np.asarray(tokens) - 7
    return t // 100_000, t % 100_000 // 100, t % 100


def whole_sentences(tokens, docs):
    """The (doc, sentence) list that tokens spells out exactly, or None if it is not whole."""
    d, s, _ = origin(tokens)
    spans = list(dict.fromkeys(zip(d.tolist(), s.tolist())))
    rebuilt = [t for di, si in spans for t in docs[di][si]]
    return spans if rebuilt == list(tokens) else None


def test_pairs_without_truncation_cover_every_sentence_once():
    # max_len far above twice a document's length: nothing is truncated, so A and B are whole
    # sentences; IsNext B is the sentences right after A, NotNext B is another document's run.
    docs = labelled_docs()
    rng = np.random.default_rng(0)
    instances = bp.create_instances(docs, 512, rng)
    seen = []
    for a, b, is_random_next in instances:
        spans_a, spans_b = whole_sentences(a, docs), whole_sentences(b, docs)
        assert spans_a and spans_b
        doc_a = {d for d, _ in spans_a}
        assert len(doc_a) == 1 and [s for _, s in spans_a] == list(
            range(spans_a[0][1], spans_a[0][1] + len(spans_a)))
        if is_random_next:
            assert len({d for d, _ in spans_b}) == 1 and spans_b[0][0] not in doc_a
        else:
            assert spans_a + spans_b == [(spans_a[0][0], s) for s in range(
                spans_a[0][1], spans_a[0][1] + len(spans_a) + len(spans_b))]
            seen += spans_b
        seen += spans_a
    # Unused sentences of a NotNext chunk go back, so every sentence is in exactly one A or
    # IsNext B.
    assert sorted(seen) == [(d, s) for d, doc in enumerate(docs) for s in range(len(doc))]


def test_pairs_with_truncation_fit_and_keep_their_origin():
    docs = labelled_docs(n_docs=60, min_sentences=5, max_sentences=30, max_sentence_len=12)
    instances = bp.create_instances(docs, 24, np.random.default_rng(1), short_seq_prob=0.3)
    assert len(instances) > 300
    for a, b, is_random_next in instances:
        assert 1 <= len(a) and 1 <= len(b) and len(a) + len(b) <= 24 - 3
        (doc_a, sent_a, _), (doc_b, sent_b, _) = origin(a), origin(b)
        assert len(set(doc_a)) == 1 and len(set(doc_b)) == 1
        assert (doc_a[0] != doc_b[0]) == is_random_next
        if not is_random_next:
            assert sent_b.min() > sent_a.max()  # B comes after A in the document


def test_nsp_balance():
    # Long documents of short sentences: chunks almost always have two or more sentences, so
    # NotNext is a fair coin (a lone-sentence chunk is always NotNext).
    docs = labelled_docs(n_docs=300, min_sentences=100, max_sentences=200, max_sentence_len=3)
    instances = bp.create_instances(docs, 32, np.random.default_rng(2), short_seq_prob=0.0)
    not_next = np.mean([r for _, _, r in instances])
    assert len(instances) > 3000 and abs(not_next - 0.5) < 0.04, (len(instances), not_next)


def test_short_seq_prob_controls_length():
    docs = labelled_docs(n_docs=50, min_sentences=100, max_sentences=200)
    lengths = {}
    for p in (0.0, 1.0):
        instances = bp.create_instances(docs, 64, np.random.default_rng(3), short_seq_prob=p)
        lengths[p] = np.array([len(a) + len(b) for a, b, _ in instances])
    # Full-length targets fill the 61 tokens except where a document runs out.
    assert np.mean(lengths[0.0] == 61) > 0.8
    # A uniform target in [2, 61] halves the mean length.
    assert lengths[1.0].mean() < 0.7 * lengths[0.0].mean()


def test_create_instances_needs_two_documents():
    assert bp.create_instances([[[7, 8], [9]]], 32, np.random.default_rng(0)) == []
    assert bp.create_instances([[[7, 8], [9]], [[]], []], 32, np.random.default_rng(0)) == []


def reference_cuts(len_a, len_b, max_num_tokens):
    """Tokens the textbook loop removes from each side: always the longer one, B on a tie."""
    cut_a = cut_b = 0
    while (len_a - cut_a) + (len_b - cut_b) > max_num_tokens:
        if len_a - cut_a > len_b - cut_b:
            cut_a += 1
        else:
            cut_b += 1
    return cut_a, cut_b


def test_truncate_pair():
    rng = np.random.default_rng(0)
    fronts = 0
    for _ in range(500):
        len_a, len_b = (int(x) for x in rng.integers(1, 60, size=2))
        budget = int(rng.integers(2, 80))
        a, b = list(range(len_a)), list(range(100, 100 + len_b))
        bp.truncate_pair(a, b, budget, rng)
        cut_a, cut_b = reference_cuts(len_a, len_b, budget)
        assert (len(a), len(b)) == (len_a - cut_a, len_b - cut_b)
        assert len(a) + len(b) <= budget and len(a) >= 1 and len(b) >= 1
        # What is left is a contiguous slice of each side.
        assert a == list(range(a[0], a[0] + len(a))) and b == list(range(b[0], b[0] + len(b)))
        fronts += a[0] + (b[0] - 100)
    # Removals come from both ends: about half of them from the front.
    assert fronts > 0
    a, b = list(range(50)), [100, 101]
    bp.truncate_pair(a, b, 10, rng)
    assert len(a) == 8 and b == [100, 101]  # only the longer side was trimmed


FIRST_ORDINARY_ID = len(tok.SPECIAL_PIECES)  # our SentencePiece ids: 0..6 are special


def ordinary(vocab_size):
    """mask_tokens' keywords for our SentencePiece ids and a vocabulary of vocab_size."""
    return dict(mask_id=tok.MASK_ID,
                ordinary_ids=np.arange(FIRST_ORDINARY_ID, vocab_size, dtype=np.int32))


def synthetic_rows(n_rows=2000, max_len=128, vocab_size=8000, seed=0):
    """[CLS] A [SEP] B [SEP] PAD... rows of ordinary ids with their masking candidates."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(FIRST_ORDINARY_ID, vocab_size, size=(n_rows, max_len)).astype(np.int32)
    real = rng.integers(max_len // 2, max_len + 1, size=n_rows)
    first_sep = rng.integers(2, real - 2)
    columns = np.arange(max_len)
    ids[:, 0] = tok.CLS_ID
    ids[np.arange(n_rows), first_sep] = tok.SEP_ID
    ids[np.arange(n_rows), real - 1] = tok.SEP_ID
    ids[columns[None, :] >= real[:, None]] = tok.PAD_ID
    candidates = (ids != tok.CLS_ID) & (ids != tok.SEP_ID) & (ids != tok.PAD_ID)
    return ids, candidates


def test_masking_statistics():
    vocab_size, max_predictions = 8000, 20
    ids, candidates = synthetic_rows(vocab_size=vocab_size)
    rng = np.random.default_rng(1)
    kinds = np.zeros(3)  # [MASK], random, unchanged
    chosen_total = 0
    for row, cand in zip(ids, candidates):
        masked, positions, originals = bp.mask_tokens(
            row, cand, rng, **ordinary(vocab_size), max_predictions=max_predictions)
        n_cand = cand.sum()
        assert len(positions) == min(max_predictions, max(1, round(0.15 * n_cand)))
        assert (np.diff(positions) > 0).all() and cand[positions].all()
        np.testing.assert_array_equal(originals, row[positions])
        untouched = np.ones(len(row), bool)
        untouched[positions] = False
        np.testing.assert_array_equal(masked[untouched], row[untouched])
        new = masked[positions]
        is_mask = new == tok.MASK_ID
        is_random = ~is_mask & (new != originals)
        assert ((new[is_random] >= FIRST_ORDINARY_ID) & (new[is_random] < vocab_size)).all()
        kinds += [is_mask.sum(), is_random.sum(), (new == originals).sum()]
        chosen_total += len(positions)
    assert abs(chosen_total / candidates.sum() - 0.15) < 0.005
    np.testing.assert_allclose(kinds / chosen_total, [0.8, 0.1, 0.1], atol=0.01)


def test_random_replacements_are_uniform_ordinary_ids():
    # A tiny vocabulary makes a draw of a special id (0..6) or a skew across ids easy to see.
    vocab_size = 20
    ids, candidates = synthetic_rows(n_rows=1000, vocab_size=vocab_size)
    rng = np.random.default_rng(4)
    replaced = []
    for row, cand in zip(ids, candidates):
        masked, positions, originals = bp.mask_tokens(row, cand, rng, **ordinary(vocab_size),
                                                      max_predictions=20)
        new = masked[positions]
        replaced += new[(new != tok.MASK_ID) & (new != originals)].tolist()
    counts = np.bincount(replaced, minlength=vocab_size)
    assert not counts[:FIRST_ORDINARY_ID].any()
    # ~1,600 replacements over 13 ids (minus the 1/13 that hit the original id).
    drawn = counts[FIRST_ORDINARY_ID:]
    assert drawn.min() > 0.7 * drawn.mean() and drawn.max() < 1.3 * drawn.mean()


def test_masking_caps_at_max_predictions():
    ids, candidates = synthetic_rows(n_rows=50)
    rng = np.random.default_rng(2)
    for row, cand in zip(ids, candidates):
        _, positions, _ = bp.mask_tokens(row, cand, rng, **ordinary(8000), max_predictions=3)
        assert len(positions) == 3
    # A row with few candidates still gets one prediction.
    row = np.array([tok.CLS_ID, 9, tok.SEP_ID, 10, tok.SEP_ID, 0, 0], np.int32)
    _, positions, _ = bp.mask_tokens(row, row > tok.MASK_ID, rng, **ordinary(100),
                                     max_predictions=5)
    assert len(positions) == 1 and positions[0] in (1, 3)


def words_of(candidates, word_starts):
    """Lists of positions of each word: a start piece and the candidates that continue it."""
    words = []
    for i in np.flatnonzero(candidates):
        if word_starts[i] or not words or words[-1][-1] != i - 1:
            words.append([i])
        else:
            words[-1].append(i)
    return words


def test_whole_word_masking_masks_whole_words():
    ids, candidates = synthetic_rows(n_rows=300)
    rng = np.random.default_rng(3)
    partial_budget = 0
    for row, cand in zip(ids, candidates):
        word_starts = rng.random(len(row)) < 0.4  # words of 2.5 pieces on average
        _, positions, _ = bp.mask_tokens(row, cand, rng, **ordinary(8000), max_predictions=20,
                                         word_starts=word_starts)
        budget = min(20, max(1, round(0.15 * cand.sum())))
        chosen = set(positions.tolist())
        assert 0 < len(chosen) <= budget
        for word in words_of(cand, word_starts):
            assert chosen.isdisjoint(word) or chosen.issuperset(word), word
        partial_budget += len(chosen) < budget
    # A word that does not fit is skipped and the next ones tried, so rows fill their budget.
    assert partial_budget < 30
    # A word longer than the whole budget is never cut: 20 candidates, budget 3, 4-piece words.
    row = np.arange(7, 29, dtype=np.int32)
    cand = np.ones(22, bool)
    cand[[0, 21]] = False
    _, positions, _ = bp.mask_tokens(row, cand, rng, **ordinary(100), max_predictions=10,
                                     word_starts=np.arange(22) % 4 == 1)
    assert len(positions) == 0


@pytest.fixture(scope="module")
def docs(corpus_file):
    return sources.read_documents(str(corpus_file))


@pytest.fixture(scope="module")
def trained(docs, tmp_path_factory):
    path = tmp_path_factory.mktemp("bert_tok") / "tokenizer.model"
    return tok.train_tokenizer(docs, str(path), vocab_size=400, model_type="bpe")


def unmasked(rows):
    """The inputs with the original ids put back at the predicted positions."""
    inputs = rows["inputs"].copy()
    r, k = np.nonzero(rows["mlm_weights"])
    inputs[r, rows["mlm_positions"][r, k]] = rows["mlm_targets"][r, k]
    return inputs


def as_text(ids):
    """Ids as ',7,8,9,' so that a contiguous run of ids is a substring."""
    return "," + ",".join(map(str, ids)) + ","


def test_rows_invariants(docs, trained):
    max_len, max_predictions = 48, 8
    rows = bp.build_pretraining_rows(docs, trained, max_len=max_len,
                                     max_predictions=max_predictions, seed=0)
    n = len(rows["inputs"])
    shapes = {"inputs": ((n, max_len), np.int32), "token_types": ((n, max_len), np.int32),
              "segment_ids": ((n, max_len), np.int32),
              "mlm_positions": ((n, max_predictions), np.int32),
              "mlm_targets": ((n, max_predictions), np.int32),
              "mlm_weights": ((n, max_predictions), np.float32),
              "nsp_labels": ((n,), np.int32), "example_weights": ((n,), np.float32)}
    assert {k: (v.shape, v.dtype) for k, v in rows.items()} == shapes
    assert n > 100 and 0.35 < rows["nsp_labels"].mean() < 0.75
    assert (rows["example_weights"] == 1).all()

    # Every A and B, with the masked ids restored, is a contiguous run of one document's ids.
    streams = [as_text([t for s in bp.split_sentences(d) for t in trained.encode(s)])
               for d in docs]
    original = unmasked(rows)
    for r in range(n):
        ids = original[r]
        assert ids[0] == tok.CLS_ID
        seps = np.flatnonzero(ids == tok.SEP_ID)
        assert len(seps) == 2 and (ids[seps[1] + 1:] == tok.PAD_ID).all()
        first, second = seps
        np.testing.assert_array_equal(rows["token_types"][r],
                                      (np.arange(max_len) > first) & (np.arange(max_len) <= second))
        np.testing.assert_array_equal(rows["segment_ids"][r], np.arange(max_len) <= second)
        a, b = as_text(ids[1:first]), as_text(ids[first + 1:second])
        assert len(a) > 2 and len(b) > 2
        in_a = [i for i, s in enumerate(streams) if a in s]
        in_b = [i for i, s in enumerate(streams) if b in s]
        assert in_a and in_b
        if not rows["nsp_labels"][r]:
            assert set(in_a) & set(in_b)  # IsNext: same document

        k = int(rows["mlm_weights"][r].sum())
        np.testing.assert_array_equal(rows["mlm_weights"][r], np.arange(max_predictions) < k)
        positions = rows["mlm_positions"][r]
        assert 1 <= k and (np.diff(positions[:k]) > 0).all() and not positions[k:].any()
        assert not rows["mlm_targets"][r, k:].any()
        assert set(positions[:k]).isdisjoint({0, first, second}) and positions[k - 1] < second
        n_cand = second - 2
        assert k == min(max_predictions, max(1, round(0.15 * n_cand)))


def test_rows_deterministic_per_seed_and_dupe_factor(docs, trained):
    def build(seed, dupe_factor=1):
        return bp.build_pretraining_rows(docs, trained, max_len=32, max_predictions=5,
                                         seed=seed, dupe_factor=dupe_factor)

    first, again, other = build(0), build(0), build(1)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["mlm_positions"][:50], other["mlm_positions"][:50])
    twice = build(0, dupe_factor=2)
    n = len(first["inputs"])
    assert 1.6 * n < len(twice["inputs"]) < 2.4 * n
    # The second pass pairs and masks the same text anew.
    assert not np.array_equal(twice["inputs"][:n], twice["inputs"][n:2 * n])


def test_whole_word_rows_mask_whole_words(docs, trained):
    rows = bp.build_pretraining_rows(docs, trained, max_len=48, max_predictions=8, seed=0,
                                     whole_word=True)
    starts = np.array([trained.id_to_piece(i).startswith("▁")
                       for i in range(trained.vocab_size)])
    original = unmasked(rows)
    continued = 0
    for r, ids in enumerate(original):
        chosen = set(rows["mlm_positions"][r][rows["mlm_weights"][r] > 0].tolist())
        candidates = (rows["segment_ids"][r] == 1) & (ids != tok.CLS_ID) & (ids != tok.SEP_ID)
        for word in words_of(candidates, starts[ids]):
            assert chosen.isdisjoint(word) or chosen.issuperset(word), (r, word)
            continued += len(word) > 1 and chosen.issuperset(word)
    assert continued > 0  # multi-piece words do get chosen


def test_padding_rows_have_zero_weights(docs, trained):
    rows = bp.build_pretraining_rows(docs, trained, max_len=32, max_predictions=5, seed=0)
    n = len(rows["inputs"])
    batches = list(lm.make_iterator(rows, 64, seed=0, shuffle=False, repeat=False))
    padding = np.concatenate([b["example_weights"] for b in batches]) == 0
    assert padding.sum() == -n % 64 > 0
    last = batches[-1]
    pad_rows = last["example_weights"] == 0
    assert not last["mlm_weights"][pad_rows].any() and not last["segment_ids"][pad_rows].any()


def test_data_errors(docs, trained):
    def build(docs, **overrides):
        settings = dict(max_len=32, max_predictions=5, seed=0) | overrides
        return bp.build_pretraining_rows(docs, trained, **settings)

    with pytest.raises(DataError, match="max_len 7 is too short .* at least 8"):
        build(docs, max_len=7)
    with pytest.raises(DataError, match="max_predictions 0 .* at least 1"):
        build(docs, max_predictions=0)
    with pytest.raises(DataError, match="has 0 document.* needs at least two"):
        build([])
    with pytest.raises(DataError, match="has 0 document"):
        build(["  \n ", ""])
    with pytest.raises(DataError, match="has 1 document.* add documents"):
        build([docs[0]])
