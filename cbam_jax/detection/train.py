"""Detection training: `train_and_evaluate(config, workdir)` for recipes with task='detection'
(train.py dispatches here). It reuses the classification machinery: the TrainState
(cbam_jax/training/step.py), the optimiser, schedule, freezing and init_from groups (optim.py),
orbax checkpoints with exact resume (checkpoint.py) and the JSONL/TensorBoard log (metrics_log.py).

One jit-compiled step; with several devices the batch is sharded over them (a 1-D Mesh) and the
state replicated, so BatchNorm statistics and the loss are global. At the end (and every
`eval_every_steps`) the eval split is evaluated COCO-style (coco_eval.py); the figures go to
metrics.jsonl, and a finished run exports the detector to workdir/detector for `cbam-jax detect`.
"""

import functools
import json
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cbam_jax.data.sources import tfds_source
from cbam_jax.detection import config as config_lib
from cbam_jax.detection import data
from cbam_jax.detection.assign import assign_batch
from cbam_jax.detection.coco_eval import coco_evaluate
from cbam_jax.detection.decode import Detections, detect
from cbam_jax.detection.detector import FCOS, create_detector, detector_config
from cbam_jax.detection.losses import fcos_loss
from cbam_jax.detection.weights import EXPORT_DIR, save_detector
from cbam_jax.errors import InvalidInput, UserError
from cbam_jax.registry import split_name
from cbam_jax.factory import init_from
from cbam_jax.images import normalize
from cbam_jax.training import optim
from cbam_jax.training import step as step_lib
from cbam_jax.training.checkpoint import Checkpoints, check_architecture
from cbam_jax.training.config import recipe_changes
from cbam_jax.training.metrics_log import MetricLog


def build_detector(config: ml_collections.ConfigDict) -> FCOS:
    """The FCOS detector of a detection config."""
    options = {} if split_name(config.model.name)[0] is None else {"reduction": config.model.reduction}
    options.update(config.model.attention_options.to_dict())
    d = config.detection
    return create_detector(config.model.name, config.dataset.num_classes, variant=config.model.variant,
                           width=config.model.width, dtype=jnp.dtype(config.precision), backbone_options=options,
                           fpn_channels=d.fpn_channels, head_convs=d.head_convs, head_norm_groups=d.head_norm_groups,
                           train_backbone_bn=d.train_backbone_bn, size_boundaries=tuple(d.size_boundaries))


def make_source(config: ml_collections.ConfigDict, train: bool):
    """The train or eval examples of the config's dataset."""
    dataset = config.dataset
    if dataset.source == "shapes":
        return data.ShapesDataset(dataset.num_train_images if train else dataset.num_eval_images, dataset.image_size,
                                  seed=config.seed if train else 0, split="train" if train else "test",
                                  min_size=dataset.min_object_size, max_size=dataset.max_object_size)
    split = dataset.train_split if train else dataset.eval_split
    return data.TfdsDetectionSource(tfds_source(dataset.name, split, dataset.data_dir))


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    if config.dataset.source == "shapes":
        return list(data.SHAPE_CLASSES)
    return [str(i) for i in range(config.dataset.num_classes)]


def example_options(config: ml_collections.ConfigDict) -> dict:
    return dict(num_classes=config.dataset.num_classes, max_boxes=config.detection.max_boxes,
                size=config.dataset.image_size)


def train_step(state: step_lib.TrainState, batch: dict, *, detector: FCOS, tx, config_values: tuple,
               frozen_statistics: frozenset[str] = frozenset()) -> tuple[step_lib.TrainState, dict]:
    """One optimiser step on `batch` (data.TrainBatches' layout); returns (state, metrics of the batch)."""
    mean, std, image_size, center_radius, alpha, gamma = config_values
    images = normalize(batch["image"], mean, std)
    xy, strides, ranges = detector.points((image_size, image_size))
    targets = assign_batch(xy, strides, ranges, batch["boxes"], batch["labels"], batch["mask"], center_radius)

    def loss_fn(params):
        outputs, updates = detector.apply({"params": params, "batch_stats": state.batch_stats}, images, train=True,
                                          mutable=["batch_stats"])
        total, parts = fcos_loss(*outputs, targets, xy, strides, detector.num_classes, alpha, gamma)
        return total, (parts, updates["batch_stats"])

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if frozen_statistics:
        batch_stats = step_lib.keep_leaves(batch_stats, state.batch_stats, frozen_statistics)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss": loss, **parts}


def predict(variables: dict, images: jax.Array, *, detector: FCOS, mean: tuple, std: tuple,
            decoding: dict) -> Detections:
    """Detections for uint8 images (B, S, S, 3) in input pixels."""
    outputs = detector.apply(variables, normalize(images, mean, std), train=False)
    size = images.shape[1:3]
    return detect(*outputs, *detector.points(size)[:2], size, **decoding)


def decoding_options(config: ml_collections.ConfigDict) -> dict:
    d = config.detection
    return dict(score_threshold=d.score_threshold, pre_nms_top_k=d.pre_nms_top_k, iou_threshold=d.iou_threshold,
                max_detections=d.max_detections)


def evaluate(predict_fn, variables: dict, source, config: ml_collections.ConfigDict) -> dict[str, float]:
    """COCO figures of the detector on `source`, in the images' original pixels."""
    ground_truth, detections = [], []
    options = example_options(config)
    for batch in data.eval_batches(source, config.eval_batch_size, **options):
        out = jax.device_get(predict_fn(variables, batch["image"]))
        for row in np.flatnonzero(batch["valid"]):
            original = data.check_example(source[int(batch["index"][row])], options["num_classes"],
                                          options["max_boxes"], f"eval example {int(batch['index'][row])}")
            ground_truth.append((original["boxes"], original["labels"]))
            keep = out.valid[row]
            detections.append((out.boxes[row][keep] / batch["scale"][row], out.scores[row][keep], out.classes[row][keep]))
    return coco_evaluate(ground_truth, detections, config.dataset.num_classes)


def _mesh_shardings(batch_size: int) -> tuple[Any, Any, Any]:
    """(mesh, replicated, batch-sharded) placements over all devices."""
    devices = jax.devices()
    if batch_size % len(devices):
        raise InvalidInput(f"config.batch_size = {batch_size} must be divisible by the {len(devices)} devices.")
    mesh = Mesh(np.asarray(devices), ("data",))
    return mesh, NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) a detector in `workdir`; returns the summary (status, step, final COCO figures,
    best mAP and its step, seconds, images/s, workdir, pretrained = the exported detector)."""
    config = config_lib.validate(config)
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
    checkpoints = Checkpoints(workdir, config.keep_checkpoints)
    try:
        saved_meta = checkpoints.meta()
        if saved_meta is not None:
            check_architecture(saved_meta, run["model_config"], workdir)
            changes = recipe_changes(saved_meta["config"], config)  # logging/stopping fields may change
            if changes:
                raise InvalidInput(f"The workdir {workdir} holds a detection run trained with another recipe "
                                   f"({'; '.join(changes)}); resume with the config that wrote it or use a new --workdir.")
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
    tx = optim.make_optimizer(config, schedule)
    state = jax.device_get(step_lib.create_state(detector, tx, jax.random.key(config.seed), (image_size, image_size, 3),
                                                 False))
    new_params, report = saved_meta.get("new_params", []) if saved_meta is not None else [], None
    if saved_meta is None and config.init_from:

        backbone, report = init_from(config.init_from, detector.backbone, initial={
            "params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]})
        new_params = [path.replace("params/", "params/backbone/", 1) for path in report.new if path.startswith("params/")]
        state = state.replace(params={**state.params, "backbone": backbone["params"]},
                              batch_stats={**state.batch_stats, "backbone": backbone["batch_stats"]})
    run["new_params"] = new_params
    labels = optim.parameter_labels(state.params, freeze, new_params, config.new_lr_factor)
    if labels is not None or config.init_from:
        tx = optim.make_optimizer(config, schedule, labels)
        state = jax.device_get(step_lib.state_from_variables({"params": state.params, "batch_stats": state.batch_stats},
                                                             tx, False))
    best = {"mAP": -1.0, "step": None}
    if saved_meta is not None:
        state, data_state, saved_meta = checkpoints.restore(state)
        stream.set_state(data_state)
        best = {"mAP": saved_meta["best_mAP"], "step": saved_meta["best_step"]}
    start_step = int(state.step)
    checkpoints.discard_best_after(start_step)

    mesh, replicated, sharded = _mesh_shardings(config.batch_size)
    values = (tuple(config.dataset.mean), tuple(config.dataset.std), image_size, config.detection.center_radius,
              config.detection.focal_alpha, config.detection.focal_gamma)
    step_fn = jax.jit(functools.partial(train_step, detector=detector, tx=tx, config_values=values,
                                        frozen_statistics=optim.frozen_statistics(state.batch_stats, freeze)),
                      in_shardings=(replicated, sharded), out_shardings=(replicated, replicated), donate_argnums=0)
    predict_fn = jax.jit(functools.partial(predict, detector=detector, mean=tuple(config.dataset.mean),
                                           std=tuple(config.dataset.std), decoding=decoding_options(config)))
    placed = jax.device_put(state, replicated)
    log = MetricLog(workdir, config.tensorboard, progress_bar=False)
    if report is not None:
        log.write(start_step, "init_from", {"source": config.init_from, "summary": report.summary()})
    window, window_images, train_seconds, train_images, first_seconds = [], 0, 0.0, 0, 0.0
    window_start = time.perf_counter()
    final_eval, status, step = None, "finished", start_step

    def meta(step: int) -> dict:
        return {**run, "step": step, "epoch": step / steps_per_epoch, "best_mAP": best["mAP"], "best_step": best["step"]}

    def flush(step: int) -> None:
        nonlocal window, window_images, window_start, train_seconds, train_images
        if not window:
            return
        host = jax.device_get(window)
        record = {key: float(np.mean([m[key] for m in host])) for key in host[0]}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"The detection loss became {record['loss']} by step {step}; lower "
                                     "config.learning_rate or set config.grad_clip_norm.")
        elapsed = time.perf_counter() - window_start
        train_seconds += elapsed
        train_images += window_images
        record["learning_rate"] = float(schedule(step - 1))
        record["images_per_second"] = window_images / max(elapsed, 1e-9)
        log.write(step, "train", record)
        window, window_images, window_start = [], 0, time.perf_counter()

    def run_eval(step: int) -> dict:
        nonlocal window_start
        started = time.perf_counter()
        figures = evaluate(predict_fn, {"params": placed.params, "batch_stats": placed.batch_stats}, eval_source, config)
        log.write(step, "eval", {**figures, "examples": len(eval_source), "epoch": step / steps_per_epoch})
        window_start += time.perf_counter() - started  # evaluation is not training time
        return figures

    try:
        with jax.set_mesh(mesh):
            for step in range(start_step + 1, total_steps + 1):
                batch = next(stream)
                batch = {k: v for k, v in batch.items() if k in ("image", "boxes", "labels", "mask")}
                placed, metrics = step_fn(placed, batch)
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
                        checkpoints.save(step, jax.device_get(placed), stream.get_state(), meta(step), best=True)
                stop = step == config.stop_at_step
                if step % checkpoint_every == 0 or step == total_steps or stop:
                    flush(step)
                    checkpoints.save(step, jax.device_get(placed), stream.get_state(), meta(step))
                if stop:
                    status = "stopped"
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
        variables = jax.device_get({"params": placed.params, "batch_stats": placed.batch_stats})
        metadata = {"class_names": class_names(config), "decoding": decoding_options(config),
                    "preprocessing": {"image_size": image_size, "mean": list(config.dataset.mean),
                                      "std": list(config.dataset.std)},
                    "source": f"detection run {workdir}, step {step}"}
        summary["pretrained"] = str(save_detector(os.path.join(workdir, EXPORT_DIR), detector, variables, metadata,
                                                  overwrite=True))
    return summary


def format_summary(summary: dict) -> str:
    """The last lines of a detection run."""
    if summary["status"] != "finished":
        return (f"Stopped at step {summary['step']}/{summary['total_steps']}; a checkpoint is saved in "
                f"{summary['workdir']}: run the same command again to resume.")
    final = summary["final"]
    return (f"Final COCO mAP@[.5:.95] {final['mAP']:.3f}, mAP@.5 {final['mAP50']:.3f}; training time "
            f"{summary['train_seconds']:.1f} s after a {summary['first_step_seconds']:.1f} s first (compiling) step; "
            f"detector in {summary.get('pretrained')}\n" + json.dumps(summary))
