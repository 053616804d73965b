"""Talks to a fine-tuned GPT run (task "sft") in its chat format, with the KV cache.

  python -m experiments.chat --workdir=runs/gpt_sft --prompt="Whose son was Boaz?"
  python -m experiments.chat --workdir=runs/gpt_sft            # a conversation on stdin
  python -m experiments.chat --workdir=runs/gpt_sft --system="Answer with one name." \
      --temperature=0.7 --top_k=40

One --prompt gives one reply. Without it every line read from stdin is a user turn and the
reply follows; the conversation so far stays in the prompt (its oldest turns are dropped when
it no longer fits the context). An empty line or end of input stops. Temperature 0 (the
default) is greedy.
"""
import functools
import sys

import jax
import jax.numpy as jnp
from absl import flags, logging

from data import chat_template
from data.errors import DataError
from models import gpt
from train import cli, errors, runs
from train.tasks import lm

flags.DEFINE_string("workdir", None, "A run folder trained with experiments/gpt_sft.py.",
                    required=True)
flags.DEFINE_string("prompt", None, "One user message (default: read turns from stdin).")
flags.DEFINE_string("system", "", "An optional system message before the first turn.")
cli.define_sampling_flags(temperature=0.0, max_new_tokens=64, what="reply")
FLAGS = flags.FLAGS


class Chat:
    """A conversation with a run: reply(text) appends the user turn and the model's answer."""

    def __init__(self, config, tokenizer, params, *, system="", max_new_tokens=64,
                 temperature=0.0, top_k=0, top_p=1.0, seed=0):
        self.config, self.tokenizer, self.params = config, tokenizer, params
        self.format = chat_template.chat_format(tokenizer)  # its template, or our tokens
        self.turns = [("system", system)] if system else []
        self.max_new_tokens = min(max_new_tokens, config.model.max_len - 8)
        self.rng = jax.random.key(seed)
        self._generate = jax.jit(functools.partial(
            gpt.generate, lm.build_model(config, decode=True),
            max_new_tokens=self.max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, eos_id=self.format.stop_ids))

    def prompt(self) -> list[int]:
        """The tokens the reply continues, oldest turns dropped until it fits the context."""
        room = self.config.model.max_len - self.max_new_tokens
        turns = list(self.turns)
        ids = self.format.prompt(turns)
        while len(ids) > room and len(turns) > 1:
            turns.pop(1 if turns[0][0] == "system" and len(turns) > 2 else 0)
            ids = self.format.prompt(turns)
        if len(ids) > room:
            raise DataError(f"the message is {len(ids)} tokens but the model's context leaves "
                            f"{room} for it; shorten it")
        return ids

    def reply(self, text: str) -> str:
        self.turns.append(("user", text))
        ids = self.prompt()
        self.rng, rng = jax.random.split(self.rng)
        out = jax.device_get(self._generate(self.params, jnp.asarray([ids], jnp.int32), rng))
        row = out[0].tolist()
        stops = [i for i, t in enumerate(row) if t in self.format.stop_ids]
        row = row[:stops[0]] if stops else row
        answer = self.tokenizer.decode(row).strip()
        self.turns.append(("assistant", answer))
        return answer


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only opens
    try:
        config, tokenizer, params, _ = runs.load_run(FLAGS.workdir,
                                                     families=tuple(lm.DECODERS))
        # The tasks that train in the chat format.
        if config.task not in ("sft", "dpo", "ppo", "grpo"):
            raise DataError(f"{FLAGS.workdir} is a {config.task} run without the chat format; "
                            "fine-tune it first (experiments/gpt_sft.py), or sample plain text "
                            "with python -m experiments.sample")
        session = Chat(config, tokenizer, params, system=FLAGS.system,
                       max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                       top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
        if FLAGS.prompt is not None:
            print(session.reply(FLAGS.prompt))
            return
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line.strip():
                break
            answer = session.reply(line.strip())
            print(f"model> {answer}" if interactive else answer, flush=True)
    except (DataError, errors.CheckpointMismatchError) as e:
        cli.fail(str(e))


if __name__ == "__main__":
    cli.run(main)
