"""Llama-family decoders (models/llama.py) on the default corpus, and the shapes of published
Llama / Qwen / SmolLM models.

Command (the CPU demo, beside experiments/gpt.py:tiny):
  python -m train.main --config=experiments/llama.py:tiny --workdir=runs/llama_tiny

Variants (`:name`): smoke (tests, seconds); tiny (gpt.py:tiny's loop, data and step count
with a parameter count within 0.3% of it: RMSNorm, rotary positions, SwiGLU, 2 kv heads);
smollm2_135m, qwen3_0_6b and llama3_2_1b (the published shapes, for --dry_run and
experiments.bench; start from the published weights with --config.init_from=hf:DIR, see
docs/llama.md). Everything else (data, optimiser, mesh, loop keys) is gpt.py's; any key can
be overridden.
"""
import ml_collections

from experiments import gpt

# name: model fields over the defaults of `_model` (Llama 2-style, tied, no window)
PRESETS = {
    "smoke": dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64,
                  vocab_size=512, max_len=64),
    # gpt.py:tiny's parameter count (1.072M; this has 1.074M): no position table and GQA's
    # smaller K, V leave room for a gated feed-forward 3.125 x d_model wide.
    "tiny": dict(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, d_ff=400,
                 vocab_size=2048, max_len=128),
    # HuggingFaceTB/SmolLM2-135M
    "smollm2_135m": dict(num_layers=30, d_model=576, num_heads=9, num_kv_heads=3, d_ff=1536,
                         vocab_size=49152, max_len=8192, rope_theta=100000.0,
                         norm_epsilon=1e-5),
    # Qwen/Qwen3-0.6B
    "qwen3_0_6b": dict(num_layers=28, d_model=1024, num_heads=16, num_kv_heads=8,
                       head_dim=128, d_ff=3072, vocab_size=151936, max_len=40960,
                       rope_theta=1000000.0, qk_norm=True),
    # meta-llama/Llama-3.2-1B
    "llama3_2_1b": dict(num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8, d_ff=8192,
                        vocab_size=128256, max_len=131072, rope_theta=500000.0,
                        rope_type="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
                        rope_high_freq_factor=4.0, rope_original_max_len=8192,
                        norm_epsilon=1e-5),
}


def _model(shape: dict) -> ml_collections.ConfigDict:
    fields = dict(
        family="llama", num_kv_heads=0, head_dim=0, rope_theta=10000.0, rope_type="default",
        rope_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
        rope_original_max_len=8192, activation="silu", norm_epsilon=1e-6, norm_offset=0.0,
        embed_scale=False, qkv_bias=False, out_bias=False, mlp_bias=False, qk_norm=False,
        sliding_window=0, tie_embeddings=True, dropout_rate=0.0, attention_dropout_rate=0.0,
        attention="fast", dtype="float32", param_dtype="float32", remat="none",
        scan_layers=False, query_blocks=1, vocab_multiple=1,
        # LoRA (models/lora.py) over the attention and the gated feed-forward's projections.
        lora_rank=0, lora_alpha=16.0, lora_targets="query,key,value,out,gate,up,down")
    return ml_collections.ConfigDict({**fields, **shape})


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown Llama variant {arg!r}; choose one of {sorted(PRESETS)}")
    # The loop, data and optimiser of the GPT preset of the same size.
    c = gpt.get_config(arg if arg in ("smoke", "tiny") else "bench_124m")
    c.model = _model(PRESETS[arg])
    c.init_from = ""  # hf:DIR starts from a Llama / Qwen / Mistral / Gemma folder
    if arg not in ("smoke", "tiny"):
        # The published shapes at bench_124m's batch (4 sequences of 256 tokens) for
        # experiments.bench on a CPU; the model's context (max_len) stays the published one.
        # --dry_run at training lengths: --config.data.max_len=4096.
        c.data.max_len = 256
        c.model.query_blocks = 1
    return c
