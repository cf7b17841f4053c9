"""The training configuration: every field, its default, and the check run on load.

A recipe in `configs/NAME.py` starts from `base_config()`, changes what it needs and returns
`validate(config)`. `train.py` validates again after command-line overrides
(`--config.batch_size=256`), so a bad value fails before any data is read or anything compiles.
"""

import importlib.util
import os

import ml_collections

from cbam_jax.registry import VARIANTS, create_model, list_models

OPTIMIZERS = ("sgd", "nesterov", "adamw")
SCHEDULES = ("constant", "step", "cosine")
PRECISIONS = ("float32", "bfloat16", "float16")
PARALLEL_MODES = ("jit", "pmap")
SOURCES = ("digits", "tfds", "folder")
TRAIN_AUGMENTS = ("none", "pad_crop", "random_resized_crop")


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
    config.progress_bar = True  # tqdm on stderr (process 0)
    config.tensorboard = True  # events in workdir/tensorboard (needs tensorboardX)
    config.compilation_cache_dir = "~/.cache/cbam_jax/xla"  # '' disables the persistent compile cache
    config.distributed = ml_collections.ConfigDict(dict(
        enabled=False,  # call jax.distributed.initialize()
        coordinator_address="",  # host:port; '' lets JAX detect the cluster (SLURM, TPU, ...)
        num_processes=0,
        process_id=-1,
    ))
    return config


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"config.{name} = {value!r} is not one of {list(allowed)}.")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check every field against the schema of `base_config()`; returns the config, locked.

    Raises:
      ValueError: an unknown or missing field, a wrong type or an invalid value, with the fix.
    """
    if "model" in config and "attention_options" not in config.model and not config.is_locked:
        config.model.attention_options = ml_collections.ConfigDict()  # a config saved before the field existed
    _check_fields(config, base_config(), "config")
    if config.model.name not in list_models():
        raise ValueError(f"config.model.name = {config.model.name!r} is not a model; choose from {list_models()}.")
    _choice("model.variant", config.model.variant, tuple(VARIANTS))
    _check_attention_options(config.model)
    _choice("model.stem", config.model.stem, ("imagenet", "cifar"))
    _choice("dataset.source", config.dataset.source, SOURCES)
    _choice("dataset.train_augment", config.dataset.train_augment, TRAIN_AUGMENTS)
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("schedule", config.schedule, SCHEDULES)
    _choice("precision", config.precision, PRECISIONS)
    _choice("parallel", config.parallel, PARALLEL_MODES)
    if config.bn_group_size < 0 or (config.bn_group_size and config.parallel != "jit"):
        raise ValueError(f"config.bn_group_size = {config.bn_group_size} must be 0 (global BatchNorm statistics) or a "
                         "positive device count with parallel='jit'.")
    if config.dataset.source == "tfds" and not config.dataset.name:
        raise ValueError("config.dataset.name must name the tfds dataset (e.g. 'cifar10') when source='tfds'.")
    if config.dataset.source == "folder" and not config.dataset.data_dir:
        raise ValueError("config.dataset.data_dir must be the image folder root when source='folder'.")
    _choice("dataset.channels", config.dataset.channels, (1, 3))
    for field in ("mean", "std"):
        if len(config.dataset[field]) != config.dataset.channels:
            raise ValueError(f"config.dataset.{field} needs {config.dataset.channels} value(s) "
                             f"(dataset.channels); got {tuple(config.dataset[field])}.")
    positive = {"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size,
                "dataset.num_classes": config.dataset.num_classes, "dataset.image_size": config.dataset.image_size,
                "model.width": config.model.width, "model.reduction": config.model.reduction, "log_every_steps": config.log_every_steps,
                "keep_checkpoints": config.keep_checkpoints, "learning_rate": config.learning_rate}
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"config.{name} must be > 0; got {value}.")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ValueError("Set config.num_epochs > 0 or config.num_train_steps > 0.")
    if config.init_from:
        from cbam_jax.zoo import source_kind
        try:
            source_kind(config.init_from)  # checks the name or path only: nothing is downloaded here
        except ValueError as error:
            raise ValueError(f"config.init_from: {error}") from None
    if config.new_lr_factor <= 0 or (config.new_lr_factor != 1 and not config.init_from):
        raise ValueError(f"config.new_lr_factor = {config.new_lr_factor} must be > 0 and applies to the parameters "
                         "config.init_from does not provide; set config.init_from, or leave the factor at 1.")
    config.lock()
    return config


def _check_attention_options(model: ml_collections.ConfigDict) -> None:
    """model.attention_options: names the model's attention layer takes (values are checked when it is built)."""
    options = model.attention_options.to_dict()
    if "reduction" in options:
        raise ValueError("Set the reduction as config.model.reduction, not in config.model.attention_options.")
    try:
        built = create_model(model.name, variant=model.variant, **options)
    except ValueError as error:
        raise ValueError(f"config.model.attention_options: {error}") from None
    not_attention = sorted(set(options) - set(built.attention_options))
    if not_attention:
        raise ValueError(f"config.model.attention_options: {not_attention} are model options, not options of "
                         f"the attention layer (set the width in config.model.width, the dtype through config.precision).")


def _check_fields(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str) -> None:
    """Same keys as the schema (recursively; any keys in the free-form group model.attention_options)
    and values of a compatible type."""
    if prefix == "config.model.attention_options":
        return
    unknown = sorted(set(config.keys()) - set(schema.keys()))
    missing = sorted(set(schema.keys()) - set(config.keys()))
    if unknown:
        raise ValueError(f"Unknown config field(s) {[f'{prefix}.{k}' for k in unknown]}; "
                         f"known fields: {sorted(schema.keys())}.")
    if missing:
        raise ValueError(f"Missing config field(s) {[f'{prefix}.{k}' for k in missing]}; start recipes from "
                         "cbam_jax.training.config.base_config().")
    for key, default in schema.items():
        value = config[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ValueError(f"{prefix}.{key} must be a group of fields; got {value!r}.")
            _check_fields(value, default, f"{prefix}.{key}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{prefix}.{key} must be True or False; got {value!r}.")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{prefix}.{key} must be a number; got {value!r}.")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{prefix}.{key} must be a string; got {value!r}.")


def load_config(path: str) -> ml_collections.ConfigDict:
    """Run `get_config()` of a recipe file (e.g. 'configs/cifar10.py') and validate the result."""
    if not os.path.isfile(path):
        here = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
        raise FileNotFoundError(f"No config file {path!r}; recipes live in configs/ "
                                f"({', '.join(sorted(os.listdir(here))) if os.path.isdir(here) else 'see the README'}).")
    spec = importlib.util.spec_from_file_location("cbam_jax_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return validate(module.get_config())
