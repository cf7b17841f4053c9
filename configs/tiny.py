"""For tests: a width-8 CBAM-ResNet-18 on the embedded digits, a handful of steps."""

from cbam_jax.training.config import base_config, validate


def get_config():
    config = base_config()
    config.model.width = 8
    config.model.reduction = 4
    config.batch_size = 16
    config.eval_batch_size = 64
    config.num_train_steps = 8
    config.learning_rate = 0.05
    config.log_every_steps = 2
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 4
    config.dataset.num_threads = 1
    config.progress_bar = False
    config.tensorboard = False
    config.compilation_cache_dir = ""  # JAX's own setting (under pytest: the session's cache, tests/conftest.py)
    return validate(config)
