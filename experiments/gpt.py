"""GPT language models on the default corpus (public-domain World English Bible).

Command (the CPU demo; `make demo` runs it):
  python -m train.main --config=experiments/gpt.py:tiny --workdir=runs/gpt_tiny

Variants (`:name`): smoke (tests, seconds), tiny (CPU demo, minutes), gpt1 (117M),
gpt2 / gpt2_medium / gpt2_large / gpt2_xl (124M / 350M / 774M / 1.5B, Radford et al. 2019),
bench_small and bench_124m (the shapes timed by experiments/bench.py).
Any key can be overridden: --config.opt.learning_rate=3e-4 --config.mesh.fsdp=2.

Measured (2-core CPU, 2026-11-26): `tiny`, 1,500 steps in 6 minutes, eval loss 3.784 nats
(perplexity 44.0) on Ruth, Jonah and Philemon against 6.034 for a unigram model of the
training text; bench figures in docs/benchmarks.md.
"""
import os

import ml_collections

from data import sources

# name: (num_layers, d_model, num_heads, vocab_size, max_len)
PRESETS = {
    "smoke": (2, 32, 2, 512, 64),
    "tiny": (4, 128, 4, 2048, 128),
    "gpt1": (12, 768, 12, 40478, 512),
    "gpt2": (12, 768, 12, 50257, 1024),
    "gpt2_medium": (24, 1024, 16, 50257, 1024),
    "gpt2_large": (36, 1280, 20, 50257, 1024),
    "gpt2_xl": (48, 1600, 25, 50257, 1024),
    "bench_small": (4, 256, 4, 8192, 256),
    "bench_124m": (12, 768, 12, 50257, 256),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown GPT variant {arg!r}; choose one of {sorted(PRESETS)}")
    num_layers, d_model, num_heads, vocab_size, max_len = PRESETS[arg]
    c = ml_collections.ConfigDict()
    c.task = "lm"
    c.seed = 0
    c.init_from = ""  # hf:DIR starts from a Hugging Face GPT-2 folder (docs/pretrained.md)
    c.model = ml_collections.ConfigDict(dict(
        family="gpt", vocab_size=vocab_size, max_len=max_len, num_layers=num_layers,
        d_model=d_model, num_heads=num_heads, d_ff=4 * d_model, dropout_rate=0.1,
        attention_dropout_rate=0.0, attention="fast", dtype="float32", param_dtype="float32",
        remat="none", scan_layers=False, query_blocks=1, activation="gelu", ln_epsilon=1e-5,
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
        max_len=max_len))
    c.opt = ml_collections.ConfigDict(dict(
        learning_rate=6e-4, schedule="cosine", warmup_steps=200, end_lr_fraction=0.1,
        weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_grad_norm=1.0, grad_accum_steps=1))
    # cpu_devices > 1: a CPU run exposes its cores as that many devices (train/host.py)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, cpu_devices=0))
    c.sharding_rules = ()  # empty: train/sharding.py DEFAULT_RULES
    c.batch_size = 32  # global, in sequences
    c.eval_batch_size = 32
    c.num_train_steps = 5000
    c.eval_every_steps = 500
    c.num_eval_steps = 0  # 0: the whole eval split
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    c.average_checkpoints = 0  # >1: evaluate the mean of the last N checkpoints at the end
    c.stop_at_step = 0  # >0: save and exit after this step, as on SIGTERM (preemption drills)
    # A step whose loss or gradient norm is not finite stops the run (0), or is skipped, up to
    # this many in a row, and counted in the metrics as skipped_steps.
    c.skip_nonfinite_steps = 0
    # XLA's compiled programs are kept here, so a resumed or preempted run starts without
    # compiling again ("" turns it off; train/profiling.py).
    c.compilation_cache_dir = os.path.join(sources.default_cache_dir(), "xla")
    c.profile_steps = ""  # "FIRST-LAST": a profiler trace of those steps in <workdir>/profile

    if arg == "smoke":
        # Rows of 32 tokens keep pretraining to seconds; the 64-token context is what the
        # post-training smoke presets (gpt_sft.py, gpt_dpo.py, ...) need of their base run.
        c.data.max_len = 32
        c.model.dropout_rate = 0.0
        c.batch_size = c.eval_batch_size = 8
        c.num_train_steps, c.eval_every_steps, c.log_every_steps = 20, 10, 5
        c.checkpoint_every_steps, c.num_eval_steps = 10, 2
        c.opt.warmup_steps, c.opt.learning_rate = 5, 3e-3
    elif arg == "tiny":
        c.model.dropout_rate = 0.0
        c.batch_size = c.eval_batch_size = 16
        c.num_train_steps, c.eval_every_steps, c.log_every_steps = 1500, 250, 25
        c.checkpoint_every_steps, c.num_eval_steps = 500, 20
        c.opt.warmup_steps, c.opt.learning_rate = 100, 2e-3
    elif arg.startswith("bench"):
        c.model.dropout_rate = 0.0
        # Causal attention in 4 query blocks: the same numbers with 5/8 of the score work
        # (XLA:CPU computes every masked score; cuDNN's flash attention on GPUs does not).
        c.model.query_blocks = 4
        c.batch_size = 16 if arg == "bench_small" else 4
        if arg == "bench_small":
            # On a CPU, two devices run the two batch halves side by side, which is faster at
            # this shape and slower at bench_124m's (docs/benchmarks.md). Ignored on GPU/TPU.
            c.mesh.cpu_devices = 2
    elif arg == "gpt1":
        c.opt.learning_rate, c.opt.warmup_steps = 2.5e-4, 2000  # Radford et al. 2018, sec. 4.1
        c.batch_size = 64
    return c
