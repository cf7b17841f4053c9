"""CBAM-ResNet-50 on ImageNet, the paper's recipe: SGD 0.1, momentum 0.9, weight decay 1e-4 (on all
weights, as PyTorch's SGD), x0.1 every 30 epochs, batch 256, 90 epochs; random-resized-crop 224 +
flip; eval resize 256 / center crop 224.

ImageNet cannot be downloaded automatically: place ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in ~/tensorflow_datasets/downloads/manual/, then with TensorFlow installed
(`pip install 'cbam-jax[prepare]'`) run
`python -c "import tensorflow_datasets as tfds; tfds.builder('imagenet2012').download_and_prepare(file_format='array_record')"`.
"""

from cbam_jax.training.config import base_config, validate


def get_config():
    config = base_config()
    config.model.name = "cbam_resnet50"
    config.model.stem = "imagenet"
    config.model.width = 64
    config.dataset.source = "tfds"
    config.dataset.name = "imagenet2012"
    config.dataset.eval_split = "validation"
    config.dataset.num_classes = 1000
    config.dataset.image_size = 224
    config.dataset.channels = 3
    config.dataset.train_augment = "random_resized_crop"
    config.dataset.flip = True
    config.dataset.eval_resize = 256
    config.dataset.mean = (0.485, 0.456, 0.406)
    config.dataset.std = (0.229, 0.224, 0.225)
    config.dataset.num_threads = 16
    config.batch_size = 256
    config.eval_batch_size = 250
    config.num_epochs = 90.0
    config.optimizer = "sgd"
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.schedule = "step"
    config.lr_step_epochs = 30.0
    config.lr_step_factor = 0.1
    config.log_every_steps = 100
    return validate(config)
