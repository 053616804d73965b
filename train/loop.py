"""The objective-agnostic training loop: state, restore, train, log, evaluate, save.

The task (train/tasks) supplies the model, the data and the loss; train/step.py the jitted
step and its sharded state. Resuming is automatic: a workdir with checkpoints continues from
the newest intact one, data position included. A step whose loss or gradient norm is not
finite stops the run, the last good checkpoint left as the newest; with
config.skip_nonfinite_steps=N such steps are skipped instead, up to N in a row.
"""
import dataclasses
import os
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from data import lm as lm_data, sources
from train import checkpoint, config as config_lib, errors, metrics as metrics_lib
from train import pretrained as hf_io, profiling, runs, sharding, step as step_lib
from train.errors import ConfigError
from train.tasks import Task


@dataclasses.dataclass
class Run:
    """What the step loop and the end of training share."""
    config: Any
    workdir: str
    task: Task
    data: dict
    setup: step_lib.Setup
    ckpt: checkpoint.Checkpointer
    train_step: Callable
    eval_step: Callable
    writer: Any = None
    log: Callable = print


def evaluate(eval_step, params, eval_rows, config, batch_shard,
             summarize=metrics_lib.summarize):
    """Sums the task's metrics over the eval split (at most config.num_eval_steps batches)."""
    it = lm_data.make_iterator(eval_rows, config.eval_batch_size, seed=0, shuffle=False,
                               repeat=False, process_index=jax.process_index(),
                               process_count=jax.process_count())
    totals = None
    for i, batch in enumerate(it):
        if config.num_eval_steps and i >= config.num_eval_steps:
            break
        sums = eval_step(params, sharding.global_batch(batch, batch_shard))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return summarize(jax.device_get(totals))


def train_and_evaluate(config, workdir: str, task: Task) -> dict:
    """Trains `task` as configured; returns the final eval metrics."""
    hf_io.configure(config)  # init_from=hf:DIR sets the architecture from DIR/config.json
    if task.configure is not None:
        task.configure(config)
    config_lib.validate(config)
    profiling.use_compilation_cache(config.get("compilation_cache_dir", ""))
    if step_lib.uses_lora(config) and config.get("init_from"):
        # A LoRA run reloads its base at every start and in every tool: from anywhere.
        base = hf_io.hf_folder(config.init_from)
        config.init_from = (hf_io.PREFIX + os.path.abspath(base) if base is not None
                            else os.path.abspath(config.init_from))
    config_lib.check_workdir(workdir)
    notes = checkpoint.check_resume_config(config, workdir)
    s = step_lib.build(task, config)
    config_lib.check_batch_split(config, dict(s.mesh.shape))
    hf_dir = hf_io.hf_folder(config.get("init_from", ""))
    has_checkpoint = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
        name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints")))
    hf_report = None
    if hf_dir and not has_checkpoint:  # every tensor's name and shape, before any write
        hf_report = hf_io.check(config, s.base_params)
    if step_lib.uses_lora(config) and not config.get("init_from"):
        raise ConfigError("config.model.lora_rank > 0 trains adapters over a pretrained model, "
                          "but config.init_from is empty; set it to a run folder or hf:DIR, or "
                          "train every weight with --config.model.lora_rank=0")
    os.makedirs(workdir, exist_ok=True)
    data = task.prepare_data(config, workdir)
    pretrained = None
    if step_lib.uses_lora(config):
        # A LoRA run reloads its frozen base at every start: checkpoints hold only adapters.
        # Checked before the checkpoint folder exists, so a refusal leaves none behind.
        pretrained = runs.load_base_params(config, task, s, hf_report, log=not has_checkpoint)
        lacking = sorted(set(s.abstract.frozen) - set(pretrained))
        if lacking:
            raise ConfigError(
                f"with LoRA every frozen weight comes from config.init_from, but "
                f"{config.init_from} lacks {lacking}, which would stay at their random values; "
                "train every weight with --config.model.lora_rank=0")
    ckpt = checkpoint.Checkpointer(workdir, save_every_steps=config.checkpoint_every_steps,
                                   keep=config.keep_checkpoints)
    train_iter = lm_data.make_iterator(
        data["train_rows"], config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    rng = jax.random.key(config.seed)
    resuming = ckpt.latest_step() is not None
    if pretrained is None:
        pretrained = {} if resuming else runs.load_base_params(config, task, s, hf_report, log=True)
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        if resuming:
            state, data_state = ckpt.restore(s.abstract)
            train_iter.set_state(data_state)
            if s.abstract.frozen is not None:  # every frozen weight comes from the base
                state = state.replace(frozen={k: pretrained[k] for k in s.abstract.frozen})
        else:
            state = s.init_fn(jax.random.fold_in(rng, 0))
        if state.frozen is not None:
            state = state.replace(frozen={**state.frozen, **pretrained})
        elif not resuming:
            state = state.replace(params={**state.params, **pretrained})
        if jax.process_index() == 0:  # once the state is in hand: a refusal writes nothing
            with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
                f.write(config.to_json(indent=2))
        eval_step = jax.jit(lambda p, b: task.loss_fn(p, b, None, model=s.model, train=False)[1],
                            in_shardings=(s.param_shardings, s.batch_shard),
                            out_shardings=sharding.replicated(s.mesh))
        train_step = (task.make_train_step(s, config, data) if task.make_train_step
                      else s.jit_train_step(task, config))
        run = Run(config, workdir, task, data, s, ckpt, train_step, eval_step)
        return _run(run, state, train_iter, jax.random.fold_in(rng, 1), notes)


def _diverged(step, metrics, saved):
    """The one-line account of a non-finite step: where, what, and what to do."""
    loss = metrics["loss_sum"] / max(float(metrics["weight_sum"]), 1e-9)
    last = (f"the newest checkpoint, step {saved}, is the last good one (nothing later was "
            f"saved); rerunning resumes from it" if saved is not None
            else "no checkpoint was saved before it")
    return (f"step {step}: the loss is {loss:.6g} and the gradient norm "
            f"{float(metrics['grad_norm']):.6g}, so training stopped; {last}. Lower "
            "--config.opt.learning_rate, clip gradients with --config.opt.clip_grad_norm=1.0, "
            "or skip such steps with --config.skip_nonfinite_steps=N")


def _run(run, state, train_iter, dropout_rng, notes):
    """The step loop: train, log, evaluate, checkpoint; saves on SIGTERM and at the end."""
    config, task, ckpt = run.config, run.task, run.ckpt
    first_step = int(jax.device_get(state.step))
    peak, peak_source = metrics_lib.peak_flops(str(sources.default_cache_dir()))
    tokens_per_step = config.batch_size * config.data.max_len
    seconds_at_peak = task.flops_per_token(config) * tokens_per_step / peak
    num_params = sum(x.size for x in jax.tree.leaves(run.setup.abstract.params))
    if run.setup.abstract.frozen is not None:
        frozen = sum(x.size for x in jax.tree.leaves(run.setup.abstract.frozen))
        num_params = f"{num_params + frozen:,} ({num_params:,} trained: LoRA)"
    else:
        num_params = f"{num_params:,}"
    run.writer = metrics_lib.MetricWriter(run.workdir)
    bar = metrics_lib.ProgressBar(first_step, config.num_train_steps)
    run.log = bar.write
    bar.write(f"{num_params} parameters | {jax.device_count()} devices {dict(config.mesh)} | "
              f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source}) | data {run.data['info']} | "
              f"{'resuming at step ' + str(first_step) if first_step else 'new run'}")
    if notes and first_step:
        bar.write("changed since the saved run: " + "; ".join(notes))
    stop = {"signal": False}
    # One process: our SIGTERM handler. Several: JAX's preemption service (started by
    # jax.distributed.initialize) agrees on one step at which every process stops and saves,
    # so no process waits in a collective that another has left.
    multi = jax.process_count() > 1
    previous_handler = None if multi else signal.signal(
        signal.SIGTERM, lambda *_: stop.update(signal=True))
    wall0, timer = metrics_lib.last_wall_time(run.workdir), metrics_lib.Throughput()
    run_start, final, step = time.time(), {}, first_step
    skip_limit, skipped = config.get("skip_nonfinite_steps", 0), {"in_a_row": 0, "window": 0}
    pending, unchecked = [], []  # metrics of checked steps not yet logged; of unchecked steps
    profiler = profiling.StepProfiler(config.get("profile_steps", ""), run.workdir, bar.write)

    def write_train(at_step, step_metrics):
        out = metrics_lib.train_means(step_metrics, task.summarize, timer.steps_per_sec(),
                                      tokens_per_step, seconds_at_peak)
        if skip_limit:
            out["skipped_steps"] = skipped["window"]
        out.update(wall_time=wall0 + time.time() - run_start, tokens=at_step * tokens_per_step)
        run.writer.write(at_step, "train", out)
        return out

    def check_finite():
        """Moves the unchecked steps to `pending`; stops (or skips) at a non-finite one."""
        for at_step, m in jax.device_get(unchecked):
            if not m["nonfinite"]:
                skipped["in_a_row"] = 0
                pending.append(m)
            elif skipped["in_a_row"] < skip_limit:
                skipped["in_a_row"] += 1
                skipped["window"] += 1
            else:
                write_train(at_step, pending + [m])
                raise errors.DivergedError(_diverged(at_step, m, ckpt.latest_step()))
        unchecked.clear()

    try:
        stopping = False
        while step < config.num_train_steps and not stopping:
            batch = sharding.global_batch(next(train_iter), run.setup.batch_shard)
            profiler.before(step + 1)
            state, step_metrics = run.train_step(state, batch, dropout_rng)
            step += 1
            profiler.after(step, step_metrics)
            # The previous step is checked while this one runs: one step behind, the device
            # never waits for the host.
            check_finite()
            unchecked.append((step, step_metrics))
            if step == first_step + 1:  # the compiling step is left out of throughput
                jax.block_until_ready(step_metrics)
                timer.restart()
            else:
                timer.tick()
            if step == config.get("stop_at_step", 0):
                stop["signal"] = True  # a preemption drill: same path as SIGTERM
            if multi and multihost_utils.reached_preemption_sync_point(step):
                stop["signal"] = True
            # Read once: a SIGTERM arriving later in this step is acted on at the next one,
            # so the step the loop stops at is always the step it saved.
            stopping = stop["signal"]
            last = step == config.num_train_steps or stopping
            log_now = step % config.log_every_steps == 0 or step == config.num_train_steps
            eval_now = step % config.eval_every_steps == 0 or step == config.num_train_steps
            if log_now or eval_now or last or step % ckpt.save_every_steps == 0:
                check_finite()  # nothing non-finite is logged as good, evaluated or saved
            if log_now and pending:
                out = write_train(step, pending)
                timer.restart()
                bar.update_to(step, loss=out["loss"], tok_s=out.get("tokens_per_sec", 0.0))
                pending.clear()
                skipped["window"] = 0
            if eval_now:
                final = _eval_all(run, step_lib.full_params(state.params, state.frozen))
                final["wall_time"] = wall0 + time.time() - run_start
                run.writer.write(step, "eval", final)
                bar.write(f"step {step}: eval " + " ".join(
                    f"{k} {v:.4g}" for k, v in final.items() if k != "wall_time"))
                timer.restart()
            ckpt.save(step, state, train_iter.get_state(), force=last)
        if stopping:
            bar.write(f"stopped early: saved a checkpoint at step {step}; rerun to resume")
        elif final:
            bar.write(task.final_report(final, run.data["info"]))
            final = _finish(run, state, step, final)
    finally:
        profiler.stop()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        ckpt.close()
        bar.close()
        run.writer.close()
    return final


def _eval_all(run, params):
    """The eval split's loss metrics, plus the task's prediction metrics (BLEU, EM/F1); a task
    without eval rows (PPO) has only the latter."""
    metrics = {}
    if run.data["eval_rows"] is not None:
        metrics = evaluate(run.eval_step, params, run.data["eval_rows"], run.config,
                           run.setup.batch_shard, run.task.summarize)
    metrics.update(run.task.evaluate_predictions(params, run.data, run.config, run.workdir))
    return metrics


def _finish(run, state, step, final):
    """After the last step: checkpoint averaging (if configured), then the test split.

    Returns `final` with the averaged model's metrics as `averaged_*` and the test split's as
    `test_*`; both are also written to metrics.jsonl (splits "averaged" and "test").
    """
    num = run.config.get("average_checkpoints", 0)
    params = step_lib.full_params(state.params, state.frozen)
    if num > 1:
        run.ckpt.wait()  # the final save is asynchronous
        params, steps = run.ckpt.average_params(run.setup.abstract, num)
        params = step_lib.full_params(params, state.frozen)
        averaged = _eval_all(run, params)
        run.writer.write(step, "averaged", dict(averaged, checkpoints=len(steps)))
        run.log(f"averaged the last {len(steps)} checkpoints (steps {steps[0]}..{steps[-1]}): "
                + run.task.final_report(averaged, run.data["info"]))
        final = dict(final, **{f"averaged_{k}": v for k, v in averaged.items()})
    test = run.task.evaluate_test(params, run.data, run.config)
    if test:
        run.writer.write(step, "test", test)
        run.log(run.task.test_report(test, averaged=num > 1))
        final = dict(final, **{f"test_{k}": v for k, v in test.items()})
    return final
