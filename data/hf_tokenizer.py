"""Hugging Face tokenizer folders, read with the `tokenizers` library (data/hf_export.py
writes our SentencePiece models as one).

A folder holds one of: tokenizer.json (any fast tokenizer: GPT-2's byte-level BPE, BERT's
WordPiece, ...); BERT's vocab.txt alone (a WordPiece tokenizer is built from it with the
library); or Marian's source.spm + target.spm + vocab.json (SentencePiece cuts the text into
pieces, vocab.json numbers them). The special tokens are named in tokenizer_config.json /
special_tokens_map.json, else they are the model class's defaults (BERT's [CLS] ...), else the
ids of config.json; an encoder-decoder's config.json decoder_start_token_id is its bos_id,
because the translation pipeline starts the decoder with bos_id (Marian starts with <pad>).
"""

import json
import os
import re
import shutil
import tempfile

import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers

from data import tokenizer as tok
from data.errors import DataError

MARIAN_FILES = ("source.spm", "target.spm", "vocab.json")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "config.json",
                "generation_config.json")
TEMPLATE_FILE = "chat_template.jinja"  # where newer folders keep the chat template
_LOOKED_FOR = "tokenizer.json, vocab.txt (BERT) or source.spm + target.spm + vocab.json (Marian)"

# What transformers' tokenizer classes assume when tokenizer_config.json names no token.
_BERT = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
_GPT2 = {"unk": "<|endoftext|>", "bos": "<|endoftext|>", "eos": "<|endoftext|>"}
_MARIAN = {"unk": "<unk>", "eos": "</s>", "pad": "<pad>"}
_DEFAULTS = {"BertTokenizer": _BERT, "GPT2Tokenizer": _GPT2, "MarianTokenizer": _MARIAN,
             "bert": _BERT, "gpt2": _GPT2, "marian": _MARIAN}  # by tokenizer_class, model_type


class HFTokenizer(tok.BaseTokenizer):
    """A `tokenizers` library tokenizer (tokenizer.json, or BERT's vocab.txt) and its ids."""

    def __init__(self, path: str, backend: tokenizers.Tokenizer, ids: dict, files: list[str],
                 chat_template: str | None = None, stop_ids: tuple = ()):
        self.path = path
        # The checkpoint's Jinja chat template (data/chat_template.py), None when it has none;
        # stop_ids: generation_config.json's eos_token_id(s), where generation may end.
        self.chat_template = chat_template
        self.stop_ids = stop_ids
        self._tk = backend
        self._tk.no_truncation()  # a tokenizer.json may carry BERT's 512-token truncation
        self._tk.no_padding()
        for name, i in ids.items():
            setattr(self, f"{name}_id", i)
        self._added_special_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._files = files
        self._word_start = _word_start_rule(json.loads(backend.to_str()))

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int], list[int]]:
        encoding = self._tk.encode(text, add_special_tokens=False)
        starts, ends = [], []
        # The library's offsets are already str indices into the original text (through its
        # normalizer, so BERT's "café" -> "cafe" still points at "café"), and every byte piece
        # of a character split by byte-level BPE spans that character. Only a leading space
        # is cut: byte-level BPE's "Ġword" covers " word".
        for begin, end in encoding.offsets:
            while begin < end and text[begin] == " ":
                begin += 1
            starts.append(begin)
            ends.append(end)
        return encoding.ids, starts, ends

    def decode(self, ids) -> str:
        return self._tk.decode(self._kept(ids), skip_special_tokens=True)

    def backend_json(self) -> str:
        """tokenizer.json of the `tokenizers` backend (data/chat_template.py builds on it)."""
        return self._tk.to_str()

    def id_to_piece(self, i: int) -> str:
        return self._tk.id_to_token(int(i)) or ""

    def is_word_start(self, i: int) -> bool:
        return self._word_start(self.id_to_piece(i))

    def save(self, directory: str) -> None:
        """Copies the files it was read from into directory/hf_tokenizer/."""
        _copy_files(self.path, self._files, os.path.join(directory, tok.HF_DIR))

    def export_hf(self, directory: str, model_family: str) -> None:
        """Copies its tokenizer files into directory (config.json is the model's to write)."""
        _export_files(self.path, self._files, directory)

    def with_special_tokens(self, tokens, directory: str) -> "HFTokenizer":
        """This tokenizer with `tokens` added as special tokens (new ones take the next ids),
        written as directory/hf_tokenizer/ (tokenizer.json and its configs) and loaded from
        there. Its tokenizer_config.json says split_special_tokens: true (transformers' name
        for it), so no special token is ever matched in text: encode("<|user|>") cannot give
        the id of <|user|>, nor GPT-2's "<|endoftext|>" the id 50256."""
        backend = tokenizers.Tokenizer.from_str(self._tk.to_str())
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in tokens])
        config = _read_json(self.path, "tokenizer_config.json") or {}
        # Named explicitly: a vocab.txt-only folder relied on BERT's defaults, which a
        # tokenizer.json folder does not assume.
        for name in tok.SPECIAL_NAMES:
            if getattr(self, f"{name}_id") is not None:
                config[f"{name}_token"] = self.id_to_piece(getattr(self, f"{name}_id"))
        extra = list(config.get("additional_special_tokens") or [])
        config["additional_special_tokens"] = extra + [t for t in tokens if t not in extra]
        if isinstance(config.get("added_tokens_decoder"), dict):
            for t in tokens:
                config["added_tokens_decoder"][str(backend.token_to_id(t))] = {
                    "content": t, "lstrip": False, "normalized": False, "rstrip": False,
                    "single_word": False, "special": True}
        config["split_special_tokens"] = True
        files = {"tokenizer.json": backend.to_str(),
                 "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)}
        for name in ("special_tokens_map.json", "config.json", "generation_config.json",
                     TEMPLATE_FILE):
            if name in self._files:
                with open(os.path.join(self.path, name), encoding="utf-8") as f:
                    files[name] = f.read()
        target = os.path.join(directory, tok.HF_DIR)
        _write_files(target, files)
        return load_hf_tokenizer(target)


class MarianSpmTokenizer(tok.BaseTokenizer):
    """Marian's tokenizer: SentencePiece pieces numbered by vocab.json (transformers'
    MarianTokenizer, shared vocabulary), source.spm for sources and target.spm for targets."""

    def __init__(self, path, source, target, vocab: dict, ids: dict, split_tokens, files):
        self.path = path
        self._source, self._target = source, target
        self._vocab = vocab
        self._pieces = {i: piece for piece, i in vocab.items()}
        for name, i in ids.items():
            setattr(self, f"{name}_id", i)
        # As in MarianTokenizer, special tokens in the text are cut out first and each piece
        # between them goes through SentencePiece on its own (its own dummy "▁" prefix).
        self._split_tokens = sorted(split_tokens, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, self._split_tokens)) + ")")
        self._added_special_ids = frozenset(vocab[t] for t in split_tokens)
        self._files = files

    @property
    def vocab_size(self) -> int:
        return max(self._vocab.values()) + 1

    def encode(self, text: str) -> list[int]:
        return self._encode(text, self._source)

    def encode_target(self, text: str) -> list[int]:
        return self._encode(text, self._target)

    def _encode(self, text, sp) -> list[int]:
        return [i for _, i, _, _ in self._spans(text, sp)]

    def _spans(self, text, sp):
        """(piece, id, start, end) of text: special tokens whole, the rest through sp."""
        spans, offset = [], 0
        for k, part in enumerate(self._split.split(text) if self._split_tokens else [text]):
            if k % 2:  # a special token
                spans.append((part, self._vocab[part], offset, offset + len(part)))
            elif part:
                # A leading ">>fra<<" picks a multilingual model's target language.
                if part.startswith(">>") and "<<" in part:
                    code = part[:part.index("<<") + 2]
                    spans.append((code, self._vocab.get(code, self.unk_id), offset,
                                  offset + len(code)))
                    part, offset = part[len(code):], offset + len(code)
                for piece, _, begin, end in tok.sentencepiece_spans(sp, part):
                    spans.append((piece, self._vocab.get(piece, self.unk_id), offset + begin,
                                  offset + end))
            offset += len(part)
        return spans

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int], list[int]]:
        spans = self._spans(text, self._source)
        return [s[1] for s in spans], [s[2] for s in spans], [s[3] for s in spans]

    def decode(self, ids) -> str:
        return self._target.decode_pieces([self._pieces[i] for i in self._kept(ids)
                                           if i in self._pieces])

    def id_to_piece(self, i: int) -> str:
        return self._pieces.get(int(i), "")

    def is_word_start(self, i: int) -> bool:
        return self.id_to_piece(i).startswith("▁")

    def save(self, directory: str) -> None:
        _copy_files(self.path, self._files, os.path.join(directory, tok.HF_DIR))

    def export_hf(self, directory: str, model_family: str) -> None:
        _export_files(self.path, self._files, directory)


# ---- reading a folder -------------------------------------------------------------------

def load_hf_tokenizer(directory: str):
    """The tokenizer of a Hugging Face folder: HFTokenizer, or MarianSpmTokenizer."""
    directory = str(directory)
    if not os.path.isdir(directory):
        raise DataError(f"{directory} is not a folder; pass a Hugging Face model folder that "
                        f"holds its tokenizer files ({_LOOKED_FOR})")
    configs = {name: _read_json(directory, name) for name in CONFIG_FILES}
    files = [name for name in CONFIG_FILES if configs[name] is not None]
    configs = {name: value or {} for name, value in configs.items()}
    has = lambda name: os.path.isfile(os.path.join(directory, name))  # noqa: E731
    if has("tokenizer.json"):
        backend = _read_tokenizer_json(directory)
        named = _named_tokens(configs, {})
        files.append("tokenizer.json")
    elif has("vocab.txt"):
        named = _named_tokens(configs, _BERT)
        backend = _wordpiece(directory, configs["tokenizer_config.json"], named)
        files.append("vocab.txt")
    elif any(has(name) for name in MARIAN_FILES):
        return _marian(directory, configs, files)
    else:
        raise DataError(f"{directory} has no tokenizer files (looked for {_LOOKED_FOR}); "
                        "download the model's tokenizer files into it too")
    ids = _special_ids(directory, configs, named, backend.token_to_id)
    if configs["tokenizer_config.json"].get("split_special_tokens") is True:
        backend.encode_special_tokens = True  # special tokens in text stay plain text
    template = _chat_template(directory, configs["tokenizer_config.json"])
    if has(TEMPLATE_FILE):
        files.append(TEMPLATE_FILE)
    stops = configs["generation_config.json"].get("eos_token_id")
    stops = tuple(i for i in (stops if isinstance(stops, list) else [stops])
                  if isinstance(i, int))
    return HFTokenizer(directory, backend, ids, files, template, stops)


def _chat_template(directory, config) -> str | None:
    """The folder's chat template: chat_template.jinja, or tokenizer_config.json's
    chat_template (a string, or a list of named ones of which "default" is taken)."""
    path = os.path.join(directory, TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise DataError(f"{directory}/tokenizer_config.json: chat_template is not a string (or "
                        "a list with a 'default' entry); download it again")
    return template or None


def _read_json(directory, name):
    """The JSON object in directory/name, None when the file is absent."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} is not a JSON object; download it again")
    return value


def _read_tokenizer_json(directory) -> tokenizers.Tokenizer:
    path = os.path.join(directory, "tokenizer.json")
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception for any unreadable file
        raise DataError(f"{directory}: tokenizer.json cannot be read by the tokenizers library "
                        f"({str(e)[:200]}); download it again (a folder needs one of "
                        f"{_LOOKED_FOR})") from None


def _wordpiece(directory, config, named) -> tokenizers.Tokenizer:
    """BERT's WordPiece tokenizer of vocab.txt, set up as transformers' BertTokenizer does."""
    path = os.path.join(directory, "vocab.txt")
    try:
        with open(path, encoding="utf-8") as f:
            # One token a line, numbered from 0; a repeated line keeps its last number.
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); download it again") from None
    unk = named.get("unk", _BERT["unk"])
    if unk not in vocab:
        raise DataError(f"{path} has no unknown token {unk!r}; download vocab.txt again")
    backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=unk,
                                                    max_input_chars_per_word=100))
    # Uncased BERT lowercases and strips accents; strip_accents None follows do_lower_case.
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    # The special tokens are matched whole in the text, as transformers does.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in sorted(set(named.values())) if t in vocab])
    return backend


def _marian(directory, configs, files) -> MarianSpmTokenizer:
    missing = [name for name in MARIAN_FILES
               if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise DataError(f"{directory} has Marian tokenizer files but not {missing} (a Marian "
                        "tokenizer needs source.spm, target.spm and vocab.json); download them")
    if configs["tokenizer_config.json"].get("separate_vocabs"):
        raise DataError(f"{directory}: Marian tokenizers with separate source and target "
                        "vocabularies are not supported; use a model with one shared vocab.json")
    source, target = (_read_spm(directory, name) for name in MARIAN_FILES[:2])
    vocab = _read_json(directory, "vocab.json")
    if not all(isinstance(i, int) for i in vocab.values()):
        raise DataError(f"{directory}/vocab.json must map pieces to integer ids; download it "
                        "again")
    named = _named_tokens(configs, _MARIAN)
    ids = _special_ids(directory, configs, named, vocab.get)
    if ids.get("bos") is None:
        ids["bos"] = ids.get("pad")  # opus-mt starts decoding with <pad>
    added = configs["tokenizer_config.json"].get("added_tokens_decoder", {})
    split_tokens = {t for t in named.values()} | {
        t["content"] for t in added.values() if isinstance(t, dict) and "content" in t}
    split_tokens |= set(configs["tokenizer_config.json"].get("additional_special_tokens", []))
    split_tokens = {t for t in split_tokens if isinstance(t, str) and t in vocab}
    return MarianSpmTokenizer(directory, source, target, vocab, ids, split_tokens,
                              files + list(MARIAN_FILES))


def _read_spm(directory, name):
    path = os.path.join(directory, name)
    try:
        with open(path, "rb") as f:
            return spm.SentencePieceProcessor(model_proto=f.read())
    except RuntimeError:
        raise DataError(f"{path} is not a SentencePiece model; download it again") from None


def _named_tokens(configs, defaults: dict) -> dict[str, str]:
    """{name: token text} of the special tokens tokenizer_config.json or
    special_tokens_map.json names (the latter wins, as in transformers); the others are the
    defaults of the folder's tokenizer class or model type, else `defaults`."""
    config, model_config = configs["tokenizer_config.json"], configs["config.json"]
    kind = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    named = dict(_DEFAULTS.get(kind) or _DEFAULTS.get(model_config.get("model_type")) or defaults)
    for source in (config, configs["special_tokens_map.json"]):
        for name in tok.SPECIAL_NAMES:
            if f"{name}_token" not in source:
                continue
            value = source[f"{name}_token"]
            value = value.get("content") if isinstance(value, dict) else value
            if value is None:
                named.pop(name, None)  # "pad_token": null, as GPT-2 says
            elif isinstance(value, str):
                named[name] = value
    return named


def _special_ids(directory, configs, named, token_to_id) -> dict[str, int | None]:
    """{name: id} of the named tokens, config.json's <name>_token_id for the others."""
    model_config = configs["config.json"]
    ids = {}
    for name in tok.SPECIAL_NAMES:
        if name in named:
            ids[name] = token_to_id(named[name])
            if ids[name] is None:
                raise DataError(f"{directory}: the {name}_token {named[name]!r} is not in the "
                                "vocabulary; fix tokenizer_config.json or download it again")
        elif isinstance(model_config.get(f"{name}_token_id"), int):
            ids[name] = model_config[f"{name}_token_id"]
        else:
            ids[name] = None
    if isinstance(model_config.get("decoder_start_token_id"), int):
        ids["bos"] = model_config["decoder_start_token_id"]
    return ids


def _word_start_rule(spec: dict):
    """piece -> whether it begins a word, for the kind of tokenizer in tokenizer.json."""
    model = spec.get("model") or {}
    if model.get("type") == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        return lambda piece: not piece.startswith(prefix)
    text = json.dumps(spec.get("pre_tokenizer"))
    if '"ByteLevel"' in text:
        return lambda piece: piece.startswith("Ġ")  # GPT-2: "Ġ" is the byte of a space
    if '"Metaspace"' in text or model.get("type") == "Unigram":
        return lambda piece: piece.startswith("▁")
    if model.get("continuing_subword_prefix"):
        prefix = model["continuing_subword_prefix"]
        return lambda piece: not piece.startswith(prefix)
    return lambda piece: True  # no word marks: whole-word masking masks single pieces


def _copy_files(source_dir, names, target):
    """Copies source_dir/<names> into the folder target, replacing it as a whole."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(target) + ".tmp")
    try:
        for name in names:
            shutil.copyfile(os.path.join(source_dir, name), os.path.join(tmp, name))
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)  # readers see no folder, or a complete one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_files(target, files: dict[str, str]):
    """Writes {name: text} as the folder target, replacing it as a whole (as _copy_files)."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(target) + ".tmp")
    try:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _export_files(source_dir, names, directory):
    os.makedirs(directory, exist_ok=True)
    for name in names:
        if name != "config.json":
            shutil.copyfile(os.path.join(source_dir, name), os.path.join(directory, name))
