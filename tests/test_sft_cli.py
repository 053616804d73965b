"""Supervised fine-tuning end to end: train.main on the sft task (full and LoRA), resume,
merge, the chat, data and few-shot tools, and bad input."""
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_cli import _assert_clear_error, run, train, tree_digest
from train import checkpoint, runs

NAMES = "Abel Boaz Caleb Dan Eli Gad Hur Ira Joel Levi Mesha Nahum Obed Peleg Reu Seth".split()


def _qa(rng):
    """A question whose answer is in the prompt: learnable by copying."""
    person, father = rng.sample(NAMES, 2)
    return f"{person} was the son of {father}. Whose son was {person}?", father


def write_sft_files(root, n_train=80, n_dev=8):
    rng = random.Random(0)
    lines = []
    for i in range(n_train):
        prompt, answer = _qa(rng)
        if i % 2:
            lines.append({"prompt": prompt, "response": answer})
        else:
            lines.append({"messages": [{"role": "system", "content": "Answer with a name."},
                                       {"role": "user", "content": prompt},
                                       {"role": "assistant", "content": answer}]})
    train_path, dev_path = root / "train.jsonl", root / "dev.tsv"
    train_path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    dev_path.write_text("".join("\t".join(_qa(rng)) + "\n" for _ in range(n_dev)),
                        encoding="utf-8")
    return train_path, dev_path


@pytest.fixture(scope="module")
def base_run(corpus_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft") / "base"
    train(workdir, corpus_file, "--config.num_train_steps=10", "--config.eval_every_steps=10",
          "--config.model.max_len=64", "--config.data.max_len=64")
    return workdir


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    return write_sft_files(tmp_path_factory.mktemp("sft_data"))


def sft(workdir, base_run, files, *overrides, check=True):
    return run("train.main", "--config=experiments/gpt_sft.py:smoke", f"--workdir={workdir}",
               f"--config.init_from={base_run}", f"--config.data.source={files[0]}",
               f"--config.data.eval_source={files[1]}", "--config.num_train_steps=12",
               "--config.eval_every_steps=12", "--config.log_every_steps=2",
               "--config.checkpoint_every_steps=6", *overrides, check=check)


def _metrics(workdir, split):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


@pytest.fixture(scope="module")
def full_run(base_run, sft_files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft_full") / "run"
    proc = sft(workdir, base_run, sft_files)
    return workdir, proc


@pytest.fixture(scope="module")
def lora_run(base_run, sft_files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft_lora") / "run"
    sft(workdir, base_run, sft_files, "--config.model.lora_rank=4",
        "--config.opt.learning_rate=1e-2")
    return workdir


def test_sft_run_logs_answer_metrics_and_writes_the_generations(full_run, sft_files):
    workdir, proc = full_run
    final = _metrics(workdir, "eval")[-1]
    assert {"loss", "exact_match", "f1"} <= set(final) and 0 <= final["exact_match"] <= 100
    assert "loss_token_share" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in
               (workdir / "eval_generations.jsonl").read_text().splitlines()]
    dev = [line.split("\t") for line in sft_files[1].read_text().splitlines()]
    assert [r["prompt"] for r in records] == [p for p, _ in dev]
    assert [r["reference"] for r in records] == [[a] for _, a in dev]
    assert all(isinstance(r["answer"], str) for r in records)
    losses = [m["loss"] for m in _metrics(workdir, "train")]
    assert losses[-1] < losses[0]  # it learns


def test_lora_checkpoints_hold_only_the_adapters(lora_run):
    ckpt = checkpoint.Checkpointer(str(lora_run), async_save=False, read_only=True)
    metadata = ckpt._manager.item_metadata(ckpt.latest_step())["state"]
    ckpt.close()
    names = {str(path[-1].key) for path, _ in
             jax.tree_util.tree_flatten_with_path(dict(metadata["params"]))[0]}
    assert names == {"lora_a", "lora_b"}
    assert json.loads((lora_run / "config.json").read_text())["model"]["lora_rank"] == 4


def test_lora_resume_is_exact(lora_run, base_run, sft_files, tmp_path):
    workdir = tmp_path / "resumed"
    args = ("--config.model.lora_rank=4", "--config.opt.learning_rate=1e-2")
    sft(workdir, base_run, sft_files, *args, "--config.stop_at_step=6")
    sft(workdir, base_run, sft_files, *args)
    resumed = {m["step"]: m["loss"] for m in _metrics(workdir, "train")}
    straight = {m["step"]: m["loss"] for m in _metrics(lora_run, "train")}
    assert resumed == straight
    assert _metrics(workdir, "eval")[-1]["loss"] == _metrics(lora_run, "eval")[-1]["loss"]


def test_merged_lora_run_gives_the_same_logits(lora_run, tmp_path):
    out = tmp_path / "merged"
    run("experiments.merge_lora", f"--workdir={lora_run}", f"--out={out}")
    tokens = jnp.asarray(np.random.default_rng(0).integers(7, 500, (2, 16)), jnp.int32)
    logits = []
    for workdir in (lora_run, out):
        config, _, params, task = runs.load_run(str(workdir))
        logits.append(task.build_model(config).apply({"params": params}, tokens))
    assert json.loads((out / "config.json").read_text())["model"]["lora_rank"] == 0
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)
    again = run("experiments.merge_lora", f"--workdir={lora_run}", f"--out={out}", check=False)
    _assert_clear_error(again, "not empty")
    # The merged run needs no base run: it trains on from its own weights and tokenizer.
    saved = json.loads((out / "config.json").read_text())
    files = saved["data"]
    run("train.main", "--config=experiments/gpt_sft.py:smoke", f"--workdir={out}",
        "--config.init_from=", f"--config.data.source={files['source']}",
        f"--config.data.eval_source={files['eval_source']}", "--config.num_train_steps=14",
        "--config.eval_every_steps=14",
        f"--config.model.vocab_size={saved['model']['vocab_size']}")
    assert _metrics(out, "eval")[-1]["step"] == 14


def test_resuming_a_lora_run_over_another_base_is_refused(lora_run, full_run, sft_files):
    before = tree_digest(lora_run / "checkpoints")
    proc = sft(lora_run, full_run[0], sft_files, "--config.model.lora_rank=4",
               "--config.opt.learning_rate=1e-2", "--config.num_train_steps=20", check=False)
    _assert_clear_error(proc, "init_from")
    assert tree_digest(lora_run / "checkpoints") == before


def test_chat_answers_one_prompt_and_a_conversation_on_stdin(full_run):
    workdir, _ = full_run
    one = run("experiments.chat", f"--workdir={workdir}", "--prompt=Whose son was Abel?",
              "--max_new_tokens=4")
    assert len(one.stdout.strip().splitlines()) <= 1
    import subprocess
    import sys
    from tests.test_cli import ROOT
    proc = subprocess.run([sys.executable, "-m", "experiments.chat", f"--workdir={workdir}",
                           "--max_new_tokens=4", "--system=Answer with a name."],
                          input="Whose son was Dan?\nAnd Eli?\n\n", cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 2


def test_chat_refuses_a_run_without_the_chat_format(base_run):
    _assert_clear_error(run("experiments.chat", f"--workdir={base_run}", "--prompt=hi",
                            check=False), "fine-tune it first")


def test_sft_data_shows_the_rendered_example_and_packing(base_run, sft_files):
    proc = run("experiments.sft_data", "--config=experiments/gpt_sft.py:smoke",
               f"--config.init_from={base_run}", f"--config.data.source={sft_files[0]}",
               f"--config.data.eval_source={sft_files[1]}", "--show_example=1")
    assert "<|assistant|>" in proc.stdout and "<|end|>" in proc.stdout
    assert "train: 80 conversations in" in proc.stdout and "dev: 8 conversations" in proc.stdout


def test_few_shot_baseline_scores_the_base_run(base_run, sft_files):
    proc = run("experiments.few_shot", f"--workdir={base_run}", f"--source={sft_files[0]}",
               f"--eval_source={sft_files[1]}", "--shots=1", "--max_new_tokens=4",
               "--batch_size=8")
    assert "1-shot, 8 dev questions: exact match" in proc.stdout


def test_dry_run_shows_the_memory_lora_saves(base_run, sft_files, tmp_path):
    proc = sft(tmp_path / "dry", base_run, sft_files, "--config.model.lora_rank=4",
               "--dry_run")
    assert "LoRA:" in proc.stdout and "GiB more" in proc.stdout
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("line, needle", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "assistant"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "robot"),
    ({"prompt": "hi", "response": "  "}, "empty"),
    ({"prompt": "hi"}, "response"),
])
def test_bad_conversations_are_one_error_naming_file_and_line(line, needle, base_run,
                                                               sft_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps(line) + "\n",
                   encoding="utf-8")
    proc = sft(tmp_path / "run", base_run, (bad, sft_files[1]), check=False)
    _assert_clear_error(proc, f"{bad}:2", needle)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_prompt_too_long_to_leave_anything_to_train_on_is_refused(base_run, sft_files,
                                                                     tmp_path):
    long_prompt = {"prompt": "x " * 5, "response": "y " * 200}  # the response fills max_len
    bad = tmp_path / "long.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n"
                   + json.dumps(long_prompt) + "\n", encoding="utf-8")
    proc = sft(tmp_path / "run", base_run, (bad, sft_files[1]), check=False)
    _assert_clear_error(proc, f"{bad}:2", "max_len")


def test_lora_without_a_base_run_is_refused(sft_files, tmp_path):
    proc = run("train.main", "--config=experiments/gpt_sft.py:smoke",
               f"--workdir={tmp_path / 'run'}", f"--config.data.source={sft_files[0]}",
               f"--config.data.eval_source={sft_files[1]}", "--config.model.lora_rank=4",
               check=False)
    _assert_clear_error(proc, "init_from")
