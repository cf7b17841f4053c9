"""FCOS with a CBAM-ResNet-50 backbone on MS COCO 2017 (tfds 'coco/2017'): train2017 -> val2017.

The paper's COCO experiment is Faster R-CNN (ResNet-50/101, CBAM +1.0 to +1.7 mAP@[.5:.95]); cbam-jax
has no two-stage detector, so this is FCOS's own "1x" schedule: batch 16, SGD momentum 0.9,
lr 0.01 with a linear warm-up, 90k iterations, x0.1 at 60k (FCOS: and at 80k), weight decay 1e-4, frozen
BatchNorm in an ImageNet-initialised backbone. The input is a fixed 800 x 800 square (FCOS resizes
the shorter side to 800, at most 1333, per image; static shapes need one size).

Preparation (once, ~25 GB; needs tensorflow-datasets; see docs/detection.md):
    python -c "import tensorflow_datasets as tfds; tfds.builder('coco/2017').download_and_prepare(file_format='array_record')"
"""

from cbam_jax.detection.config import base_config, validate

COCO_TRAIN_IMAGES = 118_287


def get_config():
    config = base_config()
    config.model.name = "cbam_resnet50"
    config.model.width = 64
    config.model.reduction = 16
    config.dataset.source = "tfds"
    config.dataset.name = "coco/2017"
    config.dataset.train_split = "train"
    config.dataset.eval_split = "validation"
    config.dataset.num_classes = 80
    config.dataset.image_size = 800
    config.detection.fpn_channels = 256
    config.detection.head_convs = 4
    config.detection.head_norm_groups = 32
    config.detection.size_boundaries = (64.0, 128.0, 256.0, 512.0)
    config.detection.train_backbone_bn = False
    config.detection.max_boxes = 100
    config.detection.pre_nms_top_k = 1000
    config.detection.max_detections = 100
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_train_steps = 90_000
    config.optimizer = "sgd"
    config.learning_rate = 0.01
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.schedule = "step"
    steps_per_epoch = COCO_TRAIN_IMAGES // 16
    config.warmup_epochs = 500 / steps_per_epoch  # 500 warm-up iterations
    config.lr_step_epochs = 60_000 / steps_per_epoch  # x0.1 at 60k only (FCOS also at 80k: the "step" schedule has one period)
    config.grad_clip_norm = 0.0
    config.log_every_steps = 100
    config.checkpoint_every_steps = 5000
    config.eval_every_steps = 0
    config.init_from = "cbam_resnet50"
    return validate(config)
