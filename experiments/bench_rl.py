"""PPO step benchmark: rollout throughput, the step split into generation, scoring and update,
against Hugging Face `generate` on the same shape, and per-device memory with LoRA and without.

  python -m experiments.bench_rl                       # gpt2 (124M) shape, 8 prompts
  python -m experiments.bench_rl --preset=smoke --steps=2 --hf=False   # seconds, any machine

The policy is randomly initialised at the preset's shape (no checkpoint is read), the prompts
are random token ids of --prompt_len, every rollout runs --new_tokens (no end token is ever
special-cased), and the reward is the host token F1 against a fixed answer, so the split measures our machinery.
The step is the real one of train/tasks/ppo.py (make_train_step, composed from train/rl/): the
same jitted rollout and update a training run uses. Memory is XLA's buffer assignment of the compiled update (arguments
+ temporaries, per device) for full fine-tuning and for LoRA (rank --lora_rank); on CPU the
process peak RSS is printed too. Hugging Face: GPT2LMHeadModel of the same shape, sampling
with its KV cache, fp32, torch on the same threads.
"""
import resource
import time
import types

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "gpt2", "experiments/gpt.py preset of the model shape")
flags.DEFINE_integer("batch", 8, "prompts per step")
flags.DEFINE_integer("prompt_len", 32, "prompt tokens")
flags.DEFINE_integer("new_tokens", 32, "sampled tokens per response")
flags.DEFINE_integer("steps", 3, "timed steps (after one compiling step)")
flags.DEFINE_integer("lora_rank", 8, "LoRA rank of the memory comparison")
flags.DEFINE_bool("hf", True, "also time Hugging Face generate (needs torch + transformers)")


class _Tokens:
    """What the step needs of a tokenizer: decode (to hand text to the reward)."""

    def decode(self, ids):
        return " ".join(map(str, ids))


def make_config(lora_rank):
    from experiments import gpt_ppo, gpt
    from train.config import override
    c = gpt_ppo.rl_config("smoke", "ppo")
    shape = gpt.get_config(FLAGS.preset).model
    c.model.update({k: shape[k] for k in ("num_layers", "d_model", "num_heads", "d_ff",
                                            "vocab_size", "max_len", "vocab_multiple")
                    if k in shape})
    c.model.max_len = max(c.model.max_len, FLAGS.prompt_len + FLAGS.new_tokens)
    return override(c, **{
        "batch_size": FLAGS.batch, "data.max_len": FLAGS.prompt_len + FLAGS.new_tokens,
        "rl.max_new_tokens": FLAGS.new_tokens, "rl.stall_steps": 0, "model.lora_rank": lora_rank,
        "rl.reward": "fn:train.rl.rewards:answer_f1", "num_train_steps": 1000,
        "mesh.data": 1})


def build_step(lora_rank):
    """(train_step, state, batch, config) with random weights and prompts."""
    import flax.linen as nn
    import jax

    from train import sharding, step as step_lib, tasks
    from train.rl import rewards, settings
    config = make_config(lora_rank)
    task = tasks.get("ppo")
    s = step_lib.build(task, config)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.model.vocab_size, (FLAGS.batch, FLAGS.prompt_len),
                           dtype=np.int32)
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        state = s.init_fn(jax.random.key(0))
        full = step_lib.full_params(state.params, state.frozen)
        end = types.SimpleNamespace(end_id=config.model.vocab_size - 1)  # a chat format's end
        data = {"tokenizer": _Tokens(), "chat": end,
                "train_text": ([""] * FLAGS.batch, [("7",)] * FLAGS.batch),
                "reward": rewards.load_reward(config, None)}
        if not lora_rank:
            data["reference_weights"] = jax.device_get(
                {k: v for k, v in full.items() if k != settings.VALUE_HEAD})
        train_step = task.make_train_step(s, config, data)
        batch = sharding.global_batch(
            {"prompt": prompts, "prompt_valid": np.ones_like(prompts),
             "index": np.arange(FLAGS.batch, dtype=np.int32)}, s.batch_shard)
    return train_step, state, batch, config, s


def run_ppo(lora_rank):
    import flax.linen as nn
    import jax
    train_step, state, batch, config, s = build_step(lora_rank)
    rng = jax.random.key(1)
    times = []
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        for i in range(FLAGS.steps + 1):
            t0 = time.perf_counter()
            state, m = train_step(state, batch, rng)
            m = jax.device_get(m)
            if i:  # the first step compiles
                times.append((time.perf_counter() - t0, m["time_rollout_sum"],
                              m["time_reward_sum"], m["time_update_sum"]))
        memory = train_step.update_memory(state)
    med = np.median(np.asarray(times), axis=0)
    return {"step_s": med[0], "rollout_s": med[1], "reward_s": med[2], "update_s": med[3],
            "tokens_per_s": FLAGS.batch * FLAGS.new_tokens / med[1], **memory}


def run_hf(config):
    import torch
    import transformers
    torch.manual_seed(0)
    m = config.model
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.max_len, n_embd=m.d_model, n_layer=m.num_layers,
        n_head=m.num_heads, n_inner=m.d_ff, bos_token_id=0, eos_token_id=m.vocab_size - 1,
        pad_token_id=0)).eval()
    prompts = torch.randint(0, m.vocab_size, (FLAGS.batch, FLAGS.prompt_len))
    times = []
    with torch.no_grad():
        for i in range(FLAGS.steps + 1):
            t0 = time.perf_counter()
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts),
                                 do_sample=True, max_new_tokens=FLAGS.new_tokens,
                                 min_new_tokens=FLAGS.new_tokens)
            assert out.shape[1] == FLAGS.prompt_len + FLAGS.new_tokens
            if i:
                times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    return {"rollout_s": t, "tokens_per_s": FLAGS.batch * FLAGS.new_tokens / t,
            "threads": torch.get_num_threads()}


def main(_):
    mib = 2 ** 20
    results = {"full": run_ppo(0), f"LoRA r{FLAGS.lora_rank}": run_ppo(FLAGS.lora_rank)}
    config = make_config(0)
    print(f"PPO step, {FLAGS.preset} shape ({config.model.num_layers} layers, d_model "
          f"{config.model.d_model}, vocab {config.model.vocab_size}), {FLAGS.batch} prompts of "
          f"{FLAGS.prompt_len} tokens, {FLAGS.new_tokens} new tokens, epochs "
          f"{config.rl.epochs} x minibatches {config.rl.minibatches}; median of {FLAGS.steps} "
          "steps")
    print("| run | step s | generation s | scoring s | update s | rollout new tokens/s | "
          "update memory per device (XLA: arguments + temp) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| ours, {name} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['reward_s']:.3f} | "
              f"{r['update_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['update_bytes'] / mib:,.0f} MiB |")
    if FLAGS.hf:
        hf = run_hf(config)
        ours = results["full"]["tokens_per_s"]
        print(f"| Hugging Face generate ({hf['threads']} threads) | - | {hf['rollout_s']:.2f} | - "
              f"| - | {hf['tokens_per_s']:.0f} (ours {ours / hf['tokens_per_s']:.2f}x) | - |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS {peak:,.0f} MiB")


if __name__ == "__main__":
    app.run(main)
