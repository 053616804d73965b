"""Dev exact match of a pretrained GPT before fine-tuning: few-shot prompts in plain text.

  python -m experiments.few_shot --workdir=runs/gpt_tiny --shots=1

The baseline for experiments/gpt_sft.py: the same dev questions (data/chat.py bible_qa), asked
of the pretrained run with no chat format. The prompt holds --shots solved training examples,
"<verse> Question: <question> Answer: <name>.", then the dev question and " Answer:"; the
greedy continuation up to its first full stop, line break or "Question" is the answer, scored
like the fine-tuned run's (exact match and token F1, SQuAD normalisation). Examples that do
not fit the context lose their oldest shots first.
"""
import random

import numpy as np
from absl import flags, logging

from data import chat, sources, tokenizer as tok
from data.errors import DataError
from train import cli, errors, runs
from train.tasks import lm, sft

flags.DEFINE_string("workdir", None, "A pretrained GPT run folder.", required=True)
flags.DEFINE_string("source", "bible", "Training conversations the shots come from: 'bible' "
                    "(the genealogy questions) or a JSONL/TSV file as for gpt_sft.py.")
flags.DEFINE_string("eval_source", "", "The dev file, when --source is a file.")
flags.DEFINE_integer("shots", 1, "Solved training examples before each question.")
flags.DEFINE_integer("max_new_tokens", 16, "Most tokens per answer.")
flags.DEFINE_integer("limit", 200, "Dev questions scored (0: all), the first ones, as the "
                     "fine-tuning run's eval_generations.")
flags.DEFINE_integer("batch_size", 16, "Prompts generated at once.")
FLAGS = flags.FLAGS
cli.at_least("shots", 0)
cli.at_least("max_new_tokens", 1)
cli.at_least("limit", 0, " (0: all)")
cli.at_least("batch_size", 1)


def as_text(conv, with_answer: bool) -> str:
    user = " ".join(conv.turns[-2][1].split())
    return f"{user} Answer:" + (f" {conv.turns[-1][1]}." if with_answer else "")


def cut_answer(text: str) -> str:
    for stop in (".", "\n", "Question"):
        text = text.split(stop, 1)[0]
    return text.strip()


def prompts(train, dev, tokenizer, shots: int, room: int, seed: int = 0) -> list[list[int]]:
    """[BOS] + shots + question ids per dev conversation, within `room` tokens."""
    rng = random.Random(seed)
    out = []
    for conv in dev:
        examples = [as_text(c, True) for c in rng.sample(train, shots)]
        while True:
            ids = tok.bos_prefix(tokenizer) + tokenizer.encode(
                " ".join(examples + [as_text(conv, False)]))
            if len(ids) <= room or not examples:
                break
            examples.pop(0)
        out.append(ids)
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    try:
        config, tokenizer, params, _ = runs.load_run(FLAGS.workdir,
                                                     families=tuple(lm.DECODERS))
        if FLAGS.source == "bible":
            train, dev = chat.bible_qa(sources.bible_db("bible", None))
        elif not FLAGS.eval_source:
            raise DataError("--source is a file: pass the dev file as --eval_source")
        else:
            train = chat.read_conversations(FLAGS.source)
            dev = chat.read_conversations(FLAGS.eval_source)
        if len(train) < FLAGS.shots:
            raise DataError(f"--shots={FLAGS.shots} exceeds the {len(train)} training "
                            "conversations")
    except (DataError, errors.CheckpointMismatchError) as e:
        cli.fail(str(e))
    dev = dev[:FLAGS.limit] if FLAGS.limit else dev
    width = config.model.max_len - FLAGS.max_new_tokens
    ids = prompts(train, dev, tokenizer, FLAGS.shots, width)
    end_id = tokenizer.eos_id
    fn = sft.make_generate_fn(params, config, end_id, FLAGS.max_new_tokens)
    outputs = sft.generate(params, ids, fn, width=width, batch_size=FLAGS.batch_size,
                           pad_id=tokenizer.pad_id or 0, end_id=end_id)
    answers = [cut_answer(tokenizer.decode(row)) for row in outputs]
    scores = np.asarray([chat.answer_scores(a, c.answers) for a, c in zip(answers, dev)])
    for conv, answer in list(zip(dev, answers))[:3]:
        print(f"{as_text(conv, False)} -> {answer!r} (reference {conv.answers[0]!r})")
    print(f"{FLAGS.workdir}, {FLAGS.shots}-shot, {len(dev)} dev questions: exact match "
          f"{100 * scores[:, 0].mean():.1f}%, F1 {100 * scores[:, 1].mean():.1f}%")


if __name__ == "__main__":
    cli.run(main)
