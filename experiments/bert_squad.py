"""BERT span question answering fine-tuning, SQuAD v1.1 / v2.0 (Devlin et al. 2018, 4.2-4.3).

Command (the CPU demo: genealogy questions from the Bible, a third unanswerable, v2.0 format):
  python -m train.main --config=experiments/bert.py:tiny --workdir=runs/bert_tiny
  python -m train.main --config=experiments/bert_squad.py:tiny --workdir=runs/bert_tiny_qa
  python -m experiments.predict_qa --workdir=runs/bert_tiny_qa --context=... --question=...
SQuAD itself: --config.data.source=train-v2.0.json --config.data.eval_source=dev-v2.0.json.
Each eval writes predictions.json (official format) and, for v2.0, the no-answer threshold
chosen on the held-apart training questions (data.holdout_fraction), which predict_qa uses.
base/large follow the paper: max_len 384, doc stride 128, lr 3e-5, batch 32, 2 epochs. Measured results: docs/bert.md.
"""
from experiments import bert


def get_config(arg: str = "tiny"):
    c = bert.get_config(arg)
    c.task = "span_qa"
    c.init_from = "" if arg == "smoke" else f"runs/bert_{arg}"
    c.model.heads = ("span",)
    c.data.eval_source = ""
    c.data.doc_stride = 128
    c.data.max_query_len = 64
    c.data.n_best = 20
    c.data.max_answer_len = 30
    # SQuAD v2.0: the share of training contexts held apart (never trained on) to choose the
    # no-answer threshold that the dev exact / f1 are reported at.
    c.data.holdout_fraction = 0.05
    c.batch_size = c.eval_batch_size = 32
    c.opt.schedule, c.opt.end_lr_fraction = "linear", 0.0
    c.num_eval_steps = 0
    if arg == "smoke":
        c.data.doc_stride, c.data.max_query_len = 8, 10
        c.batch_size = c.eval_batch_size = 8
        c.num_train_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 10, 10
        c.opt.learning_rate, c.opt.warmup_steps = 1e-3, 2
    elif arg in ("tiny", "mini"):
        c.data.doc_stride, c.data.max_query_len = c.data.max_len // 2, 24
        c.num_train_steps, c.eval_every_steps, c.checkpoint_every_steps = 1000, 250, 250
        c.log_every_steps = 50
        c.opt.learning_rate, c.opt.warmup_steps = 3e-4, 100
    else:
        c.data.max_len = 384
        c.model.dropout_rate = 0.1
        c.num_train_steps, c.eval_every_steps, c.checkpoint_every_steps = 5500, 1000, 1000
        c.opt.learning_rate, c.opt.warmup_steps = 3e-5, 550
    return c
