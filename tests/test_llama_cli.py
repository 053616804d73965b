"""The Llama family through the command lines: a Qwen3 folder with a chat template imported,
sampled from and trained further, then fine-tuned with LoRA in its template, chatted with,
merged and exported (transformers loads the export with our logits), and post-trained with
DPO and GRPO. (A Llama trained here from scratch and exported with its
tokenizer: tests/test_hf_cli.py.)"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.data.test_chat_template import CHATML, _byte_level  # noqa: E402
from tests.test_hf_cli import _our_logits  # noqa: E402
from tests.test_cli import run  # noqa: E402
from data import tokenizer_io  # noqa: E402
from train import runs  # noqa: E402

SMOKE = "--config=experiments/llama.py:smoke"


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    """A Qwen3 folder as the hub has them: config.json, model.safetensors, tokenizer files."""
    folder = str(tmp_path_factory.mktemp("hf") / "tiny_qwen3")
    # Qwen's layout: no BOS, <|endoftext|> ends documents and pads, ChatML turns and template.
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    end = fast.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=len(fast), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
        tie_word_embeddings=False, eos_token_id=end, pad_token_id=end)
    transformers.Qwen3ForCausalLM(config).eval().save_pretrained(folder)
    return folder


def _their_logits(folder, ids):
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()(
            torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def imported(qwen3_folder, tmp_path_factory):
    """The Qwen3 folder as a run folder (experiments.hf --import_from)."""
    workdir = tmp_path_factory.mktemp("runs") / "imported"
    run("experiments.hf", f"--import_from={qwen3_folder}", f"--workdir={workdir}", SMOKE)
    return workdir


def test_an_imported_qwen3_samples_and_continues_pretraining(qwen3_folder, imported,
                                                              corpus_file, tmp_path):
    workdir = imported
    saved = json.loads((workdir / "config.json").read_text())["model"]
    assert saved["family"] == "llama" and saved["qk_norm"] and saved["head_dim"] == 12
    sample = run("experiments.sample", f"--workdir={workdir}", "--prompt=the king",
                 "--temperature=0", "--max_new_tokens=8").stdout
    assert sample.strip()
    tuned = tmp_path / "tuned"
    run("train.main", SMOKE, f"--workdir={tuned}", f"--config.init_from=hf:{qwen3_folder}",
        f"--config.data.source={corpus_file}", "--config.num_train_steps=4",
        "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2")
    evals = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert len(evals) == 2 and all(np.isfinite(e["loss"]) for e in evals)
    # The import gives transformers' logits, and the run trained away from them.
    ids = np.random.default_rng(0).integers(0, 300, (2, 12))
    theirs = _their_logits(qwen3_folder, ids)
    vocab = theirs.shape[-1]
    assert np.abs(_our_logits(workdir, ids)[..., :vocab] - theirs).max() <= 1e-5
    assert np.abs(_our_logits(tuned, ids)[..., :vocab] - theirs).max() > 1e-4


def test_post_training_starts_from_an_imported_qwen3(qwen3_folder, imported, tmp_path):
    """SFT with LoRA over the gated feed-forward in the checkpoint's chat template, chat,
    merge_lora and export on it, then DPO and GRPO from the SFT run: the GPT-shaped experiment
    files take the imported run's Llama-family architecture."""
    from tests.test_sft_cli import write_sft_files
    sft = tmp_path / "sft"
    files = write_sft_files(tmp_path, n_train=40, n_dev=8)
    run("train.main", "--config=experiments/gpt_sft.py:smoke", f"--workdir={sft}",
        f"--config.init_from={imported}", f"--config.data.source={files[0]}",
        f"--config.data.eval_source={files[1]}", "--config.model.lora_rank=4",
        "--config.num_train_steps=4", "--config.eval_every_steps=4")
    model = json.loads((sft / "config.json").read_text())["model"]
    assert model["family"] == "llama" and model["qk_norm"] and model["lora_rank"] == 4
    assert model["lora_targets"] == "query,key,value,out,gate,up,down"
    # The checkpoint's chat template is the format: no chat tokens added, ChatML prompts.
    tokenizer = tokenizer_io.load_run_tokenizer(str(sft))
    assert model["vocab_size"] == tokenizer.vocab_size == len(
        transformers.AutoTokenizer.from_pretrained(qwen3_folder))
    predictions = (sft / "eval_generations.jsonl").read_text()
    assert predictions.strip()
    _, _, params, _ = runs.load_run(str(sft))
    assert "lora_a" in params["layer_0"]["mlp"]["gate"]
    reply = run("experiments.chat", f"--workdir={sft}", "--prompt=Whose son was Abel?",
                "--max_new_tokens=4")
    assert reply.returncode == 0
    # Merged and exported, the LoRA run is a Qwen3 folder transformers runs with our logits.
    merged, exported = tmp_path / "merged", tmp_path / "exported"
    run("experiments.merge_lora", f"--workdir={sft}", f"--out={merged}")
    run("experiments.hf", f"--workdir={merged}", f"--export_to={exported}")
    assert json.loads((exported / "config.json").read_text())["model_type"] == "qwen3"
    ids = np.random.default_rng(2).integers(0, tokenizer.vocab_size, (2, 12))
    ours, theirs = _our_logits(sft, ids), _their_logits(exported, ids)
    assert np.abs(ours[..., :theirs.shape[-1]] - theirs).max() <= 1e-5
    # DPO and GRPO, each from the SFT run (its LoRA base merged). The reward model and PPO
    # read the trunk as DPO and GRPO do (hidden_only, lm.output_table); they are left to
    # tests/train, to keep the suite's time.
    from tests.train.conftest import write_pairs, write_prompts
    pairs = (write_pairs(tmp_path / "pairs.jsonl", 24, 0), write_pairs(tmp_path / "dev.jsonl",
                                                                      8, 1))
    prompts = (write_prompts(tmp_path / "prompts.jsonl", 16, 0),
               write_prompts(tmp_path / "dev_prompts.jsonl", 8, 1))
    steps = ["--config.num_train_steps=2", "--config.eval_every_steps=2",
             "--config.log_every_steps=1"]
    for experiment, files, extra in (
            ("gpt_dpo", pairs, []),
            ("gpt_grpo", prompts, ["--config.rl.reward=fn:tests.train.test_ppo:word_reward",
                                   "--config.model.lora_rank=4"])):
        workdir = tmp_path / experiment
        run("train.main", f"--config=experiments/{experiment}.py:smoke", f"--workdir={workdir}",
            f"--config.init_from={sft}", f"--config.data.source={files[0]}",
            f"--config.data.eval_source={files[1]}", *steps, *extra)
        saved = json.loads((workdir / "config.json").read_text())["model"]
        assert saved["family"] == "llama", experiment
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text()
                   .splitlines()]
        assert any(r.get("split") == "eval" for r in records), experiment
        assert all(np.isfinite(r["loss"]) for r in records if "loss" in r), experiment
