"""Train a CBAM-ResNet: `python train.py --config configs/default.py --workdir runs/default
[--config.batch_size=256 ...]`. The logic lives in cbam_jax.training.trainer.

A user mistake (a missing recipe, a typo in an override, a workdir that is a file, data that does
not fit the config, a resumed workdir of another recipe) ends with one line on stderr and exit
code 1 (2 for a wrong command line); see "When something goes wrong" in the README.
"""

import os
import sys

from cbam_jax.errors import MissingExtra, UserError, check_extra, describe_os_error, report

try:  # the training application's packages are an extra: say which, in one line, before importing them
    check_extra("train")
except MissingExtra as missing:
    sys.exit(report("train.py", missing))

from absl import app, flags, logging

PROGRAM = "train.py"
DEFAULT_RECIPE = "configs/default.py"
flags.DEFINE_string("workdir", "runs/default", "checkpoints, metrics.jsonl and TensorBoard events go here; "
                    "an existing run in it is resumed")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with --config (the recipe and its overrides); a mistake is one line."""
    from cbam_jax.training.config import config_from_flags

    try:
        config_from_flags(argv, flags.FLAGS, DEFAULT_RECIPE)
    except UserError as error:
        sys.exit(report(PROGRAM, error, exit_code=2))
    return argv[:1]


def main(argv: list[str]) -> int:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from cbam_jax.atomic import check_destination
    from cbam_jax.errors import OutputError
    from cbam_jax.training.config import validate
    from cbam_jax.training.trainer import format_summary, train_and_evaluate

    workdir = flags.FLAGS.workdir
    try:
        if not workdir:
            raise OutputError("--workdir is empty; give the folder for the run, e.g. --workdir runs/NAME.")
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise OutputError(f"--workdir {workdir}: is a file, not a folder; choose another --workdir.")
        check_destination(workdir, replace=True, option="--workdir")
        if flags.FLAGS.config.get("task") == "detection":  # detection recipes (configs/detection_*.py)
            from cbam_jax.detection import train as detection

            config = flags.FLAGS.config  # validated by detection.train_and_evaluate
            train_and_evaluate, format_summary = detection.train_and_evaluate, detection.format_summary
        else:
            config = validate(flags.FLAGS.config)
        summary = train_and_evaluate(config, workdir)
    except UserError as error:
        return report(PROGRAM, error)
    except FloatingPointError as error:  # the loss diverged: the message says what to change
        return report(PROGRAM, error, exit_code=1)
    except OSError as error:  # what the system refused (disk full, permissions): not a bug
        return report(PROGRAM, describe_os_error(error), exit_code=1)
    except (ValueError, ImportError) as error:
        # Checks of the libraries it calls that do not raise a UserError (yet). Other exceptions are
        # bugs and keep their traceback.
        return report(PROGRAM, error, exit_code=1)
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted; run the same command again to resume from the last checkpoint.",
              file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    from cbam_jax.host_memory import use_huge_pages

    use_huge_pages()  # restarts once with glibc's huge-page tunable on the CPU (cbam_jax/host_memory.py)
    app.run(main, flags_parser=parse_flags)
