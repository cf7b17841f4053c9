"""Detection training: `train_and_evaluate(config, workdir)` for recipes with task='detection'
(train.py dispatches here). It reuses the classification machinery: the TrainState and float16
loss scaling (cbam_jax/training/step.py), the parallel modes (`DataParallel` of parallel.py: 'jit'
over a Mesh, or 'pmap'), the optimiser, schedule, freezing and init_from groups (optim.py), orbax
checkpoints with exact resume (checkpoint.py), SIGTERM handling (trainer.Preemption) and the
JSONL/TensorBoard log (metrics_log.py).

Under 'jit' the batch is sharded over the devices and the state replicated, so BatchNorm statistics
and the loss are global; under 'pmap' each device runs the step on its share, BatchNorm statistics
and gradients are averaged over the devices and the loss normalisers (positives, centerness sum)
are the devices' mean, so the step equals the global one. At the end (and every `eval_every_steps`)
the eval split is evaluated COCO-style (evaluate.py); the figures go to metrics.jsonl, and a
finished run exports the detector to workdir/detector for `cbam-jax detect` and `cbam-jax export`.
"""

import functools
import json
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cbam_jax.detection import config as config_lib
from cbam_jax.detection import data
from cbam_jax.detection.assign import assign_batch
from cbam_jax.detection.detector import FCOS, detector_config, with_bn_axis
from cbam_jax.detection.evaluate import (build_detector, class_names, decoding_options, evaluate, example_options,
                                         make_source, predict, predict_function)
from cbam_jax.detection.losses import fcos_loss
from cbam_jax.detection.weights import EXPORT_DIR, save_detector
from cbam_jax.errors import InvalidInput, UserError
from cbam_jax.factory import init_from
from cbam_jax.images import normalize
from cbam_jax.training import optim
from cbam_jax.training import step as step_lib
from cbam_jax.training.checkpoint import Checkpoints, check_architecture, holding_workdir
from cbam_jax.training.config import recipe_changes
from cbam_jax.training.metrics_log import MetricLog
from cbam_jax.training.parallel import DataParallel, DevicePrefetch
from cbam_jax.training.trainer import Preemption

__all__ = ["build_detector", "class_names", "decoding_options", "evaluate", "example_options", "make_source",
           "predict", "train_and_evaluate", "train_step", "format_summary"]
BATCH_KEYS = ("image", "boxes", "labels", "mask")  # what the step reads of data.TrainBatches' batches


def train_step(state: step_lib.TrainState, batch: dict, *, model: FCOS, tx, config_values: tuple,
               dynamic_loss_scale: bool = False, axis_name: str | tuple[str, ...] | None = None,
               frozen_statistics: frozenset[str] = frozenset()) -> tuple[step_lib.TrainState, dict]:
    """One optimiser step on `batch` (data.TrainBatches' layout: uint8 images (B, S, S, 3), boxes
    (B, M, 4), labels (B, M), mask (B, M)); returns (state, the batch's mean losses, positives and the
    loss scale). `axis_name`: per-device step under pmap (gradients, statistics and metrics averaged)."""
    mean, std, image_size, center_radius, alpha, gamma = config_values
    images = normalize(batch["image"], mean, std)
    xy, strides, ranges = model.points((image_size, image_size))
    targets = assign_batch(xy, strides, ranges, batch["boxes"], batch["labels"], batch["mask"], center_radius)

    def loss_fn(params):
        outputs, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                       mutable=["batch_stats"])
        total, parts = fcos_loss(*outputs, targets, xy, strides, model.num_classes, alpha, gamma, axis_name=axis_name)
        return total * state.loss_scale, (total, parts, updates["batch_stats"])

    grads, (loss, parts, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": loss, **parts}
    if axis_name is not None:
        grads, batch_stats, metrics = jax.lax.pmean((grads, batch_stats, metrics), axis_name)
    if frozen_statistics:
        batch_stats = step_lib.keep_leaves(batch_stats, state.batch_stats, frozen_statistics)
    grads = jax.tree.map(lambda g: g / state.loss_scale, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    if dynamic_loss_scale:
        new_state = step_lib.keep_finite_update(state, new_state, grads)
    metrics["loss_scale"] = state.loss_scale
    return new_state, metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) a detector in `workdir`; returns the summary (status, step, final COCO figures,
    best mAP and its step, seconds, images/s, workdir, pretrained = the exported detector)."""
    config = config_lib.validate(config)
    DataParallel.check_batch_size(config.batch_size)
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
    workdir = os.path.abspath(os.path.expanduser(workdir))
    detector = build_detector(config)
    run = {"model_config": detector_config(detector), "config": config.to_json(), "task": "detection"}
    image_shape = (config.dataset.image_size, config.dataset.image_size, 3)
    freeze = optim.freeze_patterns(config)
    if freeze:  # a pattern naming nothing fails before the workdir is made
        abstract = jax.eval_shape(detector.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
        optim.parameter_labels(abstract["params"], freeze, (), 1.0)
    train_source, eval_source = make_source(config, train=True), make_source(config, train=False)
    if len(eval_source) == 0:
        raise InvalidInput("The eval split has no examples; give dataset.num_eval_images > 0 or another eval_split.")
    created = not os.path.exists(workdir)
    # One run per workdir, as classification's: a second one stops here, before it touches anything.
    with holding_workdir(workdir):
        checkpoints = Checkpoints(workdir, config.keep_checkpoints)
        try:
            saved_meta = checkpoints.meta()
            if saved_meta is not None:
                check_architecture(saved_meta, run["model_config"], workdir)
                changes = recipe_changes(saved_meta["config"], config)  # logging/stopping fields may change
                if changes:
                    raise InvalidInput(f"The workdir {workdir} holds a detection run trained with another recipe "
                                       f"({'; '.join(changes)}); resume with the config that wrote it or use a new "
                                       "--workdir.")
            return _train(config, workdir, detector, run, checkpoints, saved_meta, train_source, eval_source)
        except UserError:
            if created and checkpoints.latest_step() is None:
                checkpoints.close()
                shutil.rmtree(workdir, ignore_errors=True)
            raise


def _train(config, workdir, detector, run, checkpoints, saved_meta, train_source, eval_source) -> dict:
    image_size = config.dataset.image_size
    stream = data.TrainBatches(train_source, config.batch_size, seed=config.seed, flip_probability=0.5 * config.dataset.flip,
                               scale_range=(config.dataset.scale_min, config.dataset.scale_max), **example_options(config))
    steps_per_epoch = stream.per_epoch
    total_steps = config.num_train_steps if config.num_train_steps > 0 else int(math.ceil(config.num_epochs * steps_per_epoch))
    checkpoint_every = config.checkpoint_every_steps or steps_per_epoch
    schedule = optim.learning_rate_schedule(config, steps_per_epoch, total_steps)
    freeze = optim.freeze_patterns(config)
    dynamic_loss_scale = config.precision == "float16"

    # As classification's trainer: the variables, the backbone from init_from (its FPN and head are
    # new), then the optimiser that knows which parameters are frozen or new, then the state.
    variables = jax.device_get(step_lib.init_variables(detector, jax.random.key(config.seed), (image_size, image_size, 3)))
    new_params, report = saved_meta.get("new_params", []) if saved_meta is not None else [], None
    if saved_meta is None and config.init_from:
        backbone, report = init_from(config.init_from, detector.backbone, initial={
            "params": variables["params"]["backbone"], "batch_stats": variables["batch_stats"]["backbone"]})
        new_params = [path.replace("params/", "params/backbone/", 1) for path in report.new if path.startswith("params/")]
        variables = {"params": {**variables["params"], "backbone": backbone["params"]},
                     "batch_stats": {**variables["batch_stats"], "backbone": backbone["batch_stats"]}}
    run["new_params"] = new_params
    labels = optim.parameter_labels(variables["params"], freeze, new_params, config.new_lr_factor)
    tx = optim.make_optimizer(config, schedule, labels)
    state = jax.device_get(jax.jit(lambda v: step_lib.state_from_variables(v, tx, dynamic_loss_scale))(variables))
    best = {"mAP": -1.0, "step": None}
    if saved_meta is not None:
        state, data_state, saved_meta = checkpoints.restore(state)
        stream.set_state(data_state)
        best = {"mAP": saved_meta["best_mAP"], "step": saved_meta["best_step"]}
    start_step = int(state.step)
    checkpoints.discard_best_after(start_step)

    values = (tuple(config.dataset.mean), tuple(config.dataset.std), image_size, config.detection.center_radius,
              config.detection.focal_alpha, config.detection.focal_gamma)
    step = functools.partial(train_step, tx=tx, config_values=values, dynamic_loss_scale=dynamic_loss_scale,
                             frozen_statistics=optim.frozen_statistics(state.batch_stats, freeze))
    # Evaluation decodes on one device from the host copy of the variables (predict_fn), in any mode.
    parallel = DataParallel(config.parallel, detector, tx, steps=(step, None), with_bn_axis=with_bn_axis)
    predict_fn = predict_function(detector, config)
    placed = parallel.place_state(state)
    # Batches placed one step ahead; its get_state() is the stream's after the last batch trained on.
    batches = DevicePrefetch(stream, lambda batch: parallel.place_batch({k: batch[k] for k in BATCH_KEYS}))
    log = MetricLog(workdir, config.tensorboard, progress_bar=False)
    if report is not None:
        log.write(start_step, "init_from", {"source": config.init_from, "summary": report.summary()})
    window, window_images, train_seconds, train_images, first_seconds = [], 0, 0.0, 0, 0.0
    window_start = time.perf_counter()
    final_eval, status, step = None, "finished", start_step

    def meta(step: int) -> dict:
        return {**run, "step": step, "epoch": step / steps_per_epoch, "best_mAP": best["mAP"], "best_step": best["step"]}

    def host_state():
        return parallel.to_host(placed)

    def flush(step: int) -> None:
        nonlocal window, window_images, window_start, train_seconds, train_images
        if not window:
            return
        host = [parallel.metrics_to_host(metrics) for metrics in window]
        record = {key: float(np.mean([m[key] for m in host])) for key in host[0] if key != "loss_scale"}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"The detection loss became {record['loss']} by step {step}; lower "
                                     "config.learning_rate or set config.grad_clip_norm.")
        elapsed = time.perf_counter() - window_start
        train_seconds += elapsed
        train_images += window_images
        record["learning_rate"] = float(schedule(step - 1))
        record["images_per_second"] = window_images / max(elapsed, 1e-9)
        if dynamic_loss_scale:
            record["loss_scale"] = host[-1]["loss_scale"]  # the scale of the last step
        log.write(step, "train", record)
        window, window_images, window_start = [], 0, time.perf_counter()

    def run_eval(step: int) -> dict:
        nonlocal window_start
        started = time.perf_counter()
        host = host_state()
        figures = evaluate(predict_fn, {"params": host.params, "batch_stats": host.batch_stats}, eval_source, config)
        log.write(step, "eval", {**figures, "examples": len(eval_source), "epoch": step / steps_per_epoch})
        window_start += time.perf_counter() - started  # evaluation is not training time
        return figures

    try:
        with Preemption() as preemption:
            for step in range(start_step + 1, total_steps + 1):
                placed, metrics = parallel.train_step(placed, next(batches))
                if step == start_step + 1:
                    jax.block_until_ready(metrics)
                    first_seconds = time.perf_counter() - window_start
                    window_start = time.perf_counter()
                    window.append(metrics)
                else:
                    window.append(metrics)
                    window_images += config.batch_size
                if step % config.log_every_steps == 0:
                    flush(step)
                if (config.eval_every_steps and step % config.eval_every_steps == 0) or step == total_steps:
                    flush(step)
                    final_eval = run_eval(step)
                    if final_eval["mAP"] > best["mAP"]:
                        best = {"mAP": final_eval["mAP"], "step": step}
                        checkpoints.save(step, host_state(), batches.get_state(), meta(step), best=True)
                preempted = preemption.should_stop(step)
                stop = preempted or step == config.stop_at_step
                if step % checkpoint_every == 0 or step == total_steps or stop:
                    flush(step)
                    checkpoints.save(step, host_state(), batches.get_state(), meta(step))
                if stop:
                    status = "preempted" if preempted else "stopped"
                    break
            flush(step)
            if final_eval is None and status == "finished":  # resumed a finished run
                final_eval = run_eval(step)
    finally:
        checkpoints.close()
        log.close()
    summary = {"status": status, "step": step, "total_steps": total_steps, "final": final_eval,
               "best_mAP": best["mAP"] if best["step"] is not None else None, "best_step": best["step"],
               "train_seconds": round(train_seconds, 2), "first_step_seconds": round(first_seconds, 2),
               "images_per_second": round(train_images / train_seconds, 1) if train_seconds > 0 else None,
               "workdir": workdir}
    log = MetricLog(workdir, False)
    log.write(step, "summary", {k: v for k, v in summary.items() if k != "workdir"})
    if status == "finished" and jax.process_index() == 0:
        host = host_state()
        metadata = {"class_names": class_names(config), "decoding": decoding_options(config),
                    "preprocessing": {"image_size": image_size, "mean": list(config.dataset.mean),
                                      "std": list(config.dataset.std)},
                    "source": f"detection run {workdir}, step {step}"}
        summary["pretrained"] = str(save_detector(os.path.join(workdir, EXPORT_DIR), detector,
                                                  {"params": host.params, "batch_stats": host.batch_stats}, metadata,
                                                  overwrite=True))
    return summary


def format_summary(summary: dict) -> str:
    """The last lines of a detection run."""
    if summary["status"] != "finished":
        return (f"Stopped at step {summary['step']}/{summary['total_steps']} ({summary['status']}); a checkpoint is saved in "
                f"{summary['workdir']}: run the same command again to resume.")
    final = summary["final"]
    return (f"Final COCO mAP@[.5:.95] {final['mAP']:.3f}, mAP@.5 {final['mAP50']:.3f}; training time "
            f"{summary['train_seconds']:.1f} s after a {summary['first_step_seconds']:.1f} s first (compiling) step; "
            f"detector in {summary.get('pretrained')}\n" + json.dumps(summary))
