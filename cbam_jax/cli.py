"""The `cbam-jax` command: `cbam-jax SUBCOMMAND ...` (run `cbam-jax -h` for the list).

Each subcommand lives in its own module with two functions, `add_arguments(parser)` and
`run(args) -> int` (the exit code); they are imported only when used, so `cbam-jax convert`
does not pay for the training stack and vice versa.
"""

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("cbam_jax.convert.cli", "convert PyTorch checkpoints to Flax (and back with --to-torch)"),
    "eval": ("cbam_jax.training.evaluate", "evaluate a training workdir or a pretrained model on a dataset split"),
    "predict": ("cbam_jax.predict", "top-k classes of images with a pretrained model"),
    "attention": ("cbam_jax.visualize.command", "attention-map and Grad-CAM figures of images"),
    "export": ("cbam_jax.artifacts", "portable inference artifacts of a pretrained model (StableHLO, ONNX)"),
    "list-pretrained": ("cbam_jax.zoo", "the published pretrained weights cbam-jax can load by name"),
}


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the chosen subcommand; returns the exit code."""
    parser = argparse.ArgumentParser(prog="cbam-jax", description="CBAM and CBAM-ResNets in JAX/Flax.")
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    subparsers.required = True
    argv = sys.argv[1:] if argv is None else argv
    # Only the chosen subcommand's module is imported; the others are listed by name and help.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(sub)
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args))


if __name__ == "__main__":
    sys.exit(main())
