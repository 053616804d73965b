"""Prepared data (experiments/prepare.py, data/prepared.py) against the in-memory path.

The in-memory pipelines are the reference: on the same corpus and seed, prepared data must give
exactly their batches, for GPT (rows cut across shard boundaries), BERT and translation.
"""
import json
import os

import jax
import numpy as np
import pytest

from data import lm as lm_data
from data import prepared
from data.errors import DataError
from experiments import bert as bert_exp
from experiments import prepare as prep
from experiments import transformer as transformer_exp
from tests.conftest import smoke_config, tree_digest, write_corpus
from train import loop, runs, tasks

lm = tasks.get("lm")


def _batches(rows, config, n, process_index=0, process_count=1):
    it = lm_data.make_iterator(rows, config.batch_size, seed=config.seed,
                               process_index=process_index, process_count=process_count)
    return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
            assert x[key].dtype == y[key].dtype, key


def _digests(directory):
    """sha256 of every shard file, by name."""
    return {os.path.relpath(os.path.join(root, f), directory): prepared.file_sha256(
        os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files
        if f.endswith(".npy")}


@pytest.fixture(scope="module")
def gpt_data(corpus_file, tmp_path_factory):
    """The smoke GPT's corpus prepared in shards of 7 documents (rows span shard ends)."""
    out = str(tmp_path_factory.mktemp("prepared") / "gpt")
    config = smoke_config(corpus_file)
    manifest = prep.prepare(config, out, docs_per_shard=7)
    return config, out, manifest


def test_gpt_prepared_batches_equal_the_in_memory_ones(gpt_data, tmp_path):
    config, out, manifest = gpt_data
    assert len(manifest["splits"]["train"]["shards"]) > 3
    memory = lm.prepare_data(config, str(tmp_path / "memory"))
    from_disk = lm.prepare_data(smoke_config("prepared:" + out), str(tmp_path / "disk"))
    assert isinstance(from_disk["train_rows"], prepared.StreamRows)
    # The tokenizer trained by prepare is the one the in-memory run trains on the same text.
    assert prepared.tokenizer_fingerprint(memory["tokenizer"]) == \
        prepared.tokenizer_fingerprint(from_disk["tokenizer"])
    assert lm_data.num_rows(from_disk["train_rows"]) == len(memory["train_rows"]["inputs"])
    _assert_same_batches(_batches(memory["train_rows"], config, 12),
                         _batches(from_disk["train_rows"], config, 12))
    _assert_same_batches([memory["eval_rows"]],
                         [prepared.rows_as_arrays(from_disk["eval_rows"])])
    assert from_disk["info"]["unigram_eval_loss"] == pytest.approx(
        memory["info"]["unigram_eval_loss"], rel=1e-12)
    assert from_disk["info"]["train_tokens"] == memory["info"]["train_tokens"]
    # Another max_len reads the same preparation.
    other = lm.prepare_data(smoke_config("prepared:" + out, **{"data.max_len": 16}),
                            str(tmp_path / "disk16"))
    assert other["train_rows"].take([0])["inputs"].shape == (1, 16)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_document_index_blocks_give_the_same_rows(gpt_data, tmp_path, monkeypatch, stride):
    """Rows found through the sparse document index equal the in-memory rows whatever its
    stride (the default 512 exceeds a test shard's documents: one block)."""
    config, out, manifest = gpt_data
    memory = lm.prepare_data(config, str(tmp_path / "memory"))["train_rows"]
    monkeypatch.setattr(prepared, "DOC_INDEX_STRIDE", stride)
    rows = prepared.split_rows(out, manifest, "train", config.data.max_len)
    assert len(rows.sparse_starts[0]) > 1
    _assert_same_batches([memory], [prepared.rows_as_arrays(rows)])


def test_reading_maps_no_shard_into_memory(gpt_data):
    """Shards are read by positioned reads: nothing of them is mapped into the process, so
    what a run reads stays in the page cache, not in its resident memory."""
    config, out, manifest = gpt_data
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs Linux /proc")
    rows = prepared.split_rows(out, manifest, "train", config.data.max_len)
    rows.take(np.arange(len(rows)))
    with open("/proc/self/maps", encoding="utf-8") as f:
        assert not [line for line in f if out in line]


def test_a_separate_eval_file_is_the_whole_eval_split(corpus_file, tmp_path):
    """data.eval_source: every training document trains, all of the eval file evaluates, in
    memory and prepared alike."""
    eval_file = write_corpus(tmp_path / "held_out.txt", num_docs=30, seed=5)
    config = smoke_config(corpus_file, **{"data.eval_source": str(eval_file)})
    memory = lm.prepare_data(config, str(tmp_path / "memory"))
    manifest = prep.prepare(config, str(tmp_path / "data"), docs_per_shard=50)
    assert manifest["splits"]["train"]["docs"] == 120 and manifest["splits"]["eval"]["docs"] == 30
    from_disk = lm.prepare_data(smoke_config("prepared:" + str(tmp_path / "data")),
                                str(tmp_path / "disk"))
    _assert_same_batches([memory["eval_rows"]], [prepared.rows_as_arrays(from_disk["eval_rows"])])
    from data import sources
    tokenizer = memory["tokenizer"]
    count = lambda path: sum(len(tokenizer.encode(d)) + 2  # noqa: E731 (BOS, EOS)
                             for d in sources.read_documents(str(path)))
    assert memory["info"]["eval_tokens"] == from_disk["info"]["eval_tokens"] == count(eval_file)
    assert memory["info"]["train_tokens"] == from_disk["info"]["train_tokens"] == \
        count(corpus_file)
    _assert_same_batches(_batches(memory["train_rows"], config, 4),
                         _batches(from_disk["train_rows"], config, 4))


def test_two_processes_read_disjoint_slices_covering_the_global_batch(gpt_data):
    config, out, manifest = gpt_data
    rows = prepared.StreamRows(out, manifest["splits"]["train"]["shards"], config.data.max_len)
    read = {0: [], 1: []}

    class Spy:  # records which rows each process's iterator reads
        def __init__(self, p):
            self.p = p

        def __len__(self):
            return len(rows)

        def take(self, indices):
            read[self.p].extend(int(i) for i in indices)
            return rows.take(indices)

    whole = _batches(rows, config, 3)
    parts = [_batches(Spy(p), config, 3, p, 2) for p in (0, 1)]
    for b, (first, second) in enumerate(zip(*parts)):
        for key in whole[b]:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]),
                                          whole[b][key])
    assert not set(read[0]) & set(read[1])
    assert len(read[0]) == len(read[1]) == 3 * config.batch_size // 2


def test_parallel_and_killed_prepares_give_the_same_shards(corpus_file, gpt_data, tmp_path):
    config, out, _ = gpt_data
    reference = _digests(out)
    killed = str(tmp_path / "killed")
    prep.prepare(config, killed, docs_per_shard=7, stop_after_chunks=3)
    assert not os.path.exists(os.path.join(killed, prepared.MANIFEST))
    assert len(prepared.done_shards(killed, "train")) == 3
    # A shard left half-written (no record) is redone; two worker processes finish it, each
    # shard from jobs of 2 documents joined.
    os.makedirs(os.path.join(killed, "train/00003.partial"))
    manifest = prep.prepare(config, killed, docs_per_shard=7, workers=2, piece_docs=2)
    assert _digests(killed) == reference
    assert manifest["splits"] == json.load(open(os.path.join(out, prepared.MANIFEST)))["splits"]
    before = tree_digest(killed)
    again = prep.prepare(config, killed, docs_per_shard=7)  # finished: a no-op
    assert tree_digest(killed) == before and again == manifest
    with pytest.raises(DataError, match="other settings.*docs_per_shard"):
        prep.prepare(config, killed, docs_per_shard=8)
    assert tree_digest(killed) == before


def test_bert_prepared_rows_equal_the_in_memory_ones(corpus_file, tmp_path):
    mlm = tasks.get("mlm_nsp")
    config = bert_exp.get_config("smoke")
    config.data.source = str(corpus_file)
    out = str(tmp_path / "bert")
    prep.prepare(config, out, docs_per_shard=1000)
    memory = mlm.prepare_data(config, str(tmp_path / "memory"))
    disk_config = bert_exp.get_config("smoke")
    disk_config.data.source = "prepared:" + out
    from_disk = mlm.prepare_data(disk_config, str(tmp_path / "disk"))
    for split in ("train_rows", "eval_rows"):
        _assert_same_batches([memory[split]], [prepared.rows_as_arrays(from_disk[split])])
    assert from_disk["info"] == pytest.approx(memory["info"], rel=1e-12)
    # The masking was frozen at preparation: another mask_prob is refused, naming the key.
    disk_config.data.mask_prob = 0.2
    with pytest.raises(DataError, match="data.mask_prob=0.15"):
        mlm.prepare_data(disk_config, str(tmp_path / "disk2"))


def test_translation_prepared_rows_equal_the_in_memory_ones(tmp_path):
    seq2seq = tasks.get("seq2seq")
    config = transformer_exp.get_config("smoke")
    config.data.source, config.data.num_synthetic = "reverse", 300
    out = str(tmp_path / "mt")
    prep.prepare(config, out, docs_per_shard=10_000)
    memory = seq2seq.prepare_data(config, str(tmp_path / "memory"))
    disk_config = transformer_exp.get_config("smoke")
    disk_config.data.source, disk_config.data.num_synthetic = "prepared:" + out, 300
    from_disk = seq2seq.prepare_data(disk_config, str(tmp_path / "disk"))
    for split in ("train_rows", "eval_rows"):
        _assert_same_batches([memory[split]], [prepared.rows_as_arrays(from_disk[split])])
    assert from_disk["bleu_pairs"] == memory["bleu_pairs"]
    assert from_disk["test_pairs"] == memory["test_pairs"]


def test_translation_from_user_tsv_files_streamed(tmp_path):
    """A user's TSV (read streaming by prepare) gives the in-memory rows in one chunk, and
    every pair in several."""
    from data import translation
    seq2seq = tasks.get("seq2seq")
    for name, n, seed in (("train.tsv", 300, 0), ("dev.tsv", 40, 1)):
        pairs = translation.synthetic_pairs("reverse", n, seed=seed)
        (tmp_path / name).write_text("".join(f"{a}\t{b}\n" for a, b in pairs), "utf-8")

    def config(source):
        c = transformer_exp.get_config("smoke")
        c.data.source, c.data.eval_source = source, str(tmp_path / "dev.tsv")
        return c
    prep.prepare(config(str(tmp_path / "train.tsv")), str(tmp_path / "one"))
    memory = seq2seq.prepare_data(config(str(tmp_path / "train.tsv")), str(tmp_path / "m"))
    from_disk = seq2seq.prepare_data(config("prepared:" + str(tmp_path / "one")),
                                     str(tmp_path / "d"))
    for split in ("train_rows", "eval_rows"):
        _assert_same_batches([memory[split]], [prepared.rows_as_arrays(from_disk[split])])
    manifest = prep.prepare(config(str(tmp_path / "train.tsv")), str(tmp_path / "many"),
                            docs_per_shard=64)
    assert len(manifest["splits"]["train"]["shards"]) == 6  # 300 train + 40 dev pairs
    assert manifest["splits"]["train"]["docs"] == 300 and manifest["splits"]["eval"]["docs"] == 40


def test_bad_prepared_data_is_one_clear_error_and_leaves_the_shards(gpt_data, tmp_path):
    config, out, _ = gpt_data
    before = tree_digest(out)
    # A run folder whose tokenizer is another one.
    other_corpus = write_corpus(tmp_path / "other.txt", num_docs=40, seed=7)
    workdir = tmp_path / "run"
    lm.prepare_data(smoke_config(other_corpus), str(workdir))
    with pytest.raises(DataError, match="not the one .* was tokenized with"):
        lm.prepare_data(smoke_config("prepared:" + out), str(workdir))
    # Not prepared, or not finished.
    with pytest.raises(DataError, match="does not exist; make it with"):
        lm.prepare_data(smoke_config("prepared:" + str(tmp_path / "nowhere")), str(workdir))
    unfinished = tmp_path / "unfinished"
    prep.prepare(config, str(unfinished), docs_per_shard=7, stop_after_chunks=1)
    with pytest.raises(DataError, match="did not finish"):
        lm.prepare_data(smoke_config("prepared:" + str(unfinished)), str(tmp_path / "r2"))
    # Prepared for another task.
    with pytest.raises(DataError, match="prepared for config.task='lm'"):
        tasks.get("mlm_nsp").prepare_data(_bert_on(out), str(tmp_path / "r3"))
    assert tree_digest(out) == before
    # A missing and a truncated shard, in a copy.
    import shutil
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    shard = damaged / "train" / "00001" / "tokens.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(DataError, match="00001/tokens.npy has .* bytes.*truncated"):
        lm.prepare_data(smoke_config("prepared:" + str(damaged)), str(tmp_path / "r4"))
    shard.unlink()
    with pytest.raises(DataError, match="00001/tokens.npy is missing"):
        lm.prepare_data(smoke_config("prepared:" + str(damaged)), str(tmp_path / "r5"))


def _bert_on(source):
    config = bert_exp.get_config("smoke")
    config.data.source = "prepared:" + source
    return config


def test_a_corpus_without_text_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty corpus"):
        prep.prepare(smoke_config(empty), str(tmp_path / "out"))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["some text"] * 3}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match="has no column 'text'.*data.text_field"):
        prep.prepare(smoke_config(tmp_path / "c.parquet"), str(tmp_path / "out3"))
    assert not os.path.exists(tmp_path / "out3" / prepared.MANIFEST)
    with pytest.raises(DataError, match="supports the tasks"):
        config = smoke_config(empty)
        config.task = "sft"
        prep.prepare(config, str(tmp_path / "out2"))


@pytest.mark.parametrize("under", [False, True])
def test_out_on_an_existing_file_is_one_error_line(corpus_file, tmp_path, monkeypatch, capsys,
                                                   under):
    """--out=FILE (or a folder under FILE): one error line, exit status 2, the file untouched."""
    import types
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me\n", encoding="utf-8")
    out = existing / "shards" if under else existing
    # main reads flags.FLAGS: the parsed command line, here without absl's global registry
    # (other modules of this session define --config and --out).
    parsed = types.SimpleNamespace(config=smoke_config(corpus_file), out=str(out),
                                   docs_per_shard=7, workers=1, tokenizer_from="")
    monkeypatch.setattr(prep, "flags", types.SimpleNamespace(FLAGS=parsed))
    with pytest.raises(SystemExit) as stopped:
        prep.main([])
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    expected = (f"error: cannot make the folder --out={out} (Not a directory); pass a folder "
                "you can write to" if under else
                f"error: --out={out} is a file, not a folder; pass a new folder name for the "
                "shards (the file is left as it is)")
    assert captured.err.splitlines() == [expected] and "Traceback" not in captured.err
    assert existing.read_text(encoding="utf-8") == "keep me\n"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_resume_on_prepared_data_is_bit_exact(corpus_file, gpt_data, tmp_path):
    """A run on prepared data, stopped and resumed, equals the uninterrupted in-memory run."""
    _, out, _ = gpt_data
    overrides = {"num_train_steps": 8, "log_every_steps": 2, "eval_every_steps": 4,
                 "checkpoint_every_steps": 100}
    full, split = tmp_path / "full", tmp_path / "split"
    loop.train_and_evaluate(smoke_config(corpus_file, **overrides), str(full), lm)
    loop.train_and_evaluate(smoke_config("prepared:" + out, stop_at_step=4, **overrides),
                            str(split), lm)
    loop.train_and_evaluate(smoke_config("prepared:" + out, **overrides), str(split), lm)

    def curve(workdir):
        return [(m["step"], m["split"], m["loss"]) for m in map(
            json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert curve(split) == curve(full)
    a, _ = runs.restore_params(smoke_config(corpus_file, **overrides), str(full), lm)
    b, _ = runs.restore_params(smoke_config("prepared:" + out, **overrides), str(split), lm)
    jax.tree.map(np.testing.assert_array_equal, a, b)
