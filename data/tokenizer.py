"""SentencePiece tokenizers (Kudo & Richardson 2018): train on the run's corpus, load, use.

Every tokenizer object, this module's SentencePiece `Tokenizer` and the Hugging Face folders of
data/hf_tokenizer.py, carries its own special ids (`BaseTokenizer` lists what the pipelines may
use), because a published vocabulary puts them anywhere: GPT-2 has only <|endoftext|> (50256),
BERT's WordPiece has [PAD]=0 and [CLS]=101, Marian has </s>=0 and <pad> last. The constants
below are only the ids *our* SentencePiece training assigns: [CLS], [SEP] and [MASK] are
reserved for BERT (Devlin et al. 2018, section 3) as user-defined symbols, so every tokenizer
trained here has them at the same ids whether or not the run uses them.
"""

import bisect
import io
import os
import pathlib
import random
import time
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from data import sources
from data.errors import DataError

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
CLS_ID = 4
SEP_ID = 5
MASK_ID = 6
BERT_SYMBOLS = ("[CLS]", "[SEP]", "[MASK]")  # take ids 4, 5, 6 in this order
SPECIAL_PIECES = ("<pad>", "<unk>", "<s>", "</s>", *BERT_SYMBOLS)  # ids 0..6

MODEL_TYPES = ("bpe", "unigram")
MODEL_FILE = "tokenizer.model"  # a run folder's SentencePiece tokenizer ...
HF_DIR = "hf_tokenizer"  # ... or the files of a Hugging Face tokenizer, in this subfolder
SPECIAL_NAMES = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")  # attributes <name>_id

# SentencePiece silently skips training sentences longer than max_sentence_length (4192 bytes by
# default), which would drop whole documents such as a Bible chapter stored as one line.
_MAX_PIECE_CHARS = 1000
# Enough sentences for a good vocabulary; bigger corpora are sampled so training stays ~minutes.
_MAX_TRAINING_SENTENCES = 2_000_000


class BaseTokenizer:
    """What the pipelines may use of a tokenizer; subclasses define the first group.

      vocab_size; encode(text) -> ids, no special tokens added; encode_with_offsets(text) ->
      (ids, char_starts, char_ends), str offsets, a span never starting with a space;
      decode(ids) -> text, skipping special ids and ids >= vocab_size (model vocabulary
      padding); id_to_piece(i); is_word_start(i): the piece begins a word (whole-word
      masking); save(directory): the files to load it again (data/tokenizer_io.py
      load_run_tokenizer reads them); a Hugging Face folder's tokenizers also have
      export_hf(directory, model_family), their own files copied (tokenizer_io.export_hf
      writes any tokenizer, ours rebuilt by data/hf_export.py).
      pad_id, unk_id, bos_id, eos_id, cls_id, sep_id, mask_id: an id, or None when the
      vocabulary has no such token.
    Defined here: encode_target, special_ids, ordinary_ids.
    """

    path = ""
    pad_id = unk_id = bos_id = eos_id = cls_id = sep_id = mask_id = None
    _added_special_ids = frozenset()  # special tokens beyond the seven named ones

    def encode_target(self, text: str) -> list[int]:
        """Ids of a translation target; only Marian has a separate target-side model."""
        return self.encode(text)

    @property
    def special_ids(self) -> frozenset[int]:
        """The named special ids that exist, plus any other special (added) tokens."""
        named = (getattr(self, f"{name}_id") for name in SPECIAL_NAMES)
        return frozenset(i for i in named if i is not None) | self._added_special_ids

    def ordinary_ids(self) -> np.ndarray:
        """int32 ids that are not special: BERT's random replacements are drawn from these."""
        ids = np.arange(self.vocab_size, dtype=np.int32)
        return ids[~np.isin(ids, list(self.special_ids))]

    def _kept(self, ids) -> list[int]:
        """ids without special ones and without ids outside the vocabulary, as ints."""
        special, vocab_size = self.special_ids, self.vocab_size
        return [i for i in map(int, ids) if 0 <= i < vocab_size and i not in special]


def required_ids(tokenizer, *names: str, purpose: str) -> tuple[int, ...]:
    """tokenizer.<name>_id for each name; a DataError when the vocabulary lacks one."""
    ids = tuple(getattr(tokenizer, f"{name}_id", None) for name in names)
    missing = [name for name, i in zip(names, ids) if i is None]
    if missing:
        raise DataError(
            f"the tokenizer in {getattr(tokenizer, 'path', '?')} has no {'/'.join(missing)} "
            f"token, which {purpose} needs; use a vocabulary that has one (a Hugging Face "
            f"folder names it in tokenizer_config.json, e.g. \"{missing[0]}_token\")"
        )
    return ids


def bos_prefix(tokenizer) -> list[int]:
    """[bos_id], or [] for a vocabulary without BOS (Qwen's): what starts a document, a
    prompt or a rendered conversation."""
    bos = getattr(tokenizer, "bos_id", None)
    return [] if bos is None else [bos]


def sentencepiece_spans(sp, text: str) -> list[tuple[str, int, int, int]]:
    """(piece, id, char_start, char_end) of each piece of sp.encode(text), spans as in
    BaseTokenizer.encode_with_offsets."""
    # sentencepiece reports UTF-8 *byte* offsets; span-QA needs str indices. starts[c] is
    # the byte offset where character c begins, with the total byte length appended, so a
    # byte offset b on a character boundary is character bisect_left(starts, b).
    starts = [0]
    for char in text:
        starts.append(starts[-1] + len(char.encode("utf-8")))
    spans = []
    for piece in sp.encode(text, out_type="proto").pieces:
        if sp.is_byte(piece.id):
            # A character outside the vocabulary becomes one piece per UTF-8 byte. Each of them
            # gets the whole character, so an answer that contains the character covers every
            # one of its byte pieces.
            begin = bisect.bisect_right(starts, piece.begin) - 1
            end = begin + 1
        else:
            begin = bisect.bisect_left(starts, piece.begin)
            end = bisect.bisect_left(starts, piece.end)
            # The "▁" of a word-initial piece stands for the space before the word (or, with
            # Marian's nmt_nfkc normalization, a tab or line break); the span starts at the
            # word so an answer span never starts with a space. A lone "▁" (before a word
            # with no "▁"-piece for its start, or the dummy prefix at the very start, which
            # covers no input at all) is left with an empty span.
            if piece.piece.startswith("▁"):
                while begin < end and text[begin].isspace():
                    begin += 1
        spans.append((piece.piece, piece.id, begin, end))
    return spans


class Tokenizer(BaseTokenizer):
    """A SentencePiece model trained by this codebase, with the ids of the constants above."""

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
    cls_id, sep_id, mask_id = CLS_ID, SEP_ID, MASK_ID

    def __init__(self, path: str, model_proto: bytes):
        self.path = str(path)
        self._proto = model_proto
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError:
            raise DataError(
                f"{self.path} is not a SentencePiece model (corrupt or another file); delete it "
                "so the run trains a new tokenizer"
            ) from None
        # Guards against a model trained elsewhere with other special ids.
        specials = [self._sp.id_to_piece(i) for i in range(min(7, self._sp.vocab_size()))]
        if specials != list(SPECIAL_PIECES):
            raise DataError(
                f"{self.path} was not trained by this codebase (its first pieces are {specials}, "
                f"expected {list(SPECIAL_PIECES)}); delete it so the run trains a new tokenizer"
            )
        # Control pieces beyond pad / bos / eos (the chat tokens of data/chat.py, appended by
        # with_special_tokens) are special too: text never produces them, decode skips them.
        self._added_special_ids = frozenset(
            i for i in range(self._sp.vocab_size()) if self._sp.is_control(i))

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special and byte pieces included."""
        return self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without BOS or EOS."""
        return self._sp.encode(text, out_type=int)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int], list[int]]:
        """(ids, char_starts, char_ends): piece i covers text[char_starts[i]:char_ends[i]]."""
        spans = sentencepiece_spans(self._sp, text)
        return [s[1] for s in spans], [s[2] for s in spans], [s[3] for s in spans]

    def decode(self, ids) -> str:
        """Text of ids, skipping special ids and ids outside the vocabulary (model padding)."""
        return self._sp.decode(self._kept(ids))

    def id_to_piece(self, i: int) -> str:
        """The piece string of one id, e.g. '▁the' or '<0x0A>'."""
        return self._sp.id_to_piece(int(i))

    def is_word_start(self, i: int) -> bool:
        """Whether the piece begins a word: "▁" marks the space before it."""
        return self._sp.id_to_piece(int(i)).startswith("▁")

    def save(self, directory: str) -> None:
        """Writes directory/tokenizer.model (atomically)."""
        sources.write_atomic(os.path.join(directory, MODEL_FILE), self._proto)

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (data/hf_export.py rebuilds it for transformers)."""
        return self._proto

    def with_special_tokens(self, tokens, directory: str) -> "Tokenizer":
        """This model with `tokens` appended as control pieces (ids vocab_size, vocab_size + 1,
        ...; one already there becomes a control piece in place), written to
        directory/tokenizer.model (atomically) and returned. SentencePiece never produces a
        control piece from text, so encode("<|user|>") cannot give its id."""
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        control = model_pb2.ModelProto.SentencePiece.CONTROL
        model = model_pb2.ModelProto()
        model.ParseFromString(self._proto)
        existing = {piece.piece: piece for piece in model.pieces}
        for token in tokens:
            if token in existing:
                existing[token].type = control
            else:
                model.pieces.add(piece=token, score=0.0, type=control)
        proto = model.SerializeToString()
        path = os.path.join(directory, MODEL_FILE)
        sources.write_atomic(path, proto)
        return Tokenizer(path, proto)


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """Lines of texts, long lines cut at spaces into pieces of about _MAX_PIECE_CHARS."""
    # Cutting at whitespace loses nothing: pieces never span a space (split_by_whitespace).
    for text in texts:
        for line in text.splitlines():
            words, length = [], 0
            for word in line.split():
                if length + len(word) > _MAX_PIECE_CHARS and words:
                    yield " ".join(words)
                    words, length = [], 0
                words.append(word)
                length += len(word) + 1
            if words:
                yield " ".join(words)


def sample_sentences(texts: Iterable[str], max_sentences: int, seed: int) -> tuple[list, int]:
    """(sentences, how many there were): all of them in order, or when there are more than
    max_sentences a uniform sample of that many (reservoir sampling, seeded), in corpus order,
    so a corpus of any size is read streaming with bounded memory."""
    if max_sentences < 1:
        raise DataError(f"tokenizer_max_sentences must be >= 1, got {max_sentences}")
    rng = random.Random(seed)  # a scalar draw per line: far cheaper than numpy's
    kept, seen = [], 0
    for sentence in _training_sentences(texts):
        if seen < max_sentences:
            kept.append((seen, sentence))
        else:
            j = rng.randrange(seen + 1)
            if j < max_sentences:
                kept[j] = (seen, sentence)
        seen += 1
    return [s for _, s in sorted(kept)], seen


def train_tokenizer(
    texts: Iterable[str], path: str, vocab_size: int, model_type: str = "bpe", *,
    max_sentences: int = _MAX_TRAINING_SENTENCES, seed: int = 0,
) -> Tokenizer:
    """Trains a tokenizer on texts (a seeded sample of max_sentences lines of a larger
    corpus), writes it to path atomically and returns it."""
    if model_type not in MODEL_TYPES:
        raise DataError(f"unknown tokenizer model_type {model_type!r}; use one of {MODEL_TYPES}")
    start = time.perf_counter()
    sentences, total = sample_sentences(texts, max_sentences, seed)
    if not sentences:
        raise DataError("cannot train a tokenizer on an empty corpus; check the data source")
    # Sampling of large corpora is random; a fixed seed makes the same corpus give the same model.
    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            # Unknown characters become UTF-8 byte pieces instead of <unk>, so decode is lossless.
            byte_fallback=True,
            # A small corpus may not support vocab_size pieces; take fewer instead of failing.
            hard_vocab_limit=False,
            character_coverage=0.9995,
            # No NFKC and no whitespace folding: decode(encode(text)) == text exactly, so samples
            # keep their line breaks and span-QA character offsets map straight back to the text.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=list(BERT_SYMBOLS),
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(
            f"sentencepiece could not train a {model_type} tokenizer with vocab_size={vocab_size}: "
            f"{e}; byte fallback alone needs 256 + 7 special ids + the corpus's characters, so "
            "raise --config.data.vocab_size"
        ) from e
    sources.write_atomic(path, model.getvalue())
    if total > len(sentences) or total > 100_000:  # a sample, or minutes of training: say so
        sample = (f"{len(sentences):,} of {total:,} lines (seed {seed})"
                  if total > len(sentences) else f"{total:,} lines")
        print(f"tokenizer: trained {model_type} on {sample} in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    return Tokenizer(str(path), model.getvalue())


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a tokenizer written by train_tokenizer."""
    try:
        model_proto = pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"tokenizer file {path} does not exist; train the run first (it writes "
            "tokenizer.model into the workdir) or point to the workdir that has it"
        ) from None
    return Tokenizer(str(path), model_proto)
