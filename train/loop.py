"""The objective-agnostic training loop: mesh, sharded state, restore, train, evaluate, save.

`train_step(state, batch, rng)` is a pure function jitted once with in/out shardings and a
donated state; the task supplies the model, the data and the loss. Resuming is automatic: a
workdir with checkpoints continues from the latest one, data position included.
"""
import functools
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.experimental import multihost_utils

from data import lm as lm_data
from train import checkpoint, metrics as metrics_lib, optim, sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_train_step(loss_fn, tx, schedule, grad_accum_steps: int):
    """Returns train_step(state, batch, rng) -> (state, metrics) for a task's loss_fn.

    With accumulation the batch is split into `grad_accum_steps` micro-batches scanned in
    sequence; gradients of the summed loss are added and divided once by the total token
    count, so the update equals the one of a single large batch.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        if grad_accum_steps == 1:
            (_, sums), grads = grad_fn(state.params, batch, rng)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)

            def accumulate(carry, xs):
                i, mb = xs
                (_, s), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng)))
            (grads, sums), _ = jax.lax.scan(
                accumulate, (zeros[1], zeros[0][1]), (jnp.arange(grad_accum_steps), micro))
        count = jnp.maximum(sums["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        sums = dict(sums, grad_norm=optax.tree.norm(grads),
                    param_norm=optax.tree.norm(params), learning_rate=schedule(state.step))
        return TrainState(state.step + 1, params, opt_state), sums

    return train_step


def jit_train_step(task, config, model, tx, schedule, state_shardings, batch_shard):
    """The task's train_step, jitted once with shardings and a donated state."""
    step_fn = make_train_step(functools.partial(task.loss_fn, model=model, train=True), tx,
                              schedule, config.opt.grad_accum_steps)
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_shard, None),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def create_state_fns(task, config, model, tx, mesh, rules):
    """(abstract sharded state, jitted init_fn(rng) -> state placed on the mesh)."""
    def init_boxed(rng):
        params = task.init_params(model, config, rng)
        return TrainState(jnp.array(0, jnp.int32), params, tx.init(params))

    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            nn.meta.unbox(boxed), shardings)
    init_fn = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=shardings)
    return abstract, shardings, init_fn


def evaluate(eval_step, state, eval_rows, config, batch_shard,
             summarize=metrics_lib.summarize):
    """Sums the task's metrics over the eval split (at most config.num_eval_steps batches)."""
    it = lm_data.make_iterator(eval_rows, config.eval_batch_size, seed=0, shuffle=False,
                               repeat=False, process_index=jax.process_index(),
                               process_count=jax.process_count())
    totals = None
    for i, batch in enumerate(it):
        if config.num_eval_steps and i >= config.num_eval_steps:
            break
        sums = eval_step(state.params, sharding.global_batch(batch, batch_shard))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return summarize(jax.device_get(totals))


_LAST_VALUE_METRICS = ("grad_norm", "param_norm", "learning_rate")


def _train_metrics(step_sums, summarize, steps_per_sec, tokens_per_step, step_seconds_at_peak):
    """Means over the logged steps (exact: sums / counts), last norms and rate, throughput, MFU."""
    summed = {k: sum(m[k] for m in step_sums) for k in step_sums[0]
              if k not in _LAST_VALUE_METRICS}
    summed.update({k: step_sums[-1][k] for k in _LAST_VALUE_METRICS})
    out = summarize(summed)
    if steps_per_sec is not None:
        out["tokens_per_sec"] = steps_per_sec * tokens_per_step
        out["mfu"] = steps_per_sec * step_seconds_at_peak  # model FLOP/s over peak FLOP/s
    return out


def train_and_evaluate(config, workdir: str, task) -> dict:
    """Trains `task` as configured; returns the final eval metrics."""
    averaged = config.get("average_checkpoints", 0)
    if averaged > config.keep_checkpoints:
        raise sharding.ConfigError(
            f"config.average_checkpoints={averaged} needs config.keep_checkpoints >= {averaged} "
            f"(now {config.keep_checkpoints}): raise keep_checkpoints or average fewer")
    os.makedirs(workdir, exist_ok=True)
    checkpoint.check_resume_config(config, workdir)
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config)
    data = task.prepare_data(config, workdir)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json(indent=2))

    model = task.build_model(config)
    tx, schedule = optim.make_optimizer(config.opt, config.num_train_steps, config.model.d_model)
    abstract, state_shardings, init_fn = create_state_fns(task, config, model, tx, mesh, rules)
    batch_shard, repl = sharding.batch_sharding(mesh, rules), sharding.replicated(mesh)
    num_params = sum(x.size for x in jax.tree.leaves(abstract.params))

    ckpt = checkpoint.Checkpointer(workdir, save_every_steps=config.checkpoint_every_steps,
                                   keep=config.keep_checkpoints)
    train_iter = lm_data.make_iterator(
        data["train_rows"], config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    rng = jax.random.key(config.seed)
    resuming = ckpt.latest_step() is not None
    # Fine-tuning starts from a pretrained encoder (placed on this mesh) and fresh heads.
    pretrained = (task.load_pretrained(config, state_shardings.params)
                  if config.get("init_from") and not resuming else {})
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if resuming:
            state, data_state = ckpt.restore(abstract)
            train_iter.set_state(data_state)
        else:
            state = init_fn(jax.random.fold_in(rng, 0))
            state = state.replace(params={**state.params, **pretrained})
        train_step = jit_train_step(task, config, model, tx, schedule, state_shardings,
                                    batch_shard)
        eval_step = jax.jit(lambda p, b: task.loss_fn(p, b, None, model=model, train=False)[1],
                            in_shardings=(state_shardings.params, batch_shard),
                            out_shardings=repl)
        return _run(config, workdir, task, data, state, train_iter, train_step, eval_step, ckpt,
                    batch_shard, jax.random.fold_in(rng, 1), num_params, abstract)


def _run(config, workdir, task, data, state, train_iter, train_step, eval_step, ckpt,
         batch_shard, dropout_rng, num_params, abstract):
    """The step loop: train, log, evaluate, checkpoint; saves on SIGTERM and at the end."""
    first_step = int(jax.device_get(state.step))
    summarize = getattr(task, "summarize", metrics_lib.summarize)
    peak, peak_source = metrics_lib.peak_flops()
    tokens_per_step = config.batch_size * config.data.max_len
    flops_per_step = task.flops_per_token(config) * tokens_per_step
    writer, bar = metrics_lib.MetricWriter(workdir), metrics_lib.ProgressBar(
        first_step, config.num_train_steps)
    bar.write(f"{num_params:,} parameters | {jax.device_count()} devices {dict(config.mesh)} | "
              f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source}) | data {data['info']} | "
              f"{'resuming at step ' + str(first_step) if first_step else 'new run'}")
    stop = {"signal": False}
    # One process: our SIGTERM handler. Several: JAX's preemption service (started by
    # jax.distributed.initialize) agrees on one step at which every process stops and saves,
    # so no process waits in a collective that another has left.
    multi = jax.process_count() > 1
    previous_handler = None if multi else signal.signal(
        signal.SIGTERM, lambda *_: stop.update(signal=True))
    wall0, pending, timer = metrics_lib.last_wall_time(workdir), [], metrics_lib.Throughput()
    run_start, final = time.time(), {}
    step = first_step
    try:
        while step < config.num_train_steps and not stop["signal"]:
            batch = sharding.global_batch(next(train_iter), batch_shard)
            state, step_metrics = train_step(state, batch, dropout_rng)
            step += 1
            pending.append(step_metrics)
            if step == first_step + 1:  # the compiling step is left out of throughput
                jax.block_until_ready(step_metrics)
                timer.restart()
            else:
                timer.tick()
            if step % config.log_every_steps == 0 or step == config.num_train_steps:
                train_metrics = _train_metrics(jax.device_get(pending), summarize,
                                               timer.steps_per_sec(), tokens_per_step,
                                               flops_per_step / peak)
                timer.restart()
                train_metrics.update(wall_time=wall0 + time.time() - run_start,
                                     tokens=step * tokens_per_step)
                writer.write(step, "train", train_metrics)
                bar.update_to(step, loss=train_metrics["loss"],
                              tok_s=train_metrics.get("tokens_per_sec", 0.0))
                pending = []
            if step % config.eval_every_steps == 0 or step == config.num_train_steps:
                final = _eval_all(eval_step, state, data, config, workdir, task, batch_shard,
                                  summarize)
                final["wall_time"] = wall0 + time.time() - run_start
                writer.write(step, "eval", final)
                bar.write(f"step {step}: eval " + " ".join(
                    f"{k} {v:.4g}" for k, v in final.items() if k != "wall_time"))
                timer.restart()
            if step == config.get("stop_at_step", 0):
                stop["signal"] = True  # a preemption drill: same path as SIGTERM
            if multi and multihost_utils.reached_preemption_sync_point(step):
                stop["signal"] = True
            ckpt.save(step, state, train_iter.get_state(),
                      force=step == config.num_train_steps or stop["signal"])
        if stop["signal"]:
            bar.write(f"stopped early: saved a checkpoint at step {step}; rerun to resume")
        elif final:
            if hasattr(task, "final_report"):
                bar.write(task.final_report(final, data["info"]))
            final = _finish(config, workdir, task, data, state, ckpt, abstract, eval_step,
                            batch_shard, summarize, writer, bar.write, step, final)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        ckpt.close()
        bar.close()
        writer.close()
    return final


def _eval_all(eval_step, state, data, config, workdir, task, batch_shard, summarize):
    """The eval split's loss metrics, plus the task's prediction metrics (BLEU, EM/F1)."""
    metrics = evaluate(eval_step, state, data["eval_rows"], config, batch_shard, summarize)
    if hasattr(task, "evaluate_predictions"):
        metrics.update(task.evaluate_predictions(state.params, data, config, workdir))
    return metrics


def _finish(config, workdir, task, data, state, ckpt, abstract, eval_step, batch_shard,
            summarize, writer, log, step, final):
    """After the last step: checkpoint averaging (if configured), then the test split.

    Returns `final` with the averaged model's metrics as `averaged_*` and the test split's as
    `test_*`; both are also written to metrics.jsonl (splits "averaged" and "test").
    """
    num = config.get("average_checkpoints", 0)
    if num > 1:
        ckpt.wait()  # the final save is asynchronous
        params, steps = ckpt.average_params(abstract, num)
        state = state.replace(params=params)
        averaged = _eval_all(eval_step, state, data, config, workdir, task,
                             batch_shard, summarize)
        writer.write(step, "averaged", dict(averaged, checkpoints=len(steps)))
        log(f"averaged the last {len(steps)} checkpoints (steps {steps[0]}..{steps[-1]}): "
            + (task.final_report(averaged, data["info"]) if hasattr(task, "final_report")
               else f"eval loss {averaged['loss']:.4f}"))
        final = dict(final, **{f"averaged_{k}": v for k, v in averaged.items()})
    if hasattr(task, "evaluate_test"):
        test = task.evaluate_test(state.params, data, config)
        if test:
            writer.write(step, "test", test)
            log(task.test_report(test, averaged=num > 1))
            final = dict(final, **{f"test_{k}": v for k, v in test.items()})
    return final


def restore_params(config, workdir: str, task, average=None):
    """(params, step) of the latest checkpoint in `workdir`, on the local devices.

    With `average` (default: the run's config.average_checkpoints) above 1, the params are
    the mean of the last `average` checkpoints, as at the end of its training.
    """
    ckpt = checkpoint.Checkpointer(workdir, async_save=False, read_only=True)
    if ckpt.latest_step() is None:
        raise checkpoint.CheckpointMismatchError(
            f"no checkpoint in {ckpt.directory}; train first with "
            f"python -m train.main --config=... --workdir={workdir}")
    mesh, rules = sharding.make_mesh({"data": -1}), sharding.rules_from_config(config)
    model = task.build_model(config)
    tx, _ = optim.make_optimizer(config.opt, config.num_train_steps, config.model.d_model)
    abstract, _, _ = create_state_fns(task, config, model, tx, mesh, rules)
    average = config.get("average_checkpoints", 0) if average is None else average
    if average > 1:  # the mean reads the latest checkpoint too: no separate restore
        params, steps = ckpt.average_params(abstract, average)
        step = steps[-1]
    else:
        state, _ = ckpt.restore(abstract)
        params, step = state.params, int(state.step)
    ckpt.close()
    return params, step
