"""A detection run's model, data and COCO evaluation, shared by training (cbam_jax/detection/train.py)
and `cbam-jax eval --workdir RUN` on a detection run (`evaluate_checkpoint`, called by
cbam_jax/training/evaluate.py when the checkpoint's meta says task='detection').

This module does not import the training loop, so that the eval command can reach it without an
import cycle (training/evaluate.py <- training/trainer.py <- detection/train.py).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cbam_jax.data.sources import tfds_source
from cbam_jax.detection import config as config_lib
from cbam_jax.detection import data
from cbam_jax.detection.coco_eval import coco_evaluate
from cbam_jax.detection.decode import Detections, detect
from cbam_jax.detection.detector import FCOS, create_detector, detector_from_config
from cbam_jax.errors import InvalidInput
from cbam_jax.images import normalize
from cbam_jax.registry import split_name


def build_detector(config: ml_collections.ConfigDict) -> FCOS:
    """The FCOS detector of a detection config (compute dtype from config.precision, float32 parameters)."""
    options = {} if split_name(config.model.name)[0] is None else {"reduction": config.model.reduction}
    options.update(config.model.attention_options.to_dict())
    d = config.detection
    return create_detector(config.model.name, config.dataset.num_classes, variant=config.model.variant,
                           width=config.model.width, dtype=jnp.dtype(config.precision), backbone_options=options,
                           fpn_channels=d.fpn_channels, head_convs=d.head_convs, head_norm_groups=d.head_norm_groups,
                           train_backbone_bn=d.train_backbone_bn, size_boundaries=tuple(d.size_boundaries))


def make_source(config: ml_collections.ConfigDict, train: bool, split: str | None = None):
    """The train or eval examples of the config's dataset (`split`: another tfds split to evaluate)."""
    dataset = config.dataset
    if dataset.source == "shapes":
        return data.ShapesDataset(dataset.num_train_images if train else dataset.num_eval_images, dataset.image_size,
                                  seed=config.seed if train else 0, split="train" if train else "test",
                                  min_size=dataset.min_object_size, max_size=dataset.max_object_size)
    split = split or (dataset.train_split if train else dataset.eval_split)
    return data.TfdsDetectionSource(tfds_source(dataset.name, split, dataset.data_dir))


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    if config.dataset.source == "shapes":
        return list(data.SHAPE_CLASSES)
    return [str(i) for i in range(config.dataset.num_classes)]


def example_options(config: ml_collections.ConfigDict) -> dict:
    return dict(num_classes=config.dataset.num_classes, max_boxes=config.detection.max_boxes,
                size=config.dataset.image_size)


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


def predict_function(detector: FCOS, config: ml_collections.ConfigDict):
    """`predict` of the config's preprocessing and decoding, jit-compiled: (variables, uint8 images) -> Detections."""
    return jax.jit(functools.partial(predict, detector=detector, mean=tuple(config.dataset.mean),
                                     std=tuple(config.dataset.std), decoding=decoding_options(config)))


def evaluate(predict_fn, variables: dict, source, config: ml_collections.ConfigDict,
             batch_size: int | None = None) -> dict[str, float]:
    """COCO figures of the detector on `source`, in the images' original pixels."""
    ground_truth, detections = [], []
    options = example_options(config)
    for batch in data.eval_batches(source, batch_size or config.eval_batch_size, **options):
        out = jax.device_get(predict_fn(variables, batch["image"]))
        for row in np.flatnonzero(batch["valid"]):
            original = data.check_example(source[int(batch["index"][row])], options["num_classes"],
                                          options["max_boxes"], f"eval example {int(batch['index'][row])}")
            ground_truth.append((original["boxes"], original["labels"]))
            keep = out.valid[row]
            detections.append((out.boxes[row][keep] / batch["scale"][row], out.scores[row][keep], out.classes[row][keep]))
    return coco_evaluate(ground_truth, detections, config.dataset.num_classes)


def evaluate_checkpoint(variables: dict, meta: dict, *, config: ml_collections.ConfigDict | None = None,
                        split: str | None = None, batch_size: int | None = None) -> dict:
    """`cbam-jax eval --workdir RUN` of a detection run: {'split', 'step', 'examples', COCO figures}
    of the checkpoint's detector (`variables`, `meta` from `restore_variables`) on the run's eval
    split, or `split` (tfds sets only), with the run's config or `config`."""
    config = config if config is not None else config_lib.config_from_json(meta["config"])
    detector = detector_from_config(meta["model_config"])
    if detector.num_classes != config.dataset.num_classes:
        raise InvalidInput(f"the detector has {detector.num_classes} classes but the config says "
                           f"dataset.num_classes = {config.dataset.num_classes}; evaluate with the run's own config.")
    if split is not None and config.dataset.source == "shapes" and split != config.dataset.eval_split:
        raise InvalidInput(f"--split {split}: the generated shapes set has one eval split "
                           f"({config.dataset.eval_split!r}); leave out --split.")
    source = make_source(config, train=False, split=split)
    if len(source) == 0:
        raise InvalidInput(f"the split {split or config.dataset.eval_split!r} has no examples.")
    figures = evaluate(predict_function(detector, config), variables, source, config, batch_size)
    return {"split": split or config.dataset.eval_split, "step": meta["step"], "examples": len(source), **figures}
