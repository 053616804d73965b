"""Reward against KL to the reference: PPO at several KL coefficients, DPO at several betas.

The controlled-generation comparison of Rafailov et al. 2023 (sec. 6.1, fig. 2), on data that
ships offline. The policy starts from an SFT run (experiments/gpt_sft.py:tiny); the reward is
train.rl.rewards.answer_f1, the token F1 of an answer against the genealogy question's
reference answer (a reward anyone can recompute, and one the SFT model already earns sometimes).
  1. pairs: two answers sampled (temperature 1) from the SFT run for every train and dev prompt,
     labelled by the same reward (the higher F1 chosen; ties dropped): DPO's data;
  2. runs: PPO (experiments/gpt_ppo.py:tiny) at each --kl_coefs, DPO (gpt_dpo.py:tiny) at each
     --betas, all from the SFT run, each in OUT/<method>_<value>;
  3. evaluation, the same for every policy and for the SFT run itself: answers sampled at
     temperature 1 to the dev prompts and to as many training prompts, their mean reward, and
     their KL to the SFT run (the mean over answers of sum_t log pi(y_t) - log ref(y_t), the
     sampled k1 estimate);
  4. OUT/frontier.png (reward against KL, one point per run), OUT/frontier.md (the table and
     samples before and after), OUT/frontier.json.

  python -m experiments.rl_frontier --sft=runs/gpt_sft --out=runs/frontier
A finished run folder is reused (its checkpoint restored), so a rerun only evaluates.
"""
import json
import os

from absl import flags

from train import cli, runs

FLAGS = flags.FLAGS
flags.DEFINE_string("sft", "runs/gpt_sft", "the SFT run every policy starts from")
flags.DEFINE_string("out", "runs/frontier", "folder for the runs, pairs, table and plot")
flags.DEFINE_list("kl_coefs", ["0.01", "0.05", "0.2"], "PPO KL coefficients")
flags.DEFINE_list("betas", ["0.05", "0.1", "0.5"], "DPO betas")
flags.DEFINE_integer("ppo_steps", 150, "PPO steps (16 prompts each)")
flags.DEFINE_integer("dpo_steps", 300, "DPO steps (16 pairs each)")
flags.DEFINE_integer("samples", 3, "dev prompts shown before and after")


def eval_setup(sft_run, workdir):
    """(config, data) of a PPO config on the SFT run: dev prompts, reward, reference weights."""
    from experiments import gpt_ppo
    from train import tasks
    config = gpt_ppo.get_config("tiny")
    config.init_from = sft_run
    ppo = tasks.get("ppo")
    ppo.configure(config)
    return config, ppo.prepare_data(config, workdir)


def sample_pairs(config, data, out_dir):
    """Four sampled answers per prompt of each split, labelled by the reward: the best one
    chosen, the worst rejected (prompts whose four scores are equal give no pair)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from train.rl import rollout

    group = config.rl.group_size = 4
    end_id, tokenizer = data["chat"].end_id, data["tokenizer"]
    params = jax.device_put(data["reference_weights"])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sample = rollout.make_rollout_fn(config, end_id, NamedSharding(mesh, PartitionSpec()))
    paths = {}
    for split, rows, (questions, refs) in (
            ("train", data["train_rows"], data["train_text"]),
            ("dev", data["dev_rows"], data["dev_text"])):
        pairs, size, n = [], config.batch_size, len(rows["index"])
        for i, (real, part) in enumerate(rollout.padded_batches(rows, size)):
            host = jax.device_get(sample(params, part["prompt"], part["prompt_valid"],
                                         part["index"], jax.random.key(i * size)))
            host = {k: v[:group * real] for k, v in host.items()}
            _, texts = rollout.decode_responses(host["tokens"], end_id, tokenizer)
            scores = rollout.score_rollouts(data, host, (questions, refs), end_id, tokenizer)
            for b in range(real):
                own = range(group * b, group * b + group)
                best = max(own, key=lambda i: scores[i])
                worst = min(own, key=lambda i: scores[i])
                if scores[best] == scores[worst] or not texts[best] or not texts[worst]:
                    continue
                pairs.append({"prompt": questions[int(host["index"][group * b])],
                              "chosen": texts[best], "rejected": texts[worst]})
        paths[split] = os.path.join(out_dir, f"pairs_{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
        print(f"{split}: {len(pairs)} pairs from {n} prompts (ties dropped)")
    config.rl.group_size = 1
    return paths


def train(experiment, workdir, overrides):
    """Trains (or resumes) one run; returns its restored params."""
    from train import loop, tasks
    from train.config import override
    config = override(experiment.get_config("tiny"), **overrides)
    task = tasks.get(config.task)
    loop.train_and_evaluate(config, workdir, task)
    config = runs.read_run_config(workdir, "")
    return runs.restore_params(config, workdir, task)[0]


def main(_):
    import jax
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments import gpt_dpo, gpt_ppo
    from train.rl import evaluate, settings

    out = FLAGS.out
    os.makedirs(out, exist_ok=True)
    sft = os.path.abspath(FLAGS.sft)
    config, data = eval_setup(sft, os.path.join(out, "eval"))
    paths = {s: os.path.join(out, f"pairs_{s}.jsonl") for s in ("train", "dev")}
    if not all(os.path.exists(p) for p in paths.values()):
        paths = sample_pairs(config, data, out)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    placed = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec())
    reference = jax.device_put(data["reference_weights"], placed)
    data["reference"] = reference
    runs = [("SFT (reference)", None, reference)]
    for coef in FLAGS.kl_coefs:
        runs.append((f"PPO kl_coef {coef}", "ppo", train(gpt_ppo, os.path.join(out, f"ppo_{coef}"), {
            "init_from": sft, "rl.kl_coef": float(coef), "num_train_steps": FLAGS.ppo_steps})))
    for beta in FLAGS.betas:
        runs.append((f"DPO beta {beta}", "dpo", train(gpt_dpo, os.path.join(out, f"dpo_{beta}"), {
            "init_from": sft, "dpo.beta": float(beta), "num_train_steps": FLAGS.dpo_steps,
            "data.source": paths["train"], "data.eval_source": paths["dev"]})))
    n_dev = len(data["dev_rows"]["index"])
    on_train = dict(data, dev_rows={k: v[:n_dev] for k, v in data["train_rows"].items()},
                    dev_text=data["train_text"])
    results = []
    for name, method, params in runs:
        params = {k: v for k, v in params.items() if k != settings.VALUE_HEAD}
        params = jax.device_put(jax.device_get(params), placed)
        workdir = os.path.join(out, "eval", name.split()[0].lower() + "_" + name.split()[-1])
        os.makedirs(workdir, exist_ok=True)
        t = evaluate.evaluate_predictions(params, on_train, config, workdir)
        m = evaluate.evaluate_predictions(params, data, config, workdir)  # the dev samples last
        samples = [json.loads(x) for x in open(os.path.join(workdir, evaluate.SAMPLES_FILE),
                                               encoding="utf-8")]
        results.append({"run": name, "method": method or "sft", **m, "samples": samples,
                        "train_score": t["score"], "train_kl": t["kl"]})
        print(f"{name}: dev reward {m['score']:.4f} at KL {m['kl']:.3f}, train prompts "
              f"{t['score']:.4f} at KL {t['kl']:.3f}, length {m['response_length']:.1f}, cut "
              f"{100 * m['truncated']:.0f}%")
    with open(os.path.join(out, "frontier.json"), "w", encoding="utf-8") as f:
        json.dump([{k: v for k, v in r.items() if k != "samples"} for r in results], f, indent=1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (split, score, kl) in zip(axes, (("training prompts", "train_score", "train_kl"),
                                             ("held-out dev prompts", "score", "kl"))):
        for method, marker in (("sft", "*"), ("ppo", "o"), ("dpo", "s")):
            part = [r for r in results if r["method"] == method]
            ax.scatter([r[kl] for r in part], [r[score] for r in part], marker=marker, s=60,
                       label=method.upper())
            for r in part:
                ax.annotate(r["run"].split()[-1] if method != "sft" else "SFT",
                            (r[kl], r[score]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        ax.set_xlabel("KL(policy || SFT reference), nats per answer (sampled)")
        ax.set_ylabel("mean reward (answer F1)")
        ax.set_title(f"{split} ({n_dev})")
        ax.legend()
    fig.suptitle("Reward against KL: PPO (label: kl_coef) and DPO (label: beta)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
    lines = ["| run | reward, train prompts | KL, train prompts | reward, dev | KL, dev | "
             "dev answer length | cut at limit |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['train_score']:.3f} | {r['train_kl']:.3f} | {r['score']:.3f} | "
              f"{r['kl']:.3f} | {r['response_length']:.1f} | {100 * r['truncated']:.0f}% |"
              for r in results]
    best = {m: max((r for r in results if r["method"] == m), key=lambda r: r["score"])
            for m in ("ppo", "dpo")}
    lines += ["", "Samples (dev prompts; reference answer; SFT, best PPO, best DPO):", ""]
    for i in range(min(FLAGS.samples, len(results[0]["samples"]))):
        s = results[0]["samples"][i]
        lines.append(f"- {s['prompt'][:160]!r} (reference {s['reference'][0]!r}): SFT "
                     f"{s['answer']!r}; {best['ppo']['run']} {best['ppo']['samples'][i]['answer']!r}"
                     f"; {best['dpo']['run']} {best['dpo']['samples'][i]['answer']!r}")
    with open(os.path.join(out, "frontier.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}/frontier.png, frontier.md, frontier.json")


if __name__ == "__main__":
    cli.run(main)
