"""CBAM-ResNet-18 (CIFAR stem) on CIFAR-10: pad-4 random crop + flip, SGD momentum, cosine, 200 epochs.

Prepare the data once with TensorFlow installed (`pip install 'cbam-jax[prepare]'`):
`python -c "import tensorflow_datasets as tfds; tfds.builder('cifar10').download_and_prepare(file_format='array_record')"`.
"""

from cbam_jax.training.config import base_config, validate


def get_config():
    config = base_config()
    config.model.name = "cbam_resnet18"
    config.model.stem = "cifar"
    config.model.width = 64
    config.dataset.source = "tfds"
    config.dataset.name = "cifar10"
    config.dataset.num_classes = 10
    config.dataset.image_size = 32
    config.dataset.channels = 3
    config.dataset.train_augment = "pad_crop"
    config.dataset.crop_padding = 4
    config.dataset.flip = True
    config.dataset.mean = (0.4914, 0.4822, 0.4465)
    config.dataset.std = (0.2470, 0.2435, 0.2616)
    config.dataset.num_threads = 8
    config.batch_size = 128
    config.eval_batch_size = 500
    config.num_epochs = 200.0
    config.optimizer = "sgd"
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.schedule = "cosine"
    config.log_every_steps = 100
    return validate(config)
