"""The encoder-decoder Transformer (Vaswani et al. 2017) for translation.

Command (the CPU demo: World English Bible -> Louis Segond 1910 French, verse pairs):
  python -m train.main --config=experiments/transformer.py:tiny --workdir=runs/transformer_tiny
Measured (2-core CPU, 2026-11-26): 4,000 steps (about 45 minutes) give dev BLEU 3.7 and
test BLEU 2.8 (averaged checkpoints); resumed to 7,000 steps (--config.num_train_steps=7000),
dev BLEU 8.1 and test BLEU 8.2.
The sanity task (copy or reverse random symbol strings):
  python -m train.main --config=experiments/transformer.py:smoke --workdir=runs/reverse \
      --config.data.source=reverse

Variants: smoke (tests), tiny (CPU), base (6+6 layers, 512, 8 heads, 2048, dropout 0.1, ~65M)
and big (1024, 16 heads, 4096, dropout 0.3, ~213M); transformer_bench_small / _base are the
shapes timed by experiments/bench.py (source and target length 64). The paper's training recipe (sec. 5.3, 5.4):
Adam beta1 0.9, beta2 0.98, eps 1e-9; lrate = d_model^-0.5 * min(step^-0.5, step *
warmup^-1.5) with warmup 4000; label smoothing 0.1; beam 4, length penalty 0.6.
Own data: --config.data.source=train.tsv --config.data.eval_source=dev.tsv (source<TAB>target)
[--config.data.test_source=test.tsv: BLEU on it at the end of training].
Checkpoint averaging (sec. 6.1): --config.average_checkpoints=N (<= keep_checkpoints).
"""
import os

import ml_collections

from data import sources

# name: (num_layers, d_model, num_heads, d_ff, vocab_size, max_len, dropout)
PRESETS = {
    "smoke": (2, 32, 2, 64, 384, 32, 0.0),
    "tiny": (3, 128, 4, 512, 4000, 96, 0.1),
    "base": (6, 512, 8, 2048, 37000, 256, 0.1),
    "big": (6, 1024, 16, 4096, 37000, 256, 0.3),
    "transformer_bench_small": (3, 256, 4, 1024, 8192, 64, 0.0),
    "transformer_bench_base": (6, 512, 8, 2048, 32000, 64, 0.0),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown Transformer variant {arg!r}; choose one of {sorted(PRESETS)}")
    num_layers, d_model, num_heads, d_ff, vocab_size, max_len, dropout = PRESETS[arg]
    c = ml_collections.ConfigDict()
    c.task = "seq2seq"
    c.seed = 0
    c.init_from = ""  # hf:DIR starts from a Hugging Face MarianMT folder (docs/pretrained.md)
    c.model = ml_collections.ConfigDict(dict(
        family="transformer", vocab_size=vocab_size, max_len=max_len, num_layers=num_layers,
        d_model=d_model, num_heads=num_heads, d_ff=d_ff, dropout_rate=dropout,
        attention_dropout_rate=0.0, pre_ln=False, activation="relu", attention="fast",
        remat="none", label_smoothing=0.1, dtype="float32", param_dtype="float32",
        embed_scale=True, position_layout="interleaved", final_logits_bias=False,
        ln_epsilon=1e-5, pad_id=0, vocab_multiple=1))
    c.data = ml_collections.ConfigDict(dict(
        source="bible", eval_source="", test_source="", source_version="4", target_version="l",
        cache_dir="", tokenizer_type="bpe", tokenizer_max_sentences=2_000_000,
        max_len=max_len, pack=True,
        num_synthetic=20000, eval_sentences=200))
    c.decode = ml_collections.ConfigDict(dict(beam_size=4, alpha=0.6))
    c.opt = ml_collections.ConfigDict(dict(
        learning_rate=1.0, schedule="noam", warmup_steps=4000, end_lr_fraction=0.0,
        weight_decay=0.0, b1=0.9, b2=0.98, eps=1e-9, clip_grad_norm=0.0, grad_accum_steps=1))
    # cpu_devices > 1: a CPU run exposes its cores as that many devices (train/host.py)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, cpu_devices=0))
    c.sharding_rules = ()
    c.batch_size = 64  # global, in rows of max_len source + max_len target tokens
    c.eval_batch_size = 64
    c.num_train_steps = 100_000
    c.eval_every_steps = 5000
    c.num_eval_steps = 0
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5000
    c.keep_checkpoints = 5
    # Sec. 6.1: the last 5 (base) or 20 (big) checkpoints, written at 10-minute intervals,
    # are averaged; that interval was about 1,400 steps for base, 600 for big. The mean is
    # evaluated (dev and test) at the end of training, and experiments.translate uses it.
    c.average_checkpoints = 0
    c.stop_at_step = 0
    # A step whose loss or gradient norm is not finite stops the run (0), or is skipped, up to
    # this many in a row, and counted in the metrics as skipped_steps.
    c.skip_nonfinite_steps = 0
    # XLA's compiled programs are kept here, so a resumed or preempted run starts without
    # compiling again ("" turns it off; train/profiling.py).
    c.compilation_cache_dir = os.path.join(sources.default_cache_dir(), "xla")
    c.profile_steps = ""  # "FIRST-LAST": a profiler trace of those steps in <workdir>/profile
    if arg == "smoke":
        # The sanity task: reversing strings of 3-12 of 20 symbols, 100% exact match on
        # held-out strings after 1,000 steps (about a minute on 2 CPU cores).
        c.data.source, c.data.num_synthetic, c.data.eval_sentences = "reverse", 2000, 32
        c.decode.beam_size = 2
        c.batch_size, c.eval_batch_size = 32, 16
        c.num_train_steps, c.eval_every_steps, c.log_every_steps = 1000, 500, 100
        c.checkpoint_every_steps, c.num_eval_steps = 500, 2
        # Noam's peak step size is scale * d_model^-0.5 * warmup^-0.5: 0.2 * 0.18 * 0.1 here.
        # Clipping the gradient norm at 1.0 keeps the loss spikes after that peak from
        # undoing the learned reversal (with it, seeds 0-3 reach 100% exact match).
        c.opt.warmup_steps, c.opt.learning_rate = 100, 0.2
        c.opt.clip_grad_norm = 1.0
    elif arg == "base":
        c.checkpoint_every_steps, c.average_checkpoints = 1400, 5
    elif arg == "big":
        c.num_train_steps, c.checkpoint_every_steps = 300_000, 600
        c.average_checkpoints = c.keep_checkpoints = 20
    elif arg.startswith("transformer_bench"):
        c.batch_size = 32 if arg == "transformer_bench_small" else 16
    elif arg == "tiny":
        c.batch_size = c.eval_batch_size = 32
        c.num_train_steps, c.eval_every_steps, c.log_every_steps = 4000, 1000, 50
        c.num_eval_steps, c.opt.warmup_steps, c.opt.learning_rate = 20, 400, 1.0
        # The last 4 checkpoints, 250 steps apart, are averaged at the end (sec. 6.1).
        c.checkpoint_every_steps, c.keep_checkpoints, c.average_checkpoints = 250, 4, 4
    return c
