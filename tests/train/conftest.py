"""Fixtures shared by the post-training tests (DPO, reward models, PPO, GRPO)."""
import json
import random

import pytest

from tests.conftest import override, smoke_config
from train import loop, tasks

NAMES = "Abel Boaz Caleb Dan Eli Gad Hur Ira Joel Levi Mesha Nahum Obed Peleg Reu Seth".split()


def write_pairs(path, n, seed):
    """Pairs whose chosen answer is in the prompt and whose rejected one is not."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        person, father, other = rng.sample(NAMES, 3)
        lines.append({"prompt": f"{person} was the son of {father}. Whose son was {person}?",
                      "chosen": father, "rejected": other})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def write_prompts(path, n, seed):
    """SFT-format questions whose answer is in the prompt (the prompts of PPO and GRPO)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        person, father = rng.sample(NAMES, 2)
        lines.append({"prompt": f"{person} was the son of {father}. Whose son was {person}?",
                      "response": father})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def pair_base(corpus_file, tmp_path_factory):
    """A smoke GPT base run, and the pair files."""
    root = tmp_path_factory.mktemp("dpo")
    workdir = root / "base"
    loop.train_and_evaluate(smoke_config(corpus_file, **{
        "model.max_len": 64, "data.max_len": 64, "num_train_steps": 10,
        "eval_every_steps": 10, "checkpoint_every_steps": 10}), str(workdir), tasks.get("lm"))
    return workdir, (write_pairs(root / "train.jsonl", 48, 0), write_pairs(root / "dev.jsonl", 8, 1))


def pairs_smoke_config(c, base, **overrides):
    """An experiment's :smoke config `c` on the base run and its pair files, with short runs
    and dotted-key overrides."""
    workdir, files = base
    c.init_from, c.data.source, c.data.eval_source = str(workdir), str(files[0]), str(files[1])
    c.num_train_steps, c.eval_every_steps, c.log_every_steps = 8, 4, 2
    c.checkpoint_every_steps, c.batch_size, c.eval_batch_size = 100, 8, 8
    c.opt.learning_rate, c.opt.warmup_steps = 3e-3, 0
    c.data.eval_generations, c.data.max_new_tokens = 2, 2
    return override(c, **overrides)
