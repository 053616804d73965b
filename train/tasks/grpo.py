"""Group relative policy optimisation of GPT (task "grpo", Shao et al. 2024): train/tasks/ppo.py
with config.rl.group_size samples per prompt, each response's advantage its score standardised
within its group, no value head, and the KL to the reference a loss term."""
from train.tasks.ppo import (  # noqa: F401  (the task's hooks)
    bench_batch, build_model, configure, evaluate_predictions, final_report, flops_per_token,
    init_batch, init_extra, init_params, load_pretrained, loss_fn, make_train_step,
    prepare_data, summarize)

FRESH_HEADS = ()  # no value head: LoRA trains the adapters alone
