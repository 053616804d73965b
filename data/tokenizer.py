"""SentencePiece tokenizers (Kudo & Richardson 2018): train on the run's corpus, load, use.

The special ids are fixed here, once, for every model family. [CLS], [SEP] and [MASK] are
reserved for BERT (Devlin et al. 2018, section 3) as user-defined symbols, so every tokenizer has
them at the same ids whether or not the run uses them.
"""

import bisect
import io
import os
import pathlib
import tempfile
from typing import Iterable, Iterator

import sentencepiece as spm

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

# SentencePiece silently skips training sentences longer than max_sentence_length (4192 bytes by
# default), which would drop whole documents such as a Bible chapter stored as one line.
_MAX_PIECE_CHARS = 1000
# Enough sentences for a good vocabulary; bigger corpora are sampled so training stays ~minutes.
_MAX_TRAINING_SENTENCES = 2_000_000


class Tokenizer:
    """A trained SentencePiece model with the project's special ids."""

    def __init__(self, path: str, model_proto: bytes):
        self.path = str(path)
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

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special and byte pieces included."""
        return self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without BOS or EOS."""
        return self._sp.encode(text, out_type=int)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int], list[int]]:
        """(ids, char_starts, char_ends): piece i covers text[char_starts[i]:char_ends[i]]."""
        # sentencepiece reports UTF-8 *byte* offsets; span-QA needs str indices. starts[c] is
        # the byte offset where character c begins, with the total byte length appended, so a
        # byte offset b on a character boundary is character bisect_left(starts, b).
        starts = [0]
        for char in text:
            starts.append(starts[-1] + len(char.encode("utf-8")))
        ids, char_starts, char_ends = [], [], []
        for piece in self._sp.encode(text, out_type="proto").pieces:
            if self._sp.is_byte(piece.id):
                # A character outside the vocabulary becomes one piece per UTF-8 byte. The
                # leading bytes get an empty span at the character's first byte and the last
                # byte the whole character; all of them get the character, so an answer that
                # contains the character covers every one of its byte pieces.
                begin = bisect.bisect_right(starts, piece.begin) - 1
                end = begin + 1
            else:
                begin = bisect.bisect_left(starts, piece.begin)
                end = bisect.bisect_left(starts, piece.end)
                # The "▁" of a word-initial piece stands for the space before the word; the span
                # starts at the word so an answer span never starts with a space. A lone "▁"
                # (before a word with no "▁"-piece for its start, or the dummy prefix at the
                # very start, which covers no input at all) is left with an empty span.
                while begin < end and text[begin] == " ":
                    begin += 1
            ids.append(piece.id)
            char_starts.append(begin)
            char_ends.append(end)
        return ids, char_starts, char_ends

    def decode(self, ids) -> str:
        """Text of ids, skipping pad, bos, eos and ids outside the vocabulary (model padding)."""
        vocab_size = self.vocab_size
        ids = [int(i) for i in ids]
        kept = [i for i in ids if 0 <= i < vocab_size and i not in (PAD_ID, BOS_ID, EOS_ID)]
        return self._sp.decode(kept)

    def id_to_piece(self, i: int) -> str:
        """The piece string of one id, e.g. '▁the' or '<0x0A>'."""
        return self._sp.id_to_piece(int(i))


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


def train_tokenizer(
    texts: Iterable[str], path: str, vocab_size: int, model_type: str = "bpe"
) -> Tokenizer:
    """Trains a tokenizer on texts, writes it to path atomically and returns it."""
    if model_type not in MODEL_TYPES:
        raise DataError(f"unknown tokenizer model_type {model_type!r}; use one of {MODEL_TYPES}")
    sentences = list(_training_sentences(texts))
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
            input_sentence_size=_MAX_TRAINING_SENTENCES,
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
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed, so a crash never leaves a half-written model.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return Tokenizer(str(target), model.getvalue())


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
