"""Imported BERT and Marian folders through every tool that reads their family's runs.

The folders pair tiny random transformers models with the tokenizers of
tests/data/test_hf_tokenizer.py (BERT WordPiece with [CLS]=101, [SEP]=102, [MASK]=103;
Marian with </s>=0 and <pad> last, which also starts the decoder).
"""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.data.test_hf_tokenizer import bert_dirs, marian_dir, root  # noqa: E402,F401
from tests.test_bert_cli import write_classification, write_squad  # noqa: E402
from tests.test_cli import run  # noqa: E402


def _with_model(tokenizer_folder, target, model):
    shutil.copytree(tokenizer_folder, target)
    model.eval().save_pretrained(target)
    return str(target)


@pytest.fixture(scope="module")
def bert_folders(bert_dirs, tmp_path_factory):  # noqa: F811
    torch.manual_seed(0)
    source = bert_dirs["bert_uncased"]
    vocab = len(transformers.AutoTokenizer.from_pretrained(source))
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=vocab,
                                     max_position_embeddings=64)
    tmp = tmp_path_factory.mktemp("bert_models")
    return {"pretraining": _with_model(source, tmp / "pre", transformers.BertForPreTraining(config)),
            "qa": _with_model(source, tmp / "qa", transformers.BertForQuestionAnswering(config)),
            "model": _with_model(source, tmp / "model", transformers.BertModel(config))}


def test_imported_bert_embeds_attends_and_fine_tunes(bert_folders, tmp_path):
    workdir = tmp_path / "bert"
    run("experiments.hf", f"--import_from={bert_folders['pretraining']}",
        f"--workdir={workdir}", "--config=experiments/bert.py:smoke")
    out = run("experiments.embed", f"--workdir={workdir}", "--text=the king went home",
              "--text=the river was dark", "--word=the").stdout
    assert "the" in out
    run("experiments.attention", f"--workdir={workdir}", "--text=the king went home",
        f"--out={tmp_path / 'maps'}")
    assert list((tmp_path / "maps").glob("*.png"))
    # Classification fine-tuning straight from a BertModel folder: the classifier is new.
    train_file = write_classification(tmp_path / "train.tsv", 64, 0)
    dev_file = write_classification(tmp_path / "dev.tsv", 16, 1)
    tuned = tmp_path / "cls"
    proc = run("train.main", "--config=experiments/bert_classify.py:smoke",
               f"--workdir={tuned}", f"--config.init_from=hf:{bert_folders['model']}",
               f"--config.data.source={train_file}", f"--config.data.eval_source={dev_file}",
               "--config.num_train_steps=4", "--config.eval_every_steps=2")
    assert "freshly initialised: ['classifier']" in proc.stdout
    evals = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals and all(np.isfinite(e["loss"]) for e in evals)
    assert (tuned / "hf_tokenizer").is_dir() and not (tuned / "tokenizer.model").exists()


def test_imported_bert_question_answering_answers(bert_folders, tmp_path):
    workdir = tmp_path / "qa"
    run("experiments.hf", f"--import_from={bert_folders['qa']}", f"--workdir={workdir}")
    config = json.loads((workdir / "config.json").read_text())
    assert config["task"] == "span_qa" and config["model"]["heads"] == ["span"]
    proc = run("experiments.predict_qa", f"--workdir={workdir}",
               "--context=The king went to the city. The river was dark.",
               "--question=where did the king go")
    assert proc.stdout.strip()
    # Fine-tuning from the import on SQuAD v2.0 data.
    train_file = write_squad(tmp_path / "train.json", 24, 0)
    dev_file = write_squad(tmp_path / "dev.json", 8, 1)
    run("train.main", "--config=experiments/bert_squad.py:smoke", f"--workdir={tmp_path / 't'}",
        f"--config.init_from=hf:{bert_folders['qa']}", f"--config.data.source={train_file}",
        f"--config.data.eval_source={dev_file}", "--config.num_train_steps=2",
        "--config.eval_every_steps=2")


@pytest.fixture(scope="module")
def marian_folder(marian_dir, tmp_path_factory):  # noqa: F811
    torch.manual_seed(0)
    with open(os.path.join(marian_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    pad = vocab["<pad>"]
    config = transformers.MarianConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=pad,
        decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=0,
        scale_embedding=True, activation_function="swish")
    return _with_model(marian_dir, tmp_path_factory.mktemp("marian") / "opus",
                       transformers.MarianMTModel(config))


def test_imported_marian_translates_and_resumes(
        marian_folder, tmp_path):
    workdir = tmp_path / "marian"
    run("experiments.hf", f"--import_from={marian_folder}", f"--workdir={workdir}",
        "--config=experiments/transformer.py:smoke")
    sentences = ["the king went to the city", "light came over the land"]
    (tmp_path / "in.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    # Random weights translate into noise; what matters is one line per sentence through the
    # Marian pair (greedy ids equal transformers': tests/train/test_pretrained.py).
    ours = run("experiments.translate", f"--workdir={workdir}", f"--input={tmp_path / 'in.txt'}",
               "--beam_size=2").stdout.splitlines()
    assert len(ours) == len(sentences)
    # train.main resumes the imported run from its step-0 checkpoint.
    run("train.main", "--config=experiments/transformer.py:smoke", f"--workdir={workdir}",
        f"--config.init_from=hf:{marian_folder}", "--config.data.source=reverse",
        "--config.num_train_steps=2", "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2")
    assert "2" in os.listdir(workdir / "checkpoints")
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) >= 2
