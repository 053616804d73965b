"""Training objectives, one module each; `get(config.task)` returns one as a `Task`.

A task module defines the hooks below as module-level functions; `Task` is the written
interface the loop, the dry run, the benchmark and the tools call. Modules are imported on
demand so one task's dependencies never load for another.
"""
import dataclasses
import importlib
from typing import Any, Callable, Optional, TypedDict

NAMES = ("lm", "mlm_nsp", "classify", "span_qa", "seq2seq", "sft", "dpo", "reward", "ppo",
         "grpo")


class TaskData(TypedDict, total=False):
    """The `data` dict prepare_data returns and the later hooks read (make_train_step,
    evaluate_predictions, evaluate_test); hooks may add entries they cache (compiled
    functions). Every task gives the first four:
      train_rows: dict of equal-length arrays, one row per example; the loop batches them
      eval_rows: the same for the eval split, or None: no eval loss (ppo, grpo)
      tokenizer: the run's tokenizer (data/tokenizer.py)
      info: counts and settings for the log line at the start and for final_report
    Extras, of the tasks that read them:
      chat: the chat format, our chat tokens or the checkpoint's template (sft, dpo, reward,
          ppo; data/chat_template.py chat_format): render, prompt, end_id
      dev_prompts: (prompt ids, reference answers, question) per dev prompt (sft, dpo)
      dev_rows, train_text, dev_text, reward, reference_weights (ppo: prompt rows, their
          questions and reference answers, the reward function, the reference model)
      bleu_pairs, test_pairs (seq2seq); eval_examples, v2, holdout_* (span_qa)
    """
    train_rows: dict
    eval_rows: Optional[dict]
    tokenizer: Any
    info: dict


def _default_final_report(final: dict, info: dict) -> str:
    return f"final eval loss {final['loss']:.4f}"


def _no_predictions(params, data, config, workdir) -> dict:
    return {}


def _no_test_split(params, data, config) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Task:
    """The hooks of one objective. `batch` is a dict of arrays with a leading batch axis.

    Required, defined by every task module:
      build_model(config, **overrides) -> flax module of config.model (overrides such as
          decode=True or attention="reference" give its variants)
      prepare_data(config, workdir) -> TaskData: "train_rows" and "eval_rows" (dicts of
          equal-length arrays, one row per example), "tokenizer" and "info" (a dict for the
          log); tasks may add entries their other hooks read (`data` below)
      init_params(model, config, rng) -> parameters boxed with logical axis names
      init_batch(config, batch_size) -> a batch of the real shapes and dtypes
      loss_fn(params, batch, rng, *, model, train) -> (loss sum, metric sums); the sums hold
          "weight_sum", the count the loop divides the summed loss and gradients by
      flops_per_token(config) -> training FLOPs per token, for MFU
      bench_batch(config) -> a numpy batch of random data (experiments/bench.py)
    Optional, with the default used when a module leaves it out:
      summarize(sums) -> metric means                        [train.metrics.summarize]
      final_report(final eval metrics, info) -> closing line  [the eval loss]
      evaluate_predictions(params, data: TaskData, config, workdir) -> metrics that need
          whole predictions (BLEU, exact match), merged into every eval        [none]
      evaluate_test(params, data: TaskData, config) -> test-split metrics, once at the
          end                                                                  [none]
      test_report(test metrics, averaged) -> line for the test split      [unused if none]
      load_pretrained(config, shardings) -> params of config.init_from, placed as the
          shardings say, that replace the fresh ones      [None: init_from is refused]
      configure(config) -> None: fills config keys that follow from others (e.g. the model
          shape of the init_from run), before the config is validated; idempotent  [none]
      make_train_step(setup, config, data: TaskData) -> train_step(state, batch, rng) ->
          (state, step metrics), for objectives whose step is more than one gradient step
          on loss_fn (PPO: a rollout, rewards on the host, several optimisation epochs,
          train/rl/); the metrics hold
          step.make_train_step's keys (loss_sum, weight_sum, grad_norm, param_norm,
          learning_rate, nonfinite)                          [step.make_train_step, jitted]
      init_extra(config) -> the task's own training state that is not a parameter, kept
          in TrainState.extra and saved with the checkpoints (PPO's adaptive KL
          coefficient)                                                       [None]
    And one value, from the module's FRESH_HEADS:
      fresh_heads: names of top-level parameter groups a LoRA run trains alongside the
          adapters (heads the base checkpoint lacks, e.g. the reward head)      [()]
    A task whose prepare_data gives eval_rows None has no eval loss: its evals are
    evaluate_predictions alone.
    """
    name: str
    build_model: Callable[..., Any]
    prepare_data: Callable[..., TaskData]
    init_params: Callable[..., Any]
    init_batch: Callable[..., dict]
    loss_fn: Callable[..., tuple]
    flops_per_token: Callable[..., float]
    bench_batch: Callable[..., dict]
    summarize: Callable[[dict], dict]
    final_report: Callable[[dict, dict], str] = _default_final_report
    evaluate_predictions: Callable[..., dict] = _no_predictions
    evaluate_test: Callable[..., dict] = _no_test_split
    test_report: Optional[Callable[[dict, bool], str]] = None
    load_pretrained: Optional[Callable[..., dict]] = None
    configure: Optional[Callable[..., None]] = None
    make_train_step: Optional[Callable[..., Callable]] = None
    init_extra: Optional[Callable[..., Any]] = None
    fresh_heads: tuple = ()
    module: Any = None  # the task module itself, for its task-specific helpers


REQUIRED_HOOKS = ("build_model", "prepare_data", "init_params", "init_batch", "loss_fn",
                  "flops_per_token", "bench_batch")
OPTIONAL_HOOKS = ("summarize", "final_report", "evaluate_predictions", "evaluate_test",
                  "test_report", "load_pretrained", "configure", "make_train_step",
                  "init_extra")


def from_module(name: str, module) -> Task:
    """The Task of a module; a missing required hook is named in the error."""
    missing = [hook for hook in REQUIRED_HOOKS if not callable(getattr(module, hook, None))]
    if missing:
        raise TypeError(f"task module {module.__name__} lacks the required hooks {missing} "
                        "(train/tasks/__init__.py Task lists them)")
    from train import metrics
    hooks = {hook: getattr(module, hook) for hook in REQUIRED_HOOKS}
    hooks.update({hook: getattr(module, hook) for hook in OPTIONAL_HOOKS
                  if callable(getattr(module, hook, None))})
    hooks.setdefault("summarize", metrics.summarize)
    return Task(name=name, module=module,
                fresh_heads=tuple(getattr(module, "FRESH_HEADS", ())), **hooks)


def get(name: str) -> Task:
    """The task called `name`."""
    if name not in NAMES:
        from train.errors import ConfigError
        raise ConfigError(f"unknown config.task {name!r}; known tasks: {list(NAMES)}")
    return from_module(name, importlib.import_module(f"train.tasks.{name}"))
