"""Data-pipeline benchmark: prepare throughput, input throughput and host memory at 1 GB.

  python -m experiments.bench_data --size_mb=1024 --out=/tmp/bench_data

On a corpus of size_mb of text (the public-domain Bible versions, chapter by chapter, cycled
until the size is reached; written once into --out), it measures, in one run:
  1. prepare throughput (tokens/s) with --workers processes, against the same tokenizer called
     in one Python loop (the in-memory path, data/lm.py tokenize_documents) and against Hugging
     Face `tokenizers` batch encoding of the same model, both on the first --sample_mb;
  2. the input pipeline alone (batches/s of make_iterator over the prepared rows at the
     bench_124m shape) against what the bench_124m training step consumes;
  3. the peak host memory (max RSS) of a short `tiny` training run on prepared data at 10 MB
     and at size_mb, and of the same run in memory (in memory at size_mb only with
     --in_memory_full, as it tokenizes the whole corpus in one loop first).
--parts picks some of the three; results of earlier parts stay in --out/results.json.
Measured figures: docs/data.md "Large corpora".
"""
import itertools
import json
import os
import subprocess
import sys
import time

from absl import app, flags

from data import lm as lm_data, tokenizer_io
from data import prepared, sources
from data import tokenizer as tok
from experiments import gpt

flags.DEFINE_string("out", "/tmp/bench_data", "Work directory (corpora, preparations, runs).")
flags.DEFINE_integer("size_mb", 1024, "Size of the large corpus in MB of UTF-8 text.")
flags.DEFINE_integer("small_mb", 10, "Size of the small corpus for the memory comparison.")
flags.DEFINE_integer("sample_mb", 32, "Text for the single-loop and HF tokenizer timings.")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "Prepare processes.")
flags.DEFINE_integer("pipeline_batches", 400, "Batches timed for the input pipeline.")
flags.DEFINE_bool("step", True, "Time the bench_124m training step in this run.")
flags.DEFINE_list("parts", ["prepare", "pipeline", "memory"], "What to measure; a later part "
                  "reuses the corpora and preparations an earlier run left in --out.")
flags.DEFINE_bool("in_memory_full", False, "Also run the in-memory path on the large corpus.")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(path: str, size_mb: int) -> str:
    """Bible chapters of the public-domain versions, cycled to size_mb; written once."""
    if os.path.exists(path):
        return path
    chapters = [text for version in sources.PUBLIC_DOMAIN_VERSIONS
                for _, text in sources.read_bible_chapters(sources.fetch_bible_db(), version)]
    target, written = size_mb * 2 ** 20, 0
    with open(path + ".partial", "w", encoding="utf-8") as f:
        for copy in itertools.count():
            for i, text in enumerate(chapters):
                doc = f"{text}\n\n"
                f.write(doc)
                written += len(doc.encode("utf-8"))
                if written >= target:
                    break
            if written >= target:
                break
    os.replace(path + ".partial", path)
    return path


def first_documents(path: str, mb: int) -> list[str]:
    docs, size = [], 0
    for doc in sources.iter_documents(path):
        docs.append(doc)
        size += len(doc.encode("utf-8"))
        if size >= mb * 2 ** 20:
            return docs
    return docs


def run_prepare(corpus: str, out: str, tokenizer_from: str = "") -> tuple[dict, float]:
    args = [sys.executable, "-m", "experiments.prepare", "--config=experiments/gpt.py:tiny",
            f"--config.data.source={corpus}", f"--out={out}", f"--workers={FLAGS.workers}"]
    if tokenizer_from:
        args.append(f"--tokenizer_from={tokenizer_from}")
    t0 = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True)
    return prepared.read_manifest(out), time.perf_counter() - t0


# Run in a fresh interpreter, this starts the command from a process of a few MB and prints
# the command's max RSS: Linux carries a process's peak RSS across exec, so a command started
# straight from this (large) benchmark process would report this process's peak instead.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss if os.waitstatus_to_exitcode(status) == 0 else -1)
"""


def peak_rss_mib(args: list[str]) -> tuple[float, float]:
    """(max RSS in MiB, seconds) of a subprocess run to completion."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *args], cwd=ROOT, check=True,
                          stdout=subprocess.PIPE, text=True)
    kib = int(proc.stdout.strip().splitlines()[-1])
    if kib < 0:
        raise RuntimeError(f"{' '.join(args)} failed")
    return kib / 1024, time.perf_counter() - t0


def train_args(source: str, workdir: str) -> list[str]:
    return [sys.executable, "-m", "train.main", "--config=experiments/gpt.py:tiny",
            f"--workdir={workdir}", f"--config.data.source={source}",
            "--config.num_train_steps=10", "--config.eval_every_steps=10",
            "--config.num_eval_steps=4", "--config.log_every_steps=5"]


def pipeline_throughput(directory: str, manifest: dict, batch_size: int, max_len: int) -> float:
    rows = prepared.split_rows(directory, manifest, "train", max_len)
    it = lm_data.make_iterator(rows, batch_size, seed=0)
    next(it)
    t0 = time.perf_counter()
    for _ in range(FLAGS.pipeline_batches):
        next(it)
    return FLAGS.pipeline_batches / (time.perf_counter() - t0)


def step_tokens_per_second() -> float:
    """Training tokens/s of the bench_124m step, as `make bench` measures it."""
    proc = subprocess.run([sys.executable, "-m", "experiments.bench",
                           "--config=experiments/gpt.py:bench_124m", "--generate=False"],
                          cwd=ROOT, check=True, capture_output=True, text=True)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("train:"))
    print(line, flush=True)
    return float(line.split()[1].replace(",", ""))


def prepare_part(small: str, large: str, out) -> dict:
    """Prepare throughput on the large corpus, against one Python loop and HF tokenizers."""
    for name in ("prep_small", "prep_large"):  # timed from scratch
        subprocess.run(["rm", "-rf", out(name)], check=True)
    results = {}
    # The tokenizer is trained on the small corpus; the large one is then prepared with it,
    # so the prepare time is tokenizing; training on the large corpus is timed on its own.
    small_manifest, small_s = run_prepare(small, out("prep_small"))
    results["prepare_small_s"] = small_s
    t0 = time.perf_counter()
    tok.train_tokenizer(sources.iter_documents(large), out("large_tokenizer.model"), 8000,
                        max_sentences=2_000_000, seed=0)
    results["tokenizer_training_on_large_s"] = time.perf_counter() - t0
    large_manifest, large_s = run_prepare(large, out("prep_large"), out("prep_small"))
    tokens = large_manifest["splits"]["train"]["tokens"] + large_manifest["splits"]["eval"]["tokens"]
    results.update(prepare_large_s=large_s, large_tokens=tokens,
                   prepare_tokens_per_s=tokens / large_s)

    tokenizer = tokenizer_io.load_run_tokenizer(out("prep_small"))
    docs = first_documents(large, FLAGS.sample_mb)
    t0 = time.perf_counter()
    ids, _ = lm_data.tokenize_documents(docs, tokenizer)
    results["single_loop_tokens_per_s"] = len(ids) / (time.perf_counter() - t0)
    import tokenizers
    tokenizer_io.export_hf(tokenizer, out("hf_tokenizer"), "gpt")
    hf = tokenizers.Tokenizer.from_file(out("hf_tokenizer", "tokenizer.json"))
    t0 = time.perf_counter()
    encoded = hf.encode_batch(docs, add_special_tokens=False)
    hf_tokens = sum(len(e.ids) for e in encoded) + 2 * len(docs)  # + BOS / EOS, as ours
    results["hf_batch_tokens_per_s"] = hf_tokens / (time.perf_counter() - t0)
    print(json.dumps(results, indent=1), flush=True)
    return results


def pipeline_part(out, large_manifest: dict) -> dict:
    """Batches/s of the input pipeline alone against the bench_124m step's demand."""
    results = {}
    shape = gpt.get_config("bench_124m")
    bps = pipeline_throughput(out("prep_large"), large_manifest, shape.batch_size,
                              shape.data.max_len)
    results.update(pipeline_batches_per_s=bps,
                   pipeline_tokens_per_s=bps * shape.batch_size * shape.data.max_len)
    if FLAGS.step:
        results["bench_124m_step_tokens_per_s"] = step_tokens_per_second()
        results["pipeline_over_step"] = (results["pipeline_tokens_per_s"]
                                         / results["bench_124m_step_tokens_per_s"])
    print(json.dumps(results, indent=1), flush=True)
    return results


def memory_part(small: str, large: str, out) -> dict:
    """Peak RSS of a short training run on prepared data and in memory, small and large."""
    results = {}
    runs = [("prepared", FLAGS.small_mb, "prepared:" + out("prep_small")),
            ("prepared", FLAGS.size_mb, "prepared:" + out("prep_large")),
            ("in memory", FLAGS.small_mb, small)]
    if FLAGS.in_memory_full:
        runs.append(("in memory", FLAGS.size_mb, large))
    for how, mb, source in runs:
        workdir = out(f"run_{how.replace(' ', '_')}_{mb}mb")
        subprocess.run(["rm", "-rf", workdir], check=True)
        rss, seconds = peak_rss_mib(train_args(source, workdir))
        results[f"peak_rss_mib {how} {mb}MB"] = rss
        results[f"run_s {how} {mb}MB"] = seconds
        print(f"{how:>9} {mb:>5} MB: peak RSS {rss:,.0f} MiB, {seconds:.0f} s", flush=True)
    return results


def main(argv):
    del argv
    os.makedirs(FLAGS.out, exist_ok=True)
    out = lambda *p: os.path.join(FLAGS.out, *p)  # noqa: E731
    results = {}
    if os.path.exists(out("results.json")):  # parts measured before, kept unless measured again
        with open(out("results.json"), encoding="utf-8") as f:
            results = json.load(f)
    small = write_corpus(out(f"corpus_{FLAGS.small_mb}mb.txt"), FLAGS.small_mb)
    large = write_corpus(out(f"corpus_{FLAGS.size_mb}mb.txt"), FLAGS.size_mb)

    if "prepare" in FLAGS.parts:
        results.update(prepare_part(small, large, out))
    large_manifest = prepared.read_manifest(out("prep_large"))
    if "pipeline" in FLAGS.parts:
        results.update(pipeline_part(out, large_manifest))
    if "memory" in FLAGS.parts:
        results.update(memory_part(small, large, out))
    with open(out("results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    app.run(main)
