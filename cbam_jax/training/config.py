"""The training configuration: every field, its default, and the check run on load.

A recipe in `configs/NAME.py` starts from `base_config()`, changes what it needs and returns
`validate(config)`. `train.py` validates again after command-line overrides
(`--config.batch_size=256`, parsed by `config_from_flags`), so a bad value fails before any data is
read or anything compiles. A resumed run compares its config with the one saved in the checkpoint
(`recipe_changes`): only the `FREE_FIELDS` may differ unless `allow_config_change` is set.
"""

import difflib
import importlib.util
import json
import math
import os
import traceback
from collections.abc import Callable, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from cbam_jax.errors import InvalidInput, MissingInput
from cbam_jax.factory import source_kind
from cbam_jax.registry import VARIANTS, create_model, list_models, split_name
from cbam_jax.resnet import REMAT_CHOICES

OPTIMIZERS = ("sgd", "nesterov", "adamw")
SCHEDULES = ("constant", "step", "cosine")
PRECISIONS = ("float32", "bfloat16", "float16")
PARALLEL_MODES = ("jit", "pmap")
SOURCES = ("digits", "tfds", "folder")
TRAIN_AUGMENTS = ("none", "pad_crop", "random_resized_crop")
# Fields a resumed run may change freely: how the run is logged, evaluated, checkpointed, stopped,
# read and spread over devices, not what it computes (a name covers the fields of a group). Every
# other field, including any added later, is part of the recipe: a resumed run with another value
# is refused unless config.allow_config_change is True.
FREE_FIELDS = ("log_every_steps", "eval_every_steps", "eval_batch_size", "checkpoint_every_steps", "keep_checkpoints",
               "stop_at_step", "progress_bar", "tensorboard", "compilation_cache_dir", "parallel",
               "allow_config_change", "distributed", "dataset.data_dir", "dataset.num_threads", "dataset.prefetch",
               "model.remat")


class ConfigError(InvalidInput):
    """A config field (or a --config flag) that cannot be used; the message names it and the fix."""


def base_config() -> ml_collections.ConfigDict:
    """All fields with their defaults (a small CBAM-ResNet-18 on scikit-learn's digits)."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        name="cbam_resnet18",  # any of cbam_jax.list_models()
        variant="official",  # attention options of 'official', 'timm' or 'common'
        stem="cifar",  # 'cifar' (3x3/1 conv) for small images, 'imagenet' (7x7/2 + max-pool)
        width=64,  # channels of the first stage
        reduction=16,  # channel-attention MLP reduction (SE, CBAM, BAM); must be <= width
        # Any other option of the attention layer (`create_model`'s), e.g. {'arrangement': 'parallel'};
        # configs/ablation.py sets them for each row of the paper's ablation.
        attention_options=ml_collections.ConfigDict(),
        remat="none",  # 'blocks': recompute each residual block in the backward pass (less memory, more compute)
    ))
    config.dataset = ml_collections.ConfigDict(dict(
        source="digits",  # 'digits' (embedded), 'tfds' (tfds.data_source) or 'folder' (class sub-folders)
        name="",  # tfds name, e.g. 'cifar10', 'imagenet2012'
        data_dir="",  # tfds data_dir (default ~/tensorflow_datasets), or the image folder root
        train_split="train",  # split names (sub-folders of data_dir for 'folder')
        eval_split="test",
        num_classes=10,  # classifier size
        image_size=8,  # side of the square training/eval input
        channels=1,  # 1 (grey) or 3 (RGB); images are converted
        train_augment="pad_crop",  # 'none', 'pad_crop' (CIFAR) or 'random_resized_crop' (ImageNet)
        crop_padding=1,  # pixels of zero padding for 'pad_crop'
        flip=False,  # random horizontal flip in training
        eval_resize=0,  # resize the shorter side to this, then center-crop image_size (0: resize to image_size)
        mean=(0.3,),  # per-channel normalisation of [0, 1] pixels
        std=(0.4,),
        verify_images=False,  # 'folder': open every image up front and skip unreadable ones (else: fail on read)
        num_threads=2,  # grain reader threads
        prefetch=4,  # batches prefetched by grain
    ))
    config.batch_size = 128  # global, over all devices and processes; must divide by the device count
    config.eval_batch_size = 256  # global, as batch_size
    config.num_epochs = 30.0  # length of the run
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.optimizer = "nesterov"  # 'sgd', 'nesterov' (both with momentum) or 'adamw'
    config.learning_rate = 0.1  # peak learning rate for batch_size (no implicit scaling)
    config.momentum = 0.9  # SGD momentum
    config.weight_decay = 5e-4  # L2 added to the gradient (SGD, as PyTorch) or decoupled (AdamW)
    config.decay_norm_and_bias = True  # False: no weight decay on BatchNorm scales/offsets and biases
    config.schedule = "cosine"  # 'constant', 'step' or 'cosine'
    config.warmup_epochs = 0.0  # linear warm-up from 0
    config.lr_step_epochs = 30.0  # 'step': multiply by lr_step_factor every lr_step_epochs
    config.lr_step_factor = 0.1
    config.label_smoothing = 0.0  # 0: one-hot targets
    config.grad_clip_norm = 0.0  # > 0: clip the global gradient norm
    config.precision = "float32"  # 'bfloat16' compute (f32 params) or 'float16' with dynamic loss scaling
    config.parallel = "jit"  # 'jit' (Mesh, sharded batch) or 'pmap' (legacy)
    config.bn_group_size = 0  # 'jit': BatchNorm statistics per group of this many devices; 0 = all devices
    config.seed = 0  # initialisation, shuffling and augmentation
    config.log_every_steps = 20  # train metrics interval (also the NaN check)
    config.eval_every_steps = 0  # 0: once per epoch
    config.checkpoint_every_steps = 0  # 0: once per epoch
    config.keep_checkpoints = 2  # latest periodic checkpoints kept (the best one is kept separately)
    config.stop_at_step = 0  # > 0: save and stop after this step (scheduled preemption); rerun to resume
    config.init_from = ""  # weights to fine-tune from: a registry name, 'hf-hub:ORG/NAME[@REV]', a directory or a PyTorch file
    config.freeze = ""  # comma-separated module patterns kept as they are, BatchNorm statistics too ('conv1,bn1': the stem)
    config.new_lr_factor = 1.0  # learning-rate factor of the parameters init_from did not provide (attention, a new head)
    config.allow_config_change = False  # resume a workdir whose checkpoint was trained with other recipe fields (logged)
    config.progress_bar = True  # tqdm on stderr (process 0)
    config.tensorboard = True  # events in workdir/tensorboard (needs tensorboardX)
    config.compilation_cache_dir = "~/.cache/cbam_jax/xla"  # '': JAX's own setting (JAX_COMPILATION_CACHE_DIR, else none)
    config.distributed = ml_collections.ConfigDict(dict(
        enabled=False,  # call jax.distributed.initialize()
        coordinator_address="",  # host:port; '' lets JAX detect the cluster (SLURM, TPU, ...)
        num_processes=0,
        process_id=-1,
    ))
    return config


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"config.{name} = {value!r} is not one of {list(allowed)}.")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check every field against the schema of `base_config()`; returns the config, locked.

    Raises:
      ConfigError (a ValueError): an unknown or missing field, a wrong type or an invalid value, with the fix.
    """
    if "model" in config and "attention_options" not in config.model and not config.is_locked:
        config.model.attention_options = ml_collections.ConfigDict()  # a config saved before the field existed
    if "model" in config and "remat" not in config.model and not config.is_locked:
        config.model.remat = "none"  # a config saved before the field existed
    check_fields(config, base_config(), "config")
    if config.model.name not in list_models():
        raise ConfigError(f"config.model.name = {config.model.name!r} is not a model; choose from {list_models()}.")
    _choice("model.variant", config.model.variant, tuple(VARIANTS))
    _check_attention_options(config.model)
    _choice("model.stem", config.model.stem, ("imagenet", "cifar"))
    _choice("model.remat", config.model.remat, REMAT_CHOICES)
    _choice("dataset.source", config.dataset.source, SOURCES)
    _choice("dataset.train_augment", config.dataset.train_augment, TRAIN_AUGMENTS)
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("schedule", config.schedule, SCHEDULES)
    _choice("precision", config.precision, PRECISIONS)
    _choice("parallel", config.parallel, PARALLEL_MODES)
    if config.bn_group_size < 0 or (config.bn_group_size and config.parallel != "jit"):
        raise ConfigError(f"config.bn_group_size = {config.bn_group_size} must be 0 (global BatchNorm statistics) or a "
                         "positive device count with parallel='jit'.")
    if config.dataset.source == "tfds" and not config.dataset.name:
        raise ConfigError("config.dataset.name must name the tfds dataset (e.g. 'cifar10') when source='tfds'.")
    if config.dataset.source == "folder" and not config.dataset.data_dir:
        raise ConfigError("config.dataset.data_dir must be the image folder root when source='folder'.")
    _choice("dataset.channels", config.dataset.channels, (1, 3))
    for field in ("mean", "std"):
        if len(config.dataset[field]) != config.dataset.channels:
            raise ConfigError(f"config.dataset.{field} needs {config.dataset.channels} value(s) "
                             f"(dataset.channels); got {tuple(config.dataset[field])}.")
    positive = {"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size,
                "dataset.num_classes": config.dataset.num_classes, "dataset.image_size": config.dataset.image_size,
                "model.width": config.model.width, "model.reduction": config.model.reduction, "log_every_steps": config.log_every_steps,
                "keep_checkpoints": config.keep_checkpoints, "learning_rate": config.learning_rate,
                "lr_step_epochs": config.lr_step_epochs, "lr_step_factor": config.lr_step_factor}
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config.{name} must be > 0; got {value}.")
    not_negative = {"eval_every_steps": (config.eval_every_steps, "0: once per epoch"),
                    "checkpoint_every_steps": (config.checkpoint_every_steps, "0: once per epoch"),
                    "stop_at_step": (config.stop_at_step, "0: run to the end"),
                    "warmup_epochs": (config.warmup_epochs, "0: no warm-up"),
                    "weight_decay": (config.weight_decay, "0: none"), "grad_clip_norm": (config.grad_clip_norm, "0: no clipping"),
                    "momentum": (config.momentum, "0: plain SGD"), "dataset.crop_padding": (config.dataset.crop_padding, ""),
                    "dataset.eval_resize": (config.dataset.eval_resize, "0: resize to image_size"),
                    "dataset.num_threads": (config.dataset.num_threads, ""), "dataset.prefetch": (config.dataset.prefetch, ""),
                    "distributed.num_processes": (config.distributed.num_processes, "0: detected")}
    for name, (value, meaning) in not_negative.items():
        if value < 0:
            raise ConfigError(f"config.{name} must be >= 0{f' ({meaning})' if meaning else ''}; got {value}.")
    if not 0 <= config.label_smoothing < 1:
        raise ConfigError(f"config.label_smoothing must be in [0, 1); got {config.label_smoothing}.")
    if config.momentum >= 1:
        raise ConfigError(f"config.momentum must be in [0, 1); got {config.momentum}.")
    if min(config.dataset.std) <= 0:
        raise ConfigError(f"config.dataset.std must be positive; got {tuple(config.dataset.std)}.")
    if config.model.attention_options.to_dict() or split_name(config.model.name)[0] is not None:
        if config.model.reduction > config.model.width:
            raise ConfigError(f"config.model.reduction = {config.model.reduction} exceeds config.model.width = "
                              f"{config.model.width}: the first attention MLP would have no units; use a reduction "
                              f"<= {config.model.width}.")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError("Set config.num_epochs > 0 or config.num_train_steps > 0.")
    check_transfer(config)
    config.lock()
    return config


def check_transfer(config: ml_collections.ConfigDict) -> None:
    """config.init_from names a source (checked by name or path only: nothing is downloaded here) and
    config.new_lr_factor is positive and only set with it. Shared by the classification and detection recipes."""
    if config.init_from:
        try:
            source_kind(config.init_from)
        except ValueError as error:
            raise ConfigError(f"config.init_from: {error}") from None
    if config.new_lr_factor <= 0 or (config.new_lr_factor != 1 and not config.init_from):
        raise ConfigError(f"config.new_lr_factor = {config.new_lr_factor} must be > 0 and applies to the parameters "
                          "config.init_from does not provide; set config.init_from, or leave the factor at 1.")


def _check_attention_options(model: ml_collections.ConfigDict) -> None:
    """model.attention_options: names the model's attention layer takes (values are checked when it is built)."""
    options = model.attention_options.to_dict()
    if "reduction" in options:
        raise ConfigError("Set the reduction as config.model.reduction, not in config.model.attention_options.")
    try:
        built = create_model(model.name, variant=model.variant, **options)
    except ValueError as error:
        raise ConfigError(f"config.model.attention_options: {error}") from None
    not_attention = sorted(set(options) - set(built.attention_options))
    if not_attention:
        raise ConfigError(f"config.model.attention_options: {not_attention} are model options, not options of "
                         f"the attention layer (set the width in config.model.width, the dtype through config.precision).")


def check_fields(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str) -> None:
    """Check that `config` has the keys of `schema` (recursively; any keys in the free-form group
    model.attention_options) with values of a compatible type; `prefix` names `config` in messages
    ('config'). Shared by the training and detection `validate`.

    Raises:
      ConfigError: the first unknown, missing or mistyped field, named with the fix.
    """
    if prefix == "config.model.attention_options":
        return
    unknown = sorted(set(config.keys()) - set(schema.keys()))
    missing = sorted(set(schema.keys()) - set(config.keys()))
    if unknown:
        raise ConfigError(f"Unknown config field(s) {[f'{prefix}.{k}' for k in unknown]}; "
                         f"known fields: {sorted(schema.keys())}.")
    if missing:
        raise ConfigError(f"Missing config field(s) {[f'{prefix}.{k}' for k in missing]}; start recipes from "
                         "cbam_jax.training.config.base_config().")
    for key, default in schema.items():
        value = config[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"{prefix}.{key} must be a group of fields; got {value!r}.")
            check_fields(value, default, f"{prefix}.{key}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{prefix}.{key} must be True or False; got {value!r}.")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{prefix}.{key} must be an integer; got {value!r}.")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{prefix}.{key} must be a finite number; got {value!r}.")
        elif isinstance(default, tuple):
            if (isinstance(value, str) or not isinstance(value, Sequence) or not value
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
                raise ConfigError(f"{prefix}.{key} must be a tuple of numbers, e.g. --config.{prefix[7:] + '.' if prefix != 'config' else ''}"
                                  f"{key}='(0.5, 0.5, 0.5)'; got {value!r}.")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{prefix}.{key} must be a string; got {value!r}.")


def load_config(path: str, check: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict] | None = None
                ) -> ml_collections.ConfigDict:
    """Run `get_config()` of a recipe file (e.g. 'configs/cifar10.py') and validate the result
    (with `check`: another task's `validate`, detection's)."""
    if not os.path.isfile(path):
        raise MissingInput(f"No config file {path!r}; {_recipes_hint()}.")
    spec = importlib.util.spec_from_file_location("cbam_jax_recipe", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ConfigError(f"{path}, line {error.lineno}: {error.msg} (the recipe is not valid Python).") from None
    return (check or validate)(module.get_config())


def _recipes_hint() -> str:
    here = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    if not os.path.isdir(here):
        return "see the README for the recipes"
    return "recipes: " + ", ".join(f"configs/{name}" for name in sorted(os.listdir(here)) if name.endswith(".py"))


def config_from_json(text: str, base: Callable[[], ml_collections.ConfigDict] | None = None,
                     check: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict] | None = None
                     ) -> ml_collections.ConfigDict:
    """The validated config saved in a checkpoint (`config.to_json()`); fields added to
    `base_config()` since it was saved take their defaults. `base` and `check`: another task's
    `base_config` and `validate` (detection's)."""
    config = (base or base_config)()
    _update(config, json.loads(text), "config")
    return (check or validate)(config)


def _update(config: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
        if key not in config:
            raise ConfigError(f"The saved config has a field {prefix}.{key} that this version of cbam-jax does not know.")
        if isinstance(config[key], ml_collections.ConfigDict) and key != "attention_options":
            _update(config[key], value, f"{prefix}.{key}")
        elif key == "attention_options":
            config[key] = ml_collections.ConfigDict(value)
        else:
            config[key] = tuple(value) if isinstance(config[key], tuple) else value


# ---- resuming: which fields of a saved config may differ ---------------------------------------

def recipe_changes(saved_json: str, config: ml_collections.ConfigDict) -> list[str]:
    """'FIELD: SAVED -> NOW' for each recipe field (not in FREE_FIELDS) whose value differs between
    the config a checkpoint was written with (its `to_json()`) and `config`. A field the saved config
    lacks (added to cbam-jax since) counts as its default."""
    saved, now = _flat(json.loads(saved_json)), _flat(json.loads(config.to_json()))
    defaults = _flat(json.loads(base_config().to_json()))
    changes = []
    for field in sorted(set(saved) | set(now)):
        if field not in now or any(field == free or field.startswith(free + ".") for free in FREE_FIELDS):
            continue
        before = saved.get(field, defaults.get(field))
        if before != now[field]:
            changes.append(f"{field}: {before!r} -> {now[field]!r}")
    return changes


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        flat.update(_flat(value, name) if isinstance(value, dict) else {name: value})
    return flat


# ---- the command line: --config FILE.py[:ARGUMENT] --config.FIELD=VALUE ... ---------------------

def config_from_flags(argv: Sequence[str], flag_values: flags.FlagValues, default: str) -> ml_collections.ConfigDict:
    """Define `--config` (a recipe `FILE.py[:ARGUMENT]`, default `default`) on the absl `flag_values`,
    parse `argv` (program name first) with it, and return the config with its overrides (locked, not
    validated: the caller may still set fields).

    ml_collections' `config_flags` loads the recipe and applies the overrides; an override may change
    any field the recipe's config has (classification and detection recipes alike). What it raises
    is turned into one line here, from the exception objects.

    Raises:
      ConfigError / MissingInput: a missing recipe file, a recipe that fails to load, an override of a
        field the config does not have (with the closest field name), a value of the wrong type,
        an unknown flag: one line naming the flag and the fix.
    """
    try:
        holder = config_flags.DEFINE_config_file("config", default, "training recipe (configs/NAME.py[:ARGUMENT])",
                                                 flag_values=flag_values, lock_config=True, sys_argv=list(argv))
        unparsed = flag_values(list(argv))[1:]
        config = holder.value
        config.keys()  # a recipe file that could not be read raises here (config_flags defers the error)
    except flags.UnrecognizedFlagError as error:
        raise ConfigError(f"--{error.flagname}: unknown flag; the flags are --config, --config.FIELD=VALUE and "
                          "--workdir (see --helpfull).") from None
    except flags.Error as error:  # a value of the wrong type, or a recipe whose get_config() raised
        lines = str(error).splitlines()
        raise ConfigError(lines[0] if len(lines) == 1 else f"--config: {_one_line(_innermost(error))}") from None
    except (KeyError, AttributeError, TypeError) as error:  # an override through a field the config lacks
        raise ConfigError(_unknown_field_message(error)) from None
    except SyntaxError as error:
        raise ConfigError(f"--config {error.filename}, line {error.lineno}: {error.msg} "
                          "(the recipe is not valid Python).") from None
    except OSError as error:  # config_flags could not read the recipe file
        recipe = config_flags.get_config_filename(flag_values["config"])
        path = recipe.split(":", 1)[0]
        what = ("is a directory, not a recipe file" if os.path.isdir(path) else
                "no such recipe file" if not os.path.exists(path) else _one_line(_innermost(error)))
        raise MissingInput(f"--config {recipe}: {what}; {_recipes_hint()}.") from None
    if unparsed:
        raise ConfigError(f"unexpected argument(s) {unparsed}; overrides look like --config.batch_size=256.")
    return config


def _innermost(error: BaseException) -> BaseException:
    """The exception at the bottom of a chain (config_flags and absl wrap the recipe's own error)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _unknown_field_message(error: BaseException) -> str:
    """'no field KEY to override' with the closest field of the group that lacks it: the key is the
    KeyError's argument, the group the ConfigDict whose lookup raised it (the innermost such frame)."""
    innermost = _innermost(error)
    if not isinstance(innermost, KeyError) or not innermost.args:
        return f"a --config.FIELD override goes through a field that is not a group of fields ({_one_line(error)})."
    key = str(innermost.args[0])
    groups = [frame.f_locals.get("self") for frame, _ in traceback.walk_tb(error.__traceback__)]
    groups = [group for group in groups if isinstance(group, ml_collections.ConfigDict)]
    closest = difflib.get_close_matches(key, list(groups[-1].keys()), n=1, cutoff=0.6) if groups else []
    hint = (f"; did you mean {closest[0]!r}?" if closest else
            " (an override changes a field the recipe sets; see cbam_jax/training/config.py for the fields).")
    return f"--config.FIELD override: the config has no field {key!r} to override{hint}"
