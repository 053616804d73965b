"""Prepared data: a corpus tokenized once into shards on disk, read back by random access.

`python -m experiments.prepare --config=EXPERIMENT --out=DIR` writes DIR; a run then trains on
it with `--config.data.source=prepared:DIR`, at any scale, with flat host memory: every shard
is a set of .npy files read by positioned reads, and a batch reads only its own rows (each
process only its slice of the global batch, see data/lm.py make_iterator).

The corpus is cut into chunks of `docs_per_shard` consecutive documents; each chunk gives one
train shard and one eval shard (documents go to eval by the same every-k-th rule as the
in-memory path, or all of data.eval_source). Two layouts:
  stream (GPT): the shard holds the token stream [BOS] doc [EOS] ... and the offset of each
      document; rows of max_len + 1 tokens are cut and packed per batch (data/lm.py pack_rows
      on the gathered spans), so one preparation serves every max_len, and the batches are
      exactly those of the in-memory path.
  rows (BERT pretraining, translation): the shard holds the task's finished rows, built by the
      task's own in-memory code on that chunk; a corpus of one chunk gives exactly the
      in-memory rows.
Layout of DIR: manifest.json (written last: a finished preparation), the tokenizer files,
unigram.npy (train token counts, for the unigram baseline), and split/NNNNN/<array>.npy with a
split/NNNNN.json beside each shard (written after it, atomically: a killed prepare resumes at
the first chunk without one).
"""
import collections
import hashlib
import json
import os
import shutil

import numpy as np

from data import lm as lm_data
from data import tokenizer as tok
from data.errors import DataError

PREFIX = "prepared:"
MANIFEST = "manifest.json"
FORMAT = 1
SPLITS = ("train", "eval")
# Which tasks read which layout; the settings that a rows layout freezes at preparation.
LAYOUTS = {"lm": "stream", "mlm_nsp": "rows", "seq2seq": "rows"}
FROZEN_SETTINGS = {
    "mlm_nsp": ("max_len", "max_predictions", "mask_prob", "short_seq_prob", "whole_word",
                "dupe_factor"),
    "seq2seq": ("max_len", "pack"),
}


def prepared_dir(source: str) -> str | None:
    """DIR of a data.source "prepared:DIR", else None."""
    return os.path.expanduser(source[len(PREFIX):]) if source.startswith(PREFIX) else None


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary and the special ids: equal exactly when the ids mean the same."""
    h = hashlib.sha256()
    h.update(json.dumps([tokenizer.vocab_size] + [
        getattr(tokenizer, f"{name}_id") for name in
        ("pad", "unk", "bos", "eos", "cls", "sep", "mask")]).encode())
    for i in range(tokenizer.vocab_size):
        h.update(tokenizer.id_to_piece(i).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: str) -> dict:
    """The manifest of a finished preparation; anything else is a DataError with the fix."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise DataError(f"prepared data {directory} does not exist; make it with python -m "
                        "experiments.prepare --config=<experiment> --out=" + directory)
    if not os.path.exists(path):
        raise DataError(f"{directory} holds no {MANIFEST}: its preparation did not finish; run "
                        "the same python -m experiments.prepare command again to complete it")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} cannot be read ({e}); prepare the data again into a new "
                        "directory") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{directory} was prepared in format {manifest.get('format')}, this "
                        f"code reads format {FORMAT}; prepare it again")
    return manifest


# --- writing ------------------------------------------------------------------------------

def shard_name(split: str, index: int) -> str:
    return f"{split}/{index:05d}"


def write_shard(directory: str, split: str, index: int, arrays: dict, extra: dict) -> dict:
    """Writes one shard's arrays and then its .json record, each atomically; returns the record."""
    name = shard_name(split, index)
    final = os.path.join(directory, name)
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    files = {}
    for key, array in arrays.items():
        path = os.path.join(partial, key + ".npy")
        np.save(path, np.ascontiguousarray(array))
        files[key] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path),
                      "shape": list(array.shape), "dtype": str(array.dtype)}
    shutil.rmtree(final, ignore_errors=True)  # a shard of a killed run whose record is missing
    os.replace(partial, final)
    record = {"name": name, "files": files, **extra}
    write_json(final + ".json", record)
    return record


def write_json(path: str, value) -> None:
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(partial, path)


def done_shards(directory: str, split: str) -> list[dict]:
    """Records of the shards 0, 1, ... of split that a previous prepare finished, in order."""
    records = []
    while os.path.exists(path := os.path.join(directory, shard_name(split, len(records)) +
                                              ".json")):
        with open(path, encoding="utf-8") as f:
            records.append(json.load(f))
    return records


def stream_arrays(docs: list[str], tokenizer, vocab_size: int) -> tuple[dict, np.ndarray]:
    """(shard arrays, unigram counts) of the stream layout: tokens and document offsets."""
    tokens, doc_ids = lm_data.tokenize_documents(docs, tokenizer)
    starts = np.flatnonzero(np.diff(doc_ids, prepend=-1)).astype(np.int64) if len(doc_ids) \
        else np.zeros(0, np.int64)
    # 2 bytes a token where the vocabulary allows: half the disk and page cache.
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    counts = np.bincount(tokens, minlength=vocab_size)[:vocab_size]
    return {"tokens": tokens.astype(dtype), "doc_starts": starts}, counts


# --- reading ---------------------------------------------------------------------------------
# Shards are read with positioned reads (os.pread), not memory maps: the page cache then holds
# what was read, outside the process, and host memory (RSS) stays flat however much of a large
# corpus a long run touches. A mapped file would count every page it faulted in (and the pages
# around it) towards the run's RSS.

class NpyFile:
    """Random access to the rows of one .npy file (C order), read from disk on demand."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                self.shape, fortran, self.dtype = header(f)
            except ValueError as e:
                raise DataError(f"prepared shard file {path} cannot be read ({e}); prepare the "
                                "data again") from None
            if fortran or self.dtype.hasobject:
                raise DataError(f"{path} is not a prepared shard file; prepare the data again")
            self.offset = f.tell()
        self.path = path
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a new in-memory array."""
        start, stop = max(start, 0), min(stop, len(self))
        out = np.empty((max(stop - start, 0), *self.shape[1:]), self.dtype)
        if out.nbytes and os.preadv(_open_fd(self.path), [memoryview(out).cast("B")],
                                    self.offset + start * self.row_bytes) != out.nbytes:
            raise DataError(f"prepared shard file {self.path} ends early: it was truncated "
                            "while in use; prepare the data again, or restore the file")
        return out


_MAX_OPEN_FILES = 128  # a corpus of thousands of shards stays far below the fd limit
_open_fds: "collections.OrderedDict[str, int]" = collections.OrderedDict()


def _open_fd(path: str) -> int:
    """A read-only descriptor of path from a small cache, least recently used closed first."""
    if path in _open_fds:
        _open_fds.move_to_end(path)
        return _open_fds[path]
    while len(_open_fds) >= _MAX_OPEN_FILES:
        os.close(_open_fds.popitem(last=False)[1])
    _open_fds[path] = fd = os.open(path, os.O_RDONLY)
    return fd


def _open_shards(directory: str, records: list[dict]) -> list[dict]:
    """The NpyFile of each shard's arrays; a missing or truncated file is a DataError."""
    shards = []
    for record in records:
        arrays = {}
        for key, meta in record["files"].items():
            path = os.path.join(directory, record["name"], key + ".npy")
            if not os.path.exists(path):
                raise DataError(f"prepared shard file {path} is missing; prepare the data again "
                                "(python -m experiments.prepare), or restore the file")
            if os.path.getsize(path) != meta["bytes"]:
                raise DataError(f"prepared shard file {path} has {os.path.getsize(path)} bytes, "
                                f"the manifest says {meta['bytes']}: it is truncated or was "
                                "changed; prepare the data again, or restore the file")
            arrays[key] = NpyFile(path)
            if list(arrays[key].shape) != meta["shape"]:
                raise DataError(f"prepared shard file {path} has shape {arrays[key].shape}, the "
                                f"manifest says {meta['shape']}; prepare the data again")
        shards.append(arrays)
    return shards


# Every this-many-th document start of a shard is kept in memory (1/512 of the starts, 16 bytes
# per million tokens of typical text); a span's documents are then found by reading one block.
DOC_INDEX_STRIDE = 512


class StreamRows:
    """Packed LM rows of max_len tokens cut from the prepared token stream, read per batch.

    Row r is stream positions [r (max_len + 1), (r + 1)(max_len + 1)), as in pack_rows, which
    then builds the row's inputs, targets, segments, positions and weights from the span.
    """

    def __init__(self, directory: str, records: list[dict], max_len: int):
        self.shards = [s for s in _open_shards(directory, records) if len(s["tokens"])]
        lengths = [len(s["tokens"]) for s in self.shards]
        self.token_offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.doc_offsets = np.concatenate(
            [[0], np.cumsum([len(s["doc_starts"]) for s in self.shards], dtype=np.int64)])
        self.sparse_starts = [self._sparse(s["doc_starts"]) for s in self.shards]
        self.max_len = max_len
        self.num_tokens = int(self.token_offsets[-1])

    @staticmethod
    def _sparse(starts: NpyFile) -> np.ndarray:
        """starts[::DOC_INDEX_STRIDE], read a block at a time."""
        block = DOC_INDEX_STRIDE * 2048
        return np.concatenate([starts.rows(i, i + block)[::DOC_INDEX_STRIDE]
                               for i in range(0, len(starts), block)] or [np.zeros(0, np.int64)])

    def __len__(self) -> int:
        return self.num_tokens // (self.max_len + 1)

    def _doc_ids(self, s: int, a: int, b: int) -> np.ndarray:
        """Global document ids of shard s's positions [a, b)."""
        sparse, stride = self.sparse_starts[s], DOC_INDEX_STRIDE
        first = int(np.searchsorted(sparse, a, side="right")) - 1
        last = int(np.searchsorted(sparse, b - 1, side="right"))
        starts = self.shards[s]["doc_starts"].rows(first * stride, last * stride)
        local = first * stride + np.searchsorted(starts, np.arange(a, b), side="right") - 1
        return self.doc_offsets[s] + local

    def _span(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and global document ids of stream positions [start, stop)."""
        tokens, docs = [], []
        s = int(np.searchsorted(self.token_offsets, start, side="right")) - 1
        while start < stop:
            shard, offset = self.shards[s], int(self.token_offsets[s])
            a, b = start - offset, min(stop - offset, len(shard["tokens"]))
            tokens.append(shard["tokens"].rows(a, b).astype(np.int32))
            docs.append(self._doc_ids(s, a, b))
            start, s = offset + b, s + 1
        return np.concatenate(tokens), np.concatenate(docs)

    def take(self, indices) -> dict[str, np.ndarray]:
        width = self.max_len + 1
        spans = [self._span(int(i) * width, (int(i) + 1) * width) for i in indices]
        if not spans:
            empty = lm_data.pack_rows(np.zeros(width, np.int32), np.zeros(width, np.int64),
                                      self.max_len)
            return {key: array[:0] for key, array in empty.items()}
        return lm_data.pack_rows(np.concatenate([t for t, _ in spans]),
                                 np.concatenate([d for _, d in spans]), self.max_len)


class ShardRows:
    """Fixed-shape rows stored in shards (the rows layout), read by global row index."""

    def __init__(self, directory: str, records: list[dict]):
        self.shards = [s for s in _open_shards(directory, records) if s]
        lengths = [len(next(iter(s.values()))) for s in self.shards]
        self.row_offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.row_offsets[-1])

    def take(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        which = np.searchsorted(self.row_offsets, indices, side="right") - 1
        out = {key: np.empty((len(indices), *f.shape[1:]), f.dtype)
               for key, f in self.shards[0].items()}
        for n, (s, i) in enumerate(zip(which, indices)):
            local = int(i - self.row_offsets[s])
            for key, f in self.shards[s].items():
                out[key][n] = f.rows(local, local + 1)[0]
        return out


def row_chunks(rows, limit: int, chunk: int = 1024):
    """The first `limit` rows of a StreamRows / ShardRows as dicts of at most `chunk` rows."""
    n = min(limit, len(rows))
    for start in range(0, n, chunk):
        yield rows.take(np.arange(start, min(n, start + chunk)))


def rows_as_arrays(rows, limit: int | None = None) -> dict[str, np.ndarray]:
    """The first `limit` rows (all when None) of a StreamRows / ShardRows as in-memory arrays."""
    n = len(rows) if limit is None else min(limit, len(rows))
    return rows.take(np.arange(n))


# --- what a training run checks -------------------------------------------------------------

def open_for_run(config, task: str) -> tuple[str, dict]:
    """(DIR, manifest) of config.data.source=prepared:DIR, checked against the run's config."""
    directory = prepared_dir(config.data.source)
    manifest = read_manifest(directory)
    if manifest["task"] != task:
        raise DataError(f"{directory} was prepared for config.task={manifest['task']!r}, but "
                        f"this run is {task!r}; prepare it with this run's --config")
    settings = manifest["settings"]
    for key in FROZEN_SETTINGS.get(task, ()):
        if settings[key] != config.data[key]:
            raise DataError(
                f"{directory} was prepared with data.{key}={settings[key]!r}, this run has "
                f"{config.data[key]!r}; set --config.data.{key}={settings[key]!r}, or prepare "
                "again with this value")
    if manifest["tokenizer"]["vocab_size"] > config.model.vocab_size:
        raise DataError(f"{directory}'s tokenizer has {manifest['tokenizer']['vocab_size']} "
                        f"pieces but config.model.vocab_size={config.model.vocab_size}; raise it")
    return directory, manifest


def tokenizer_files(directory: str) -> str | None:
    """The name of the tokenizer a folder holds (tokenizer.model or hf_tokenizer), or None."""
    for name in (tok.MODEL_FILE, tok.HF_DIR):
        if os.path.exists(os.path.join(directory, name)):
            return name
    return None


def check_tokenizer(manifest: dict, tokenizer, workdir: str, directory: str) -> None:
    """DataError unless the run's tokenizer is the one the data was tokenized with."""
    if tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
        raise DataError(
            f"the tokenizer in {workdir} is not the one {directory} was tokenized with (their "
            "vocabularies differ); train into a new --workdir (it takes the data's tokenizer), "
            f"or prepare again with --tokenizer_from={workdir}")


def split_rows(directory: str, manifest: dict, split: str, max_len: int):
    """The lazy rows of one split: StreamRows (GPT) or ShardRows."""
    records = manifest["splits"][split]["shards"]
    if manifest["layout"] == "stream":
        rows = StreamRows(directory, records, max_len)
    else:
        rows = ShardRows(directory, records)
    if len(rows) == 0:
        raise DataError(f"the {split} split of {directory} has no rows of max_len={max_len}; "
                        "add text, lower --config.data.max_len, or prepare with data.eval_source")
    return rows


def unigram_counts(directory: str, vocab_size: int) -> np.ndarray:
    path = os.path.join(directory, "unigram.npy")
    if not os.path.exists(path):
        raise DataError(f"{path} is missing; prepare the data again")
    return np.load(path, allow_pickle=False)[:vocab_size]


def read_pairs(directory: str) -> dict:
    """{"dev": [(source, target)], "test": [...]} kept by a translation preparation."""
    with open(os.path.join(directory, "pairs.json"), encoding="utf-8") as f:
        pairs = json.load(f)
    return {split: [tuple(p) for p in pairs[split]] for split in ("dev", "test")}
