"""FCOS with a width-8 CBAM-ResNet-18 backbone on the generated shapes set (offline, a few CPU minutes).

    python train.py --config configs/detection_shapes.py --workdir runs/detect_shapes
    python train.py --config configs/detection_shapes.py --config.model.name=resnet18 --workdir runs/detect_plain
"""

from cbam_jax.detection.config import base_config, validate


def get_config():
    config = base_config()
    config.num_train_steps = 600
    config.log_every_steps = 50
    config.checkpoint_every_steps = 200
    return validate(config)
