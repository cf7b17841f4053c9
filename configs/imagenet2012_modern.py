"""CBAM-ResNet-50 on ImageNet, a modern recipe: batch 1024, SGD-nesterov 0.4 with 5 warm-up epochs
and cosine decay, label smoothing 0.1, no weight decay on BatchNorm and biases, bf16 compute,
timm-style zero-initialised last BN of each block. Data preparation as in imagenet2012.py.
"""

import importlib.util
import os

from cbam_jax.training.config import validate


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet2012.py")
    spec = importlib.util.spec_from_file_location("imagenet2012_recipe", path)
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    config = official.get_config()
    config.unlock()
    config.model.variant = "timm"
    config.batch_size = 1024
    config.eval_batch_size = 1000
    config.num_epochs = 100.0
    config.optimizer = "nesterov"
    config.learning_rate = 0.4
    config.weight_decay = 5e-5
    config.decay_norm_and_bias = False
    config.schedule = "cosine"
    config.warmup_epochs = 5.0
    config.label_smoothing = 0.1
    config.precision = "bfloat16"
    return validate(config)
