"""CBAM-ResNet-18 (CIFAR stem) on CIFAR-100: the CIFAR-10 recipe with 100 classes and their statistics.

Prepare the data once with TensorFlow installed (`pip install 'cbam-jax[prepare]'`):
`python -c "import tensorflow_datasets as tfds; tfds.builder('cifar100').download_and_prepare(file_format='array_record')"`.
"""

import importlib.util
import os

from cbam_jax.training.config import validate


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10.py")
    spec = importlib.util.spec_from_file_location("cifar10_recipe", path)
    cifar10 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cifar10)
    config = cifar10.get_config()
    config.unlock()
    config.dataset.name = "cifar100"
    config.dataset.num_classes = 100
    config.dataset.mean = (0.5071, 0.4865, 0.4409)
    config.dataset.std = (0.2673, 0.2564, 0.2762)
    return validate(config)
