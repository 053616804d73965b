"""The reward of each rollout, on the host, from config.rl.reward.

  fn:MODULE:FUNCTION  FUNCTION(questions, responses, references) -> one float per response,
      called with the decoded responses, the questions they answer and the reference answers
      (a tuple per question). Its output is checked (one finite number per response) and an
      exception it raises becomes a DataError that names it, so a broken reward is one line,
      not a traceback. The default is answer_f1 below.
  model:RUN  a reward-model run (task "reward", train/tasks/reward.py) scores prompt ids +
      response ids + <|end|>, rendered as its own training rows, in one jitted call compiled
      once for the step's shapes. Its tokenizer must be this run's.
Every reward is a function (questions, responses, references, prompt ids, response ids) -> B
float32 scores; rollout.score_rollouts calls it.
"""
import importlib

import jax
import numpy as np

from data import chat, chat_template
from data.errors import DataError
from train import runs
from train.errors import ConfigError
from train.rl import settings
from train.tasks import reward


def answer_f1(questions, responses, references):
    """The token F1 (0 to 1) of each response against its best reference answer."""
    return [chat.answer_scores(r, refs)[1] for r, refs in zip(responses, references)]


def load_reward(config, tokenizer):
    """A host function (questions, responses, references, prompt ids, response ids) -> B
    float scores, from config.rl.reward."""
    parsed = settings.parse_reward(config.rl.reward)
    if parsed[0] == "fn":
        _, module_name, name = parsed
        try:
            fn = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"config.rl.reward={config.rl.reward!r}: {e}") from None
        return lambda questions, responses, refs, *_: call_reward_fn(
            fn, config.rl.reward, questions, responses, refs)
    return load_reward_model(parsed[1], config, tokenizer)


def call_reward_fn(fn, name, questions, responses, refs):
    """fn's scores, checked: one finite number per response."""
    try:
        out = fn(list(questions), list(responses), list(refs))
    except Exception as e:  # the user's code: whatever it raises is theirs to fix
        raise DataError(f"the reward function {name} raised {type(e).__name__}: {e}; fix it "
                        "(it gets lists of questions, responses and reference answers and "
                        "returns one float per response)") from e
    try:
        scores = np.asarray(out, np.float32)
    except (TypeError, ValueError):
        raise DataError(f"the reward function {name} returned {type(out).__name__}, not "
                        "numbers; it must return one float per response") from None
    if scores.shape != (len(responses),):
        raise DataError(f"the reward function {name} returned shape {scores.shape} for "
                        f"{len(responses)} responses; it must return one float per response, "
                        f"shape ({len(responses)},)")
    if not np.all(np.isfinite(scores)):
        raise DataError(f"the reward function {name} returned non-finite scores "
                        f"{scores[~np.isfinite(scores)][:4].tolist()}; return finite floats")
    return scores


def load_reward_model(run, config, tokenizer):
    """The scores of a reward-model run (task "reward") on (prompt ids + response ids + end),
    compiled once for the step's shapes."""
    rconfig, rtokenizer, params, task = runs.load_run(run, families=("gpt",))
    if task.name != "reward":
        raise DataError(f"config.rl.reward=model:{run} is a {task.name} run; it must be a "
                        "reward-model run (experiments/gpt_reward.py)")
    probe = "Whose son was Boaz? Obed, the son of Boaz."
    if (rtokenizer.vocab_size != tokenizer.vocab_size
            or rtokenizer.encode(probe) != tokenizer.encode(probe)):
        raise DataError(f"the reward model {run} has another tokenizer than this run's; train "
                        "it from the same base run (config.init_from)")
    net = task.build_model(rconfig)
    length = rconfig.data.max_len
    end_id = chat_template.chat_format(tokenizer).end_id
    score_fn = jax.jit(lambda p, rows: reward.scores(net, p, rows))

    def score(questions, responses, refs, prompt_ids, response_ids):
        rows = reward_rows(prompt_ids, response_ids, length, end_id)
        return np.asarray(score_fn(params, rows), np.float32)

    return score


def reward_rows(prompt_ids, response_ids, length, end_id):
    """The reward task's rows of (prompt + response + end_id), cut to `length` from the left,
    weighted on the response and its end: the head reads the last weighted position."""
    rows = {k: np.zeros((len(prompt_ids), length), np.int32)
            for k in ("inputs", "positions", "segment_ids")}
    rows["weights"] = np.zeros((len(prompt_ids), length), np.float32)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        full = (list(p) + list(r) + [end_id])[-(length + 1):]
        n = len(full) - 1
        rows["inputs"][b, :n] = full[:-1]
        rows["positions"][b, :n] = np.arange(n)
        rows["segment_ids"][b, :n] = 1
        rows["weights"][b, max(n - len(r) - 1, 0):n] = 1.0
    return rows
