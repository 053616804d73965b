"""BERT sequence classification fine-tuning (Devlin et al. 2018, sec. 4.1).

Command (the CPU demo: which testament a verse comes from, dev verses from held-out books):
  python -m train.main --config=experiments/bert.py:tiny --workdir=runs/bert_tiny
  python -m train.main --config=experiments/bert_classify.py:tiny --workdir=runs/bert_tiny_cls
Own data: --config.data.source=train.tsv --config.data.eval_source=dev.tsv (columns text,
optional text_pair, label; or JSONL with those fields) --config.model.num_labels=N (1 for
regression). --config.init_from names the pretraining run; its tokenizer is reused.

Variants match experiments/bert.py (smoke, tiny, mini, base, large), so the encoder shapes agree.
base/large use the paper's fine-tuning recipe: batch 32, lr 2e-5, 3 epochs, 10% warmup.
Measured results: docs/bert.md.
"""
from experiments import bert


def get_config(arg: str = "tiny"):
    c = bert.get_config(arg)
    c.task = "classify"
    c.init_from = "" if arg == "smoke" else f"runs/bert_{arg}"
    c.model.heads = ("classify",)
    c.model.num_labels = 2
    c.data.eval_source = ""
    c.batch_size = c.eval_batch_size = 32
    c.opt.schedule, c.opt.end_lr_fraction = "linear", 0.0
    c.num_eval_steps = 0
    if arg == "smoke":
        c.batch_size = c.eval_batch_size = 8
        c.num_train_steps, c.eval_every_steps, c.checkpoint_every_steps = 20, 10, 10
        c.opt.learning_rate, c.opt.warmup_steps = 1e-3, 2
    elif arg in ("tiny", "mini"):
        c.num_train_steps, c.eval_every_steps, c.checkpoint_every_steps = 600, 200, 200
        c.log_every_steps = 50
        c.opt.learning_rate, c.opt.warmup_steps = 2e-4, 60
    else:
        c.model.dropout_rate = 0.1
        c.num_train_steps, c.eval_every_steps, c.checkpoint_every_steps = 2700, 900, 900
        c.opt.learning_rate, c.opt.warmup_steps = 2e-5, 270
    return c
