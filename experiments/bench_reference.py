"""The Hugging Face PyTorch baseline of experiments/bench.py, for same-machine ratios.

Not part of requirements.txt; run it from a separate environment:
  python -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers
  /tmp/hf/bin/python experiments/bench_reference.py --preset=bench_small [--compile]

Times GPT2LMHeadModel (LlamaForCausalLM for smollm2_135m) (AdamW, forward + backward + step,
random tokens) at the bench presets' shapes, and `generate` with its KV cache (32-token prompt,
128 new tokens, greedy) at batch 1 and 8, printing the same lines as experiments/bench.py. The bert_bench_* presets time
BertForPreTraining (masked-LM labels on 20 positions a row + next-sentence labels), dropout off
as in experiments/bert.py.
"""
import argparse
import statistics
import time

import torch
import transformers

PRESETS = {  # name: (vocab, layers, d_model, heads, seq, batch), as in experiments/gpt.py
    "bench_small": (8192, 4, 256, 4, 256, 16),
    "bench_124m": (50257, 12, 768, 12, 256, 4),
    "bert_bench_mini": (8192, 4, 256, 4, 128, 32),
    "bert_bench_base": (30522, 12, 768, 12, 128, 8),
    "transformer_bench_small": (8192, 3, 256, 4, 64, 32),
    "transformer_bench_base": (32000, 6, 512, 8, 64, 16),
    "smollm2_135m": (49152, 30, 576, 9, 256, 4),  # LlamaForCausalLM; experiments/llama.py
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="bench_small", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--generate", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    vocab, layers, d_model, heads, seq, batch = PRESETS[args.preset]
    if args.preset.startswith("bert"):
        return bench_bert(args, vocab, layers, d_model, heads, seq, batch)
    if args.preset.startswith("transformer"):
        return bench_marian(args, vocab, layers, d_model, heads, seq, batch)
    if args.preset == "smollm2_135m":  # HuggingFaceTB/SmolLM2-135M's config.json
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=1536,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=3,
            max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=max(seq, 160),
                                         n_embd=d_model, n_layer=layers, n_head=heads,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if args.compile else model
    tokens = torch.randint(0, vocab, (batch, seq))

    def step():
        loss = step_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    time_training(step, args, batch, seq)
    if not args.generate:
        return
    model.eval()
    rates = []
    for b in (1, 8):
        prompt = torch.randint(0, vocab, (b, 32))
        kwargs = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False,
                      pad_token_id=0, attention_mask=torch.ones_like(prompt))
        with torch.no_grad():
            model.generate(prompt, **kwargs)
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                model.generate(prompt, **kwargs)
                best = min(best, time.perf_counter() - start)
        rates.append(b * 128 / best)
    print(f"generate (greedy, 32-token prompt, 128 new): batch 1: {rates[0]:,.0f} | "
          f"batch 8: {rates[1]:,.0f} new tokens/s")


def time_training(step, args, batch, seq):
    """Prints training tokens/s of step() from the median of args.steps timed steps after 3
    untimed ones (the median, as experiments/bench.py, shrugs off a noisy neighbour)."""
    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(f"train: {batch * seq / seconds:,.0f} tokens/s | torch {torch.__version__} "
          f"{'compiled' if args.compile else 'eager'} | batch {batch} x seq {seq}")


def bench_bert(args, vocab, layers, d_model, heads, seq, batch):
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * d_model,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForPreTraining(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if args.compile else model
    tokens = torch.randint(7, vocab, (batch, seq))
    types = (torch.arange(seq) >= seq // 2).long().expand(batch, seq)
    labels = torch.full((batch, seq), -100)
    for row in range(batch):
        picked = torch.randperm(seq - 1)[:20] + 1
        labels[row, picked] = torch.randint(7, vocab, (20,))
    nsp = torch.randint(0, 2, (batch,))

    def step():
        loss = step_model(input_ids=tokens, token_type_ids=types, labels=labels,
                          next_sentence_label=nsp).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    time_training(step, args, batch, seq)


def bench_marian(args, vocab, layers, d_model, heads, seq, batch):
    """MarianMTModel (the original Transformer's shape: post-LN, ReLU, sinusoids, shared
    embeddings), label-smoothed loss as in training; target tokens/s."""
    config = transformers.MarianConfig(
        vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, activation_function="relu",
        max_position_embeddings=max(seq, 512), share_encoder_decoder_embeddings=True,
        pad_token_id=0, decoder_start_token_id=2)
    model = transformers.MarianMTModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = torch.compile(model) if args.compile else model
    src = torch.randint(7, vocab, (batch, seq))
    tgt = torch.randint(7, vocab, (batch, seq))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step():
        logits = step_model(input_ids=src, decoder_input_ids=tgt).logits
        loss = loss_fn(logits.reshape(-1, vocab), tgt.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    time_training(step, args, batch, seq)


if __name__ == "__main__":
    main()
