"""Evaluation of an RL policy, and the means of its logged step metrics.

Eval: answers sampled (at config.rl.temperature, group_size per prompt) to the dev prompts,
their mean score under the run's reward, their KL to the reference (the sampled k1 summed over
each response, then averaged), their length and the share cut at the length limit; the
samples go to workdir/eval_generations.jsonl (prompt, reference answers, answer, score).
"""
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from train import step as step_lib
from train.rl import advantages, rollout
from train.tasks import lm, posttrain

SAMPLES_FILE = "eval_generations.jsonl"


def summarize(sums: dict) -> dict:
    """Means over the logged steps of each per-step value (weight_sum counts the steps)."""
    count = max(float(sums.get("weight_sum", 0.0)), 1e-9)
    out = {k[:-4]: float(v) / count for k, v in sums.items()
           if k.endswith("_sum") and k != "weight_sum"}
    out.update({k: float(v) for k, v in sums.items()
                if not k.endswith("_sum") and k != "weight_sum"})
    return out


def eval_fns(params, data, config):
    """Compiles, once, the reference's log-probs of rollouts (data["eval_fn"]) and the rollout
    sampler (data["rollout_fn"], unless the train step made it), replicated."""
    if "eval_fn" in data:
        return
    rl, end_id = config.rl, data["chat"].end_id
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    net, lora = lm.build_model(config), step_lib.uses_lora(config)

    def ref_logps(params, reference, rows):
        ref = advantages.reference_params(params, reference, lora)
        return advantages.token_outputs(net, ref, rows, rl.temperature)[0]

    data["eval_fn"] = jax.jit(ref_logps, out_shardings=NamedSharding(mesh, PartitionSpec()))
    if "rollout_fn" not in data:
        data["rollout_fn"] = rollout.make_rollout_fn(config, end_id,
                                                     NamedSharding(mesh, PartitionSpec()))


def evaluate_predictions(params, data, config, workdir) -> dict:
    """Sampled answers to the dev prompts: mean score, KL to the reference (summed sampled k1
    per response), response length, share cut at the limit; the samples in SAMPLES_FILE."""
    rl, rows_all = config.rl, data["dev_rows"]
    end_id, tokenizer = data["chat"].end_id, data["tokenizer"]
    eval_fns(params, data, config)
    scores, kls, lengths, cut, samples = [], [], [], [], []
    rng = jax.random.key(config.seed + 1)
    for i, (real, part) in enumerate(rollout.padded_batches(rows_all, config.batch_size)):
        rows = data["rollout_fn"](params, part["prompt"], part["prompt_valid"], part["index"],
                                  jax.random.fold_in(rng, i * config.batch_size))
        ref = data["eval_fn"](params, data.get("reference", data.get("reference_weights")), rows)
        host = jax.device_get(rows)
        keep = np.arange(real * rl.group_size)
        host = {k: v[keep] for k, v in host.items()}
        mask = np.asarray(advantages.response_mask(host["tokens"], end_id))
        kls.append(((host["old_logp"] - np.asarray(ref)[keep]) * mask).sum(1))
        scores.append(rollout.score_rollouts(data, host, data["dev_text"], end_id, tokenizer))
        lengths.append(mask.sum(1))
        cut.append(~np.any(host["tokens"] == end_id, axis=1))
        _, texts = rollout.decode_responses(host["tokens"], end_id, tokenizer)
        for j, answer, s in zip(host["index"].tolist(), texts, scores[-1].tolist()):
            samples.append({"prompt": data["dev_text"][0][j],
                            "reference": list(data["dev_text"][1][j]), "answer": answer,
                            "score": s})
    if jax.process_index() == 0:
        posttrain.write_jsonl(os.path.join(workdir, SAMPLES_FILE), samples)
    return {"score": float(np.concatenate(scores).mean()),
            "kl": float(np.concatenate(kls).mean()),
            "response_length": float(np.concatenate(lengths).mean()),
            "truncated": float(np.concatenate(cut).mean())}


def final_report(final: dict, info: dict) -> str:
    return (f"final eval ({info['dev_prompts']} dev prompts, sampled): reward "
            f"{final['score']:.4f} at KL {final['kl']:.4f} nats to the reference, mean response "
            f"{final['response_length']:.1f} tokens, {100 * final['truncated']:.0f}% cut at the "
            "length limit")
