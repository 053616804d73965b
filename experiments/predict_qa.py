"""Answers one question about a context with a fine-tuned span-QA run (experiments/bert_squad.py).

  python -m experiments.predict_qa --workdir=runs/bert_tiny_qa \
      --context="Abraham became the father of Isaac. Isaac became the father of Jacob." \
      --question="Who did Isaac become the father of?"

Long contexts are windowed exactly as in training. For a SQuAD v2.0 run, the answer is "no
answer" when the [CLS] (null) score beats the best span by more than the threshold the run chose
on training questions held apart from training (null_threshold.json in the workdir).
"""
import json
import os

from absl import flags, logging

from data import squad, squad_eval
from data.errors import DataError
from train import cli, errors, runs
from train.tasks import span_qa

flags.DEFINE_string("workdir", None, "A fine-tuned span-QA run folder.", required=True)
flags.DEFINE_string("context", None, "The passage to search for the answer.", required=True)
flags.DEFINE_string("question", None, "The question.", required=True)
FLAGS = flags.FLAGS


def answer(config, tokenizer, params, context: str, question: str, threshold=None):
    """(answer text or "", score_diff): score_diff = null score - best span score."""
    if not context.strip() or not question.strip():
        raise DataError("--context and --question must both be non-empty text")
    example = squad.QAExample(qid="q", question=question, context=context, answers=(),
                              is_impossible=False)
    d = config.data
    rows, meta = squad.squad_features([example], tokenizer, max_len=d.max_len,
                                      doc_stride=d.doc_stride, max_query_len=d.max_query_len,
                                      train=False)
    start, end = span_qa.predict_logits(params, rows, config)
    answers, diffs = squad_eval.postprocess([example], meta, start, end, n_best=d.n_best,
                                            max_answer_len=d.max_answer_len)
    if threshold is not None:
        answers = squad_eval.apply_null_threshold(answers, diffs, threshold)
    return answers["q"], diffs["q"]


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only opens
    try:
        config, tokenizer, params, task = runs.load_run(FLAGS.workdir, families=("bert",))
        if task.name != "span_qa":
            raise DataError(f"{FLAGS.workdir} is a {config.task} run, not span QA; fine-tune "
                            "one with experiments/bert_squad.py")
        threshold = None
        path = os.path.join(FLAGS.workdir, span_qa.THRESHOLD_FILE)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                threshold = json.load(f)["null_threshold"]
        text, diff = answer(config, tokenizer, params, FLAGS.context, FLAGS.question, threshold)
    except (DataError, errors.CheckpointMismatchError) as e:
        cli.fail(str(e))
    print(f"answer: {text}" if text else "answer: (no answer in the context)")
    print(f"null score - best span score: {diff:.3f}"
          + (f" (threshold {threshold:.3f})" if threshold is not None else ""))


if __name__ == "__main__":
    cli.run(main)
