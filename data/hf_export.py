"""Our SentencePiece models written as Hugging Face tokenizers (`tokenizer_io.export_hf`).

The model is rebuilt with the `tokenizers` library: the same pieces at the same ids, BPE merges
derived from the pieces (or the unigram scores as they are), SentencePiece's dummy "▁" prefix
and byte fallback, so that transformers' AutoTokenizer gives our ids. Where it cannot (the
library's added tokens and Metaspace differ from SentencePiece in three corners) is listed at
`_sentencepiece_backend`. The "transformer" family is written as Marian's files instead.
"""
import json
import os

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from data import tokenizer as tok
from data.errors import DataError
from data.hf_tokenizer import MARIAN_FILES

FAMILIES = ("gpt", "bert", "transformer")


def export_sentencepiece(model_proto: bytes, special: dict[str, int], directory: str,
                         model_family: str) -> None:
    """Writes one of our SentencePiece models (`special`: its {name: id}, names as in
    tokenizer.SPECIAL_NAMES) into directory as a Hugging Face tokenizer:
    tokenizer.json, tokenizer_config.json and special_tokens_map.json; for "transformer"
    Marian's files instead of tokenizer.json (source.spm = target.spm = the model, and
    vocab.json), which transformers' MarianTokenizer reads (tokenizer_config names it)."""
    from sentencepiece import sentencepiece_model_pb2

    if model_family not in FAMILIES:
        raise DataError(f"unknown model family {model_family!r}; use one of {FAMILIES}")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    backend = _sentencepiece_backend(proto, special["unk"])  # checks it can be exported
    names = {name: proto.pieces[i].piece for name, i in special.items()}
    os.makedirs(directory, exist_ok=True)
    if model_family == "transformer":
        # No tokenizer.json: MarianTokenizer would take its added tokens and cut the text at
        # [CLS] / [SEP] / [MASK], which SentencePiece keeps whole as user-defined symbols.
        # For the same reason they are not named (Marian has no use for them).
        names = {k: v for k, v in names.items() if k not in ("cls", "sep", "mask")}
        for name in MARIAN_FILES[:2]:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(model_proto)
        _write_json(os.path.join(directory, "vocab.json"),
                    {p.piece: i for i, p in enumerate(proto.pieces)})
        config = {"tokenizer_class": "MarianTokenizer", "separate_vocabs": False,
                  **{f"{k}_token": v for k, v in names.items()}}
    else:
        backend.post_processor = _post_processor(model_family, names, special)
        backend.save(os.path.join(directory, "tokenizer.json"))
        # As AddedToken objects, so transformers keeps them normalized=True (see _added_token).
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  **{f"{k}_token": dict(content=v, lstrip=False, rstrip=False, normalized=True,
                                        single_word=False, special=True, __type="AddedToken")
                     for k, v in names.items()}}
    config["clean_up_tokenization_spaces"] = False
    _write_json(os.path.join(directory, "tokenizer_config.json"), config)
    _write_json(os.path.join(directory, "special_tokens_map.json"),
                {f"{k}_token": v for k, v in names.items()})


def _added_token(content: str) -> AddedToken:
    # normalized=True: the text is normalized as a whole before these are cut out of it, so
    # the "\A " rule below sees the true start of the text and nothing else.
    return AddedToken(content, special=True, normalized=True)


def _sentencepiece_backend(proto, unk_id: int) -> tokenizers.Tokenizer:
    """A `tokenizers` Tokenizer that encodes like the SentencePiece model `proto`.

    Our models (train_tokenizer): identity normalization, spaces kept, a dummy "▁" before
    the text, words split at "▁", byte fallback. Metaspace(prepend_scheme="first") adds that
    "▁" only when the text does not already start with a space, so a leading space is first
    doubled ("\\A " -> "▁ "), which gives SentencePiece's "▁" + one "▁" per space.
    Not the same as SentencePiece, where transformers / tokenizers cannot follow it:
      - "<pad>", "<unk>", "<s>", "</s>" written in the text: SentencePiece never matches
        control symbols in text (they are plain characters); transformers always cuts its
        special tokens out of the text, so they become the special id;
      - text that starts with [CLS], [SEP] or [MASK]: SentencePiece puts its dummy "▁" in
        front of the symbol (one more id); Metaspace only prefixes text that starts with
        ordinary characters;
      - unigram models only: a byte piece spelled out in the text ("<0x41>") can be matched
        by the library's Viterbi search, which SentencePiece keeps for byte fallback only.
    """
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    if (spec.name != "identity" or spec.remove_extra_whitespaces or not spec.add_dummy_prefix
            or trainer.treat_whitespace_as_suffix or not trainer.byte_fallback):
        raise DataError("this SentencePiece model was not trained with this codebase's settings "
                        "(identity normalization, spaces kept, byte fallback), so it cannot be "
                        "exported; retrain it with data.tokenizer.train_tokenizer")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    kinds = proto.SentencePiece.Type
    if trainer.model_type == trainer.ModelType.BPE:
        model = models.BPE(vocab={p: i for i, (p, _, _) in enumerate(pieces)},
                           merges=_bpe_merges(pieces, kinds.NORMAL), unk_token=pieces[unk_id][0],
                           byte_fallback=True)
    elif trainer.model_type == trainer.ModelType.UNIGRAM:
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=unk_id, byte_fallback=True)
    else:
        raise DataError(f"SentencePiece model type {trainer.model_type} cannot be exported; "
                        f"use one of {tok.MODEL_TYPES}")
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.Replace(Regex(r"\A "), "▁ ")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                     split=True)
    # "▁" -> " ", <0xNN> pieces -> bytes -> UTF-8, then the dummy prefix's space dropped.
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    # <pad> <unk> <s> </s> and the user-defined [CLS] [SEP] [MASK].
    backend.add_special_tokens([_added_token(p) for p, _, kind in pieces
                                if kind in (kinds.CONTROL, kinds.UNKNOWN, kinds.USER_DEFINED)])
    return backend


def _bpe_merges(pieces, normal) -> list[tuple[str, str]]:
    """BPE merges that rebuild SentencePiece's BPE: every split of a piece into two pieces."""
    # SentencePiece's BPE repeatedly joins the adjacent pair whose joined piece scores best
    # (its pieces are scored -rank, in merge order), so each split of piece p into two vocab
    # pieces is a merge ranked by p's score; splits of one piece follow each other.
    ids = {p: i for i, (p, _, t) in enumerate(pieces) if t == normal}
    merges = []
    for piece, score, kind in pieces:
        if kind != normal:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                merges.append((-score, ids[piece], k, left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _post_processor(model_family, names, special):
    """What add_special_tokens=True adds, as our pipelines do."""
    bos, cls, sep = names["bos"], names["cls"], names["sep"]
    ids = {bos: special["bos"], cls: special["cls"], sep: special["sep"]}
    single, pair = {
        "gpt": (f"{bos} $A", f"{bos} $A $B:1"),  # a prompt: experiments/sample.py
        "bert": (f"{cls} $A {sep}", f"{cls} $A {sep} $B:1 {sep}:1"),  # data/finetune.py
    }[model_family]
    used = [(t, i) for t, i in ids.items() if t in single or t in pair]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=used)


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=2)
        f.write("\n")
