"""experiments.hf and --config.init_from=hf:DIR end to end, through the command lines.

A tiny GPT-2 folder (random GPT2LMHeadModel + a byte-level BPE tokenizer trained here) is
imported, sampled from, fine-tuned from and exported back; a GPT trained here is exported and
loaded by transformers (weights and tokenizer) with the same logits and ids.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.conftest import WORDS, tree_digest  # noqa: E402
from tests.test_cli import _assert_clear_error, run, train  # noqa: E402
from train import runs
from data import tokenizer_io


def save_byte_level_tokenizer(folder, corpus_file, cls=None, **special):
    """A 320-piece byte-level BPE trained on the corpus, ending in <|endoftext|>, saved into
    folder as transformers' `cls` with the `special` tokens; returns the tokenizer."""
    import tokenizers
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([corpus_file.read_text()], vocab_size=320,
                            special_tokens=["<|endoftext|>"])
    cls = cls or transformers.PreTrainedTokenizerFast
    fast = cls(tokenizer_object=bpe._tokenizer, **special)
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, corpus_file):
    """A GPT-2 folder as the hub has them: config.json, model.safetensors, tokenizer files."""
    folder = str(tmp_path_factory.mktemp("hf") / "tiny_gpt2")
    eot = "<|endoftext|>"
    fast = save_byte_level_tokenizer(folder, corpus_file, transformers.GPT2TokenizerFast,
                                     bos_token=eot, eos_token=eot, unk_token=eot)
    end = fast.convert_tokens_to_ids(eot)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(fast),
                                     n_positions=64, bos_token_id=end, eos_token_id=end)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


def _our_logits(workdir, ids):
    config, _, params, task = runs.load_run(str(workdir))
    model = task.build_model(config)
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32)))


def test_import_sample_finetune_and_export_round_trip(gpt2_folder, corpus_file, tmp_path):
    workdir = tmp_path / "imported"
    out = run("experiments.hf", f"--import_from={gpt2_folder}", f"--workdir={workdir}",
              "--config=experiments/gpt.py:smoke").stdout
    assert "imported" in out and "padded to 384" in out
    assert (workdir / "hf_tokenizer").is_dir() and (workdir / "checkpoints" / "0").is_dir()
    # The imported run gives transformers' logits.
    ids = np.random.default_rng(0).integers(0, 300, (2, 12))
    with torch.no_grad():
        ref = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()(
            torch.tensor(ids)).logits.numpy()
    ours = _our_logits(workdir, ids)
    vocab = ref.shape[-1]
    assert np.abs(ours[..., :vocab] - ref).max() <= 1e-5
    # Every tool reads it: greedy sampling through the GPT-2 tokenizer.
    sample = run("experiments.sample", f"--workdir={workdir}", "--prompt=the king",
                 "--temperature=0", "--max_new_tokens=8").stdout
    assert sample.strip()
    # compare lists it (no steps yet) next to the run fine-tuned from it, below.
    assert "imported" in run("experiments.compare", str(workdir),
                             f"--out={tmp_path / 'cmp.png'}").stdout
    # Export gives back the same tensors, and a tokenizer AutoTokenizer loads.
    exported = tmp_path / "exported"
    run("experiments.hf", f"--workdir={workdir}", f"--export_to={exported}")
    from safetensors.numpy import load_file
    a = load_file(os.path.join(gpt2_folder, "model.safetensors"))
    b = load_file(str(exported / "model.safetensors"))
    from models import hf
    assert sorted(b) == sorted(k for k in a if not hf.is_derived(k))
    assert all(a[k].tobytes() == b[k].tobytes() for k in b)
    text = "the king went to the city, 42 times!"
    assert (transformers.AutoTokenizer.from_pretrained(str(exported)).encode(text)
            == transformers.AutoTokenizer.from_pretrained(gpt2_folder).encode(text))
    # A fine-tuning run starts straight from the folder: its loss is the import's at step 0.
    tuned = tmp_path / "tuned"
    train(tuned, corpus_file, f"--config.init_from=hf:{gpt2_folder}",
          "--config.num_train_steps=4", "--config.eval_every_steps=2",
          "--config.checkpoint_every_steps=2")
    lines = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r.get("split") == "eval"]
    assert len(evals) == 2 and all(np.isfinite(r["loss"]) for r in evals)
    assert json.loads((tuned / "config.json").read_text())["model"]["vocab_size"] == vocab


@pytest.mark.parametrize("experiment, model_type, extra", [
    ("gpt", "gpt2", []), ("llama", "llama", ["--config.model.tie_embeddings=False"])])
def test_a_decoder_trained_here_exports_with_its_tokenizer(corpus_file, tmp_path, experiment,
                                                           model_type, extra):
    workdir = tmp_path / "ours"
    run("train.main", f"--config=experiments/{experiment}.py:smoke", f"--workdir={workdir}",
        f"--config.data.source={corpus_file}", "--config.num_train_steps=3",
        "--config.eval_every_steps=3", *extra)
    exported = tmp_path / "ours_hf"
    run("experiments.hf", f"--workdir={workdir}", f"--export_to={exported}")
    assert json.loads((exported / "config.json").read_text())["model_type"] == model_type
    ours_tok = tokenizer_io.load_run_tokenizer(str(workdir))
    theirs_tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    rng = np.random.default_rng(1)
    for _ in range(20):
        text = " ".join(rng.choice(WORDS, 8)) + " Ünïcode 東京 🙂"
        assert theirs_tok.encode(text, add_special_tokens=False) == ours_tok.encode(text)
    ids = rng.integers(0, ours_tok.vocab_size, (2, 16))
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()(
            torch.tensor(ids)).logits.numpy()
    assert np.abs(_our_logits(workdir, ids) - ref).max() <= 1e-5


def test_bad_import_and_export_are_one_error_and_write_nothing(gpt2_folder, tmp_path):
    target = tmp_path / "never"
    _assert_clear_error(run("experiments.hf", f"--import_from={tmp_path / 'missing'}",
                            f"--workdir={target}", check=False), "is not a folder")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(gpt2_folder):
        if name != "model.safetensors":
            (broken / name).write_bytes((open(os.path.join(gpt2_folder, name), "rb")).read())
    (broken / "pytorch_model.bin").write_bytes(b"not read")
    _assert_clear_error(run("experiments.hf", f"--import_from={broken}", f"--workdir={target}",
                            check=False), "pytorch_model.bin", "never read")
    llama = tmp_path / "mixtral"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    _assert_clear_error(run("experiments.hf", f"--import_from={llama}", f"--workdir={target}",
                            check=False), "model_type='mixtral' is not supported")
    assert not target.exists() and not list(tmp_path.glob("never*"))
    # An export never overwrites: a non-empty destination is refused, untouched.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    before = tree_digest(taken)
    run("experiments.hf", f"--import_from={gpt2_folder}", f"--workdir={tmp_path / 'imp'}",
        "--config=experiments/gpt.py:smoke")
    _assert_clear_error(run("experiments.hf", f"--workdir={tmp_path / 'imp'}",
                            f"--export_to={taken}", check=False), "not empty")
    assert tree_digest(taken) == before
    _assert_clear_error(run("experiments.hf", f"--workdir={tmp_path / 'imp'}", check=False),
                        "exactly one of")


def test_sft_with_lora_from_an_imported_gpt2_uses_its_tokenizer(gpt2_folder, tmp_path):
    """The chat tokens go into the imported run's Hugging Face tokenizer; their rows fill the
    padded part of GPT-2's table, starting at the mean of the rows "User:" etc. use."""
    from data import chat, tokenizer as tok
    from tests.test_sft_cli import write_sft_files
    imported, workdir = tmp_path / "imported", tmp_path / "sft"
    run("experiments.hf", f"--import_from={gpt2_folder}", f"--workdir={imported}",
        "--config=experiments/gpt.py:smoke")
    files = write_sft_files(tmp_path, n_train=40, n_dev=8)
    run("train.main", "--config=experiments/gpt_sft.py:smoke", f"--workdir={workdir}",
        f"--config.init_from={imported}", f"--config.data.source={files[0]}",
        f"--config.data.eval_source={files[1]}", "--config.model.lora_rank=4",
        "--config.num_train_steps=4", "--config.eval_every_steps=4")
    tokenizer = tokenizer_io.load_run_tokenizer(str(workdir))
    base_tokenizer = tokenizer_io.load_run_tokenizer(str(imported))
    ids = chat.chat_token_ids(tokenizer)
    assert (workdir / tok.HF_DIR).is_dir()
    assert sorted(ids.values()) == list(range(base_tokenizer.vocab_size,
                                              base_tokenizer.vocab_size + 4))
    _, _, base, _ = runs.load_run(str(imported))
    _, _, params, _ = runs.load_run(str(workdir))
    table, base_table = (np.asarray(p["wte"]["embedding"]) for p in (params, base))
    assert table.shape == base_table.shape == (384, 32)
    user = base_tokenizer.encode("User:")
    np.testing.assert_allclose(table[ids["user"]], base_table[user].mean(axis=0), atol=1e-6)
    np.testing.assert_array_equal(table[:base_tokenizer.vocab_size],
                                  base_table[:base_tokenizer.vocab_size])
    reply = run("experiments.chat", f"--workdir={workdir}", "--prompt=Whose son was Abel?",
                "--max_new_tokens=4")
    assert reply.returncode == 0


def test_an_import_with_lora_is_refused(gpt2_folder, tmp_path):
    proc = run("experiments.hf", f"--import_from={gpt2_folder}", f"--workdir={tmp_path / 'r'}",
               "--config=experiments/gpt.py:smoke", "--config.model.lora_rank=4", check=False)
    _assert_clear_error(proc, "lora_rank at 0")
    assert not (tmp_path / "r").exists()
