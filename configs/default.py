"""The main job: a CBAM-ResNet-18 (width 16) on scikit-learn's 1,797 real 8x8 handwritten digits.

Runs offline on a fresh machine (the data ships inside scikit-learn) in a few minutes on a CPU.
"""

from cbam_jax.training.config import base_config, validate


def get_config():
    config = base_config()
    config.model.width = 16
    config.batch_size = 64
    config.num_epochs = 30.0
    config.learning_rate = 0.05
    return validate(config)
