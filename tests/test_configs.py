"""Every recipe loads and validates; bad fields fail with a message that says what to fix."""

import glob
import json
import os

import pytest

from cbam_jax.training.config import base_config, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Detection recipes have their own schema (cbam_jax/detection/config.py; tests/test_detection_train.py).
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not os.path.basename(p).startswith("detection_"))


def test_all_recipes_present_and_valid():
    names = {os.path.basename(p)[:-3] for p in RECIPES}
    assert {"default", "tiny", "cifar10", "cifar100", "imagenet2012", "imagenet2012_modern"} <= names
    for path in RECIPES:
        config = load_config(path)
        assert config.is_locked


def test_imagenet_recipe_is_the_papers():
    config = load_config(os.path.join(ROOT, "configs", "imagenet2012.py"))
    assert (config.model.name, config.optimizer, config.learning_rate, config.momentum) == ("cbam_resnet50", "sgd", 0.1, 0.9)
    assert (config.weight_decay, config.schedule, config.lr_step_epochs, config.lr_step_factor) == (1e-4, "step", 30.0, 0.1)
    assert (config.batch_size, config.num_epochs, config.dataset.image_size, config.dataset.eval_resize) == (256, 90.0, 224, 256)
    modern = load_config(os.path.join(ROOT, "configs", "imagenet2012_modern.py"))
    assert (modern.schedule, modern.label_smoothing, modern.precision) == ("cosine", 0.1, "bfloat16")
    assert modern.warmup_epochs > 0


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.model, "name", "cbam_resnet19"), "not a model"),
    (lambda c: setattr(c, "optimizer", "lamb"), "optimizer"),
    (lambda c: setattr(c, "batch_size", 0), "batch_size must be > 0"),
    (lambda c: setattr(c.dataset, "mean", (0.5, 0.5)), "dataset.mean needs 1"),
    (lambda c: setattr(c, "parallel", "pjit"), "parallel"),
    (lambda c: setattr(c, "init_from", "/nonexistent/dir"), "no existing directory"),
])
def test_invalid_values_are_rejected(change, message):
    config = base_config()
    change(config)
    with pytest.raises(ValueError, match=message):
        validate(config)


def test_unknown_and_missing_fields():
    config = base_config()
    config.batchsize = 32
    with pytest.raises(ValueError, match="Unknown config field.*batchsize"):
        validate(config)
    config = base_config()
    del config.dataset["flip"]
    with pytest.raises(ValueError, match="Missing config field.*dataset.flip"):
        validate(config)


def test_missing_recipe_file_lists_the_recipes():
    with pytest.raises(FileNotFoundError, match="default.py"):
        load_config("configs/nope.py")


def test_resume_refuses_a_changed_recipe_and_lists_the_fields():
    from cbam_jax.training.trainer import check_recipe

    saved = validate(base_config())
    changed = base_config()
    changed.learning_rate, changed.dataset.train_augment = 0.2, "none"
    changed.stop_at_step, changed.progress_bar = 7, False  # free fields: never listed
    changed = validate(changed)
    with pytest.raises(ValueError) as caught:
        check_recipe({"config": saved.to_json()}, changed, "runs/x")
    message = str(caught.value)
    assert "learning_rate: 0.1 -> 0.2" in message and "dataset.train_augment" in message
    assert "stop_at_step" not in message and "progress_bar" not in message
    assert "allow_config_change=True" in message
    check_recipe({"config": saved.to_json()}, validate(base_config()), "runs/x")  # the same recipe resumes
    allowed = base_config()
    allowed.learning_rate, allowed.allow_config_change = 0.2, True
    check_recipe({"config": saved.to_json()}, validate(allowed), "runs/x")  # logged, not refused


def test_a_field_added_since_the_checkpoint_counts_as_its_default():
    from cbam_jax.training.config import recipe_changes

    saved = json.loads(validate(base_config()).to_json())
    del saved["allow_config_change"], saved["label_smoothing"]  # written before these fields existed
    assert recipe_changes(json.dumps(saved), validate(base_config())) == []
    smoothed = base_config()
    smoothed.label_smoothing = 0.1
    assert recipe_changes(json.dumps(saved), validate(smoothed)) == ["label_smoothing: 0.0 -> 0.1"]


def parse(*arguments):
    """config_from_flags on a fresh FlagValues, as train.py calls it (recipe paths from the repository root)."""
    from absl import flags

    from cbam_jax.training.config import config_from_flags

    return config_from_flags(["train.py", *arguments], flags.FlagValues(), os.path.join(ROOT, "configs", "tiny.py"))


def test_overrides_apply_to_any_field_of_the_chosen_recipe():
    config = parse("--config.batch_size=32", "--config.dataset.flip=True")
    assert (config.batch_size, config.dataset.flip) == (32, True)
    detection = parse("--config", os.path.join(ROOT, "configs", "detection_shapes.py"),
                      "--config.detection.fpn_channels=16", "--config.dataset.num_train_images=64",
                      "--config.detection.size_boundaries=(8.0, 16.0, 32.0, 64.0)")
    assert (detection.task, detection.detection.fpn_channels, detection.dataset.num_train_images) == ("detection", 16, 64)
    assert detection.detection.size_boundaries == (8.0, 16.0, 32.0, 64.0)


@pytest.mark.parametrize("arguments, error, message", [
    (["--config.batchsize=3"], "ConfigError", "no field 'batchsize' to override; did you mean 'batch_size'?"),
    (["--config", os.path.join(ROOT, "configs", "detection_shapes.py"), "--config.detection.fpn_chanels=16"],
     "ConfigError", "no field 'fpn_chanels' to override; did you mean 'fpn_channels'?"),
    (["--config", os.path.join(ROOT, "configs", "detection_shapes.py"), "--config.detection.fpn_channels=abc"],
     "ConfigError", "--config.detection.fpn_channels=abc"),
    (["--config.dataset.flip=3"], "ConfigError", "--config.dataset.flip=3"),
    (["--config", os.path.join(ROOT, "configs", "tiny.py:x")], "ConfigError", "get_config() takes 0 positional"),
    (["--config", "configs/nope.py"], "MissingInput", "--config configs/nope.py: no such recipe file"),
    (["--config", ROOT], "MissingInput", "is a directory, not a recipe file"),
    (["--bogus=1"], "ConfigError", "--bogus: unknown flag"),
    (["extra"], "ConfigError", "unexpected argument(s) ['extra']"),
])
def test_command_line_mistakes_are_one_line(arguments, error, message):
    from cbam_jax.errors import UserError

    with pytest.raises(UserError) as caught:
        parse(*arguments)
    assert type(caught.value).__name__ == error
    assert message in str(caught.value) and "\n" not in str(caught.value)
