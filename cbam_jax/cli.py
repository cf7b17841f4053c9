"""The `cbam-jax` command: `cbam-jax SUBCOMMAND ...` (run `cbam-jax -h` for the list).

Each subcommand lives in its own module with two functions, `add_arguments(parser)` and
`run(args) -> int` (the exit code); they are imported only when used, so `cbam-jax convert`
does not pay for the training stack and vice versa. A user mistake, raised as
`cbam_jax.errors.UserError` by the subcommand (or a wrong command line, found by argparse), is
reported here, once, as one line on stderr; anything else is a bug and keeps its traceback.
"""

import argparse
import importlib
import os
import sys

from cbam_jax.errors import UsageError, UserError, describe_os_error, report
from cbam_jax.host_memory import use_huge_pages

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("cbam_jax.convert_command", "convert PyTorch checkpoints to Flax (and back with --to-torch)"),
    "eval": ("cbam_jax.training.evaluate", "evaluate a training workdir or a pretrained model on a dataset split"),
    "predict": ("cbam_jax.predict", "top-k classes of images with a pretrained model"),
    "attention": ("cbam_jax.visualize.command", "attention-map and Grad-CAM figures of images"),
    "export": ("cbam_jax.artifacts", "portable inference artifacts of a pretrained model (StableHLO, ONNX)"),
    "list-pretrained": ("cbam_jax.zoo", "the published pretrained weights cbam-jax can load by name"),
    "detect": ("cbam_jax.detection.command", "boxes, classes and scores of images with a trained detector"),
    "summary": ("cbam_jax.summary", "parameters and MACs of a model per stage, attention's share"),
}

# Subcommands that run many CPU steps: worth a restart with glibc's huge-page tunable (~1 s).
RESTART_WITH_HUGE_PAGES = ("eval",)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a UsageError (one line) instead of usage text and a message."""

    def error(self, message: str):
        raise UsageError(f"{message.rstrip('.')} (see `{self.prog} -h`).")  # one sentence, one full stop


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the chosen subcommand; returns the exit code."""
    console = argv is None
    argv = sys.argv[1:] if console else argv
    if console:  # a file name that is not valid UTF-8 (kept by Python as surrogates) prints as its bytes
        sys.stdout.reconfigure(errors="surrogateescape")
    chosen = next((a for a in argv if not a.startswith("-")), None)  # the subcommand's name
    if console and chosen in RESTART_WITH_HUGE_PAGES:
        use_huge_pages()  # a console run of a long CPU job: once, before anything else (host_memory)
    program = "cbam-jax"
    try:
        parser = ArgumentParser(prog=program, description="CBAM and CBAM-ResNets in JAX/Flax.")
        subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=ArgumentParser)
        subparsers.required = True
        # Only the chosen subcommand's module is imported; the others are listed by name and help.
        modules = {}
        for name, (module_name, help_text) in SUBCOMMANDS.items():
            sub = subparsers.add_parser(name, help=help_text, description=help_text)
            if name == chosen:
                program = f"cbam-jax {name}"
                modules[name] = importlib.import_module(module_name)
                modules[name].add_arguments(sub)
        args = parser.parse_args(argv)
        return int(modules[args.command].run(args))
    except UserError as error:
        return report(program, error)
    except KeyboardInterrupt:
        print(f"{program}: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `cbam-jax list-pretrained | head -3`: the reader is gone, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:  # what the system refused (disk full, a file where a folder must be...): not a bug
        return report(program, describe_os_error(error), exit_code=1)


if __name__ == "__main__":
    sys.exit(main())
