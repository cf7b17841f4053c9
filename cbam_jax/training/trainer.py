"""The training loop: `train_and_evaluate(config, workdir)`.

Order of work, so that bad input fails before anything slow: config and devices -> workdir
architecture -> datasets -> model init -> restore -> compile and train. An interrupted run (SIGTERM,
`stop_at_step`, a crash after a checkpoint) resumes exactly where it stopped when started again
with the same workdir: the state, the optimizer and the position in the data stream are restored.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
from typing import Any, NamedTuple

import jax
import ml_collections
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils

from cbam_jax.data import make_source, train_dataset
from cbam_jax.data.pipeline import check_source
from cbam_jax.errors import InvalidInput
from cbam_jax.factory import init_from
from cbam_jax.registry import create_model, model_config, split_name
from cbam_jax.training import config as config_lib
from cbam_jax.training import optim
from cbam_jax.training import step as step_lib
from cbam_jax.training.checkpoint import Checkpoints, DIVERGED_FIX, check_architecture, holding_workdir
from cbam_jax.training.evaluate import evaluate_split
from cbam_jax.training.export import export_pretrained
from cbam_jax.training.metrics_log import MetricLog, MetricWindow
from cbam_jax.training.parallel import DataParallel


def setup_runtime(config: ml_collections.ConfigDict) -> None:
    """jax.distributed (when asked) and the persistent compilation cache; call before any JAX op."""
    if config.distributed.enabled:
        # CPU collectives across processes need gloo (no effect on GPU/TPU backends).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=config.distributed.coordinator_address or None,
                                   num_processes=config.distributed.num_processes or None,
                                   process_id=None if config.distributed.process_id < 0 else config.distributed.process_id)
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def build_model(config: ml_collections.ConfigDict):
    """The model of the config (compute dtype from config.precision, float32 parameters)."""
    attention_options = {} if split_name(config.model.name)[0] is None else {"reduction": config.model.reduction}
    attention_options.update(config.model.attention_options.to_dict())
    return create_model(config.model.name, num_classes=config.dataset.num_classes, stem=config.model.stem,
                        variant=config.model.variant, width=config.model.width,
                        dtype=config.precision, **attention_options,
                        **({"remat": config.model.remat} if config.model.remat != "none" else {}))  # ResNets only


class Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint and stops cleanly at the next step.

    With several processes JAX's own preemption service (started by jax.distributed) catches
    SIGTERM on any host and agrees on a step at which all of them save and stop together.
    """

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self.requested = False
        self.previous = None

    def should_stop(self, step: int) -> bool:
        if self.multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and not self.multi_process:
            try:
                self.previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no handler
                self.previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


class Best(NamedTuple):
    """The best eval accuracy so far and its step (None before the first evaluation)."""

    accuracy: float = -1.0
    step: int | None = None


def _checkpoint_meta(run: dict, step: int, steps_per_epoch: int, best: Best) -> dict:
    """The 'meta' item of a checkpoint: the run's model and config, where it stands, the best so far."""
    return {**run, "step": step, "epoch": step / steps_per_epoch, "best_accuracy": best.accuracy,
            "best_step": best.step}


def _model_variables(state: step_lib.TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def _log_train_window(step: int, window: MetricWindow, log: MetricLog, checkpoints: Checkpoints) -> None:
    """Log the train metrics of the steps since the last call; stop on a non-finite loss before
    anything evaluates or checkpoints the state that produced it (so the last checkpoint is good)."""
    record = window.flush(step)
    if record is None:
        return
    if not math.isfinite(record["loss"]):
        raise FloatingPointError(f"The training loss became {record['loss']} by step {step}. "
                                 f"{checkpoints.last_good_sentence()} {DIVERGED_FIX}")
    log.write(step, "train", record)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) in `workdir`; returns the summary printed at the end.

    Returns:
      {'status': 'finished'|'stopped'|'preempted', 'step', 'total_steps', 'final_accuracy',
       'best_accuracy', 'best_step', 'train_seconds', 'first_step_seconds', 'images_per_second',
       'workdir'} (+ 'pretrained': the exported model's directory, when finished).

    Raises:
      ValueError / FileNotFoundError: bad config, devices, dataset or workdir (before compiling).
      FloatingPointError: the loss or the state became NaN/inf (nothing non-finite is saved; the last
        checkpoint on disk is left intact).
      OutputError: the workdir is in use by another run or not writable, or a save failed (disk full).
    """
    config_lib.validate(config)
    setup_runtime(config)
    DataParallel.check_batch_size(config.batch_size)
    DataParallel.check_batch_size(config.eval_batch_size, "eval_batch_size")
    DataParallel.check_bn_group_size(config.bn_group_size, config.parallel)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    model = build_model(config)
    run = {"model_config": model_config(model), "config": config.to_json()}
    image_shape = (config.dataset.image_size, config.dataset.image_size, config.dataset.channels)
    freeze = optim.freeze_patterns(config)
    if freeze:  # a pattern that names nothing fails before the workdir is made (shapes only: no compile)
        abstract = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, *image_shape)))
        optim.parameter_labels(abstract["params"], freeze, (), 1.0)
    train_source = make_source(config.dataset, config.dataset.train_split)
    eval_source = make_source(config.dataset, config.dataset.eval_split)
    check_source(train_source, config.dataset, config.dataset.train_split)
    check_source(eval_source, config.dataset, config.dataset.eval_split)

    created_workdir = not os.path.exists(workdir)
    # One run per workdir: a second one stops here, before it touches anything (process 0 holds it).
    with holding_workdir(workdir):
        checkpoints = Checkpoints(workdir, config.keep_checkpoints)
        with _removed_on_failure(workdir if created_workdir else None, checkpoints):
            job = TrainingJob(config, workdir, model, run, checkpoints, train_source, eval_source,
                              saved_meta=checkpoints.meta())
            if job.saved_meta is not None:
                check_architecture(job.saved_meta, run["model_config"], workdir)
                check_recipe(job.saved_meta, config, workdir)
            return _train(job)


@dataclasses.dataclass
class TrainingJob:
    """What the loop works from, all checked before anything compiles."""

    config: ml_collections.ConfigDict
    workdir: str  # absolute
    model: nn.Module
    run: dict  # the base of every checkpoint's 'meta': model_config, config JSON (+ new_params)
    checkpoints: Checkpoints
    train_source: Any
    eval_source: Any
    saved_meta: dict | None  # the 'meta' of the checkpoint resumed from; None for a fresh run


def check_recipe(saved_meta: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuse to resume a checkpoint written under another recipe (config_lib.recipe_changes: every
    field outside config_lib.FREE_FIELDS), unless config.allow_config_change (then log the changes)."""
    changes = config_lib.recipe_changes(saved_meta["config"], config)
    if not changes:
        return
    if config.allow_config_change:
        logging.warning("Resuming %s with a changed recipe (config.allow_config_change): %s", workdir, "; ".join(changes))
        return
    raise InvalidInput(f"The workdir {workdir} holds a run trained with another recipe ({'; '.join(changes)}). "
                       "Resume with the config that wrote it, use a new --workdir, or pass "
                       "--config.allow_config_change=True to continue under the new values.")


@contextlib.contextmanager
def _removed_on_failure(created_workdir: str | None, checkpoints: Checkpoints):
    """A workdir this run created is removed again when anything ends the run before its first
    checkpoint (a user mistake, a diverged loss, an interrupt): a failed command leaves no folder
    behind, not even a TensorBoard file."""
    try:
        yield
    except BaseException:
        if created_workdir is not None and checkpoints.latest_step() is None:
            with contextlib.suppress(Exception):  # the error that ended the run is the one to report
                checkpoints.close()
            shutil.rmtree(created_workdir, ignore_errors=True)
        raise


def _train(job: TrainingJob) -> dict:
    """The loop of `train_and_evaluate`, from a checked config, workdir and data."""
    config, workdir, model, run, checkpoints = job.config, job.workdir, job.model, job.run, job.checkpoints
    saved_meta, train_source, eval_source = job.saved_meta, job.train_source, job.eval_source
    image_shape = (config.dataset.image_size, config.dataset.image_size, config.dataset.channels)
    freeze = optim.freeze_patterns(config)
    steps_per_epoch = len(train_source) // config.batch_size
    if steps_per_epoch == 0:
        raise InvalidInput(f"config.batch_size = {config.batch_size} exceeds the {len(train_source)} training examples.")
    total_steps = config.num_train_steps if config.num_train_steps > 0 else int(math.ceil(config.num_epochs * steps_per_epoch))
    eval_every = config.eval_every_steps or steps_per_epoch
    checkpoint_every = config.checkpoint_every_steps or steps_per_epoch
    schedule = optim.learning_rate_schedule(config, steps_per_epoch, total_steps)
    dynamic_loss_scale = config.precision == "float16"

    # The state: fresh, resumed from the workdir, or fine-tuned from pretrained weights (what they lack,
    # e.g. the attention of a plain ResNet, is fresh: 'new', recorded in the checkpoints for resuming).
    # Built once, from the variables, after the optimizer knows which parameters are frozen or new.
    variables = jax.device_get(step_lib.init_variables(model, jax.random.key(config.seed), image_shape))
    new_params, report = saved_meta.get("new_params", []) if saved_meta is not None else [], None
    if saved_meta is None and config.init_from:
        variables, report = init_from(config.init_from, model, initial=variables)
        new_params = [path for path in report.new if path.startswith("params/")]
    run["new_params"] = new_params
    labels = optim.parameter_labels(variables["params"], freeze, new_params, config.new_lr_factor)
    tx = optim.make_optimizer(config, schedule, labels)
    state = jax.device_get(jax.jit(lambda v: step_lib.state_from_variables(v, tx, dynamic_loss_scale))(variables))
    data_state, best = None, Best()
    if saved_meta is not None:
        state, data_state, saved_meta = checkpoints.restore(state)
        best = Best(saved_meta["best_accuracy"], saved_meta["best_step"])
    start_step = int(state.step)
    checkpoints.discard_best_after(start_step)

    stream = iter(train_dataset(train_source, config.dataset, global_batch=config.batch_size, seed=config.seed,
                                process_index=jax.process_index(), process_count=jax.process_count()))
    if data_state is not None:
        stream.set_state(data_state)
    parallel = DataParallel(config.parallel, model, tx, num_classes=config.dataset.num_classes,
                            label_smoothing=config.label_smoothing, mean=config.dataset.mean, std=config.dataset.std,
                            dynamic_loss_scale=dynamic_loss_scale, bn_group_size=config.bn_group_size,
                            frozen_statistics=optim.frozen_statistics(state.batch_stats, freeze))
    placed = parallel.place_state(state)
    batches = parallel.prefetch(stream)  # its get_state() is the stream's after the last batch trained on
    log = MetricLog(workdir, config.tensorboard, progress_bar=config.progress_bar, total_steps=total_steps,
                    start_step=start_step)
    if report is not None:  # what the pretrained weights provided, in metrics.jsonl and on the terminal
        log.write(start_step, "init_from", {"source": config.init_from, "summary": report.summary(),
                                            "new": list(report.new), "dropped": list(report.dropped)})
        if jax.process_index() == 0:
            print(f"init_from {config.init_from}: {report.summary()}", file=sys.stderr)
    window = MetricWindow(parallel.metrics_to_host, schedule, loss_scaled=dynamic_loss_scale)
    status, step, final_eval, compile_seconds = "finished", start_step, None, 0.0
    try:
        with Preemption() as preemption:
            for step in range(start_step + 1, total_steps + 1):
                placed, metrics = parallel.train_step(placed, next(batches))
                if step == start_step + 1:  # the first step compiles: keep it out of the throughput
                    compile_seconds = window.exclude_first_step(metrics)
                else:
                    window.add(metrics, images=config.batch_size)
                log.advance()
                if step % config.log_every_steps == 0:
                    _log_train_window(step, window, log, checkpoints)
                if step % eval_every == 0 or step == total_steps:
                    _log_train_window(step, window, log, checkpoints)
                    with window.paused():  # evaluation is not training time
                        final_eval = evaluate_split(parallel, _model_variables(placed), eval_source, config.dataset,
                                                    config.eval_batch_size)
                        log.write(step, "eval", {"loss": final_eval["loss"], "accuracy": final_eval["accuracy"],
                                                 "examples": final_eval["count"], "epoch": step / steps_per_epoch})
                        if final_eval["accuracy"] > best.accuracy:
                            best = Best(final_eval["accuracy"], step)
                            checkpoints.save(step, parallel.to_host(placed), batches.get_state(),
                                             _checkpoint_meta(run, step, steps_per_epoch, best), best=True)
                preempted = preemption.should_stop(step)
                stop = preempted or step == config.stop_at_step
                if step % checkpoint_every == 0 or step == total_steps or stop:
                    _log_train_window(step, window, log, checkpoints)
                    checkpoints.save(step, parallel.to_host(placed), batches.get_state(),
                                     _checkpoint_meta(run, step, steps_per_epoch, best))
                if stop:
                    status = "preempted" if preempted else "stopped"
                    break
            _log_train_window(step, window, log, checkpoints)
            if final_eval is None and status == "finished":  # resumed a run that had already finished
                final_eval = evaluate_split(parallel, _model_variables(placed), eval_source, config.dataset,
                                            config.eval_batch_size)
    finally:
        try:
            checkpoints.close()  # raises SaveFailed if a save failed: the log is closed all the same
        finally:
            log.close()
    summary = {"status": status, "step": step, "total_steps": total_steps,
               "final_accuracy": final_eval["accuracy"] if final_eval else None,
               "best_accuracy": best.accuracy if best.step is not None else None, "best_step": best.step,
               "train_seconds": round(window.train_seconds, 2), "first_step_seconds": round(compile_seconds, 2),
               "images_per_second": (round(window.train_images / window.train_seconds, 1)
                                     if window.train_seconds > 0 else None),
               "workdir": workdir}
    if jax.process_index() == 0:
        log.write(step, "summary", {k: v for k, v in summary.items() if k != "workdir"})
        if status == "finished":  # the best model, ready for `cbam-jax predict` / `attention`
            summary["pretrained"] = str(export_pretrained(workdir, model, config.dataset, eval_source))
    return summary


def format_summary(summary: dict) -> str:
    """The human-readable last lines of a run."""
    if summary["status"] != "finished":
        return (f"Stopped at step {summary['step']}/{summary['total_steps']} ({summary['status']}); a checkpoint is saved "
                f"in {summary['workdir']}: run the same command again to resume.")
    accuracy = summary["final_accuracy"]
    best = summary["best_accuracy"]
    return (f"Final test accuracy: {accuracy:.2%} (best {best:.2%} at step {summary['best_step']}); "
            f"training time {summary['train_seconds']:.1f} s after a {summary['first_step_seconds']:.1f} s first "
            f"(compiling) step, {summary['images_per_second']} images/s; "
            f"workdir {summary['workdir']}\n" + json.dumps(summary))
