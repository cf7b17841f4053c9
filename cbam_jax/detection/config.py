"""The detection training configuration: `base_config()` with every field and its default (a tiny
FCOS on the generated shapes set), and `validate`.

The fields shared with classification keep their names and meaning (cbam_jax/training/config.py):
optimizer, schedule, checkpoints, logging, init_from, freeze. `task = 'detection'` is what train.py
dispatches on. Command-line overrides (`--config.FIELD=VALUE`) work for every field of the recipe,
the detection-only ones too (`--config.detection.fpn_channels=64`, `--config.dataset.num_train_images=64`).
"""

import ml_collections

from cbam_jax.registry import VARIANTS, list_models
from cbam_jax.training import config as config_lib
from cbam_jax.training.config import ConfigError

SOURCES = ("shapes", "tfds")
PRECISIONS = config_lib.PRECISIONS  # 'float16' with dynamic loss scaling, as classification


def base_config() -> ml_collections.ConfigDict:
    """All fields with their defaults: a width-8 CBAM-ResNet-18 FCOS on 64 x 64 generated shapes."""
    config = ml_collections.ConfigDict()
    config.task = "detection"
    config.model = ml_collections.ConfigDict(dict(
        name="cbam_resnet18",  # the backbone: any of cbam_jax.list_models() (always the 'imagenet' stem)
        variant="official",
        width=8,
        reduction=4,  # attention MLP reduction (ignored by plain ResNets)
        attention_options=ml_collections.ConfigDict(),
    ))
    config.dataset = ml_collections.ConfigDict(dict(
        source="shapes",  # 'shapes' (generated, offline) or 'tfds' (voc/2007, coco/2017)
        name="",  # tfds name
        data_dir="",  # tfds data_dir (default ~/tensorflow_datasets)
        train_split="train",
        eval_split="test",
        num_classes=3,  # object classes (shapes: rectangle, ellipse, triangle)
        image_size=64,  # side of the square network input; images are fitted into it (longer side)
        num_train_images=512,  # 'shapes' only
        num_eval_images=128,  # 'shapes' only
        min_object_size=10,  # 'shapes' only: object sides in pixels
        max_object_size=32,
        flip=True,  # random horizontal flip in training
        scale_min=1.0,  # random resize in training: a factor in [scale_min, scale_max] of the fit
        scale_max=1.0,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    ))
    config.detection = ml_collections.ConfigDict(dict(
        fpn_channels=32,  # 256 in FCOS
        head_convs=2,  # 4 in FCOS
        head_norm_groups=8,  # 32 in FCOS
        train_backbone_bn=True,  # False: frozen BatchNorm in the backbone (fine-tuning at small batches)
        size_boundaries=(16.0, 32.0, 64.0, 128.0),  # P3..P7 object-size split; FCOS: (64, 128, 256, 512)
        center_radius=1.5,  # center sampling radius in strides (0: the whole box)
        focal_alpha=0.25,
        focal_gamma=2.0,
        max_boxes=16,  # ground-truth boxes per image (padded); more is an error
        score_threshold=0.05,
        pre_nms_top_k=200,  # 1000 in FCOS
        iou_threshold=0.6,
        max_detections=50,  # 100 for COCO
    ))
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_epochs = 12.0
    config.num_train_steps = -1
    config.optimizer = "adamw"
    config.learning_rate = 2e-3
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.decay_norm_and_bias = False
    config.schedule = "cosine"
    config.warmup_epochs = 0.5
    config.lr_step_epochs = 8.0
    config.lr_step_factor = 0.1
    config.grad_clip_norm = 10.0
    config.precision = "float32"  # 'bfloat16' compute (f32 params) or 'float16' with dynamic loss scaling
    config.parallel = "jit"  # 'jit' (Mesh, sharded batch) or 'pmap' (one program per device), as classification
    config.seed = 0
    config.log_every_steps = 20
    config.eval_every_steps = 0  # 0: at the end only (COCO evaluation is slow)
    config.checkpoint_every_steps = 0  # 0: once per epoch
    config.keep_checkpoints = 2
    config.stop_at_step = 0
    config.init_from = ""  # backbone weights: a registry name, 'hf-hub:...', a directory or a PyTorch file
    config.freeze = ""  # module patterns, e.g. 'backbone/conv1,backbone/bn1,backbone/layer1_*'
    config.new_lr_factor = 1.0
    config.tensorboard = True
    config.compilation_cache_dir = "~/.cache/cbam_jax/xla"
    return config


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check every field against `base_config()`; returns the config, locked. ConfigError (one line) otherwise."""
    config_lib.check_fields(config, base_config(), "config")
    if config.task != "detection":
        raise ConfigError(f"config.task = {config.task!r}; detection recipes have task='detection'.")
    if config.model.name not in list_models():
        raise ConfigError(f"config.model.name = {config.model.name!r} is not a model; choose from {list_models()}.")
    choices = {"model.variant": (config.model.variant, tuple(VARIANTS)), "dataset.source": (config.dataset.source, SOURCES),
               "optimizer": (config.optimizer, config_lib.OPTIMIZERS), "schedule": (config.schedule, config_lib.SCHEDULES),
               "precision": (config.precision, PRECISIONS), "parallel": (config.parallel, config_lib.PARALLEL_MODES)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config.{name} = {value!r} is not one of {list(allowed)}.")
    if config.dataset.source == "tfds" and not config.dataset.name:
        raise ConfigError("config.dataset.name must name the tfds dataset ('voc/2007' or 'coco/2017') when source='tfds'.")
    positive = ("batch_size", "eval_batch_size", "dataset.num_classes", "dataset.image_size", "dataset.num_train_images",
                "dataset.num_eval_images", "dataset.scale_min", "model.width", "learning_rate", "log_every_steps",
                "keep_checkpoints", "detection.fpn_channels", "detection.head_norm_groups", "detection.max_boxes",
                "detection.pre_nms_top_k", "detection.max_detections")
    for name in positive:
        value = config[name] if "." not in name else config[name.split(".")[0]][name.split(".")[1]]
        if value <= 0:
            raise ConfigError(f"config.{name} must be > 0; got {value}.")
    if config.dataset.scale_max < config.dataset.scale_min:
        raise ConfigError(f"config.dataset.scale_max ({config.dataset.scale_max}) must be >= scale_min "
                          f"({config.dataset.scale_min}).")
    if config.detection.max_detections > config.detection.pre_nms_top_k:
        raise ConfigError("config.detection.max_detections must be <= config.detection.pre_nms_top_k.")
    if config.detection.fpn_channels % config.detection.head_norm_groups:
        raise ConfigError(f"config.detection.head_norm_groups = {config.detection.head_norm_groups} must divide "
                          f"config.detection.fpn_channels = {config.detection.fpn_channels}.")
    if len(config.detection.size_boundaries) != 4:
        raise ConfigError("config.detection.size_boundaries needs 4 increasing sizes (between P3..P7).")
    if not 0 <= config.detection.iou_threshold <= 1 or not 0 <= config.detection.score_threshold < 1:
        raise ConfigError("config.detection.iou_threshold must be in [0, 1] and score_threshold in [0, 1).")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError("Set config.num_epochs > 0 or config.num_train_steps > 0.")
    if len(config.dataset.mean) != 3 or len(config.dataset.std) != 3 or min(config.dataset.std) <= 0:
        raise ConfigError("config.dataset.mean and std need 3 values (RGB), std > 0.")
    config_lib.check_transfer(config)
    config.lock()
    return config


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """The validated detection config saved in a checkpoint (fields added since take their defaults)."""
    return config_lib.config_from_json(text, base_config, validate)
