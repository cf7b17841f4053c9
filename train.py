"""Train a CBAM-ResNet: `python train.py --config configs/default.py --workdir runs/default
[--config.batch_size=256 ...]`. The logic lives in cbam_jax.training.trainer."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/default.py", "training recipe (configs/NAME.py)", lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "checkpoints, metrics.jsonl and TensorBoard events go here; "
                    "an existing run in it is resumed")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; overrides look like --config.batch_size=256.")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from cbam_jax.training.trainer import format_summary, train_and_evaluate

    try:
        summary = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ValueError, FileNotFoundError, FloatingPointError, ImportError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    app.run(main)
