"""BERT pretraining (masked LM + next sentence) on the default corpus (World English Bible).

Command (the CPU demo, a few minutes):
  python -m train.main --config=experiments/bert.py:tiny --workdir=runs/bert_tiny
then fine-tune it: experiments/bert_classify.py, experiments/bert_squad.py (init_from).

Variants (`:name`): smoke (tests, seconds), tiny (CPU demo), mini (4 layers, 256 wide: the
BERT-Mini of Turc et al. 2019), base and large (Devlin et al. 2018, 110M / 340M), and the
benchmark shapes bert_bench_mini / bert_bench_base timed by experiments/bench.py.
base/large use the paper's optimiser (sec. A.2): Adam lr 1e-4, beta1 0.9, beta2 0.999, weight
decay 0.01, 10k warmup steps then linear decay, batch 256, sequences of 128 tokens (the paper's
first 90% of steps; rerun with --config.data.max_len=512 --config.data.max_predictions=80 for the
rest).

Measured results: docs/bert.md.
"""
import os

import ml_collections

from data import sources

# name: (num_layers, d_model, num_heads, vocab_size, seq_len, max_predictions)
PRESETS = {
    "smoke": (2, 32, 2, 512, 32, 5),
    "tiny": (2, 128, 2, 2048, 64, 10),
    "mini": (4, 256, 4, 8192, 128, 20),
    "base": (12, 768, 12, 30522, 128, 20),
    "large": (24, 1024, 16, 30522, 128, 20),
    "bert_bench_mini": (4, 256, 4, 8192, 128, 20),
    "bert_bench_base": (12, 768, 12, 30522, 128, 20),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown BERT variant {arg!r}; choose one of {sorted(PRESETS)}")
    num_layers, d_model, num_heads, vocab_size, seq_len, max_predictions = PRESETS[arg]
    c = ml_collections.ConfigDict()
    c.task = "mlm_nsp"
    c.seed = 0
    c.init_from = ""  # pretraining starts from scratch; hf:DIR from a Hugging Face BERT folder
    c.model = ml_collections.ConfigDict(dict(
        family="bert", vocab_size=vocab_size, max_len=512, num_layers=num_layers,
        d_model=d_model, num_heads=num_heads, d_ff=4 * d_model, type_vocab_size=2,
        dropout_rate=0.1, attention_dropout_rate=0.1, heads=("mlm", "nsp"), num_labels=2,
        attention="fast", dtype="float32", param_dtype="float32",
        remat="none", scan_layers=False, activation="gelu_exact", ln_epsilon=1e-12,
        vocab_multiple=1,
        # LoRA (models/lora.py): rank 0 = off; rank > 0 trains adapters over init_from's weights.
        lora_rank=0, lora_alpha=16.0, lora_targets="query,key,value,out,wi,wo"))
    c.data = ml_collections.ConfigDict(dict(
        # source: "bible", a glob of .txt / .jsonl[.gz|.zst] / .parquet files, or prepared:DIR
        # (python -m experiments.prepare). eval_source: a separate eval corpus ("" = every
        # k-th document of source, eval_fraction of them).
        source="bible", eval_source="", text_field="text", bible_version="4",
        eval_fraction=0.05, cache_dir="", tokenizer_type="bpe",
        # A larger corpus trains the tokenizer on a seeded sample of this many lines.
        tokenizer_max_sentences=2_000_000,
        max_len=seq_len, max_predictions=max_predictions,
        mask_prob=0.15, whole_word=False, short_seq_prob=0.1, dupe_factor=5))
    c.opt = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, schedule="linear", warmup_steps=10_000, end_lr_fraction=0.0,
        weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6, clip_grad_norm=1.0, grad_accum_steps=1))
    # cpu_devices > 1: a CPU run exposes its cores as that many devices (train/host.py)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, cpu_devices=0))
    c.sharding_rules = ()
    c.batch_size = 256  # global, in sequences
    c.eval_batch_size = 64
    c.num_train_steps = 1_000_000
    c.eval_every_steps = 10_000
    c.num_eval_steps = 0  # 0: the whole eval split
    c.log_every_steps = 100
    c.checkpoint_every_steps = 10_000
    c.keep_checkpoints = 3
    c.average_checkpoints = 0  # >1: evaluate the mean of the last N checkpoints at the end
    c.stop_at_step = 0
    # A step whose loss or gradient norm is not finite stops the run (0), or is skipped, up to
    # this many in a row, and counted in the metrics as skipped_steps.
    c.skip_nonfinite_steps = 0
    # XLA's compiled programs are kept here, so a resumed or preempted run starts without
    # compiling again ("" turns it off; train/profiling.py).
    c.compilation_cache_dir = os.path.join(sources.default_cache_dir(), "xla")
    c.profile_steps = ""  # "FIRST-LAST": a profiler trace of those steps in <workdir>/profile

    if arg in ("smoke", "tiny", "mini"):
        # Small models on a 2-core CPU: no dropout, a short warmup and a larger step size.
        c.model.max_len = seq_len
        c.model.dropout_rate = c.model.attention_dropout_rate = 0.0
        c.opt.schedule, c.opt.end_lr_fraction = "cosine", 0.1
    if arg == "smoke":
        c.data.dupe_factor = 2
        c.batch_size = c.eval_batch_size = 8
        c.num_train_steps, c.eval_every_steps, c.log_every_steps = 20, 10, 5
        c.checkpoint_every_steps, c.num_eval_steps = 10, 2
        c.opt.warmup_steps, c.opt.learning_rate = 5, 3e-3
    elif arg == "tiny":
        # Only ~15% of tokens carry a loss, so MLM needs many rows per step to move in minutes.
        c.batch_size, c.eval_batch_size = 128, 64
        c.num_train_steps, c.eval_every_steps, c.log_every_steps = 1500, 500, 50
        c.checkpoint_every_steps, c.num_eval_steps = 500, 0
        c.opt.warmup_steps, c.opt.learning_rate = 100, 2e-3
    elif arg == "mini":
        c.batch_size = c.eval_batch_size = 32
        c.num_train_steps, c.eval_every_steps = 20_000, 1000
        c.checkpoint_every_steps, c.num_eval_steps = 1000, 0
        c.opt.warmup_steps, c.opt.learning_rate = 1000, 5e-4
    elif arg.startswith("bert_bench"):
        c.model.dropout_rate = c.model.attention_dropout_rate = 0.0
        c.batch_size = 32 if arg == "bert_bench_mini" else 8
    return c
