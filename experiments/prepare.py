"""Tokenizes a corpus once, with every core, into the shards that training reads streaming.

  python -m experiments.prepare --config=experiments/gpt.py:tiny --out=data/bible_gpt \\
      --config.data.source='corpus/*.jsonl.zst'
  python -m train.main --config=experiments/gpt.py:tiny --workdir=runs/big \\
      --config.data.source=prepared:data/bible_gpt

The config (and its overrides) is the one train.main takes: its task picks the layout
(data/prepared.py), its data keys the corpus and the split, its tokenizer settings the
tokenizer, which is trained here on a seeded sample (data.tokenizer_max_sentences), taken from
--tokenizer_from=RUN, or from init_from=hf:DIR. Killed, it resumes at the first unfinished
shard when run again; finished, running it again only prints the summary.
"""
import collections
import itertools
import multiprocessing
import os
import sys
import time

import numpy as np
import tqdm
from absl import flags
from ml_collections import config_flags

from data import bert_pretrain, hf_tokenizer, prepared, sources, tokenizer_io, translation
from data import tokenizer as tok
from data.errors import DataError


def define_flags() -> None:
    """The command's flags, defined when it runs (tests import this module beside others that
    define --config and --out)."""
    config_flags.DEFINE_config_file("config", None, "Experiment file, e.g. "
                                    "experiments/gpt.py:tiny", lock_config=True)
    flags.DEFINE_string("out", None, "Directory for the shards and the manifest.")
    flags.DEFINE_integer("docs_per_shard", 20_000, "Documents (or sentence pairs) per chunk; "
                         "each chunk gives one train and one eval shard.")
    flags.DEFINE_integer("workers", os.cpu_count() or 1, "Tokenizing processes (1: this one).")
    flags.DEFINE_string("tokenizer_from", "", "A run folder whose tokenizer to use instead of "
                        "training one.")


_worker = {}  # the tokenizer, loaded in each worker by _init_worker
# Language-modelling documents per tokenizing job: far fewer than a shard, so every worker stays
# busy to the end; a shard is its jobs' tokens joined (the same bytes for any worker count).
PIECE_DOCS = 1000


def _init_worker(directory: str) -> None:
    _worker["tokenizer"] = tokenizer_io.load_run_tokenizer(directory)


def build_chunk(job):
    """(split, chunk, arrays, record extras, unigram counts or None) of one chunk's items."""
    task, split, chunk, items, s = job
    tokenizer = _worker["tokenizer"]
    if task == "lm":
        arrays, counts = prepared.stream_arrays(items, tokenizer, s["vocab_size"])
        return split, chunk, arrays, {"docs": len(items), "tokens": len(arrays["tokens"])}, \
            counts if split == "train" else None
    if task == "mlm_nsp":
        arrays, counts = {}, None
        if sum(1 for d in items if d.strip()) >= 2:  # NotNext needs another document
            seed = (s["seed"] if split == "train" else 12345) + chunk
            arrays = bert_pretrain.build_pretraining_rows(
                items, tokenizer, seed=seed, dupe_factor=s["dupe_factor"], **{
                    k: s[k] for k in ("max_len", "max_predictions", "mask_prob",
                                      "short_seq_prob", "whole_word")})
        if split == "train":
            counts = prepared.stream_arrays(items, tokenizer, s["vocab_size"])[1]
        rows = len(arrays.get("inputs", ()))
        return split, chunk, arrays, {"docs": len(items), "rows": rows}, counts
    src, tgt, dropped = translation.encode_pairs(items, tokenizer, max_len=s["max_len"])
    arrays = translation.make_rows(src, tgt, max_len=s["max_len"],
                                   pack=s["pack"] and split == "train") if src else {}
    return split, chunk, arrays, {"docs": len(items), "rows": len(arrays.get("inputs", ())),
                                  "dropped_as_too_long": dropped}, None


def _ordered_map(fn, jobs, workers: int, directory: str):
    """fn over jobs in order, in `workers` processes, with at most 2 per worker in flight (so
    the corpus is never all in memory)."""
    if workers <= 1:
        _init_worker(directory)
        yield from map(fn, jobs)
        return
    # spawn, not fork: this process may have started threads (tokenizer, numpy) already.
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (directory,)) as pool:
        pending = collections.deque()
        for job in jobs:
            pending.append(pool.apply_async(fn, (job,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _input_files(config) -> list[str]:
    """Every file the corpus is read from (for the manifest's checksums)."""
    d, files = config.data, []
    for pattern in (d.source, d.get("eval_source", ""), d.get("test_source", "")):
        if not pattern or pattern in ("bible", *translation.SYNTHETIC_TASKS):
            if pattern == "bible":
                files.append(str(sources.fetch_bible_db(d.cache_dir or None)))
            continue
        files.extend(sources.matching_files(pattern))
    return files


def documents(config):
    """(is_eval, document) of the corpus in order, and the document count when known; the
    split is load_corpus's: every k-th document, or all of data.eval_source."""
    d = config.data
    eval_source = d.get("eval_source", "")
    kw = dict(text_field=d.text_field, bible_version=d.bible_version,
              eval_fraction=d.eval_fraction, cache_dir=d.cache_dir or None)
    if sources.bible_db(d.source, d.cache_dir or None) is not None and not eval_source:
        train, eval_ = sources.load_corpus(d.source, **kw)  # a few MB: in memory is fine
        return itertools.chain(((False, t) for t in train), ((True, t) for t in eval_)), \
            len(train) + len(eval_)
    if eval_source:
        train, _ = (sources.load_corpus(d.source, **kw) if sources.bible_db(
            d.source, d.cache_dir or None) else (sources.iter_documents(d.source, d.text_field),
                                                 None))
        return itertools.chain(((False, t) for t in train),
                               ((True, t) for t in sources.iter_documents(eval_source,
                                                                          d.text_field))), None
    count = sum(1 for _ in sources.iter_documents(d.source, d.text_field))  # a streaming pass
    if count == 0:
        raise DataError(f"empty corpus: the files matching {d.source!r} hold no text")
    if count == 1:  # one document: split by lines, as in memory (it is read once anyway)
        train, eval_ = sources.load_corpus(d.source, **kw)
        return itertools.chain(((False, t) for t in train), ((True, t) for t in eval_)), 2
    eval_ids = sources.eval_document_ids(count, d.eval_fraction)
    return ((i in eval_ids, doc) for i, doc in enumerate(
        sources.iter_documents(d.source, d.text_field))), count


def pairs(config):
    """(is_eval, (source, target)) of a translation corpus: train pairs, then the dev pairs;
    their count when known; and (dev pairs, test pairs), which are small and kept for BLEU.
    A user's training TSV is read streaming."""
    from train.tasks import seq2seq
    d = config.data
    if d.source in translation.SYNTHETIC_TASKS or sources.bible_db(d.source, d.cache_dir or None):
        train, dev, test = seq2seq.read_pairs(config)
        return itertools.chain(((False, p) for p in train), ((True, p) for p in dev)), \
            len(train) + len(dev), (dev, test)
    dev, test = seq2seq.read_pairs(config, train=False)[1:]
    train = translation.iter_tsv_pairs(d.source)
    return itertools.chain(((False, p) for p in train), ((True, p) for p in dev)), None, \
        (dev, test)


def _chunks(items, size: int, first: int):
    """(chunk index from `first`, train items, eval items) of consecutive groups of `size`."""
    for chunk in itertools.count(first):
        group = list(itertools.islice(items, size))
        if not group:
            return
        yield chunk, [x for e, x in group if not e], [x for e, x in group if e]


def settings_of(config, docs_per_shard: int) -> dict:
    """What the shards depend on; a resumed or repeated prepare must have the same."""
    d = config.data
    s = {"task": config.task, "source": d.source, "eval_source": d.get("eval_source", ""),
         "docs_per_shard": docs_per_shard, "vocab_size": config.model.vocab_size,
         "seed": config.seed}
    for key in ("text_field", "bible_version", "eval_fraction", "tokenizer_type",
                "tokenizer_max_sentences"):
        if key in d:
            s[key] = d[key]
    for key in prepared.FROZEN_SETTINGS.get(config.task, ()):
        s[key] = d[key]
    if config.task == "seq2seq":
        s.update(source_version=d.get("source_version"), target_version=d.get("target_version"),
                 num_synthetic=d.get("num_synthetic"), eval_sentences=d.eval_sentences)
    return s


def _tokenizer(config, out: str, tokenizer_from: str, train_texts):
    """The preparation's tokenizer, saved in `out` once: copied, or trained on train_texts."""
    have = os.path.exists(os.path.join(out, tok.MODEL_FILE)) or os.path.isdir(
        os.path.join(out, tok.HF_DIR))
    if not have:
        from train import pretrained as hf_io
        hf_dir = hf_io.hf_folder(config.get("init_from", ""))
        source = tokenizer_from or hf_dir
        if source:
            (hf_tokenizer.load_hf_tokenizer(hf_dir) if hf_dir and not tokenizer_from
             else tokenizer_io.load_run_tokenizer(tokenizer_from)).save(out)
        else:
            tok.train_tokenizer(train_texts(), os.path.join(out, tok.MODEL_FILE),
                                config.model.vocab_size, config.data.tokenizer_type,
                                max_sentences=config.data.get("tokenizer_max_sentences",
                                                              2_000_000), seed=config.seed)
    tokenizer = tokenizer_io.load_run_tokenizer(out)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} pieces but "
                        f"config.model.vocab_size={config.model.vocab_size}; raise it")
    return tokenizer


def prepare(config, out: str, *, docs_per_shard: int = 20_000, workers: int = 1,
            tokenizer_from: str = "", stop_after_chunks: int | None = None,
            piece_docs: int = PIECE_DOCS) -> dict:
    """Writes (or completes) the preparation of config's corpus in `out`; returns the manifest.

    stop_after_chunks stops early as a kill would (tests of resuming); piece_docs is the size of
    a tokenizing job. With workers > 1 from a script of your own, call it under
    `if __name__ == "__main__":` (the workers are spawned, so they import that script)."""
    if config.task not in prepared.LAYOUTS:
        raise DataError(f"config.task={config.task!r} reads its data in memory; prepare "
                        f"supports the tasks {sorted(prepared.LAYOUTS)}")
    if docs_per_shard < 1:
        raise DataError(f"--docs_per_shard must be >= 1, got {docs_per_shard}")
    settings = settings_of(config, docs_per_shard)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out={out} is a file, not a folder; pass a new folder name for the "
                        "shards (the file is left as it is)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # a file on the way (--out=FILE/shards), no permission, ...
        raise DataError(f"cannot make the folder --out={out} ({e.strerror}); pass a folder "
                        "you can write to") from None
    if os.path.exists(os.path.join(out, prepared.MANIFEST)):
        manifest = prepared.read_manifest(out)
        _check_same(manifest["settings"], settings, out)
        return manifest
    files = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p),
              "sha256": prepared.file_sha256(p)} for p in _input_files(config)]
    state_path = os.path.join(out, "prepare.json")
    if os.path.exists(state_path):  # resuming: the same corpus and settings, or nothing
        import json
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        _check_same(state["settings"], settings, out)
        if state["sources"] != files:
            raise DataError(f"the input files changed since {out} was started; use a new --out "
                            "(the shards there stay as they are)")
    else:
        prepared.write_json(state_path, {"settings": settings, "sources": files})

    start = time.time()
    is_translation = config.task == "seq2seq"
    if is_translation:
        stream, total, (dev, test) = pairs(config)
        texts = lambda: (s for e, p in pairs(config)[0] if not e for s in p)  # noqa: E731
    else:
        stream, total = documents(config)
        texts = lambda: (t for e, t in documents(config)[0] if not e)  # noqa: E731
    tokenizer = _tokenizer(config, out, tokenizer_from, texts)
    done = min(len(prepared.done_shards(out, split)) for split in prepared.SPLITS)
    items = iter(stream)
    for _ in range(done * docs_per_shard):  # finished chunks: read past, not tokenized
        next(items, None)

    def jobs():
        for chunk, train_items, eval_items in _chunks(items, docs_per_shard, done):
            if stop_after_chunks is not None and chunk - done >= stop_after_chunks:
                return
            for split, group in (("train", train_items), ("eval", eval_items)):
                # Rows layouts are built from the whole chunk (NSP pairs, packing): one job.
                step = piece_docs if config.task == "lm" else max(len(group), 1)
                for start in range(0, max(len(group), 1), step):
                    yield config.task, split, chunk, group[start:start + step], settings

    def write(pieces):
        split, chunk, arrays, extra, counts = _join_pieces(pieces)
        os.makedirs(os.path.join(out, split), exist_ok=True)
        if counts is not None:  # before the shard's record, which marks it done
            np.save(os.path.join(out, prepared.shard_name(split, chunk) + ".unigram.npy"),
                    counts.astype(np.int64))
        prepared.write_shard(out, split, chunk, arrays, extra)

    progress = tqdm.tqdm(total=total, initial=min(done * docs_per_shard, total or 0),
                         unit="doc", desc="preparing", disable=not sys.stderr.isatty())
    tokens = 0

    def counted(results):  # the progress bar moves with every job
        nonlocal tokens
        for piece in results:
            tokens += piece[3].get("tokens", 0)
            progress.update(piece[3]["docs"])
            progress.set_postfix(tok_per_s=f"{tokens / max(time.time() - start, 1e-9):,.0f}")
            yield piece

    # A shard is written once its last job is back (jobs come back in order).
    for _, pieces in itertools.groupby(counted(_ordered_map(build_chunk, jobs(), workers, out)),
                                       key=lambda piece: piece[:2]):
        write(list(pieces))
    progress.close()
    if stop_after_chunks is not None:
        return {}
    manifest = _finish(out, settings, files, tokenizer, time.time() - start,
                       (dev, test) if is_translation else None)
    return manifest


def _join_pieces(pieces):
    """One shard's (split, chunk, arrays, extras, counts) from its jobs' results, in order."""
    if len(pieces) == 1:
        return pieces[0]
    split, chunk = pieces[0][:2]
    lengths = np.cumsum([0] + [len(p[2]["tokens"]) for p in pieces[:-1]])
    arrays = {"tokens": np.concatenate([p[2]["tokens"] for p in pieces]),
              "doc_starts": np.concatenate([p[2]["doc_starts"] + offset
                                            for p, offset in zip(pieces, lengths)])}
    extra = {key: sum(p[3][key] for p in pieces) for key in pieces[0][3]}
    counts = None if pieces[0][4] is None else sum(p[4] for p in pieces)
    return split, chunk, arrays, extra, counts


def _check_same(old: dict, new: dict, out: str) -> None:
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in changed)
        raise DataError(f"{out} holds data prepared with other settings ({diffs}); use a new "
                        "--out, or the settings it was prepared with")


def _finish(out, settings, files, tokenizer, seconds, translation_pairs) -> dict:
    """Sums the shards' records and counts into unigram.npy and manifest.json (written last)."""
    splits = {}
    for split in prepared.SPLITS:
        records = prepared.done_shards(out, split)
        splits[split] = {"shards": records,
                         **{k: sum(r.get(k, 0) for r in records)
                            for k in ("docs", "tokens", "rows", "dropped_as_too_long")}}
    if not splits["train"]["docs"]:
        raise DataError("the corpus has no training documents; check config.data.source")
    counts = sum(np.load(os.path.join(out, r["name"] + ".unigram.npy"))
                 for r in splits["train"]["shards"]
                 if os.path.exists(os.path.join(out, r["name"] + ".unigram.npy")))
    if not isinstance(counts, int):
        np.save(os.path.join(out, "unigram.npy"), counts)
    if translation_pairs is not None:
        dev, test = translation_pairs
        prepared.write_json(os.path.join(out, "pairs.json"),
                             {"dev": [list(p) for p in dev], "test": [list(p) for p in test]})
    manifest = {"format": prepared.FORMAT, "task": settings["task"], "settings": settings,
                "layout": prepared.LAYOUTS[settings["task"]], "sources": files,
                "tokenizer": {"fingerprint": prepared.tokenizer_fingerprint(tokenizer),
                              "vocab_size": tokenizer.vocab_size},
                "splits": splits, "seconds": seconds}
    prepared.write_json(os.path.join(out, prepared.MANIFEST), manifest)
    return manifest


def summary(manifest: dict, out: str) -> str:
    train, eval_ = manifest["splits"]["train"], manifest["splits"]["eval"]
    amount = (f"{train['tokens']:,} train / {eval_['tokens']:,} eval tokens"
              if manifest["layout"] == "stream" else
              f"{train['rows']:,} train / {eval_['rows']:,} eval rows")
    return (f"{out}: {train['docs']:,} train / {eval_['docs']:,} eval documents, {amount} in "
            f"{len(train['shards'])} shards; prepared in {manifest['seconds']:.1f} s. Train "
            f"with --config.data.source=prepared:{out}")


def main(argv):
    from train import cli, config as config_lib, pretrained as hf_io
    from train.errors import ConfigError
    del argv
    fl = flags.FLAGS
    try:
        if fl.config is None or not fl.out:
            raise ConfigError("give --config=experiments/<file>.py:<preset> and --out=DIR")
        hf_io.configure(fl.config)
        config_lib.validate(fl.config)
        if fl.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {fl.workers}")
        manifest = prepare(fl.config, fl.out, docs_per_shard=fl.docs_per_shard,
                           workers=fl.workers, tokenizer_from=fl.tokenizer_from)
        print(summary(manifest, fl.out))
    except (DataError, ConfigError) as e:
        cli.fail(str(e))


if __name__ == "__main__":
    from train import cli
    define_flags()
    cli.run(main)
