"""End-to-end BERT runs: pretrain (kill + resume), classification and span-QA fine-tuning,
predict_qa, embed, and the fine-tuning errors."""
import json
import random

import jax
import numpy as np
import pytest

from tests.conftest import WORDS
from tests.test_cli import _assert_clear_error, run, train, tree_digest
from data import squad, squad_eval
from train import checkpoint, runs


def pretrain(workdir, corpus, *overrides, check=True):
    return run("train.main", "--config=experiments/bert.py:smoke", f"--workdir={workdir}",
               f"--config.data.source={corpus}", *overrides, check=check)


def finetune(experiment, workdir, init_from, train_file, dev_file, *overrides, check=True):
    return run("train.main", f"--config=experiments/{experiment}.py:smoke",
               f"--workdir={workdir}", f"--config.init_from={init_from}",
               f"--config.data.source={train_file}", f"--config.data.eval_source={dev_file}",
               *overrides, check=check)


def write_classification(path, n, seed):
    """TSV of random sentences labelled by whether they mention the king."""
    rng = random.Random(seed)
    lines = ["text\tlabel"]
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        lines.append(" ".join(words) + "\t" + ("king" if "king" in words else "other"))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_squad(path, n, seed):
    """SQuAD v2.0 JSON: long contexts of random sentences, a word-span answer or none."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 10)))
                     for _ in range(rng.randint(3, 6))]
        context = ". ".join(sentences) + "."
        if i % 3 == 2:
            qas = [{"id": f"q{i}", "question": "where is the gate", "answers": [],
                    "is_impossible": True}]
        else:
            start = context.index(sentences[-1])
            answer = " ".join(sentences[-1].split()[:2])
            qas = [{"id": f"q{i}", "question": "what came last", "is_impossible": False,
                    "answers": [{"text": answer, "answer_start": start}]}]
        paragraphs.append({"context": context, "qas": qas})
    path.write_text(json.dumps({"version": "v2.0", "data": [
        {"title": "t", "paragraphs": paragraphs}]}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pretrained(corpus_file, tmp_path_factory):
    """A smoke pretraining run stopped at step 10 (as on preemption), then resumed to 20."""
    workdir = tmp_path_factory.mktemp("bert") / "pre"
    first = pretrain(workdir, corpus_file, "--config.stop_at_step=10")
    assert "stopped early" in first.stdout + first.stderr
    pretrain(workdir, corpus_file)
    return workdir


def _records(workdir, split):
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split]


def test_pretraining_logs_mlm_and_nsp_and_resumes(pretrained):
    evals = _records(pretrained, "eval")
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        assert 0.0 <= r["mlm_accuracy"] <= 1.0 and 0.0 <= r["nsp_accuracy"] <= 1.0
        assert r["loss"] == pytest.approx(r["mlm_loss"] + r["nsp_loss"], rel=1e-5)
        assert r["mlm_perplexity"] == pytest.approx(np.exp(r["mlm_loss"]), rel=1e-5)
    train_steps = [r["step"] for r in _records(pretrained, "train")]
    assert train_steps == [5, 10, 15, 20]  # the resumed run went on from 10, nothing twice


@pytest.fixture(scope="module")
def classified(pretrained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    train_file = write_classification(tmp / "train.tsv", 160, 0)
    dev_file = write_classification(tmp / "dev.tsv", 40, 1)
    proc = finetune("bert_classify", tmp / "run", pretrained, train_file, dev_file)
    return tmp / "run", proc


def test_classification_reports_metrics_beside_the_majority_baseline(classified):
    workdir, proc = classified
    final = _records(workdir, "eval")[-1]
    assert {"accuracy", "macro_f1", "mcc"} <= set(final)
    assert "majority-class baseline" in proc.stdout + proc.stderr


def test_finetuning_starts_from_the_pretrained_encoder(pretrained, tmp_path, corpus_file):
    """With a zero learning rate the fine-tuned encoder must equal the pretrained one."""
    train_file = write_classification(tmp_path / "train.tsv", 40, 0)
    finetune("bert_classify", tmp_path / "run", pretrained, train_file, train_file,
             "--config.opt.learning_rate=0.0", "--config.num_train_steps=1")
    _, _, pre_params, _ = runs.load_run(str(pretrained))
    _, _, ft_params, _ = runs.load_run(str(tmp_path / "run"))
    assert "mlm_bias" in pre_params and "mlm_bias" not in ft_params
    assert "classifier" in ft_params
    for name in ("word_embeddings", "position_embeddings", "layer_0", "layer_1", "pooler"):
        pre, ft = _leaves(pre_params[name]), _leaves(ft_params[name])
        assert pre.keys() == ft.keys()
        for key in pre:
            np.testing.assert_array_equal(pre[key], ft[key], err_msg=f"{name} {key}")


def test_lora_classification_trains_adapters_and_head_over_the_frozen_encoder(pretrained,
                                                                            tmp_path):
    """BERT with LoRA: the encoder equals the pretrained one, the adapters and the fresh
    classifier head trained, and the checkpoint holds only those."""
    train_file = write_classification(tmp_path / "train.tsv", 40, 0)
    finetune("bert_classify", tmp_path / "run", pretrained, train_file, train_file,
             "--config.model.lora_rank=4", "--config.num_train_steps=4",
             "--config.eval_every_steps=4", "--config.opt.warmup_steps=0")
    _, _, pre_params, _ = runs.load_run(str(pretrained))
    _, _, ft_params, _ = runs.load_run(str(tmp_path / "run"))
    base, adapters = _leaves(pre_params["layer_0"]), _leaves(ft_params["layer_0"])
    lora_keys = [k for k in adapters if "lora_" in k]
    assert lora_keys and set(adapters) - set(lora_keys) == set(base)
    for key in base:
        np.testing.assert_array_equal(base[key], adapters[key], err_msg=key)
    assert any(np.abs(adapters[k]).max() > 0 for k in lora_keys if "lora_b" in k)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), async_save=False, read_only=True)
    saved = ckpt._manager.item_metadata(ckpt.latest_step())["state"]["params"]
    ckpt.close()
    assert set(saved) == {"layer_0", "layer_1", "classifier"}


def _leaves(tree):
    return {jax.tree_util.keystr(path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_mismatched_encoder_shape_is_refused(pretrained, tmp_path):
    train_file = write_classification(tmp_path / "train.tsv", 40, 0)
    before = tree_digest(pretrained)
    proc = finetune("bert_classify", tmp_path / "run", pretrained, train_file, train_file,
                    "--config.model.d_model=64", check=False)
    _assert_clear_error(proc, "model.d_model", "pretrained")
    assert tree_digest(pretrained) == before
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_init_from_a_folder_without_a_run(tmp_path):
    train_file = write_classification(tmp_path / "train.tsv", 40, 0)
    proc = finetune("bert_classify", tmp_path / "run", tmp_path / "nothing", train_file,
                    train_file, check=False)
    _assert_clear_error(proc, "not a run folder", "pretrain first")


@pytest.fixture(scope="module")
def qa_run(pretrained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qa")
    train_file, dev_file = write_squad(tmp / "train.json", 30, 0), write_squad(tmp / "dev.json",
                                                                              12, 1)
    finetune("bert_squad", tmp / "run", pretrained, train_file, dev_file,
             "--config.data.holdout_fraction=0.3")
    return tmp / "run", dev_file


def test_span_qa_writes_official_predictions_and_scores(qa_run):
    workdir, dev_file = qa_run
    predictions = json.loads((workdir / "predictions.json").read_text())
    dev_ids = {qa["id"] for p in json.loads(dev_file.read_text())["data"][0]["paragraphs"]
               for qa in p["qas"]}
    assert set(predictions) == dev_ids and all(isinstance(v, str) for v in predictions.values())
    final = _records(workdir, "eval")[-1]
    assert 0.0 <= final["exact"] <= final["f1"] <= 100.0
    # v2.0: exact / f1 are those of the saved answers, at the threshold chosen on held-apart
    # training questions (saved for predict_qa); the oracle tuned on dev is logged beside them.
    threshold = json.loads((workdir / "null_threshold.json").read_text())["null_threshold"]
    assert threshold == final["null_threshold"]
    rescored = squad_eval.squad_evaluate(squad.read_squad(str(dev_file)), predictions)
    assert rescored["exact"] == pytest.approx(final["exact"])
    assert rescored["f1"] == pytest.approx(final["f1"])
    assert final["best_f1"] >= final["f1"] and final["best_exact"] >= final["exact"]
    assert {"best_exact_thresh", "best_f1_thresh"} <= set(final)


def test_predict_qa_answers_from_the_command_line(qa_run):
    workdir, _ = qa_run
    context = "the king went to the city. the river was dark. water ran by the stone."
    out = run("experiments.predict_qa", f"--workdir={workdir}", f"--context={context}",
              "--question=what came last").stdout
    answer = out.splitlines()[0].removeprefix("answer: ")
    assert answer == "(no answer in the context)" or answer in context


def test_predict_qa_refuses_a_pretraining_run(pretrained):
    proc = run("experiments.predict_qa", f"--workdir={pretrained}", "--context=a b",
               "--question=c", check=False)
    _assert_clear_error(proc, "not span QA")


def test_embed_prints_vectors_and_the_context_table(pretrained, tmp_path):
    out = tmp_path / "v.npz"
    proc = run("experiments.embed", f"--workdir={pretrained}", "--text=the king went",
               "--text=the river was dark", f"--output={out}")
    assert "'▁king'" in proc.stdout
    saved = np.load(out)
    assert saved["pooled"].shape == (2, 32) and saved["vectors_0"].shape[1] == 32
    table = run("experiments.embed", f"--workdir={pretrained}", "--word=king",
                "--text=the king went", "--text=water ran by the king",
                "--text=the old king said").stdout
    static = [line for line in table.splitlines()[table.splitlines().index(
        "static token-embedding lookup, same word:") + 2:]]
    # The static lookup ignores context: every similarity is exactly 1.
    assert all(float(x) == pytest.approx(1.0, abs=1e-5) for line in static
               for x in line.split()[1:])
    assert "contextual" in table


def test_embed_refuses_a_gpt_run(tmp_path, corpus_file):
    train(tmp_path / "gpt", corpus_file, "--config.num_train_steps=2")
    _assert_clear_error(run("experiments.embed", f"--workdir={tmp_path / 'gpt'}", "--text=a",
                            check=False), "gpt run")


def test_load_run_restores_what_was_trained(pretrained):
    config, tokenizer, params, task = runs.load_run(str(pretrained))
    assert task.name == "mlm_nsp" and tokenizer.vocab_size <= 512
    assert config.model.family == "bert" and params["mlm_bias"].shape == (512,)


def test_attention_maps_for_bert(pretrained, tmp_path):
    run("experiments.attention", f"--workdir={pretrained}", "--text=the king went",
        f"--out={tmp_path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["self_layer_0.png",
                                                           "self_layer_1.png"]


def test_lora_over_a_base_that_lacks_some_frozen_weights_is_refused(pretrained, corpus_file,
                                                                    tmp_path):
    """Continued pretraining with LoRA from a run folder: its MLM/NSP heads are not carried
    over, so they would stay frozen at random values. One error, naming them."""
    proc = pretrain(tmp_path / "run", corpus_file, f"--config.init_from={pretrained}",
                    "--config.model.lora_rank=4", check=False)
    _assert_clear_error(proc, "lora_rank=0", "mlm_bias")
    assert not (tmp_path / "run" / "checkpoints").exists()
