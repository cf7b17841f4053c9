"""FCOS with a CBAM-ResNet-50 backbone on PASCAL VOC 2007 trainval (tfds 'voc/2007'), evaluated on its
test split with COCO-style figures (mAP@.5 is the VOC metric, up to the VOC 11-point/area details).

The paper's VOC experiment is StairNet (an SSD) with VGG16, which cbam-jax does not have; this recipe
keeps the detector single-stage and borrows the common FCOS/RetinaNet VOC schedule: batch 16 at
512 x 512, SGD momentum 0.9, lr 0.01 with warm-up, 12 epochs-equivalent (~18k steps on 16,551
trainval07+12 images; here trainval07 only, 5,011 images: ~4k steps), step decay at 2/3 and 8/9.
Backbone from ImageNet weights (config.init_from), BatchNorm frozen.

Preparation (once, needs tensorflow-datasets and the VOC download; see docs/detection.md):
    python -c "import tensorflow_datasets as tfds; tfds.builder('voc/2007').download_and_prepare(file_format='array_record')"
"""

from cbam_jax.detection.config import base_config, validate


def get_config():
    config = base_config()
    config.model.name = "cbam_resnet50"
    config.model.width = 64
    config.model.reduction = 16
    config.dataset.source = "tfds"
    config.dataset.name = "voc/2007"
    config.dataset.train_split = "train+validation"
    config.dataset.eval_split = "test"
    config.dataset.num_classes = 20
    config.dataset.image_size = 512
    config.dataset.scale_min, config.dataset.scale_max = 0.8, 1.2
    config.detection.fpn_channels = 256
    config.detection.head_convs = 4
    config.detection.head_norm_groups = 32
    config.detection.size_boundaries = (64.0, 128.0, 256.0, 512.0)
    config.detection.train_backbone_bn = False
    config.detection.max_boxes = 64
    config.detection.pre_nms_top_k = 1000
    config.detection.max_detections = 100
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_epochs = 40.0  # ~12.5k steps at 5,011 images / 16
    config.optimizer = "sgd"
    config.learning_rate = 0.01
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.schedule = "step"
    config.warmup_epochs = 0.5
    config.lr_step_epochs = 27.0  # x0.1 at 2/3 of the run
    config.grad_clip_norm = 0.0
    config.eval_every_steps = 0
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.init_from = "cbam_resnet50"  # the published ImageNet weights (cbam-jax list-pretrained)
    return validate(config)
